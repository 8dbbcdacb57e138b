"""The tool worker process: landmark propagation, segmentation transfer, indexing and search.

Run as ``python -m AnatSSLBridge.worker`` (Slicer's own Python, started by
:class:`AnatSSLBridge.workerclient.ToolWorker`). It imports the library only, never ``slicer``,
``vtk`` or ``qt``: it reads no MRML node. It lives as long as the Slicer session and keeps what it
loaded (encoders, embedding stores, dense correspondences, the search index) between requests, so
a second Propagate or Search costs what it costs in a running CLI session.

Protocol (one JSON object per line, UTF-8):

- requests on stdin: ``{"id": n, "op": OP, "args": {...}}``; ``{"op": "cancel", "id": n}`` asks
  request ``n`` to stop at its next check; ``{"op": "shutdown"}`` ends the process.
- events on stdout: ``{"event": "ready", "pid", "modules"}`` once, then per request
  ``{"event": "progress", "id", "fraction", "stage"}``, and one of ``{"event": "result", "id",
  "result", "note", "device", "seconds"}`` (``seconds``: the time the worker spent on it), ``{"event": "error", "id", "type", "message", "user", "oom", "traceback"}``
  or ``{"event": "cancelled", "id"}``.

Volumes arrive as files (:func:`image_from_message`: an ``.npy`` array indexed ``[k, j, i]`` with
its LPS spacing, origin and direction in the message); label images go back the same way. The
library's own prints and warnings go to stderr, so stdout carries the protocol only.

Ops: ``ping``, ``landmarks``, ``segment``, ``index_add``, ``index_open``, ``index_save``,
``index_info``, ``index_clear``, ``search``, ``reset`` (drop every loaded encoder); for tests,
``crash`` (exit at once with a code, as an out-of-memory kill would) and ``sleep`` (a long request).
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import traceback

import numpy as np

__all__ = ["image_to_message", "image_from_message", "WorkerState", "main"]


# ---- images as files ------------------------------------------------------------------------------
def image_to_message(image, path: str) -> dict:
    """Write ``image``'s voxels to ``path`` (``.npy``) and return the message that describes it."""
    tmp = path + ".tmp.npy"
    np.save(tmp, np.ascontiguousarray(image.array))
    os.replace(tmp, path)
    return {"path": str(path), "spacing": list(map(float, image.spacing)), "origin": list(map(float, image.origin)),
            "direction": np.asarray(image.direction, dtype=float).reshape(-1).tolist(), "name": str(image.name)}


def image_from_message(message: dict):
    """The :class:`AnatSSLLib.image.Image` a message from :func:`image_to_message` describes."""
    from AnatSSLLib.image import Image

    array = np.load(message["path"], allow_pickle=False)
    nd = array.ndim
    return Image(array, tuple(message["spacing"]), tuple(message["origin"]),
                 np.asarray(message["direction"], dtype=float).reshape(nd, nd), message.get("name") or "image")


class _Cancelled(Exception):
    pass


