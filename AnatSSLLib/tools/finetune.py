"""Fine-tune a segmentation network, initialised from a pretrained encoder, on a few labelled volumes.

The downstream use of Alice (issue 5, deliverable 4a) and of LD's 3D encoder: the encoder's
weights initialise a MONAI segmentation network (:mod:`AnatSSLLib.networks.segmenter`), which is
then trained with labels on the shared engine (:func:`AnatSSLLib.engine.train`: progress,
checkpoints, resume, cancel, torchrun) and applied to new volumes with MONAI's sliding-window
inference.

Data path, the same as the encoder's: every volume is resampled to the encoder's spacing on an
axis-aligned LPS grid and normalised as its manifest says; label maps are resampled with nearest
neighbour. Training crops are random, half of them centred on a labelled voxel (so that small
structures are seen), with a mild random intensity scale and shift; no flips, since left and
right structures carry different labels. The loss is MONAI's :class:`~monai.losses.DiceCELoss`
(soft Dice + cross-entropy, background included). Predictions are softmax probabilities,
resampled linearly back to each target's own grid and then arg-maxed, so the label map comes out
in the target's geometry with the training label values.

A :class:`Segmenter` saves to and loads from a folder (``segmenter.safetensors`` +
``segmenter.json``), written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets import pad_to_size
from ..encoders import LoadedEncoder, normalise_intensity, to_encoder_grid
from ..errors import CacheError, InputError
from ..image import Image, check_volume
from ..networks.segmenter import build_segmenter, init_segmenter_from_encoder, size_divisor
from .segmentation import check_reference_labels

__all__ = ["FinetuneSettings", "FinetuneTask", "Segmenter", "finetune", "load_segmenter"]

_WEIGHTS, _META = "segmenter.safetensors", "segmenter.json"
FORMAT_VERSION = 1


@dataclasses.dataclass
class FinetuneSettings:
    """How to fine-tune.

    Attributes:
        init: ``"encoder"`` (the encoder's weights; the point of pretraining) or ``"random"`` (the
            same architecture freshly initialised: the baseline).
        steps: optimiser steps. batch_size: crops per step. crop: crop edge in voxels (a multiple of
            32 for Alice's SwinUNETR, of 16 for LD's U-Net).
        lr: AdamW learning rate (constant). foreground_fraction: share of crops centred on a
            labelled voxel. seed: initialisation and sampling. device: auto, cpu, cuda[:N].
        checkpoint_dir: where to checkpoint and resume (None: no checkpoints).
        overlap: sliding-window overlap at inference.
    """

    init: str = "encoder"
    steps: int = 300
    batch_size: int = 4
    crop: int = 32
    lr: float = 1e-3
    foreground_fraction: float = 0.5
    seed: int = 0
    device: str = "auto"
    checkpoint_dir: str | None = None
    overlap: float = 0.5

    def check(self, architecture: str) -> None:
        if self.init not in ("encoder", "random"):
            raise InputError(f"fine-tuning init: expected 'encoder' or 'random', got {self.init!r}")
        div = size_divisor(architecture)
        if self.crop < div or self.crop % div:
            raise InputError(f"fine-tuning crop: the {architecture} network needs a multiple of {div} voxels, got {self.crop}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or not 0.0 <= self.foreground_fraction <= 1.0:
            raise InputError(
                f"fine-tuning: expected steps >= 1, batch_size >= 1, lr > 0 and foreground_fraction in [0, 1], got "
                f"{self.steps}, {self.batch_size}, {self.lr}, {self.foreground_fraction}"
            )


def _prepare_pair(image: Image, labels: Image, spacing, intensity) -> tuple[np.ndarray, np.ndarray]:
    check_volume(image, ndim=3, name=image.name)
    lab = check_reference_labels(labels, image)
    grid = to_encoder_grid(image, spacing)
    lab_grid = to_encoder_grid(labels.with_array(lab.astype(np.int32)), spacing, interpolator="nearest")
    return normalise_intensity(grid.array, intensity), np.asarray(lab_grid.array, dtype=np.int64)


class FinetuneTask:
    """Supervised fine-tuning as a :class:`~AnatSSLLib.engine.TrainingTask`.

    Args:
        images, labels: float32 volumes on the encoder grid (``[k, j, i]``, normalised) and their
            class-index maps (``0..C-1``), pairwise of one shape.
        architecture, params: the encoder's architecture and constructor arguments.
        num_classes: C. encoder_state: weights to start from (None: random initialisation).
        settings: crop, foreground fraction. manifest: fields recorded in checkpoints.

    The network built last is kept in :attr:`model` (the engine trains it in place).
    """

    def __init__(
        self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], architecture: str, params: dict,
        num_classes: int, encoder_state: dict | None, settings: FinetuneSettings, manifest: dict,
    ) -> None:
        from monai.losses import DiceCELoss

        c = settings.crop
        self.images = [pad_to_size(a, c) for a in images]
        self.labels = [pad_to_size(a, c) for a in labels]
        self.foreground = [np.flatnonzero(lab.ravel() > 0) for lab in self.labels]
        self.architecture, self.params, self.num_classes = architecture, dict(params), int(num_classes)
        self.encoder_state, self.settings, self._manifest = encoder_state, settings, dict(manifest)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.model: nn.Module | None = None
        self.loaded_keys: list[str] = []

    def build_model(self) -> nn.Module:
        net = build_segmenter(self.architecture, self.params, self.num_classes)
        if self.encoder_state is not None:
            self.loaded_keys = init_segmenter_from_encoder(net, self.architecture, self.encoder_state)
        self.model = net
        return net

    def make_batch(self, step: int, generator: torch.Generator, *, rank: int, world_size: int, batch_size: int) -> dict:
        from ..engine import batch_shard

        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        c = self.settings.crop
        xs, ys = [], []
        for _ in range(batch_size):
            v = int(rng.integers(len(self.images)))
            img, lab = self.images[v], self.labels[v]
            if rng.random() < self.settings.foreground_fraction and self.foreground[v].size:
                centre = np.array(np.unravel_index(rng.choice(self.foreground[v]), lab.shape))
                start = np.clip(centre - c // 2, 0, np.array(lab.shape) - c)
            else:
                start = np.array([rng.integers(0, s - c + 1) for s in lab.shape])
            sl = tuple(slice(int(s), int(s) + c) for s in start)
            x = img[sl] * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
            xs.append(x.astype(np.float32))
            ys.append(lab[sl])
        rows = batch_shard(batch_size, rank, world_size)
        return {
            "image": torch.from_numpy(np.stack(xs)[rows, None].copy()),
            "label": torch.from_numpy(np.stack(ys)[rows, None].copy()),
        }

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.loss_fn(model(batch["image"]).float(), batch["label"])
        return loss, {}

    def manifest_fields(self) -> dict[str, Any]:
        return dict(self._manifest)

    def export_state(self, model: nn.Module) -> dict:
        return model.state_dict()


@dataclasses.dataclass
class Segmenter:
    """A fine-tuned segmentation network with what it needs to segment a new volume.

    Attributes:
        model: the network (eval mode). architecture, params: the encoder architecture it was built from.
        label_values: the label value of each output class (class 0 = ``label_values[0]``, usually 0).
        spacing: grid spacing in mm (x, y, z), None = each volume's own. intensity: normalisation spec. crop: window edge.
        info: provenance (encoder id, init, steps, training images, timings).
    """

    model: nn.Module
    architecture: str
    params: dict
    label_values: list[int]
    spacing: tuple[float, ...] | None
    intensity: dict
    crop: int
    info: dict = dataclasses.field(default_factory=dict)
    overlap: float = 0.5

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def probabilities(self, image: Image) -> tuple[Image, np.ndarray]:
        """Class probabilities on the encoder grid: ``(grid image, C x k x j x i float32)``."""
        from monai.inferers import sliding_window_inference

        check_volume(image, ndim=3, name=image.name)
        grid = to_encoder_grid(image, self.spacing)
        x = normalise_intensity(grid.array, self.intensity)
        shape = x.shape
        x = pad_to_size(x, self.crop)
        self.model.eval()
        t = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(self.device)
        logits = sliding_window_inference(t, (self.crop,) * 3, 4, self.model, overlap=self.overlap, mode="gaussian")
        prob = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
        return grid, prob[(slice(None),) + tuple(slice(0, s) for s in shape)]

    def segment(self, image: Image) -> Image:
        """Label map of ``image`` on its own grid (same size, spacing, origin, direction)."""
        import SimpleITK as sitk

        grid, prob = self.probabilities(image)
        vec = sitk.GetImageFromArray(np.moveaxis(prob, 0, -1).astype(np.float32), isVector=True)
        vec.SetSpacing(tuple(float(s) for s in grid.spacing))
        vec.SetOrigin(tuple(float(o) for o in grid.origin))
        vec.SetDirection(tuple(float(d) for d in np.asarray(grid.direction).ravel()))
        ref = image.to_sitk()
        back = sitk.Resample(vec, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat32)
        arr = sitk.GetArrayFromImage(back)
        labels = np.asarray(self.label_values, dtype=np.int32)[np.argmax(arr, axis=-1)]
        return image.with_array(labels.astype(np.int32), name=f"{image.name}_labels")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``segmenter.safetensors`` and ``segmenter.json`` into ``folder`` atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION, "architecture": self.architecture, "params": self.params,
            "label_values": [int(v) for v in self.label_values],
            "spacing": None if self.spacing is None else [float(s) for s in self.spacing],
            "intensity": self.intensity, "crop": int(self.crop), "overlap": float(self.overlap), "info": self.info,
        }
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tmp = Path(tempfile.mkdtemp(prefix=".segmenter.", suffix=".tmp", dir=folder))
        try:
            save_file(state, str(tmp / _WEIGHTS))
            (tmp / _META).write_text(json.dumps(meta, indent=1))
            os.replace(tmp / _WEIGHTS, folder / _WEIGHTS)
            os.replace(tmp / _META, folder / _META)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


def load_segmenter(folder: str | os.PathLike, device: str = "auto") -> Segmenter:
    """Load a :class:`Segmenter` saved by :meth:`Segmenter.save`.

    Raises:
        CacheError: a missing, unreadable or mismatching file.
    """
    from safetensors.torch import load_file

    from ..device import resolve_device

    folder = Path(folder)
    try:
        meta = json.loads((folder / _META).read_text())
        state = load_file(str(folder / _WEIGHTS))
    except (OSError, ValueError) as exc:
        raise CacheError(f"{folder}: not a readable fine-tuned segmenter ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CacheError(f"{folder}: segmenter format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    net = build_segmenter(meta["architecture"], meta["params"], len(meta["label_values"]))
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CacheError(f"{folder}: the weights do not fit the recorded network ({str(exc)[:200]})") from None
    net.to(resolve_device(device)).eval()
    spacing = None if meta.get("spacing") is None else tuple(meta["spacing"])
    return Segmenter(net, meta["architecture"], meta["params"], meta["label_values"], spacing,
                     meta["intensity"], int(meta["crop"]), meta.get("info", {}), float(meta.get("overlap", 0.5)))


def finetune(
    encoder: LoadedEncoder,
    images: Sequence[Image],
    labels: Sequence[Image],
    settings: FinetuneSettings | None = None,
    *,
    progress: Callable[[dict], None] | None = None,
    cancel: Any = None,
) -> Segmenter:
    """Fine-tune a segmentation network from ``encoder`` on ``images`` with their ``labels``.

    Args:
        encoder: a loaded 3D Alice or LD encoder (its architecture, weights, spacing, intensity).
        images, labels: training volumes and their label maps (same geometry pairwise; integer
            label values, 0 = background).
        settings: :class:`FinetuneSettings`.
        progress, cancel: as :func:`AnatSSLLib.engine.train`.

    Returns:
        the :class:`Segmenter` (``info["cancelled"]`` is True if the run was cancelled).

    Raises:
        InputError: no images, a count mismatch, a 2D image, labels off the image grid or empty,
            an encoder that cannot initialise a segmentation network.
    """
    from ..engine import TrainingConfig, train

    settings = settings or FinetuneSettings()
    man = encoder.manifest
    settings.check(man.architecture)
    if not images or len(images) != len(labels):
        raise InputError(f"fine-tuning: expected one label map per image and at least one image, got {len(images)} images and {len(labels)} label maps")
    spacing = encoder.spacing
    pairs = [_prepare_pair(im, lab, spacing, man.intensity) for im, lab in zip(images, labels)]
    values = sorted({0} | {int(v) for _, lab in pairs for v in np.unique(lab)})
    lut = np.zeros(values[-1] + 1, dtype=np.int64)
    lut[values] = np.arange(len(values))
    arrays = [img for img, _ in pairs]
    classes = [lut[lab] for _, lab in pairs]
    state = None
    if settings.init == "encoder":
        state = {k: v.detach().cpu() for k, v in encoder.model.state_dict().items()}
    manifest = {
        "method": "finetune", "architecture": man.architecture, "architecture_params": dict(man.architecture_params),
        "embedding_dim": int(man.embedding_dim), "spatial_dims": 3, "spacing": None if spacing is None else list(spacing),
        "intensity": dict(man.intensity or {}), "data_fingerprint": f"{encoder.encoder_id}:{settings.init}:{len(images)}",
    }
    task = FinetuneTask(arrays, classes, man.architecture, dict(man.architecture_params), len(values), state, settings, manifest)
    config = TrainingConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, optimizer="adamw",
                            seed=settings.seed, checkpoint_every=max(1, settings.steps // 4) if settings.checkpoint_dir else 0,
                            checkpoint_dir=settings.checkpoint_dir, device=settings.device)
    result = train(task, config, progress=progress, cancel=cancel)
    info = {
        "encoder_id": encoder.encoder_id, "init": settings.init, "steps": result.steps_done, "cancelled": result.cancelled,
        "training_images": [im.name for im in images], "seconds": round(result.seconds, 1),
        "samples_per_second": round(result.samples_per_second, 3), "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1),
        "final_loss": result.final_loss, "weights_loaded": len(task.loaded_keys),
    }
    return Segmenter(task.model.eval(), man.architecture, dict(man.architecture_params), values, spacing,
                     dict(man.intensity or {}), settings.crop, info, settings.overlap)

