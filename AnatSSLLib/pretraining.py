"""Pretraining runs: data, method task and engine put together, one function per method.

Each function reads the training volumes once (:class:`~AnatSSLLib.datasets.VolumeCrops`),
builds the method's task and runs the shared engine (:func:`AnatSSLLib.engine.train`) with a
checkpoint folder named after the run's settings and data, so that running the same command
again after a kill or a cancel resumes where it stopped. The trained encoder goes into the
encoder cache with its manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import InputError

__all__ = ["LDPretrainSettings", "pretrain_ld", "default_run_dir", "check_processes"]


def default_run_dir() -> Path:
    """Where checkpoints of pretraining runs go: ``$ANATSSL_RUNS`` or ``<user cache>/anatssl/runs``."""
    if os.environ.get("ANATSSL_RUNS"):
        return Path(os.environ["ANATSSL_RUNS"])
    from .cache import default_cache_dir

    return default_cache_dir().parent / "runs"


@dataclasses.dataclass
class LDPretrainSettings:
    """Settings of a 3D LD pretraining run (CPU scale-down of METHODS.md 2.8 by default).

    The paper trains patch discrimination (stage "pd") first, then region discrimination with
    clustering (stage "ld") from it; both stages keep the paper's losses and weights.
    ``paired_contrasts`` uses co-registered contrasts of a subject as the two photometric views
    (our extension, see :class:`~AnatSSLLib.methods.ld.LDTask`). ``canonical_orientation`` keeps
    the shared geometric augmentation small (rotations up to 15 degrees, no flips) for volumes
    that all come in one anatomical orientation, as our encoder grids do; the paper's fundus
    images have none, hence its +-180 degrees and flips. ``view_warp_vox`` > 0 also deforms view 2
    by a smooth random displacement of about that many voxels, undone on the features (our
    extension, see :func:`~AnatSSLLib.methods.ld.make_ld_batch`). ``view_shift``, ``view_turn_deg``,
    ``view_zoom`` > 0 take view 2 from another crop (moved by up to that fraction of the crop size
    per axis, turned by up to that many degrees, zoomed by up to that fraction) and pair the patches
    at the same anatomy (our extension against a positional shortcut, same function).
    ``pd_negatives="image"`` keeps patch discrimination inside each image, so that the same
    anatomy in another subject of the batch is never a negative (our option; the paper's is "batch").
    ``view_blur`` and ``view_noise`` > 0 blur each view and add noise, each by its own random amount
    (our extension, same function); ``view_remap`` > 0 passes each view through a random intensity transfer
    function with that probability (our extension, same function). ``region_consistency`` > 0 weighs a cross-view agreement of
    the cluster assignments in the LD stage (our option,
    :func:`~AnatSSLLib.methods.ld.assignment_consistency_loss`; needs views from another crop).
    ``view_flip`` False keeps view 2 in the orientation of view 1 (no random flip and quarter turn, which
    the paper draws for its orientation-free fundus images and undoes on the features): with
    ``canonical_orientation`` every volume comes in one orientation, and asking one embedding of a
    mirrored or turned crop costs the network most of what it could learn across contrasts
    (measured on one T1 crop and the T2 crop of the same place, fresh network: a voxel-level InfoNCE
    between them fell from 6.8 to 3.3 in 60 steps without the flip and turn, only to 5.2 with them;
    our option, default True as the paper).
    ``padding_mode`` ``"reflect"`` or ``"replicate"`` pads the network's convolutions without zeros, which
    would tell it where the crop's border is (our option; see :class:`~AnatSSLLib.networks.LDNet`). ``cross_subject_neighbours`` > 0
    registers that many other training subjects onto each one (affine) and pairs crops across
    them, so the same anatomy in two heads becomes a positive pair (our extension, see
    :mod:`AnatSSLLib.data.cross_subject`; the registrations run at the start of every run and resume).
    ``bias_field_std`` > 0 gives every view its own smooth multiplicative intensity field
    (:class:`~AnatSSLLib.datasets.VolumeCrops`; our extension). ``dense_contrast`` > 0 weighs a
    voxel-level contrast between the two views in both stages (our extension,
    :func:`~AnatSSLLib.methods.ld.dense_correspondence_loss`; with paired contrasts it asks the T1
    and the T2 voxel of one place to agree). ``init_encoder`` starts from the weights of a 3D LD
    encoder in the cache (id or name) of the same architecture, e.g. to continue the bundled default
    with another term; every stage then starts from it.
    """

    pd_steps: int = 300
    ld_steps: int = 1200
    batch_size: int = 2
    crop_size: int = 32
    spacing_mm: float = 2.0
    grid: int = 4
    num_clusters: int = 16
    embedding_dim: int = 32
    features: Sequence[int] | None = None
    lr: float = 1e-3
    lr_halve_every: int = 500
    paired_contrasts: bool = True
    canonical_orientation: bool = False
    view_warp_vox: float = 0.0
    view_shift: float = 0.0
    view_turn_deg: float = 0.0
    view_zoom: float = 0.0
    pd_negatives: str = "batch"
    view_blur: float = 0.0
    view_noise: float = 0.0
    view_remap: float = 0.0
    view_flip: bool = True
    region_consistency: float = 0.0
    padding_mode: str = "zeros"
    cross_subject_neighbours: int = 0
    bias_field_std: float = 0.0
    dense_contrast: float = 0.0
    init_encoder: str | None = None
    seed: int = 0
    checkpoint_every: int = 50
    device: str = "auto"

    def __post_init__(self) -> None:
        if not (0.0 <= self.view_shift < 0.5 and 0.0 <= self.view_turn_deg <= 45.0 and 0.0 <= self.view_zoom < 0.5):
            raise InputError(
                "view_shift and view_zoom (--view-shift, --view-zoom) are fractions in [0, 0.5) and view_turn_deg "
                f"(--view-turn) is at most 45 degrees; got {self.view_shift}, {self.view_zoom} and {self.view_turn_deg}"
            )
        if not (0.0 <= self.view_blur <= 4.0 and 0.0 <= self.view_noise <= 0.5):
            raise InputError(
                f"view_blur (--view-blur) must be in [0, 4] voxels and view_noise (--view-noise) in [0, 0.5]; "
                f"got {self.view_blur} and {self.view_noise}"
            )
        if not 0.0 <= self.view_remap <= 1.0:
            raise InputError(f"view_remap (--view-remap) is a probability in [0, 1], got {self.view_remap}")
        if self.region_consistency and not (self.view_shift or self.view_turn_deg or self.view_zoom):
            raise InputError("region_consistency (--region-consistency) compares two different crops: "
                             "set view_shift, view_turn_deg or view_zoom (--view-shift, --view-turn, --view-zoom)")
        if not 0.0 <= self.dense_contrast <= 100.0:
            raise InputError(f"dense_contrast (--dense-contrast) is a weight in [0, 100], got {self.dense_contrast}")

    def identity(self) -> dict[str, Any]:
        """The settings that make a run this run: all but the step counts (a run asked for more
        steps continues), the device and the checkpoint interval."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IDENTITY}

    def key(self, data_fingerprint: str) -> str:
        """Short hash of :meth:`identity` and the data: the default run folder's name."""
        blob = json.dumps({**self.identity(), "data": data_fingerprint}, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# Settings that do not make another run: the budget (continued with more steps) and where it runs.
_NOT_IDENTITY = frozenset({"pd_steps", "ld_steps", "device", "checkpoint_every"})


def check_processes(count: int, what: str) -> None:
    """Refuse a multi-process launch with more processes than ``count`` training ``what`` (e.g.
    volumes): every rank raises the same one-line InputError before any training."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > count:
        raise InputError(
            f"{world} processes (torchrun --nproc_per_node x nodes) but only {count} {what} to train on; "
            f"launch at most {count} processes"
        )


def _augment(settings: LDPretrainSettings) -> dict[str, Any]:
    augment: dict[str, Any] = {}
    if settings.canonical_orientation:
        augment.update(rotate_deg=(15.0, 15.0, 15.0), shared_flip=False)
    if not settings.view_flip:
        augment["flip_rot90"] = False
    # our view extensions, passed on (by make_ld_batch's names) only when switched on
    for name in ("view_warp_vox", "view_shift", "view_turn_deg", "view_zoom", "view_blur", "view_noise", "view_remap"):
        value = float(getattr(settings, name))
        if value > 0:
            augment[name] = value
    return augment


def _initial_weights(settings: LDPretrainSettings, cache) -> dict:
    """The weights of ``settings.init_encoder``, checked against the network these settings build."""
    from .encoders import load_encoder

    enc = load_encoder(settings.init_encoder, cache=cache, device="cpu")
    want = {"embedding_dim": settings.embedding_dim, "num_clusters": settings.num_clusters, "padding_mode": settings.padding_mode}
    have = dict(enc.manifest.architecture_params)
    have.setdefault("padding_mode", "zeros")
    if enc.manifest.method != "ld" or enc.manifest.spatial_dims != 3 or any(have.get(k) != v for k, v in want.items()) \
            or (settings.features is not None and list(have.get("features", [])) != list(settings.features)):
        raise InputError(
            f"--init {settings.init_encoder}: a {enc.manifest.spatial_dims}D {enc.manifest.method} encoder with {have}; "
            f"these settings train a 3D LD network with {want} (pass the same --clusters and --padding)"
        )
    return {k: v.detach().clone() for k, v in enc.model.state_dict().items()}


def pretrain_ld(
    subjects: Sequence[Any],
    settings: LDPretrainSettings | None = None,
    *,
    cache=None,
    name: str | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: Callable[[dict], None] | None = None,
    cancel=None,
    restart: bool = False,
):
    """Pretrain a 3D LD encoder on ``subjects`` and save it into ``cache``.

    Args:
        subjects: images or paths; an entry may be a list of co-registered contrasts of one subject.
        settings: :class:`LDPretrainSettings`.
        cache: :class:`~AnatSSLLib.cache.EncoderCache` (default: the user cache).
        name: label of the cache entry.
        run_dir: checkpoint folder (default: ``default_run_dir()/ld-<key>``; the key leaves out
            the step counts, so the same settings with more steps continue the same run).
        progress, cancel: as for :func:`AnatSSLLib.engine.train`; the events carry ``"stage"``.
        restart: discard the run folder's checkpoints (both stages) and start over.

    Continuing: run again with the same settings after a kill or a cancel, or with more
    ``pd_steps`` / ``ld_steps``, and each stage continues from its checkpoint (the "step" learning
    rate schedule does not depend on the step count: a run continued from 20 to 30 LD steps is the
    run started with 30). The LD stage starts from the PD stage's result, so once it has begun,
    another ``pd_steps`` is refused (:class:`~AnatSSLLib.engine.CheckpointMismatch` naming
    ``pd_steps``) before anything trains; so is any other setting that differs, and a step count
    below what a stage has done.

    Under ``torchrun`` both stages run in one process group; rank 0 alone reads the PD result and
    hands it to the others.

    Returns:
        The :class:`~AnatSSLLib.engine.TrainingResult` of the last stage (``encoder_id`` set when
        it finished), with ``metrics["pd_seconds"]`` added.

    Raises:
        CheckpointMismatch: the run folder holds a run with other settings (its ``differences``
            use the names of :class:`LDPretrainSettings`, plus ``data``).
        InputError: bad settings, or more processes than subjects.
    """
    from .engine import distributed

    settings = settings or LDPretrainSettings()
    with distributed(settings.device):
        return _pretrain_ld(subjects, settings, cache, name, run_dir, progress, cancel, restart)


def _stage_mismatch(exc, stage: str):
    """The engine's mismatch with its "steps" named as this stage's step count (pd_steps, ld_steps)."""
    from .engine import CheckpointMismatch

    return CheckpointMismatch(exc.path, [(f"{stage}_steps" if k == "steps" else k, a, b) for k, a, b in exc.differences],
                              budget=(f"{stage}_steps",))


def _pretrain_ld(subjects, settings, cache, name, run_dir, progress, cancel, restart):
    from .cache import EncoderCache
    from .datasets import VolumeCrops
    from .encoders import DEFAULT_INTENSITY
    from .engine import (CheckpointMismatch, TrainingConfig, barrier, checkpoint_path, load_checkpoint,
                         share_from_rank0, train, verify_identity)
    from .methods.ld import LDTask

    if settings.pd_steps < 0 or settings.ld_steps < 1:
        raise InputError(f"LD pretraining needs pd_steps >= 0 and ld_steps >= 1, got {settings.pd_steps} and {settings.ld_steps}")
    check_processes(len(subjects), "subjects")
    spacing = (settings.spacing_mm,) * 3
    if settings.cross_subject_neighbours:
        from .data.cross_subject import cross_subject_views

        subjects = cross_subject_views(subjects, settings.cross_subject_neighbours, seed=settings.seed)
    data = VolumeCrops(subjects, spacing=spacing, crop_size=settings.crop_size, intensity=DEFAULT_INTENSITY,
                       bias_field_std=settings.bias_field_std)
    paired = settings.paired_contrasts and data.max_contrasts > 1
    channels = 2 if paired else 1
    run = Path(run_dir) if run_dir is not None else default_run_dir() / f"ld-{settings.key(data.data_fingerprint)}"
    manifest = {
        "spacing": list(spacing),
        "intensity": dict(DEFAULT_INTENSITY),
        "data_fingerprint": data.data_fingerprint,
        "description": (
            f"3D LD encoder: {settings.pd_steps} PD + {settings.ld_steps} LD steps on {len(data)} subjects, "
            f"{settings.crop_size}^3 crops at {settings.spacing_mm} mm" + (", paired contrasts" if paired else "")
            + (f", cross-subject views ({settings.cross_subject_neighbours} affine neighbours each)"
               if settings.cross_subject_neighbours else "")
            + (f", per-view bias fields (std {settings.bias_field_std:g})" if settings.bias_field_std else "")
            + (f", view 2 another crop (shift {settings.view_shift:g}, turn {settings.view_turn_deg:g} deg, "
               f"zoom {settings.view_zoom:g})" if settings.view_shift or settings.view_turn_deg or settings.view_zoom else "")
            + (", negatives from the same image only" if settings.pd_negatives == "image" else "")
            + (f", per-view blur up to {settings.view_blur:g} voxels" if settings.view_blur else "")
            + (f", per-view noise up to {settings.view_noise:g}" if settings.view_noise else "")
            + (f", random contrast remap (p {settings.view_remap:g})" if settings.view_remap else "")
            + (", view 2 neither flipped nor turned by quarter turns" if not settings.view_flip else "")
            + (f", cross-view cluster consistency (weight {settings.region_consistency:g})" if settings.region_consistency else "")
            + (f", {settings.padding_mode} padding" if settings.padding_mode != "zeros" else "")
            + (f", voxel-level cross-view contrast (weight {settings.dense_contrast:g})" if settings.dense_contrast else "")
            + (f", started from encoder {settings.init_encoder}" if settings.init_encoder else "")
        ),
    }
    common = dict(
        spatial_dims=3, grid=settings.grid, num_clusters=settings.num_clusters, embedding_dim=settings.embedding_dim,
        features=settings.features, sampler=data.torch_sampler(channels), paired_contrasts=paired, manifest=manifest,
        augment=_augment(settings), negatives=settings.pd_negatives,
        w_cons=settings.region_consistency, padding_mode=settings.padding_mode, w_dense=settings.dense_contrast,
    )

    def config(steps: int, folder: str) -> TrainingConfig:
        return TrainingConfig(
            steps=steps, batch_size=settings.batch_size, lr=settings.lr, optimizer="adam", schedule="step",
            step_size=settings.lr_halve_every, gamma=0.5, seed=settings.seed, checkpoint_every=settings.checkpoint_every,
            checkpoint_dir=str(run / folder), device=settings.device, log_every=10,
        )

    def tagged(stage: str):
        if progress is None:
            return None
        return lambda event: progress({**event, "stage": stage})

    base_identity = {**settings.identity(), "data": data.data_fingerprint}
    identity = {
        "pd": {**base_identity, "stage": "pd"},
        # the LD stage starts from the PD stage's result: its length is part of the LD run
        "ld": {**base_identity, "stage": "ld", "pd_steps": settings.pd_steps},
    }

    def stage_train(stage: str, steps: int, task, **kwargs):
        try:
            return train(task, config(steps, stage), progress=tagged(stage), cancel=cancel,
                         identity=identity[stage], **kwargs)
        except CheckpointMismatch as exc:
            raise _stage_mismatch(exc, stage) from None

    if restart:
        def discard() -> None:
            for stage in ("pd", "ld"):
                checkpoint_path(run / stage).unlink(missing_ok=True)
        share_from_rank0(discard)
        barrier()
    elif settings.pd_steps:  # refuse an LD checkpoint of another run before the PD stage trains
        try:
            share_from_rank0(lambda: verify_identity(checkpoint_path(run / "ld"), identity["ld"], settings.ld_steps))
        except CheckpointMismatch as exc:
            raise _stage_mismatch(exc, "ld") from None

    cache = cache if cache is not None else EncoderCache()
    pd_seconds = 0.0
    init = _initial_weights(settings, cache) if settings.init_encoder else None
    if settings.pd_steps:
        pd = stage_train("pd", settings.pd_steps, LDTask(stage="pd", init_state=init, **common))
        pd_seconds = pd.seconds
        if pd.cancelled:
            return pd
        # rank 0 reads the PD result and hands it on (no shared file system needed)
        init = share_from_rank0(lambda: load_checkpoint(checkpoint_path(run / "pd"))["model"])
    result = stage_train("ld", settings.ld_steps, LDTask(stage="ld", init_state=init, **common), cache=cache, name=name)
    result.metrics["pd_seconds"] = pd_seconds
    return result