# ---- state kept between requests ------------------------------------------------------------------
class WorkerState:
    """Everything the worker keeps between requests, keyed by (cache folder, encoder, device, ...)."""

    def __init__(self) -> None:
        self.encoders: dict = {}
        self.stores: dict = {}
        self.propagators: dict = {}
        self.segmenters: dict = {}
        self.searches: dict = {}
        self.index = None
        self.images: dict = {}  # path -> (mtime, Image), the last few volumes read
        self.device_description = ""  # the device of the last encoder used, in words

    # -- files
    def image(self, message: dict):
        path = message["path"]
        stat = os.stat(path)
        mtime = (stat.st_mtime_ns, stat.st_size)
        cached = self.images.get(path)
        if cached is not None and cached[0] == mtime and cached[1].name == message.get("name", cached[1].name):
            return cached[1]
        image = image_from_message(message)
        self.images[path] = (mtime, image)
        while len(self.images) > 16:
            self.images.pop(next(iter(self.images)))
        return image

    # -- encoders
    def encoder(self, args: dict, device: str):
        from AnatSSLLib.cache import EncoderCache
        from AnatSSLLib.encoders import load_encoder

        key = (args.get("cache_dir") or "", args.get("encoder") or "", device)
        if key not in self.encoders:
            cache = EncoderCache(args.get("cache_dir") or None)
            self.encoders[key] = load_encoder(args.get("encoder") or None, cache=cache, device=device)
        try:
            from AnatSSLLib.device import describe_device

            self.device_description = describe_device(self.encoders[key].device)
        except Exception:
            self.device_description = str(self.encoders[key].device)
        return self.encoders[key]

    def store(self, args: dict, device: str, whiten: bool):
        from AnatSSLLib.embedding import EmbeddingStore

        key = (args.get("cache_dir") or "", args.get("encoder") or "", device, bool(whiten))
        if key not in self.stores:
            self.stores[key] = EmbeddingStore(self.encoder(args, device), whiten=whiten)
        return self.stores[key]

    def propagator(self, args: dict, device: str):
        from .landmarks import LandmarkPropagator

        contrast = str(args.get("contrast") or "auto")
        key = (args.get("cache_dir") or "", args.get("encoder") or "", device, contrast)
        if key not in self.propagators:
            self.propagators[key] = LandmarkPropagator(self.store(args, device, whiten=True),
                                                       **contrast_options(contrast))
        propagator = self.propagators[key]
        propagator.low_confidence = float(args.get("low_confidence", 0.5))
        return propagator

    def segmenter(self, args: dict, device: str):
        from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

        contrast = str(args.get("contrast") or "auto")
        key = (args.get("cache_dir") or "", args.get("encoder") or "", device, contrast)
        if key not in self.segmenters:
            self.segmenters[key] = CrossModalitySegmenter(self.store(args, device, whiten=True),
                                                          **contrast_options(contrast))
        return self.segmenters[key]

    def search(self, args: dict, device: str):
        from AnatSSLLib.tools.search import EmbeddingSearch

        key = (args.get("cache_dir") or "", args.get("encoder") or "", device)
        if key not in self.searches:
            self.searches[key] = EmbeddingSearch(self.store(args, device, whiten=False))
        return self.searches[key]

    def reset(self) -> None:
        self.encoders.clear()
        self.stores.clear()
        self.propagators.clear()
        self.segmenters.clear()
        self.searches.clear()
        self.images.clear()

    def index_info(self) -> dict:
        if self.index is None:
            return {"encoder_id": None, "volumes": [], "entries": 0}
        return {"encoder_id": self.index.encoder_id, "volumes": list(self.index.volume_names()),
                "entries": int(len(self.index))}


def contrast_options(contrast: str) -> dict:
    """Keyword arguments for a tool's constructor from the user's contrast choice: ``"auto"``
    passes nothing (the tool's default decides per target), ``"same"`` / ``"match"`` go in as
    ``contrast=``."""
    from AnatSSLLib.contrast import check_contrast_choice

    contrast = check_contrast_choice(str(contrast or "auto"))
    return {} if contrast == "auto" else {"contrast": contrast}


# ---- the ops ------------------------------------------------------------------------------------
def _points_from(args: dict):
    from AnatSSLLib.points import PointSet

    return PointSet(list(args["labels"]), np.asarray(args["positions"], dtype=float).reshape(-1, 3))


def op_landmarks(state: WorkerState, args: dict, device: str, progress, cancelled):
    propagator = state.propagator(args, device)
    targets = [(t["tag"], state.image(t["image"])) for t in args["targets"]]
    plan = {"reference": state.image(args["reference"]), "points": _points_from(args), "targets": targets}
    computed = propagator.compute(plan, progress=progress, cancelled=cancelled)
    return {"targets": [{"tag": tag, "labels": list(found.labels), "positions": np.asarray(found.positions).tolist(),
                         "confidence": np.asarray(found.confidence, dtype=float).tolist(), "recomputed": list(todo)}
                        for tag, found, todo in computed],
            "low_confidence": propagator.low_confidence}


def op_segment(state: WorkerState, args: dict, device: str, progress, cancelled):
    from .segmentation import TransferPlan, compute_transfer

    plan = TransferPlan(scene=None, reference_volume_node=None, reference_segmentation_node=None,
                        target_volume_node=None, output_segmentation_node=None,
                        reference=state.image(args["reference"]), labels=state.image(args["labels"]),
                        target=state.image(args["target"]), segments=[], value_of=dict(args["value_of"]),
                        target_name=str(args.get("target_name") or ""))
    result = compute_transfer(state.segmenter(args, device), plan, progress=progress, cancelled=cancelled)
    out = image_to_message(result.labels, os.path.join(args["out_dir"], "labels.npy"))
    return {"labels": out, "counts": result.counts}


