"""The main-thread side of the tool worker process (:mod:`AnatSSLBridge.worker`).

:class:`ToolWorker` starts ``python -m AnatSSLBridge.worker`` with Slicer's own Python (the
interpreter pretraining runs with, :func:`AnatSSLBridge.jobs.default_python`) on first use and
keeps it for the session. It sends one request at a time (:meth:`ToolWorker.submit`) and hands
its end to ``finished(result, error)`` from :meth:`ToolWorker.poll`, which the module calls from a
``qt.QTimer``: the result arrives on the main thread, which alone reads and writes MRML nodes.

Why a process and not a thread: inside Slicer the main thread holds Python's GIL while it waits
in the Qt event loop, so a Python thread of Slicer's process advances only while the main thread
runs Python. Two small reader threads here only move the worker's output lines into queues (they
wait on I/O, which releases the GIL); no tool work runs in Slicer's process.

- Progress: ``fraction`` follows the worker's progress events.
- Cancel (:meth:`ToolWorker.cancel`): the worker is asked to stop at its next check; if it has not
  answered within ``cancel_grace_s`` (default 0.4 s, e.g. inside one long network call), its process
  tree is killed. Either way ``finished(None, TaskCancelled(...))`` is delivered within a second and
  nothing is written; a killed worker is started again, cold, by the next request.
- A crash or an out-of-memory kill of the worker: ``finished(None, WorkerCrashed(...))`` with the exit
  code and the last lines of its error output; the next request starts a new worker. Slicer keeps running.

No Qt and no MRML here: tested with the real worker process in pytest.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from AnatSSLLib.errors import InputError

from .jobs import TaskCancelled, default_python, kill_process_tree, library_root

__all__ = ["ToolWorker", "ToolRequest", "WorkerCrashed", "WorkerError", "VolumeFiles", "bridge_root"]


class WorkerCrashed(RuntimeError):
    """The worker process ended during a request (crash, or killed for lack of memory)."""


class WorkerError(RuntimeError):
    """A failure inside the worker that is not the user's input: carries the worker's traceback."""

    def __init__(self, message: str, type_name: str = "", traceback_text: str = "", oom: bool = False) -> None:
        super().__init__(message)
        self.type_name = type_name
        self.traceback_text = traceback_text
        self.oom = oom


def bridge_root() -> str:
    """The folder holding the ``AnatSSLBridge`` package (put on the worker's ``PYTHONPATH``)."""
    return str(Path(__file__).resolve().parent.parent)


class ToolRequest:
    """One request: its title, progress, and ``finished(result, error)`` (called by :meth:`ToolWorker.poll`)."""

    def __init__(self, rid: int, op: str, title: str, finished: Callable | None) -> None:
        self.id = rid
        self.op = op
        self.title = str(title)
        self.finished = finished
        self.fraction = 0.0
        self.stage = ""
        self.cancel_reason = ""
        self.cancel_deadline: float | None = None
        self.started = time.monotonic()
        self.note = ""

    @property
    def cancel_requested(self) -> bool:
        return bool(self.cancel_reason)


class ToolWorker:
    """One long-lived worker process, one request at a time.

    Args:
        python: the interpreter (default :func:`~AnatSSLBridge.jobs.default_python`: Slicer's).
        cancel_grace_s: how long a cancelled request may take to stop before the worker is killed.
        start_timeout_s: how long the worker may take to start (importing the library).
    """

    def __init__(self, python: str | None = None, *, cancel_grace_s: float = 0.4, start_timeout_s: float = 120.0) -> None:
        self.python = python or default_python()
        self.cancel_grace_s = float(cancel_grace_s)
        self.start_timeout_s = float(start_timeout_s)
        self.request: ToolRequest | None = None
        self.last_result_s: float | None = None
        self.last_note = ""  # the last answer's note (e.g. "the GPU ran out of memory; ... the CPU")
        self.last_device = ""  # the device the worker's last request ran on, in words
        self.last_worker_s = None  # seconds the worker spent on the last answered request
        self.starts = 0
        self._ids = itertools.count(1)
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue | None = None
        self._stderr: collections.deque = collections.deque(maxlen=40)
        self._ready = False
        self.pid: int | None = None
        self.modules: dict = {}
        self.folder = tempfile.mkdtemp(prefix="anatssl-worker-")

    # ---- state ------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.request is not None

    @property
    def fraction(self) -> float:
        return self.request.fraction if self.request is not None else 0.0

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        return [self.python, "-u", "-m", "AnatSSLBridge.worker"]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        for root in (bridge_root(), library_root()):
            if root not in parts:
                parts.insert(0, root)
        env["PYTHONPATH"] = os.pathsep.join(parts)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # ---- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker process (returns at once; requests queue until it is ready)."""
        if self.running:
            return
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group: a kill ends its children too
        self._events = queue.Queue()
        self._ready = False
        self._stderr.clear()
        self._process = subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.environment(),
            text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        self.starts += 1
        process, events = self._process, self._events
        threading.Thread(target=self._read_stdout, args=(process, events), name="anatssl-worker-out", daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(process,), name="anatssl-worker-err", daemon=True).start()

    def _read_stdout(self, process, events) -> None:
        for line in process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                events.put(json.loads(line))
            except ValueError:
                events.put({"event": "log", "text": line})
        events.put({"event": "exit", "returncode": process.wait()})

    def _read_stderr(self, process) -> None:
        for line in process.stderr:
            self._stderr.append(line.rstrip("\r\n"))

    def stderr_tail(self, n: int = 12) -> str:
        return "\n".join(list(self._stderr)[-n:])

    def kill(self) -> None:
        """Kill the worker's process tree now (its loaded encoders are lost)."""
        kill_process_tree(self._process)
        # no wait here: the reader thread reaps the process when its output closes

    def stop(self) -> None:
        """End the worker (closing the module or Slicer); a running request is dropped."""
        process = self._process
        if process is not None and process.poll() is None:
            try:
                process.stdin.write(json.dumps({"op": "shutdown"}) + "\n")
                process.stdin.flush()
                process.wait(timeout=3)
            except Exception:
                pass
            self.kill()
        self._process = None
        self.request = None
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- requests ---------------------------------------------------------------------------------
    def submit(self, op: str, args: dict, title: str, finished: Callable | None = None) -> ToolRequest:
        """Send one request; refused (:class:`InputError`) while another runs."""
        if self.request is not None:
            raise InputError(f"AnatSSL is still busy ({self.request.title.lower()}): wait until it has finished, "
                             "or press Cancel, then try again")
        if not self.running:
            self.start()
        request = ToolRequest(next(self._ids), op, title, finished)
        self._send({"id": request.id, "op": op, "args": args})
        self.request = request
        return request

    def _send(self, message: dict) -> None:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the worker is gone: poll() reports it from the exit event

    def cancel(self, reason: str = "cancelled") -> bool:
        """Ask the running request to stop (True if there was one); it is killed after ``cancel_grace_s``."""
        request = self.request
        if request is None:
            return False
        if not request.cancel_reason:
            request.cancel_reason = str(reason) or "cancelled"
            request.cancel_deadline = time.monotonic() + self.cancel_grace_s
            self._send({"op": "cancel", "id": request.id})
        return True

    def poll(self) -> bool:
        """Handle the worker's new events; True when the running request ended (its ``finished`` was called).

        Exceptions raised by ``finished`` propagate to the caller (the worker is already free again).
        """
        if self._events is None:
            return False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            kind = event.get("event")
            if kind == "ready":
                self._ready = True
                self.pid, self.modules = event.get("pid"), dict(event.get("modules") or {})
                continue
            if kind == "exit":
                return self._worker_exited(int(event.get("returncode") or 0))
            request = self.request
            if request is None or event.get("id") != request.id:
                continue  # the answer to a request already delivered (e.g. cancelled and killed)
            if kind == "progress":
                request.fraction = float(event.get("fraction") or 0.0)
                request.stage = str(event.get("stage") or "")
            elif kind == "result":
                request.note = self.last_note = str(event.get("note") or "")
                self.last_device = str(event.get("device") or self.last_device)
                self.last_worker_s = event.get("seconds")
                return self._deliver(request, event.get("result"), None)
            elif kind == "cancelled":
                return self._deliver(request, None, None)
            elif kind == "error":
                return self._deliver(request, None, _error_from(event))
        request = self.request
        if request is not None and request.cancel_deadline is not None and time.monotonic() > request.cancel_deadline:
            self.kill()  # the worker did not stop in time: the next request starts a fresh one
            self._events = None
            self._process = None
            return self._deliver(request, None, None)
        return False

    def _worker_exited(self, code: int) -> bool:
        self._events = None
        self._process = None
        request = self.request
        if request is None:
            return False
        if request.cancel_requested:
            return self._deliver(request, None, None)
        why = " (killed: out of memory?)" if code in (-9, 137) else ""
        tail = self.stderr_tail()
        error = WorkerCrashed(f"the AnatSSL worker process stopped during {request.title.lower()} with exit code "
                              f"{code}{why}; it starts again with the next request"
                              + (f". Its last output:\n{tail}" if tail else ""))
        return self._deliver(request, None, error)

    def _deliver(self, request: ToolRequest, result, error) -> bool:
        self.request = None
        if request.cancel_requested and (error is None or isinstance(error, TaskCancelled)):
            partial = result
            result, error = None, TaskCancelled(f"{request.title}: {request.cancel_reason}; nothing was changed")
            error.partial = partial  # what a request that stops between items had done (indexing)
        elif result is None and error is None:
            result, error = None, TaskCancelled(f"{request.title}: cancelled; nothing was changed")
        self.last_result_s = time.monotonic() - request.started
        if request.finished is not None:
            request.finished(result, error)
        return True

    def wait(self, timeout: float | None = None, interval: float = 0.02) -> bool:
        """Poll until the running request ends (batch use and tests); True when it was delivered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.request is not None:
            if self.poll():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(interval)
        return False

    def call(self, op: str, args: dict, title: str = "AnatSSL", timeout: float | None = None):
        """Submit and wait (batch use): the result, or the error raised."""
        box = {}
        self.submit(op, args, title, lambda result, error: box.update(result=result, error=error))
        if not self.wait(timeout):
            self.cancel("timed out")
            self.wait(5)
        if box.get("error") is not None:
            raise box["error"]
        return box.get("result")


def _error_from(event: dict) -> Exception:
    """The exception for an ``error`` event: the library's own type for a user error, else WorkerError."""
    message = str(event.get("message") or event.get("type") or "error")
    if event.get("user"):
        try:
            from AnatSSLLib import errors

            cls = getattr(errors, str(event.get("type")), None)
            if isinstance(cls, type) and issubclass(cls, errors.AnatSSLError):
                return cls(message)
        except Exception:
            pass
        return InputError(message)
    return WorkerError(message, str(event.get("type") or ""), str(event.get("traceback") or ""), bool(event.get("oom")))


class VolumeFiles:
    """Volumes written once for the worker: a file per (key), rewritten only when the key changes.

    ``key`` is what identifies the voxels and geometry (the module uses the node ID, the image
    data's modification time and the LPS geometry), so a second Propagate writes nothing.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._files: dict = {}  # slot -> (key, message)
        self._names = itertools.count()

    def message(self, slot: str, key, image, name: str | None = None) -> dict:
        """The message for ``image`` (an Image, or a callable returning one, called only when it must be
        written); ``key=None`` always writes."""
        from .worker import image_to_message

        known = self._files.get(slot)
        if key is not None and known is not None and known[0] == key and os.path.exists(known[1]["path"]):
            message = dict(known[1])
            if name is not None:
                message["name"] = str(name)
            return message
        path = known[1]["path"] if known is not None else os.path.join(self.folder, f"volume{next(self._names)}.npy")
        os.makedirs(self.folder, exist_ok=True)
        image = image() if callable(image) else image
        message = image_to_message(image, path)
        if name is not None:
            message["name"] = str(name)
        self._files[slot] = (key, message)
        return message
