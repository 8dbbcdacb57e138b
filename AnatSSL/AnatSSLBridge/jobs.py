"""Long work off the GUI thread: pretraining in a separate process, and the shared pieces of the tool worker.

The Slicer module runs every tool request (landmark propagation, indexing, search, cross-modality
segmentation) in one long-lived worker *process* (:mod:`AnatSSLBridge.workerclient`), never in a
Python thread of Slicer's process: Slicer's main thread holds the GIL while it waits in the Qt
event loop, so such a thread would advance only on timer ticks. :class:`TaskRunner` (a thread)
remains for batch scripts and tests that run the prepare / compute / write steps in one plain
Python process; the module does not use it. A cancelled run delivers :class:`TaskCancelled`,
never a result, so nothing is written.

:class:`PretrainJob` runs ``python -m AnatSSLLib.cli pretrain ... --progress jsonl`` in its own
process group. A reader thread parses every output line (:func:`AnatSSLLib.progress.parse_event`)
into a queue; :meth:`PretrainJob.poll` hands the new events to the caller (the module polls it
from a ``qt.QTimer``, so Slicer stays responsive). Lines that are not JSON events arrive as
``{"event": "log", "text": line}``; the end of the process arrives as
``{"event": "exit", "returncode": n}``.

:meth:`PretrainJob.cancel` first creates the cancel file (the run stops at the next step and writes
a checkpoint, exit code 3), then kills the whole process tree if it is still running after a
grace period. Running the same job again resumes from the checkpoint.

No Qt here: it is tested with a real short run in pytest.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from AnatSSLLib.errors import InputError

__all__ = ["BackgroundTask", "TaskRunner", "TaskCancelled", "PretrainJob", "describe_event", "default_python", "library_root", "EXIT_OK", "EXIT_CANCELLED", "EXIT_USER_ERROR"]

EXIT_OK, EXIT_USER_ERROR, EXIT_CANCELLED = 0, 2, 3



class TaskCancelled(InputError):
    """A run was cancelled (Cancel pressed, or the scene closed) before its result was written."""


class BackgroundTask:
    """``work(progress, cancelled)`` run in a daemon thread; ``fraction``, ``done``, ``result``, ``error`` are polled.

    Args:
        title: what the run does ("Propagating landmarks"), shown in messages.
        work: called in the thread with ``progress(fraction in [0, 1])`` and ``cancelled() -> bool``;
            it must not touch MRML nodes or Qt widgets.
        finished: called by :meth:`TaskRunner.poll` on the polling (main) thread as
            ``finished(result, error)``; ``error`` is ``None``, the exception the work raised, or
            :class:`TaskCancelled`.
    """

    def __init__(self, title: str, work: Callable, finished: Callable | None = None) -> None:
        self.title = str(title)
        self.work = work
        self.finished = finished
        self.fraction = 0.0
        self.cancel_reason = ""
        self.result = None
        self.error: BaseException | None = None
        self.done = False
        self._thread = threading.Thread(target=self._run, name=f"AnatSSL {title}", daemon=True)

    @property
    def cancel_requested(self) -> bool:
        return bool(self.cancel_reason)

    def start(self) -> None:
        self._thread.start()

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the work to stop at its next check; its result, if any, is dropped."""
        if not self.cancel_reason:
            self.cancel_reason = str(reason) or "cancelled"

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended."""
        self._thread.join(timeout)
        return self.done

    def _run(self) -> None:
        try:
            self.result = self.work(self._progress, lambda: self.cancel_requested)
        except BaseException as exc:  # handed to the main thread by TaskRunner.poll
            self.error = exc
        self.done = True

    def _progress(self, fraction: float) -> None:
        self.fraction = max(0.0, min(1.0, float(fraction)))


class TaskRunner:
    """At most one :class:`BackgroundTask` at a time; :meth:`poll` delivers its end on the calling thread."""

    def __init__(self) -> None:
        self.task: BackgroundTask | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None

    @property
    def fraction(self) -> float:
        return self.task.fraction if self.task is not None else 0.0

    def start(self, title: str, work: Callable, finished: Callable | None = None) -> BackgroundTask:
        """Start ``work`` in a thread; refused (:class:`InputError`) while another run is going."""
        if self.task is not None:
            raise InputError(f"AnatSSL is still busy ({self.task.title.lower()}): wait until it has finished, "
                             "or press Cancel, then try again")
        task = BackgroundTask(title, work, finished)
        self.task = task
        try:
            task.start()
        except Exception:
            self.task = None
            raise
        return task

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancel the running task (True if there was one)."""
        if self.task is None:
            return False
        self.task.cancel(reason)
        return True

    def poll(self) -> bool:
        """If the task has ended, forget it and call its ``finished``; True when that happened.

        A cancelled run is delivered as ``finished(None, TaskCancelled(...))`` even if its work completed.
        Exceptions raised by ``finished`` propagate to the caller (the runner is already free again).
        """
        task = self.task
        if task is None or not task.done:
            return False
        self.task = None
        result, error = task.result, task.error
        if task.cancel_requested and (error is None or isinstance(error, TaskCancelled)):
            result, error = None, TaskCancelled(f"{task.title}: {task.cancel_reason}; nothing was changed")
        if task.finished is not None:
            task.finished(result, error)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the task ends, then :meth:`poll` (batch use and tests); True when it was delivered."""
        task = self.task
        if task is None:
            return False
        if not task.join(timeout):
            return False
        return self.poll()


def default_python() -> str:
    """The Python that runs the job: Slicer's ``PythonSlicer`` when present, else this interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def library_root() -> str:
    """The folder holding the ``AnatSSLLib`` package (put on the job's ``PYTHONPATH``)."""
    import AnatSSLLib

    return str(Path(AnatSSLLib.__file__).resolve().parent.parent)