def op_index_add(state: WorkerState, args: dict, device: str, progress, cancelled):
    from AnatSSLLib.errors import InputError

    search = state.search(args, device)
    if state.index is None or state.index.encoder_id != search.encoder_id:
        state.index = search.new_index()
    items = list(args.get("volumes") or [])
    if args.get("folder"):
        from AnatSSLLib.datasets import find_volumes

        paths = [str(p) for p in find_volumes([args["folder"]], None)]
        if not paths:
            raise InputError(f"no volume files found in {args['folder']}")
        items = [{"file": p} for p in paths]
    added = []
    for n, item in enumerate(items):
        if cancelled():
            break
        if "file" in item:
            search.add(state.index, [item["file"]])
            added.append(state.index.volume_names()[-1])
        else:
            name = item["name"]
            if name in state.index.volume_names():
                state.index.remove_volume(name)
            search.add(state.index, [state.image(item["image"])], names=[name])
            added.append(name)
        progress((n + 1) / len(items))
    _warm_index(state.index)
    return {"added": added, "cancelled": bool(cancelled()), "index": state.index_info()}


def _warm_index(index) -> None:
    """Build the index's search structure now (FAISS builds it on the first search: tens of seconds for
    an HNSW index of a few volumes on a CPU), so that it is part of indexing, not of the first Search."""
    if index is not None and len(index):
        index.search_vectors(np.zeros((1, index.dim), dtype=np.float32), 1)


def op_index_open(state: WorkerState, args: dict, device: str, progress, cancelled):
    from AnatSSLLib.index import EmbeddingIndex

    state.index = EmbeddingIndex.open(args["folder"])
    _warm_index(state.index)
    return {"index": state.index_info()}


def op_index_save(state: WorkerState, args: dict, device: str, progress, cancelled):
    from AnatSSLLib.errors import InputError

    if state.index is None:
        raise InputError("there is no index to save: build one first")
    return {"path": str(state.index.save(args["folder"])), "index": state.index_info()}


def op_search(state: WorkerState, args: dict, device: str, progress, cancelled):
    from .search import SearchQuery, run_query

    search = state.search(args, device)
    image = state.image(args["image"])
    if cancelled():
        raise _Cancelled()
    query = SearchQuery(args["kind"], None, image,
                        point_lps=None if args.get("point_lps") is None else np.asarray(args["point_lps"], float),
                        mask=state.image(args["mask"]) if args.get("mask") else None)
    hits = run_query(search, state.index, query, k=int(args.get("k", 10)))
    progress(1.0)
    return {"hits": [{"volume": h.volume, "position": None if h.position is None else np.asarray(h.position).tolist(),
                      "score": float(h.score), "path": str(h.path or "")} for h in hits]}


OPS = {"landmarks": op_landmarks, "segment": op_segment, "index_add": op_index_add, "index_open": op_index_open,
       "index_save": op_index_save, "search": op_search}


