"""Progress sinks for long jobs: a tqdm bar, JSON lines for a parent process, a plain callback.

A long job (e.g. :func:`AnatSSLLib.engine.train`) calls its ``progress`` argument with event dicts::

    {"event": "progress", "step": 120, "total": 2000, "loss": 3.4, "lr": 0.001,
     "samples_per_s": 52.1, "eta_s": 310.0, ...}

``event`` is one of ``"start"``, ``"progress"``, ``"checkpoint"``, ``"done"``, ``"cancelled"``,
``"error"``. The sinks here turn these into a tqdm bar on the command line
(:class:`TqdmProgress`), one JSON object per line for a parent process such as the Slicer module
(:class:`JsonLinesProgress`, read back with :func:`parse_event`), or calls of a user function
(:class:`CallbackProgress`); :func:`combine` sends each event to several sinks and
:func:`make_progress` picks one by the name a ``--progress`` option gives.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

__all__ = [
    "EVENTS",
    "ProgressCallback",
    "TqdmProgress",
    "JsonLinesProgress",
    "CallbackProgress",
    "combine",
    "parse_event",
    "make_progress",
    "PROGRESS_KINDS",
]

EVENTS = ("start", "progress", "checkpoint", "done", "cancelled", "error")
# `anatssl pretrain --progress jsonl` ends with one {"event": "summary", "encoder_id": ...} line.
PARSED_EVENTS = EVENTS + ("summary",)
ProgressCallback = Callable[[dict[str, Any]], None]
_FINAL = ("done", "cancelled", "error")


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists, unknown objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    try:  # numpy / torch scalars
        return _clean(value.item())
    except (AttributeError, ValueError, TypeError):
        return str(value)


class JsonLinesProgress:
    """Write each event as one JSON object on its own line, flushed at once.

    Args:
        stream: a text stream; default ``sys.stdout`` (looked up at each call, so redirection works).

    Non-finite numbers are written as ``null`` (strict JSON). Thread-safe.

    Example::

        train(task, config, progress=JsonLinesProgress())
        # {"event": "progress", "step": 10, "total": 100, "loss": 0.52, ...}
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: Mapping[str, Any]) -> None:
        line = json.dumps(_clean(dict(event)), separators=(",", ":"), allow_nan=False)
        stream = self.stream if self.stream is not None else sys.stdout
        with self._lock:
            stream.write(line + "\n")
            stream.flush()


def parse_event(line: str | bytes) -> dict[str, Any] | None:
    """The event dict of one line written by :class:`JsonLinesProgress`, or None for other lines.

    A parent process reading a child's stdout gets ordinary log lines too; those (and any JSON
    that is not an object with a known ``"event"``) give None. The command line's closing
    ``"summary"`` line is recognised too.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("event") not in PARSED_EVENTS:
        return None
    return data


class TqdmProgress:
    """A tqdm bar over the steps, with loss and learning rate in its postfix.

    Args:
        desc: the bar's label.
        file: where tqdm writes (default ``sys.stderr``).
        disable: no bar (e.g. when not on a terminal); messages still go to ``file``.

    ``checkpoint``, ``cancelled`` and ``error`` events print one line above the bar.
    """

    def __init__(self, desc: str = "training", file: IO[str] | None = None, disable: bool | None = False) -> None:
        self.desc = desc
        self.file = file
        self.disable = disable
        self._bar: Any = None

    def _ensure(self, event: Mapping[str, Any]) -> Any:
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=event.get("total"), initial=int(event.get("step") or 0), desc=self.desc,
                unit="step", file=self.file if self.file is not None else sys.stderr,
                disable=self.disable, dynamic_ncols=True,
            )
        return self._bar

    def _write(self, text: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(text, file=self.file if self.file is not None else sys.stderr)

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        bar = self._ensure(event)
        step = event.get("step")
        if step is not None and step > bar.n:
            bar.update(int(step) - bar.n)
        if kind == "progress":
            post = {}
            if event.get("loss") is not None:
                post["loss"] = f"{event['loss']:.4g}"
            if event.get("lr") is not None:
                post["lr"] = f"{event['lr']:.2e}"
            bar.set_postfix(post, refresh=False)
        elif kind == "start" and event.get("resumed_from"):
            self._write(f"resuming from step {event['resumed_from']} ({event.get('checkpoint')})")
        elif kind == "checkpoint":
            self._write(f"checkpoint at step {step}: {event.get('path')}")
        elif kind == "cancelled":
            self._write(f"cancelled at step {step}; resume from {event.get('checkpoint')}")
        elif kind == "error":
            self._write(f"error at step {step}: {event.get('message')}")
        elif kind == "done" and event.get("encoder_id"):
            self._write(f"saved encoder {event['encoder_id']}")
        if kind in _FINAL:
            self.close()

    def close(self) -> None:
        """Close the bar (also done on ``done``, ``cancelled`` and ``error``)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CallbackProgress:
    """Call ``fn(event)``, at most every ``min_interval_s`` for ``"progress"`` events.

    Args:
        fn: the user function (e.g. one that updates a Slicer progress bar).
        min_interval_s: throttle for ``"progress"`` events; the other kinds always go through.
        events: only these kinds (default: all).
    """

    def __init__(
        self, fn: ProgressCallback, min_interval_s: float = 0.0, events: tuple[str, ...] | None = None
    ) -> None:
        if not callable(fn):
            raise TypeError(f"CallbackProgress: fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.min_interval_s = float(min_interval_s)
        self.events = events
        self._last = -math.inf

    def __call__(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        if self.events is not None and kind not in self.events:
            return
        if kind == "progress":
            now = time.monotonic()
            if now - self._last < self.min_interval_s:
                return
            self._last = now
        self.fn(dict(event))


def combine(*sinks: ProgressCallback | None) -> ProgressCallback:
    """One callback that passes each event to every non-None sink in turn."""
    active = [s for s in sinks if s is not None]

    def fanout(event: dict[str, Any]) -> None:
        for sink in active:
            sink(event)

    return fanout


PROGRESS_KINDS = ("tqdm", "jsonl", "none")


def make_progress(kind: str = "tqdm", stream: IO[str] | None = None, desc: str = "training") -> ProgressCallback | None:
    """The sink a command line's ``--progress`` option names.

    Args:
        kind: ``"tqdm"`` (a bar on stderr), ``"jsonl"`` (JSON lines on stdout, for a parent
            process such as the Slicer module) or ``"none"``.
        stream: where to write (default stderr for tqdm, stdout for jsonl).
        desc: the tqdm bar's label.

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "tqdm":
        return TqdmProgress(desc=desc, file=stream)
    if kind == "jsonl":
        return JsonLinesProgress(stream)
    if kind == "none":
        return None
    raise ValueError(f"progress kind must be one of {PROGRESS_KINDS}, got {kind!r}")