def describe_event(event: dict) -> str:
    """One readable log line for a job event (what the module's live log shows)."""
    kind = event.get("event")
    step, total, stage = event.get("step"), event.get("total"), event.get("stage") or "training"
    loss = event.get("loss")
    loss_text = f", loss {loss:.3f}" if isinstance(loss, (int, float)) else ""
    if kind == "start":
        return f"Started {stage}" + (f": {total} steps" if total else "") + (f" on {event['device']}" if event.get("device") else "")
    if kind == "progress":
        return f"{stage}: step {step} of {total}{loss_text}"
    if kind == "checkpoint":
        return f"{stage}: checkpoint saved at step {step} (a cancelled run resumes from here)"
    if kind == "done":
        return f"{stage}: finished after {step} steps{loss_text}"
    if kind == "cancelled":
        return f"{stage}: cancelled at step {step}; the checkpoint is kept"
    if kind == "error":
        return f"Error: {event.get('message') or event.get('error') or event}"
    if kind == "summary":
        return f"New encoder {event.get('encoder_id')} saved in the encoder cache" if event.get("encoder_id") else \
            "No encoder saved (the run was cancelled)"
    if kind == "exit":
        return f"Process ended (exit code {event.get('returncode')})"
    return str(event.get("text", event))



def kill_process_tree(process) -> None:
    """Kill ``process`` (a :class:`subprocess.Popen` started in its own process group) and its
    children now; nothing if it is None or has ended."""
    if process is None or process.poll() is not None:
        return
    try:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
        else:
            os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        process.kill()