# ---- the loop -----------------------------------------------------------------------------------
class _Server:
    def __init__(self, out) -> None:
        self.out = out
        self.lock = threading.Lock()
        self.state = WorkerState()
        self.requests: queue.Queue = queue.Queue()
        self.cancelled: set = set()

    def send(self, event: dict) -> None:
        line = json.dumps(event, allow_nan=True)
        with self.lock:
            self.out.write(line + "\n")
            self.out.flush()

    def read_stdin(self, stream) -> None:
        """Reader thread: cancels take effect at once, everything else queues for the main loop."""
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError:
                self.send({"event": "log", "text": f"ignored a malformed request line: {line[:200]}"})
                continue
            if message.get("op") == "cancel":
                self.cancelled.add(message.get("id"))
            else:
                self.requests.put(message)
        os._exit(0)  # stdin closed: Slicer is gone (or the client stopped us); do not finish a running request

    def run_one(self, message: dict) -> None:
        from AnatSSLLib.errors import AnatSSLError

        rid, op, args = message.get("id"), message.get("op"), dict(message.get("args") or {})
        if op == "ping":
            loaded = {"encoders": len(self.state.encoders), "stores": len(self.state.stores),
                      "embedded": sum(len(s._volumes) for s in self.state.stores.values())}
            self.send({"event": "result", "id": rid, "note": "",
                       "result": {"pid": os.getpid(), "modules": _loaded_gui_modules(), "loaded": loaded}})
            return
        if op == "crash":  # tests: die as an out-of-memory kill would
            os._exit(int(args.get("code", 137)))
        if op == "sleep":  # tests: a long request, checking cancel (cooperative) or not (one long call)
            import time

            end = time.monotonic() + float(args.get("seconds", 1.0))
            while time.monotonic() < end:
                if args.get("cooperative") and rid in self.cancelled:
                    self.cancelled.discard(rid)
                    self.send({"event": "cancelled", "id": rid})
                    return
                time.sleep(0.05 if args.get("cooperative") else float(args.get("seconds", 1.0)))
            self.send({"event": "result", "id": rid, "result": {"slept": True}, "note": ""})
            return
        if op == "reset":
            self.state.reset()
            self.send({"event": "result", "id": rid, "result": {}, "note": ""})
            return
        if op == "index_info":
            self.send({"event": "result", "id": rid, "result": {"index": self.state.index_info()}, "note": ""})
            return
        if op == "index_clear":
            self.state.index = None
            self.send({"event": "result", "id": rid, "result": {"index": self.state.index_info()}, "note": ""})
            return
        if op not in OPS:
            self.send({"event": "error", "id": rid, "type": "InputError", "message": f"unknown worker op {op!r}",
                       "user": True, "oom": False, "traceback": ""})
            return

        def cancelled() -> bool:
            return rid in self.cancelled

        def progress(fraction: float, stage: str = "") -> None:
            if cancelled():  # the library calls back between its steps: stop there
                raise _Cancelled()
            self.send({"event": "progress", "id": rid, "fraction": max(0.0, min(1.0, float(fraction))), "stage": stage})

        import time

        device, note, began = str(args.get("device") or "auto"), "", time.monotonic()
        try:
            try:
                result = OPS[op](self.state, args, device, progress, cancelled)
            except Exception as exc:
                if device == "cpu" or not _is_oom(exc) or cancelled():
                    raise
                _empty_cuda_cache()
                note = "The GPU ran out of memory; this run used the CPU instead."
                result = OPS[op](self.state, args, "cpu", progress, cancelled)
            if cancelled() and op != "index_add":
                raise _Cancelled()
        except BaseException as exc:  # every failure is answered; the worker keeps running
            if cancelled() or isinstance(exc, _Cancelled) or type(exc).__name__ == "TaskCancelled":
                self.send({"event": "cancelled", "id": rid})
            else:
                self.send({"event": "error", "id": rid, "type": type(exc).__name__, "message": str(exc),
                           "user": isinstance(exc, AnatSSLError), "oom": _is_oom(exc),
                           "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))})
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        finally:
            self.cancelled.discard(rid)
        self.send({"event": "result", "id": rid, "result": result, "note": note,
                   "device": self.state.device_description, "seconds": round(time.monotonic() - began, 3)})

    def loop(self) -> None:
        while True:
            message = self.requests.get()
            if message.get("op") == "shutdown":
                return
            self.run_one(message)


def _is_oom(exc: BaseException) -> bool:
    try:
        from AnatSSLLib.device import is_out_of_memory

        return bool(is_out_of_memory(exc))
    except Exception:
        return "out of memory" in str(exc).lower()


def _empty_cuda_cache() -> None:
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:
        pass


def _loaded_gui_modules() -> dict:
    """Which of slicer, vtk, qt this process has imported (none should be)."""
    return {name: name in sys.modules for name in ("slicer", "vtk", "qt", "PythonQt")}


def main() -> int:
    # stdout carries the protocol only: keep a private copy of it, and send fd 1 (C-level prints,
    # print() in the library) to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    server = _Server(out)
    reader = threading.Thread(target=server.read_stdin, args=(sys.stdin,), name="anatssl-worker-stdin", daemon=True)
    reader.start()
    server.send({"event": "ready", "pid": os.getpid(), "modules": _loaded_gui_modules()})
    server.loop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
