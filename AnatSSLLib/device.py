"""Choosing the compute device and its mixed precision.

``resolve_device`` turns a user's choice (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"gpu"``)
into a ``torch.device`` with a clear error when CUDA is asked for but missing; ``autocast`` gives
bf16 (or fp16 on older GPUs) mixed precision on CUDA and does nothing on CPU; ``describe_device``
names the device for progress messages and the Slicer panel.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["DEVICE_CHOICES", "resolve_device", "autocast", "autocast_dtype", "describe_device",
           "is_out_of_memory"]

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "gpu", "gpu:N")
_CUDA_RE = re.compile(r"^(?:cuda|gpu)(?::(\d+))?$")


def _no_cuda_reason() -> str:
    import torch

    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) was built without CUDA"
    return "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for a user's choice.

    Args:
        choice: ``"auto"`` (CUDA if available, else CPU; also None or ""), ``"cpu"``,
            ``"cuda"``/``"gpu"`` (the current CUDA device), ``"cuda:N"``/``"gpu:N"``, or a
            ``torch.device``. Case and surrounding spaces are ignored.

    Raises:
        InputError: an unknown choice, or CUDA asked for but not available (the message says why
            and suggests ``cpu``).
    """
    import torch

    if isinstance(choice, torch.device):
        choice = str(choice)
    if choice is None:
        choice = "auto"
    if not isinstance(choice, str):
        raise InputError(
            f"device {choice!r}: expected one of {', '.join(DEVICE_CHOICES)}, got {type(choice).__name__}"
        )
    text = choice.strip().lower() or "auto"
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.match(text)
    if match is None:
        raise InputError(f"device {choice!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        raise InputError(f"device {choice!r}: CUDA was asked for, but {_no_cuda_reason()}; use --device cpu")
    if match.group(1) is None:
        return torch.device("cuda")
    index = int(match.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        raise InputError(
            f"device {choice!r}: expected a CUDA index from 0 to {count - 1} ({count} GPU(s) visible)"
        )
    return torch.device("cuda", index)


def autocast_dtype(device: str | torch.device) -> torch.dtype | None:
    """The mixed-precision dtype ``autocast`` uses on ``device``: bf16 if supported, else fp16; None on CPU."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    with torch.cuda.device(dev):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: str | torch.device, enabled: bool = True) -> Iterator[None]:
    """Mixed precision on CUDA (bf16, or fp16 where bf16 is unsupported); a no-op on CPU.

    Example::

        with autocast(device):
            embeddings = encoder(batch)   # B,C,D,H,W computed in bf16 on CUDA, float32 on CPU
    """
    import torch

    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield


def describe_device(device: str | torch.device) -> str:
    """A short human description, e.g. ``"CPU (2 threads)"`` or ``"NVIDIA H100 80GB HBM3, 79 GB (cuda:0)"``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cpu":
        return f"CPU ({torch.get_num_threads()} threads)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{dev} (CUDA not available)"
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GB (cuda:{index})"
    return str(dev)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a CUDA (or CPU allocator) out-of-memory error, so a caller can retry smaller or on CPU."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