class PretrainJob:
    """One pretraining run in a subprocess.

    Args:
        data: volume files or folders (``--data``); exactly one of ``data`` / ``population``.
        population: a population folder (``--population``).
        cache_dir: the encoder cache the new encoder is saved into.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        method: pretraining method (``"ld"``).
        ld_steps, pd_steps, batch_size, crop, spacing_mm: training settings (``None``: the CLI default).
        run_dir: checkpoint folder (``None``: the CLI derives one, so a second run resumes).
        name: label of the new cache entry.
        python: the interpreter (default :func:`default_python`).
        extra_args: more CLI arguments, appended as given.
    """

    def __init__(
        self,
        *,
        data: Sequence[str | os.PathLike] | None = None,
        population: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str = "auto",
        method: str = "ld",
        ld_steps: int | None = None,
        pd_steps: int | None = None,
        batch_size: int | None = None,
        crop: int | None = None,
        spacing_mm: float | None = None,
        run_dir: str | os.PathLike | None = None,
        name: str | None = None,
        python: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if (not data) == (population is None):
            raise InputError("pretraining data: give either volume files/folders or a population folder, not both or none")
        for value, what in ((ld_steps, "steps"), (batch_size, "batch size")):
            if value is not None and int(value) < 1:
                raise InputError(f"pretraining {what}: expected a positive whole number, got {value}")
        if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
            raise InputError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
        self.data = [str(p) for p in data] if data else None
        self.population = None if population is None else str(population)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.device = str(device)
        self.method = method
        self.settings = {"--ld-steps": ld_steps, "--pd-steps": pd_steps, "--batch-size": batch_size,
                         "--crop": crop, "--spacing": spacing_mm}
        self.run_dir = None if run_dir is None else str(run_dir)
        self.name = name
        self.python = python or default_python()
        self.extra_args = [str(a) for a in extra_args]
        self._work = tempfile.mkdtemp(prefix="anatssl-job-")
        self.cancel_file = os.path.join(self._work, "cancel")
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self.returncode: int | None = None
        self.summary: dict | None = None
        self.last_error: str | None = None
        self.cancel_requested = False

    @classmethod
    def from_recipe(cls, recipe: str, **kwargs) -> "PretrainJob":
        """A job running the named recipe of :mod:`AnatSSLLib.recipes` (its settings as CLI arguments).

        ``kwargs`` are the other arguments of the constructor (data, cache_dir, device, batch_size, name ...).
        """
        from AnatSSLLib.recipes import RECIPES

        if recipe not in RECIPES:
            raise InputError(f"pretraining recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")
        chosen = RECIPES[recipe]
        args = list(chosen.cli_args)
        method = chosen.method
        if "--method" in args:  # the job writes --method itself
            at = args.index("--method")
            method = args[at + 1]
            del args[at:at + 2]
        extra = list(kwargs.pop("extra_args", ()))
        return cls(method=method, extra_args=args + extra, **kwargs)

    # ---- command --------------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The full command line (a list, no shell)."""
        cmd = [self.python, "-m", "AnatSSLLib.cli", "pretrain", "--method", self.method]
        if self.population is not None:
            cmd += ["--population", self.population]
        else:
            cmd += ["--data", *self.data]
        for flag, value in self.settings.items():
            if value is not None:
                cmd += [flag, str(value)]
        cmd += ["--device", self.device, "--progress", "jsonl", "--cancel-file", self.cancel_file]
        if self.cache_dir is not None:
            cmd += ["--cache-dir", self.cache_dir]
        if self.run_dir is not None:
            cmd += ["--run-dir", self.run_dir]
        if self.name:
            cmd += ["--name", self.name]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The job's environment: this one, with the library on ``PYTHONPATH`` and unbuffered output."""
        env = dict(os.environ)
        root = library_root()
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            parts.insert(0, root)
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ---- life cycle -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def finished(self) -> bool:
        """True once :meth:`poll` has handed out the ``exit`` event, which the reader queues only after
        every output line: a process that has ended (``running`` False) may still have its summary
        and error lines waiting, so poll until ``finished``, not while ``running``."""
        return self.returncode is not None

    @property
    def encoder_id(self) -> str | None:
        """The new encoder's id, once the summary line has arrived."""
        return None if not self.summary else self.summary.get("encoder_id")

    def start(self) -> None:
        """Start the process and the reader thread (returns at once)."""
        if self._process is not None:
            raise InputError("this pretraining job was already started; create a new job to run again")
        if os.path.exists(self.cancel_file):
            os.remove(self.cancel_file)
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group: cancel kills the whole tree
        self._process = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.environment(), text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self._reader = threading.Thread(target=self._read, name="anatssl-pretrain-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        from AnatSSLLib.progress import parse_event

        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            try:
                event = parse_event(line)
            except Exception:  # a malformed line is shown as text, never kills the reader
                event = None
            if event is None:
                event = {"event": "log", "text": line}
            self._events.put(event)
        code = self._process.wait()
        self._events.put({"event": "exit", "returncode": code})

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never blocks)."""
        out = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            kind = event.get("event")
            if kind == "summary":
                self.summary = dict(event)
            elif kind == "error":
                self.last_error = str(event.get("message") or event.get("error") or event)
            elif kind == "exit":
                self.returncode = int(event["returncode"])
                self._cleanup()
            out.append(event)
        return out

    def wait(self, timeout: float | None = None) -> list[dict]:
        """Block until the process and its reader finish (tests, batch use); returns all pending events."""
        if self._process is None:
            raise InputError("the pretraining job was not started")
        self._process.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        return self.poll()

    def cancel(self, grace_s: float = 10.0) -> None:
        """Ask the run to stop (cancel file: checkpoint, exit 3); kill the process tree after ``grace_s``.

        Returns at once; the grace period runs in a background thread.
        """
        self.cancel_requested = True
        if not self.running:
            return
        Path(self.cancel_file).touch()
        threading.Thread(target=self._kill_after, args=(grace_s,), name="anatssl-pretrain-cancel", daemon=True).start()

    def kill(self) -> None:
        """Kill the whole process tree now (closing Slicer, or a run that ignores the cancel file)."""
        kill_process_tree(self._process)

    def _kill_after(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not self.running:
                return
            time.sleep(0.1)
        self.kill()

    def _cleanup(self) -> None:
        shutil.rmtree(self._work, ignore_errors=True)
