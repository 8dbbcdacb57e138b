"""The training engine shared by every pretraining method (LD, Alice, AWCL).

A method supplies a :class:`TrainingTask` (its network, its loss and a deterministic batch
sampler); :func:`train` runs it: optimizer and learning-rate schedule, mixed precision on CUDA,
checkpoints every N steps with resume after a kill, cancel from another thread or process,
progress events, deterministic seeds, multi-GPU / multi-node data parallelism under ``torchrun``,
and at the end the encoder saved into the :class:`~AnatSSLLib.cache.EncoderCache` with its
manifest.

Determinism contract. The batch of step ``s`` (0-based) is made from a ``torch.Generator`` seeded
from ``(config.seed, s)`` only, identical on every rank. The task draws the random choices of the
whole *global* batch from it and returns the rows of its rank (:func:`batch_shard`). Hence:

- a run killed and resumed from its checkpoint sees exactly the batches an uninterrupted run sees,
  and with the global RNG states restored from the checkpoint its loss curve is the same (to float
  round-off, ~1e-6 on CPU);
- a run on N processes with the same global ``batch_size`` sees the same samples per step as one
  process; the task's loss must be a *mean* over the batch so that DDP's averaged gradient equals
  the one-process gradient. Layers with per-batch statistics (BatchNorm) break that equality on
  CPU: on CUDA they are converted to ``SyncBatchNorm`` (``config.sync_batchnorm``); on CPU/gloo
  each rank keeps its own statistics (prefer Instance/Group norm, as MONAI's nets allow).

Multi-process runs. Launched by ``torchrun`` (environment ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``) with ``WORLD_SIZE > 1``, :func:`train` initialises ``torch.distributed`` (NCCL on
CUDA, gloo on CPU) unless it is already initialised, wraps the model in
``DistributedDataParallel`` and splits the global batch evenly over the ranks. Only rank 0 writes
checkpoints, progress events and the cache entry; the loss it reports is the mean over ranks; the
others wait for it in a collective with the group's timeout (:func:`dist_timeout_s`). A run of
several stages (LD's PD then LD) wraps them in one :func:`distributed` block, so that the group is
set up once. A rank that fails leaves its error in the launcher's store; the others, whose next
collective fails, stop with that error (:class:`PeerFailure`) instead of waiting.
A task's ``loss(model, batch)`` receives the DDP-wrapped model: it must run the forward pass
through ``model(...)`` (DDP synchronises gradients through that call) and may reach the
underlying network with :func:`unwrap_model`.

Checkpoints (``<checkpoint_dir>/checkpoint.pt``) are written atomically (temporary file, then
``os.replace``) and hold only tensors and plain Python values, so they load with
``torch.load(weights_only=True)`` (no arbitrary unpickling): model, optimizer, AMP scaler, step,
loss history, RNG states of every rank, the config and the task's manifest fields. The learning
rate schedule is a pure function of the step (:func:`lr_factor`), so the step restores it. A run
resumes only from a checkpoint of the same trajectory settings and task (else
:class:`CheckpointMismatch`, an InputError that lists each setting that differs); it may resume
with another number of processes, since the data of a step do not depend on it.

Continuing a run. The step budget (``steps`` or ``epochs`` x ``steps_per_epoch``, and
``warmup_steps``) is not part of what makes a checkpoint another run's: the same run asked for
more steps continues from its last checkpoint (the ``start`` event says ``resumed`` and from
which step), and one asked for fewer steps than its checkpoint has done is refused. The learning
rate stays a function of the step and of the config of the call: with the ``constant`` and
``step`` schedules and no warm-up change it does not depend on the budget, so a run continued
from 20 to 30 steps trains exactly as one started with 30 (same loss curve); with ``cosine`` (or
a warm-up that scales with the budget) the continued steps follow the longer run's curve from the
step resumed at on, so the rate jumps up there to where the longer schedule is, and the run is not
the same as one started with the longer budget. A task whose own schedules depend on the budget
(Alice's teacher momentum and temperature) behaves the same way.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from . import __version__
from .device import autocast, autocast_dtype, resolve_device
from .errors import AnatSSLError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from .cache import EncoderCache

__all__ = [
    "TrainingTask",
    "TrainingConfig",
    "TrainingResult",
    "CancelToken",
    "OptimizerName",
    "ScheduleName",
    "train",
    "lr_factor",
    "batch_shard",
    "step_generator",
    "derive_seed",
    "seed_everything",
    "unwrap_model",
    "load_checkpoint",
    "checkpoint_path",
    "CHECKPOINT_NAME",
    "CHECKPOINT_FORMAT",
    "CheckpointMismatch",
    "DistInfo",
    "PeerFailure",
    "distributed",
    "share_from_rank0",
    "barrier",
    "dist_timeout_s",
    "verify_identity",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
_PROGRESS_MIN_INTERVAL_S = 5.0
# A stop signal repeated within this many seconds is the same one delivered twice (Ctrl-C reaches a
# torchrun worker from the terminal and from torchrun, which passes it on).
_REPEAT_WINDOW_S = 1.0


# ------------------------------------------------------------------------------------ the protocol


@runtime_checkable
class TrainingTask(Protocol):
    """What a pretraining method gives the engine.

    Required methods:

    - ``build_model() -> nn.Module``: a freshly initialised network (the engine seeds the RNGs
      first, so the initialisation is reproducible).
    - ``loss(model, batch) -> (loss, metrics)``: a scalar tensor, the *mean* over the batch, and
      a dict of floats to report (may be empty). ``model`` may be DDP-wrapped: call ``model(...)``
      for the forward pass; use :func:`unwrap_model` to reach other attributes.
    - ``make_batch(step, generator, *, rank, world_size, batch_size) -> batch``: the batch of
      0-based ``step`` for this rank, on the CPU (tensors, or dicts/lists/tuples of tensors; the
      engine moves them to the device). ``generator`` is seeded from (seed, step) alone and is the
      same on every rank: draw the choices of the whole global batch of ``batch_size`` samples
      from it, then return this rank's rows ``batch_shard(batch_size, rank, world_size)``.
    - ``manifest_fields() -> dict``: ``method``, ``architecture``, ``architecture_params``,
      ``embedding_dim``, ``spatial_dims``, ``spacing`` (mm, x,y[,z]), ``intensity``,
      ``data_fingerprint`` (and optionally ``description``), as in
      :class:`~AnatSSLLib.cache.EncoderManifest`. Also used to check that a checkpoint belongs
      to this task before resuming from it.

    Optional:

    - ``export_state(model) -> dict[str, Tensor]``: the part of the trained network to cache (the
      encoder); ``model`` is unwrapped. Default: ``model.state_dict()``.
    - ``after_step(model, step)``: called after every optimiser step with the unwrapped model and
      the number of steps done (e.g. an EMA teacher update).
    """

    def build_model(self) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def make_batch(
        self, step: int, generator: torch.Generator, *, rank: int, world_size: int, batch_size: int
    ) -> Any: ...

    def manifest_fields(self) -> dict[str, Any]: ...


# -------------------------------------------------------------------------------------- the config


class OptimizerName(str, enum.Enum):
    """Optimizers :func:`train` can build."""

    ADAM = "adam"
    ADAMW = "adamw"
    SGD = "sgd"


class ScheduleName(str, enum.Enum):
    """Learning-rate schedules (after the linear warm-up)."""

    CONSTANT = "constant"
    COSINE = "cosine"
    STEP = "step"


# Fields that do not change the trajectory: a checkpoint matches a config if all others agree.
_NON_TRAJECTORY_FIELDS = frozenset(
    {"checkpoint_every", "checkpoint_dir", "device", "log_every", "resume", "deterministic",
     "find_unused_parameters", "prefetch"}
)


@dataclass
class TrainingConfig:
    """Settings of one training run.

    Args:
        steps: total optimizer steps; or give ``epochs`` and ``steps_per_epoch`` instead.
        epochs, steps_per_epoch: the budget as epochs x steps per epoch (``steps`` must be None).
        batch_size: global batch size (split evenly over the ranks of a multi-process run).
        lr: peak learning rate.
        weight_decay: L2 (adam, sgd) or decoupled (adamw) weight decay.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum.
        betas: Adam/AdamW betas.
        schedule: ``"constant"``, ``"cosine"`` (to ``min_lr_ratio * lr`` at the last step) or
            ``"step"`` (multiply by ``gamma`` every ``step_size`` steps: LD's "halve every N" is
            ``gamma=0.5``).
        step_size, gamma: for ``schedule="step"``.
        min_lr_ratio: final learning rate of the cosine schedule, as a fraction of ``lr``.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr`` over these steps.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        amp: mixed precision: None (auto) turns it on for CUDA; always off on the CPU.
        seed: seeds Python, numpy and torch, and the batch of every step.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (slower on CUDA).
        checkpoint_every: write a checkpoint every this many steps (0: only on cancel and at the end).
        checkpoint_dir: folder of the checkpoint; None: no checkpoints (a cancel then loses the run).
        resume: continue from a matching checkpoint in ``checkpoint_dir`` (False: start over).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ... (under torchrun on CUDA each
            rank uses ``cuda:LOCAL_RANK``).
        log_every: emit a progress event every this many steps (and at least every 5 s).
        prefetch: batches made ahead in a background thread while the network trains (0: none).
        sync_batchnorm: convert BatchNorm to SyncBatchNorm in multi-process CUDA runs.
        find_unused_parameters: passed to DistributedDataParallel. None (auto) means True: a
            task may leave parameters without gradient (LD's "pd" stage leaves its cluster head
            untouched), which plain DDP refuses; False saves a graph traversal per step.

    Raises:
        InputError: a value out of range or an unknown option name.
    """

    steps: int | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: OptimizerName | str = OptimizerName.ADAM
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: ScheduleName | str = ScheduleName.CONSTANT
    step_size: int = 1000
    gamma: float = 0.5
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None
    amp: bool | None = None
    seed: int = 0
    deterministic: bool = False
    checkpoint_every: int = 500
    checkpoint_dir: str | Path | None = None
    resume: bool = True
    device: str = "auto"
    log_every: int = 10
    prefetch: int = 1
    sync_batchnorm: bool = True
    find_unused_parameters: bool | None = None

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> InputError:
            return InputError(
                f"training config: {name} must be {expected}, got {getattr(self, name)!r}"
            )

        try:
            self.optimizer = OptimizerName(str(getattr(self.optimizer, "value", self.optimizer)).lower())
        except ValueError:
            raise bad("optimizer", f"one of {[o.value for o in OptimizerName]}") from None
        try:
            self.schedule = ScheduleName(str(getattr(self.schedule, "value", self.schedule)).lower())
        except ValueError:
            raise bad("schedule", f"one of {[s.value for s in ScheduleName]}") from None
        if self.steps is None:
            if self.epochs is None or self.steps_per_epoch is None:
                raise InputError(
                    "training config: give steps, or epochs and steps_per_epoch; got "
                    f"steps=None, epochs={self.epochs!r}, steps_per_epoch={self.steps_per_epoch!r}"
                )
            for name in ("epochs", "steps_per_epoch"):
                if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                    raise bad(name, "a positive integer")
        else:
            if self.epochs is not None:
                raise InputError(
                    f"training config: give steps or epochs x steps_per_epoch, not both "
                    f"(got steps={self.steps!r}, epochs={self.epochs!r})"
                )
            if not _is_int(self.steps) or self.steps < 1:
                raise bad("steps", "a positive integer")
        for name in ("batch_size", "step_size", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "seed", "prefetch"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a non-negative integer")
        if not _is_number(self.lr) or not self.lr > 0:
            raise bad("lr", "a positive number")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise bad("weight_decay", "a non-negative number")
        if not _is_number(self.gamma) or not self.gamma > 0:
            raise bad("gamma", "a positive number")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise bad("momentum", "a number in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or not self.grad_clip > 0):
            raise bad("grad_clip", "None or a positive number")
        for name in ("amp", "find_unused_parameters"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise bad(name, "None (auto), True or False")
        for name in ("deterministic", "resume", "sync_batchnorm"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)

    @property
    def total_steps(self) -> int:
        """``steps``, or ``epochs * steps_per_epoch``."""
        if self.steps is not None:
            return int(self.steps)
        return int(self.epochs) * int(self.steps_per_epoch)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field (enums as their strings, betas as a list)."""
        out = dataclasses.asdict(self)
        out["optimizer"] = self.optimizer.value  # type: ignore[union-attr]
        out["schedule"] = self.schedule.value  # type: ignore[union-attr]
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Config from :meth:`to_dict` output (e.g. a JSON file); unknown keys are an InputError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(
                f"training config: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        kwargs = dict(data)
        if "betas" in kwargs and kwargs["betas"] is not None:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    def trajectory_dict(self) -> dict[str, Any]:
        """The fields that determine the loss curve (all but checkpoint/log/device settings)."""
        d = self.to_dict()
        d["total_steps"] = self.total_steps
        for name in _NON_TRAJECTORY_FIELDS | {"steps", "epochs", "steps_per_epoch"}:
            d.pop(name, None)
        return d


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


# -------------------------------------------------------------------------------------- the result


@dataclass
class TrainingResult:
    """What :func:`train` returns.

    Attributes:
        encoder_id: id of the cache entry (None when cancelled, with no cache, or on ranks > 0).
        steps_done: optimizer steps completed (including those before a resume).
        losses: ``(step, loss)`` per completed step, ``step`` counted from 1; the loss is the mean
            over ranks.
        cancelled: True when stopped by a :class:`CancelToken` (a checkpoint was written if
            ``checkpoint_dir`` was set).
        seconds: wall time of this call.
        samples_per_second: global samples per second in this call.
        peak_memory_bytes: CUDA ``max_memory_allocated`` on CUDA, else the process's peak resident
            set size.
        resumed_from: the step the run continued from (0: a fresh start).
        metrics: the task's metrics of the last step.
        checkpoint: path of the last checkpoint written or resumed from (None if none).
    """

    encoder_id: str | None
    steps_done: int
    losses: list[tuple[int, float]]
    cancelled: bool
    seconds: float
    samples_per_second: float
    peak_memory_bytes: int
    resumed_from: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None

    @property
    def final_loss(self) -> float | None:
        """Loss of the last completed step (None if no step ran)."""
        return self.losses[-1][1] if self.losses else None


# -------------------------------------------------------------------------------------- cancelling


class CancelToken:
    """A request to stop training, set from another thread, another process or a signal.

    Args:
        cancel_file: a path another process creates (touches) to cancel; checked every step.

    ``train`` checks :meth:`is_cancelled` after every optimizer step (a cancel that arrives during
    step ``n`` or its progress event stops the run after step ``n`` or ``n + 1``; in a
    multi-process run the flag of any rank stops all ranks at the same step); on cancel it writes a
    checkpoint and returns ``cancelled=True`` (nothing is saved into the cache).

    Example::

        token = CancelToken(cancel_file="/tmp/run/CANCEL")
        with token.handle_signals():          # SIGTERM / SIGINT cancel instead of killing
            result = train(task, config, cancel=token)
    """

    def __init__(self, cancel_file: str | os.PathLike[str] | None = None) -> None:
        self._event = threading.Event()
        self.cancel_file = Path(cancel_file) if cancel_file is not None else None
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the run to stop (thread-safe; also safe inside a signal handler)."""
        if self.reason is None:
            self.reason = reason
        self._event.set()

    def is_cancelled(self) -> bool:
        """True once :meth:`cancel` was called or the cancel file exists."""
        if self._event.is_set():
            return True
        if self.cancel_file is not None and self.cancel_file.exists():
            self.cancel(f"cancel file {self.cancel_file} exists")
            return True
        return False

    @contextmanager
    def handle_signals(self, signals: tuple[int, ...] | None = None) -> Iterator[CancelToken]:
        """Within the block, SIGTERM and SIGINT (default) cancel the run instead of killing it.

        A second signal of the same kind falls back to the previous handler; one that comes
        within a second of the first counts as the same (Ctrl-C reaches a torchrun worker twice).
        In a multi-process run where another rank already failed (torchrun then sends SIGTERM),
        the signal raises :class:`PeerFailure` at once. Only works in the main thread (elsewhere
        the block runs without handlers).
        """
        if signals is None:
            signals = (signal.SIGTERM, signal.SIGINT)
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[int, Any] = {}

        first_at: dict[int, float] = {}

        def handler(signum: int, frame: Any) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                # torchrun stops the other workers with SIGTERM when one failed: no checkpoint can
                # be agreed on then, so stop at once with that worker's error
                peer = _peer_failure()
                if peer is not None:
                    raise PeerFailure(f"stopped because {peer}")
            now = time.monotonic()
            if signum in first_at and now - first_at[signum] < _REPEAT_WINDOW_S:
                return  # the same Ctrl-C, from the terminal and again from torchrun
            if self._event.is_set():  # a second signal: behave as before
                old = previous.get(signum)
                signal.signal(signum, old if old is not None else signal.SIG_DFL)
                if callable(old):
                    old(signum, frame)
                elif old in (signal.SIG_DFL, None):
                    os.kill(os.getpid(), signum)
                return
            first_at[signum] = now
            self.cancel(f"signal {signal.Signals(signum).name}")

        for s in signals:
            previous[s] = signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, old in previous.items():
                signal.signal(s, old)


# ------------------------------------------------------------------------------- seeds and batches


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (e.g. ``(seed, step)``) with numpy's SeedSequence."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of 0-based ``step``: seeded from ``(seed, step)`` only."""
    return torch.Generator().manual_seed(derive_seed(seed, step))


def batch_shard(batch_size: int, rank: int, world_size: int) -> slice:
    """Rows of the global batch that ``rank`` of ``world_size`` trains on (contiguous, even split).

    Raises:
        InputError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise InputError(f"batch_shard: rank must be in [0, {world_size}), got {rank}")
    if batch_size % world_size:
        raise InputError(
            f"batch_size {batch_size} must be a multiple of the number of processes "
            f"({world_size}) so that every rank trains on the same number of samples"
        )
    n = batch_size // world_size
    return slice(rank * n, (rank + 1) * n)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python's ``random``, numpy's global RNG and torch (CPU and CUDA).

    With ``deterministic``, also ``torch.use_deterministic_algorithms(True, warn_only=True)``,
    cuDNN benchmarking off (set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before CUDA starts for
    deterministic cuBLAS).
    """
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel (or DataParallel) wrapper, else ``model``."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def lr_factor(step: int, config: TrainingConfig) -> float:
    """Multiplier of ``config.lr`` for 0-based ``step`` (warm-up, then the schedule).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``. After it, with
    ``t = step - warmup_steps`` and ``T = total_steps - warmup_steps``: constant 1; cosine
    ``r + (1 - r) * (1 + cos(pi * t / max(T - 1, 1))) / 2`` with ``r = min_lr_ratio``;
    step ``gamma ** (t // step_size)``.
    """
    w = config.warmup_steps
    if step < w:
        return (step + 1) / w
    t = step - w
    if config.schedule is ScheduleName.CONSTANT:
        return 1.0
    if config.schedule is ScheduleName.STEP:
        return float(config.gamma ** (t // config.step_size))
    span = max(config.total_steps - w - 1, 1)
    r = config.min_lr_ratio
    return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))


def _build_optimizer(params: Any, config: TrainingConfig) -> torch.optim.Optimizer:
    if config.optimizer is OptimizerName.ADAM:
        return torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    if config.optimizer is OptimizerName.ADAMW:
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


# ------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    """Where this process stands in a (possibly multi-process) run: see :func:`distributed`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def active(self) -> bool:
        """True in a run of several processes (torch.distributed initialised)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints, progress and the cache entry."""
        return self.rank == 0


_Dist = DistInfo  # the name used inside this module before it was public
_FAILURE_KEY = f"anatssl/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
DEFAULT_DIST_TIMEOUT_S = 900.0


def dist_timeout_s() -> float:
    """Seconds a rank waits for the others at a collective (barrier, all-reduce): ``$ANATSSL_DIST_TIMEOUT``
    or 900. Ranks wait for rank 0 while it writes a checkpoint or the cache entry (seconds) and for the
    slowest rank's step; a rank that fails tells the others at once (see :func:`distributed`)."""
    raw = os.environ.get("ANATSSL_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_DIST_TIMEOUT_S
    except ValueError:
        raise InputError(f"ANATSSL_DIST_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise InputError(f"ANATSSL_DIST_TIMEOUT must be positive, got {raw!r}")
    return value


def _failure_store() -> Any:
    """The key-value store of the default process group (under torchrun: the launcher's, which
    outlives the workers), or None."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API: without it ranks still fail, with a plainer message
        return None


def _announce_failure(info: DistInfo, exc: BaseException) -> None:
    """Tell the other ranks that this one failed and why (first failure wins)."""
    store = _failure_store()
    if store is None:
        return
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = f"process {info.rank} of {info.world_size} failed: {type(exc).__name__}" + (f": {text}" if text else "")
    try:
        store.compare_set(_FAILURE_KEY, "", message)
    except Exception:  # noqa: BLE001 - the store may be gone with the launcher
        pass


def _peer_failure(wait_s: float = 0.0) -> str | None:
    """The message a failed rank left in the store, if any, looking for up to ``wait_s`` seconds."""
    store = _failure_store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_FAILURE_KEY]):
                value = store.get(_FAILURE_KEY).decode(errors="replace")
                if value:
                    return value
        except Exception:  # noqa: BLE001 - the store may be gone with the launcher
            return None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _wait_for_peers_failing(info: DistInfo, wait_s: float = 10.0) -> None:
    """Give the other ranks up to ``wait_s`` to fail too before this one exits.

    Bad input (more processes than volumes, a foreign run folder) fails on every rank alike, but
    not at the same moment; torchrun stops the others as soon as the first one exits, and a rank
    still importing would die without its line. Each failing rank counts itself in the store and
    waits until all have (or the time is up: its error was its own). ``wait_s`` 0 only counts
    (a crash of one rank, which the others then follow with a :class:`PeerFailure`).
    """
    store = _failure_store()
    if store is None:
        return
    try:
        key = _FAILURE_KEY + "/count"
        deadline = time.monotonic() + wait_s
        count = store.add(key, 1)
        while count < info.world_size and time.monotonic() < deadline:
            time.sleep(0.1)
            count = store.add(key, 0)
    except Exception:  # noqa: BLE001 - the store may be gone with the launcher
        pass


class PeerFailure(AnatSSLError):
    """Another process of a multi-process run failed; this one stops with that process's error."""


def _as_peer_failure(exc: BaseException) -> PeerFailure | None:
    """A :class:`PeerFailure` for ``exc`` when it is the echo of another rank's failure (a failed
    collective, while a failure message waits in the store); None for this rank's own errors."""
    if isinstance(exc, (AnatSSLError, KeyboardInterrupt)):
        return None
    peer = _peer_failure(wait_s=3.0)
    return PeerFailure(f"stopped because {peer}") if peer is not None else None


@contextmanager
def distributed(device: str | torch.device = "auto") -> Iterator[DistInfo]:
    """The process group of a run launched by ``torchrun``, set up once for the whole run.

    Under ``torchrun`` (``WORLD_SIZE > 1`` and ``RANK`` set) and with no group initialised yet, it
    checks ``device`` (so that ``--device cuda`` without a GPU fails alike on every rank, before
    any training), initialises ``torch.distributed`` (NCCL on CUDA, gloo on the CPU) with the
    timeout :func:`dist_timeout_s`, and destroys the group when the block ends (after a barrier
    when it ends well). Nested uses (:func:`train` inside a method's multi-stage run) reuse the
    group: a process group is initialised once per run, because initialising a second one
    through the same launcher store hangs (the LD stage after the PD stage did).

    A rank whose block raises writes its error into the launcher's store before it exits; a rank
    whose collective then fails (its peer is gone) raises :class:`PeerFailure` with that message,
    so that every process ends with the error of the one that failed, within seconds.
    Outside torchrun it yields a one-process :class:`DistInfo` and does nothing else.
    """
    import torch.distributed as dist

    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        info.device = _rank_device(device, info)
        yield info
        return
    if not (env_world > 1 and "RANK" in os.environ):
        yield DistInfo(device=resolve_device(device))
        return
    if not dist.is_available():
        raise AnatSSLError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    info = DistInfo(int(os.environ["RANK"]), env_world, int(os.environ.get("LOCAL_RANK", "0")), True)
    info.device = _rank_device(device, info)
    from datetime import timedelta

    dist.init_process_group(
        backend="nccl" if info.device.type == "cuda" else "gloo", timeout=timedelta(seconds=dist_timeout_s())
    )
    ok = False
    try:
        yield info
        ok = True
    except BaseException as exc:
        peer = _as_peer_failure(exc)
        if peer is not None:
            raise peer from exc
        if not isinstance(exc, PeerFailure):
            _announce_failure(info, exc)
        _wait_for_peers_failing(info, wait_s=10.0 if isinstance(exc, AnatSSLError) else 0.0)
        raise
    finally:
        # Free DDP's reducer (it holds gloo/NCCL work) before its group goes, and let no rank
        # tear the group down while another still talks to it.
        gc.collect()
        try:
            if ok:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def _rank_device(choice: str | torch.device, info: DistInfo) -> torch.device:
    device = resolve_device(choice)
    if device.type == "cuda" and info.active:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def share_from_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 alone, its result (or its error) handed to every rank.

    For what only rank 0 should do or see, such as reading a checkpoint (no shared file system is
    needed): an exception on rank 0 is raised on every rank, as an :class:`InputError` when it was
    one. One process: just ``fn()``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None, None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as exc:  # noqa: BLE001 - handed on to every rank below
            box[1], box[2] = type(exc).__name__, exc if isinstance(exc, InputError) else str(exc)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        if isinstance(box[2], InputError):
            raise box[2]
        raise AnatSSLError(f"rank 0 failed: {box[1]}: {box[2]}")
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op in a one-process run); the group's timeout applies."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------- checkpoints


def checkpoint_path(checkpoint_dir: str | os.PathLike[str]) -> Path:
    """``<checkpoint_dir>/checkpoint.pt``."""
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    Raises:
        InputError: unreadable file, or not an AnatSSL checkpoint of a known format.
    """
    path = Path(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise InputError(f"checkpoint {path} is not a readable torch checkpoint ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "anatssl-checkpoint":
        raise InputError(f"checkpoint {path} is not an AnatSSL training checkpoint")
    if int(data.get("format_version", 0)) > CHECKPOINT_FORMAT:
        raise InputError(
            f"checkpoint {path} has format {data.get('format_version')}, newer than this AnatSSL "
            f"({__version__}) reads (<= {CHECKPOINT_FORMAT}); upgrade AnatSSL"
        )
    return data


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _sweep_temp_files(folder: Path) -> None:
    """Remove the temporary files a killed checkpoint write left behind."""
    for p in folder.glob(f".{CHECKPOINT_NAME}.*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values only (loadable with weights_only=True)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(v) for v in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
         float(n["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _task_fingerprint(task: TrainingTask) -> str:
    fields = task.manifest_fields()
    return json.dumps(fields, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------ the training


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, Mapping):
        return type(batch)({k: _pin(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_pin(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_pin(v) for v in batch)
    return batch


class _Prefetcher:
    """Makes the batches of the next ``ahead`` steps in a background thread.

    Batches depend on (seed, step) only, so making them early changes nothing but the wait.
    """

    def __init__(self, make: Callable[[int], Any], start: int, total: int, ahead: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._make, self._total, self._ahead = make, total, ahead
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anatssl-batches") if ahead else None
        self._pending: dict[int, Any] = {}
        self._next = start

    def get(self, step: int) -> Any:
        if self._pool is None:
            return self._make(step)
        self._next = max(self._next, step)
        while self._next < min(step + 1 + self._ahead, self._total):
            self._pending[self._next] = self._pool.submit(self._make, self._next)
            self._next += 1
        future = self._pending.pop(step, None)
        return future.result() if future is not None else self._make(step)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pending.clear()


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def train(
    task: TrainingTask,
    config: TrainingConfig,
    *,
    progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: CancelToken | None = None,
    cache: EncoderCache | None = None,
    name: str | None = None,
    description: str | None = None,
    identity: Mapping[str, Any] | None = None,
) -> TrainingResult:
    """Train ``task`` with ``config``; save the result into ``cache`` (if given) with its manifest.

    Args:
        task: the method's :class:`TrainingTask`.
        config: the :class:`TrainingConfig`.
        progress: called (on rank 0) with event dicts ``{"event": "start" | "progress" |
            "checkpoint" | "done" | "cancelled" | "error", "step", "total", "loss", "lr",
            "samples_per_s", "eta_s", ...}``; ``"checkpoint"`` adds ``"path"``, ``"done"`` adds
            ``"encoder_id"``, ``"error"`` adds ``"message"``, ``"progress"`` adds ``"metrics"``.
            See :mod:`AnatSSLLib.progress` for tqdm, JSON-lines and callback sinks.
        cancel: stop when this token is cancelled (checked after every step; all ranks agree).
        cache: where to save the trained encoder at the end (None: not saved).
        name, description: the cache entry's label and free text.
        identity: what else makes this run the one a checkpoint belongs to, by the names the
            caller's user knows (e.g. the settings of a command line, the data's fingerprint);
            JSON-able values. Stored in the checkpoint and compared, before the config and the
            task's manifest fields, when resuming. Leave the step budget out of it: a run resumed
            with more steps continues (see "Continuing a run" in the module docstring).

    Returns:
        :class:`TrainingResult`.

    Raises:
        CheckpointMismatch: (an InputError) a checkpoint in ``checkpoint_dir`` belongs to another
            run (other identity, config or task), or is past the ``total_steps`` asked for.
        InputError: ``batch_size`` does not split over the processes.
        PeerFailure: another process of a multi-process run failed (its error is the message).
        AnatSSLError: the loss became NaN or infinite.
    """
    if not isinstance(config, TrainingConfig):
        raise InputError(f"train: config must be a TrainingConfig, got {type(config).__name__}")
    for method in ("build_model", "loss", "make_batch", "manifest_fields"):
        if not callable(getattr(task, method, None)):
            raise InputError(f"train: task {type(task).__name__} lacks the method {method}()")

    t_start = time.perf_counter()
    main = True
    try:
        with distributed(config.device) as dist_info:
            main = dist_info.is_main
            return _train(task, config, dist_info, dist_info.device, progress, cancel, cache, name, description,
                          t_start, identity)
    except BaseException as exc:
        if progress is not None and main and not getattr(exc, "_anatssl_reported", False):
            progress({"event": "error", "step": None, "total": config.total_steps, "loss": None, "lr": None,
                      "samples_per_s": None, "eta_s": None, "message": f"{type(exc).__name__}: {exc}"})
            _mark(exc, "_anatssl_reported")
        raise


def _mark(exc: BaseException, flag: str) -> None:
    try:
        setattr(exc, flag, True)
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass


def _train(
    task: TrainingTask,
    config: TrainingConfig,
    dd: _Dist,
    device: torch.device,
    progress: Callable[[dict[str, Any]], None] | None,
    cancel: CancelToken | None,
    cache: EncoderCache | None,
    name: str | None,
    description: str | None,
    t_start: float,
    identity: Mapping[str, Any] | None,
) -> TrainingResult:
    import torch.distributed as dist

    total = config.total_steps
    batch_shard(config.batch_size, dd.rank, dd.world_size)  # validates the split
    use_amp = bool(config.amp if config.amp is not None else device.type == "cuda") and device.type == "cuda"

    def emit(event: str, **fields: Any) -> None:
        if progress is not None and dd.is_main:
            progress({"event": event, **fields})

    # Seeds: the model is initialised identically on every rank (DDP also broadcasts rank 0's).
    seed_everything(config.seed, deterministic=config.deterministic)
    base_model = task.build_model().to(device)
    if dd.active and device.type == "cuda" and config.sync_batchnorm:
        base_model = nn.SyncBatchNorm.convert_sync_batchnorm(base_model)
    # Per-rank stream for randomness inside the loss (dropout, masking); rank 0 = one process.
    seed_everything(derive_seed(config.seed, dd.rank, 1) if dd.rank else config.seed)
    params = [p for p in base_model.parameters() if p.requires_grad]
    if not params:
        raise InputError(f"task {type(task).__name__}: build_model() returned a network with no trainable parameters")
    optimizer = _build_optimizer(params, config)
    # Loss scaling only for fp16 autocast (bf16 has float32's range).
    use_scaler = use_amp and autocast_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # Resume.
    ckpt_file = checkpoint_path(config.checkpoint_dir) if config.checkpoint_dir else None
    task_fp = _task_fingerprint(task)
    identity_json = json.dumps(dict(identity or {}), sort_keys=True, default=str)
    start_step, losses, resumed, resumed_total = 0, [], None, None
    if ckpt_file is not None and config.resume:

        def read() -> dict[str, Any] | None:
            _sweep_temp_files(ckpt_file.parent)
            if not ckpt_file.exists():
                return None
            found = load_checkpoint(ckpt_file)
            _check_matches(found, config, task_fp, ckpt_file, identity_json)
            return found

        # rank 0 reads (no shared file system needed) and hands it, or its error, to the others
        ckpt = share_from_rank0(read)
        if ckpt is not None:
            base_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if use_scaler and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            start_step = int(ckpt["step"])
            resumed_total = int(ckpt.get("total", start_step))
            losses = [(int(s), float(v)) for s, v in ckpt["losses"]]
            rng = ckpt["rng"]
            if dd.rank < len(rng):  # rank r continues rank r's streams (rank 0 = one process)
                _set_rng_state(rng[dd.rank])
            else:  # more processes than before: data stay exact, loss-time randomness reseeded
                seed_everything(derive_seed(config.seed, dd.rank, start_step))
            resumed = str(ckpt_file)
            del ckpt

    model: nn.Module = base_model
    if dd.active:
        model = nn.parallel.DistributedDataParallel(
            base_model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.find_unused_parameters is not False,
        )
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    last_ckpt: str | None = resumed

    def save_checkpoint(step_done: int) -> str | None:
        nonlocal last_ckpt
        if ckpt_file is None:
            return None
        rng = _rng_state()
        if dd.active:
            gathered: list[Any] = [None] * dd.world_size
            dist.all_gather_object(gathered, rng)
            rng_all = gathered
        else:
            rng_all = [rng]
        if dd.is_main:
            _atomic_torch_save(
                {
                    "format": "anatssl-checkpoint",
                    "format_version": CHECKPOINT_FORMAT,
                    "library_version": __version__,
                    "step": step_done,
                    "total": total,
                    "model": base_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if use_scaler else {},
                    "losses": [[s, v] for s, v in losses],
                    "rng": [_cpu_rng(r) for r in rng_all],
                    "world_size": dd.world_size,
                    "config": json.dumps(config.to_dict(), sort_keys=True),
                    "trajectory": json.dumps(config.trajectory_dict(), sort_keys=True),
                    "task": task_fp,
                    "identity": identity_json,
                },
                ckpt_file,
            )
            emit("checkpoint", step=step_done, total=total, path=str(ckpt_file))
        last_ckpt = str(ckpt_file)
        return last_ckpt

    start_info: dict[str, Any] = {"resumed": resumed is not None}
    if resumed is not None:
        more = f", now continued to {total}" if resumed_total is not None and total > resumed_total else ""
        start_info["message"] = (
            f"resumed from step {start_step} of {resumed} (a run of {resumed_total} steps{more})"
            if start_step < total or more else f"the run in {resumed} is complete ({start_step} steps)"
        )
        if resumed_total is not None and total != resumed_total:
            start_info["resumed_total"] = resumed_total
    emit(
        "start", step=start_step, total=total, loss=losses[-1][1] if losses else None,
        lr=config.lr * lr_factor(min(start_step, total - 1), config), samples_per_s=None, eta_s=None,
        world_size=dd.world_size, device=str(device), resumed_from=start_step,
        checkpoint=resumed, **start_info,
    )

    metrics: dict[str, float] = {}
    cancelled = False
    t_loop = time.perf_counter()
    t_last_event = t_loop
    step = start_step
    lr = config.lr

    def make(s: int) -> Any:
        batch = task.make_batch(
            s, step_generator(config.seed, s), rank=dd.rank, world_size=dd.world_size,
            batch_size=config.batch_size,
        )
        return _pin(batch) if device.type == "cuda" else batch

    batches = _Prefetcher(make, start_step, total, config.prefetch)
    try:
        while step < total:
            lr = config.lr * lr_factor(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = _to_device(batches.get(step), device)
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, enabled=use_amp):
                loss, metrics = task.loss(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise InputError(
                    f"task {type(task).__name__}: loss() must return a scalar tensor, got "
                    f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
                )
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            after_step = getattr(task, "after_step", None)
            if callable(after_step):  # e.g. Alice's EMA teacher update
                after_step(base_model, step)

            flag = 1.0 if (cancel is not None and cancel.is_cancelled()) else 0.0
            if dd.active:
                packed = torch.tensor([float(loss.detach()), flag], dtype=torch.float64, device=device)
                dist.all_reduce(packed)
                loss_value, flag = float(packed[0]) / dd.world_size, float(packed[1])
            else:
                loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise AnatSSLError(
                    f"training diverged: the loss is {loss_value} at step {step} of {total}; "
                    f"lower the learning rate (now {lr:g}) or set grad_clip"
                )
            losses.append((step, loss_value))
            metrics = {str(k): float(v) for k, v in (metrics or {}).items()}

            now = time.perf_counter()
            done_here = step - start_step
            rate = done_here / max(now - t_loop, 1e-9)
            if step % config.log_every == 0 or step == total or now - t_last_event >= _PROGRESS_MIN_INTERVAL_S:
                t_last_event = now
                emit(
                    "progress", step=step, total=total, loss=_json_float(loss_value), lr=lr,
                    samples_per_s=rate * config.batch_size, eta_s=(total - step) / rate if rate > 0 else None,
                    metrics=metrics,
                )
            if flag > 0:
                cancelled = True
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
                save_checkpoint(step)
    except BaseException as exc:
        peer = _as_peer_failure(exc) if dd.active else None
        shown = peer if peer is not None else exc
        emit("error", step=step, total=total, loss=_json_float(losses[-1][1]) if losses else None, lr=lr,
             samples_per_s=None, eta_s=None, message=f"{type(shown).__name__}: {shown}")
        _mark(shown, "_anatssl_reported")
        if peer is not None:
            raise peer from exc
        raise
    finally:
        batches.close()

    seconds = time.perf_counter() - t_start
    loop_s = time.perf_counter() - t_loop
    sps = (step - start_step) * config.batch_size / loop_s if loop_s > 0 else 0.0
    if step > start_step or cancelled or not resumed:
        save_checkpoint(step)
    result = TrainingResult(
        encoder_id=None, steps_done=step, losses=list(losses), cancelled=cancelled, seconds=seconds,
        samples_per_second=sps, peak_memory_bytes=_peak_memory_bytes(device), resumed_from=start_step,
        metrics=metrics, checkpoint=last_ckpt,
    )
    final = _json_float(result.final_loss)
    if cancelled:
        emit("cancelled", step=step, total=total, loss=final, lr=lr, samples_per_s=sps, eta_s=None,
             reason=cancel.reason if cancel is not None else None, checkpoint=last_ckpt)
        return result

    failure = None
    if cache is not None and dd.is_main:
        try:
            result.encoder_id = _save_to_cache(
                task, unwrap_model(model), config, result, cache, name, description
            )
        except Exception as exc:
            if not dd.active:
                raise
            failure = exc
    if dd.active:  # every rank returns the id, or raises the save's error
        box = [result.encoder_id, None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(box, src=0)
        result.encoder_id = box[0]
        if box[1] is not None:
            if failure is not None:
                raise failure
            raise AnatSSLError(f"saving the encoder on rank 0 failed: {box[1]}")
    emit("done", step=step, total=total, loss=final, lr=lr, samples_per_s=sps, eta_s=0.0,
         encoder_id=result.encoder_id, seconds=seconds, checkpoint=last_ckpt)
    return result


def _cpu_rng(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    if "cuda" in out:
        out["cuda"] = [s.cpu() for s in out["cuda"]]
    return out


# What sets the budget of a run, not what it learns: a checkpoint of another budget continues.
_BUDGET_FIELDS = frozenset({"total_steps", "warmup_steps"})
# Manifest fields that are free text, not the task (the description names the step counts).
_FREE_TEXT_FIELDS = frozenset({"description", "name"})


class CheckpointMismatch(InputError):
    """A checkpoint in the run's folder that this run may not continue.

    Attributes:
        path: the checkpoint file.
        differences: ``(name, in the checkpoint, now)`` for each setting that differs; the names
            are the identity's (as the caller gave them to :func:`train`), the config's fields,
            or ``"manifest:<field>"`` for the task's manifest fields. A checkpoint past the steps
            asked for differs in ``"steps"`` (its step, the total asked for).
        budget: the names in ``differences`` that are step budgets (``("steps",)``; a caller that
            renames them passes the new names).
    """

    def __init__(
        self, path: str | os.PathLike[str], differences: list[tuple[str, Any, Any]], budget: tuple[str, ...] = ("steps",)
    ) -> None:
        self.path = Path(path)
        self.differences = [tuple(d) for d in differences]
        self.budget = tuple(budget)
        super().__init__(self.describe())

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (torch.distributed hands it to every rank)
        return (type(self), (str(self.path), self.differences, self.budget))

    def describe(self, names: Mapping[str, str] | None = None, restart: str = "resume=False") -> str:
        """The message, with each setting shown by ``names[name]`` (e.g. a command-line option)
        and ``restart`` as the way to start over."""
        names = names or {}
        parts = []
        for key, theirs, mine in self.differences:
            label = names.get(key, key)
            if key in self.budget:
                parts.append(f"{label}: the run there is at step {theirs} already, {mine} asked now")
            else:
                parts.append(f"{label}: checkpoint {_short(theirs)} vs now {_short(mine)}")
        return (
            f"checkpoint {self.path} was written by a run with other settings ({'; '.join(parts)}); "
            f"run with the same settings to continue it, use another checkpoint folder, or {restart} to start over"
        )


def verify_identity(
    path: str | os.PathLike[str], identity: Mapping[str, Any], total_steps: int | None = None
) -> None:
    """Raise :class:`CheckpointMismatch` if the checkpoint at ``path`` (when there is one) is past
    ``total_steps`` or records another ``identity`` (as given to :func:`train`).

    For a run of several stages that must refuse a later stage's checkpoint before it trains an
    earlier one (LD's LD stage started from a PD stage of another length).
    """
    path = Path(path)
    if not path.exists():
        return
    ckpt = load_checkpoint(path)
    if total_steps is not None and int(ckpt.get("step", 0)) > total_steps:
        raise CheckpointMismatch(path, [("steps", int(ckpt["step"]), int(total_steps))])
    if "identity" not in ckpt:
        return
    mine = json.loads(json.dumps(dict(identity), sort_keys=True, default=str))
    diff = _diff(json.loads(ckpt["identity"] or "{}"), mine)
    if diff:
        raise CheckpointMismatch(path, diff)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _diff(theirs: Mapping[str, Any], mine: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    return [(prefix + k, theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)]


def _check_matches(
    ckpt: Mapping[str, Any], config: TrainingConfig, task_fp: str, path: Path, identity_json: str = "{}"
) -> None:
    """Raise :class:`CheckpointMismatch` unless ``config`` may continue the run of ``ckpt``.

    Compared, in this order, each stage stopping at its first differences: the step (not past
    ``config.total_steps``), the caller's identity (when the checkpoint has one), the config's
    trajectory fields and the task's manifest fields, both without the step budget
    (:data:`_BUDGET_FIELDS`) and free text (:data:`_FREE_TEXT_FIELDS`).
    """
    step = int(ckpt.get("step", 0))
    if step > config.total_steps:
        raise CheckpointMismatch(path, [("steps", step, config.total_steps)])
    if "identity" in ckpt:
        diff = _diff(json.loads(ckpt["identity"] or "{}"), json.loads(identity_json))
        if diff:
            raise CheckpointMismatch(path, diff)
    mine = {k: v for k, v in config.trajectory_dict().items() if k not in _BUDGET_FIELDS}
    theirs = {k: v for k, v in json.loads(ckpt.get("trajectory", "{}")).items() if k not in _BUDGET_FIELDS}
    diff = _diff(theirs, mine)
    if diff:
        raise CheckpointMismatch(path, diff)
    try:
        theirs_task = json.loads(ckpt.get("task") or "{}")
    except (TypeError, ValueError):
        theirs_task = {"?": ckpt.get("task")}
    mine_task = json.loads(task_fp)
    drop = lambda d: {k: v for k, v in d.items() if k not in _FREE_TEXT_FIELDS}  # noqa: E731
    diff = _diff(drop(theirs_task), drop(mine_task), "manifest:")
    if diff:
        raise CheckpointMismatch(path, diff)


def _save_to_cache(
    task: TrainingTask,
    model: nn.Module,
    config: TrainingConfig,
    result: TrainingResult,
    cache: EncoderCache,
    name: str | None,
    description: str | None,
) -> str:
    from .cache import EncoderManifest

    export = getattr(task, "export_state", None)
    state = export(model) if callable(export) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    fields = dict(task.manifest_fields())
    if description is not None:
        fields["description"] = description
    if name is not None or "name" not in fields:
        fields["name"] = name
    known = {f.name for f in dataclasses.fields(EncoderManifest)} - {"training", "metrics", "extra"}
    extra = {k: v for k, v in fields.items() if k not in known}
    fields = {k: v for k, v in fields.items() if k in known}
    tail = [v for _, v in result.losses[-min(len(result.losses), 10):]]
    training = {
        "config": config.to_dict() | {"checkpoint_dir": None, "device": config.device},
        "steps": result.steps_done,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 3),
        "samples_per_second": round(result.samples_per_second, 3),
        "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
        "torch_version": torch.__version__,
    }
    metrics = {"final_loss": result.final_loss, "final_loss_mean10": float(np.mean(tail)) if tail else None}
    metrics.update({f"final_{k}": v for k, v in result.metrics.items()})
    manifest = EncoderManifest(**fields, training=training, metrics=metrics, extra=extra)
    return cache.save(state, manifest)
