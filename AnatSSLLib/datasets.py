"""Unlabelled training data for pretraining: a set of volumes and deterministic random crops.

:class:`VolumeCrops` reads a folder (or list) of volumes once, brings each onto the encoder grid
(axis-aligned, the pretraining spacing, intensities normalised as the encoder will see them at
inference: :mod:`AnatSSLLib.encoders`) and serves batches of random crops. A batch depends only
on ``(seed, step, rank)``, so a resumed or multi-process run sees exactly the data an
uninterrupted single-process run would.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .encoders import normalise_intensity, to_encoder_grid
from .errors import InputError
from .image import Image, check_volume, read_image

__all__ = ["VolumeCrops", "find_volumes", "pad_to_size", "subject_images"]

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def find_volumes(paths: Sequence[str | os.PathLike], pattern: str | None = None) -> list[Path]:
    """Volume files under ``paths`` (files are taken as they are, folders searched recursively).

    ``pattern`` (a glob on the file name, e.g. ``"t1.nii.gz"``) restricts what folders yield.
    Files in folders whose name contains ``labels`` are skipped: they are label maps (as in a
    population folder), not images to learn from.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob(pattern or "*")):
                if f.is_file() and f.name.lower().endswith(_VOLUME_SUFFIXES) and "labels" not in f.name:
                    found.append(f)
        elif p.exists():
            found.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    if not found:
        raise InputError(f"no volumes ({', '.join(_VOLUME_SUFFIXES)}) found in {[str(p) for p in paths]}")
    return found


def subject_images(entry: Image | str | os.PathLike | Sequence[Image | str | os.PathLike]) -> list[Image]:
    """The images of one subject entry: an image or path, or a list of them (its co-registered contrasts)."""
    members = [entry] if isinstance(entry, (Image, str, os.PathLike)) else list(entry)
    return [v if isinstance(v, Image) else read_image(v) for v in members]


def pad_to_size(arr: np.ndarray, size: int) -> np.ndarray:
    """``arr`` zero-padded at the far end of every axis shorter than ``size`` (unchanged if none is)."""
    pad = [(0, max(0, size - s)) for s in arr.shape]
    return np.pad(arr, pad, mode="constant") if any(p[1] for p in pad) else arr


class VolumeCrops:
    """Random crops of preprocessed volumes, optionally of several co-registered contrasts.

    Args:
        subjects: one entry per subject: an image or path, or a list of images/paths of the
            *same* subject on the same grid (e.g. its T1 and T2). Crops of a subject's contrasts
            are taken at the same place, so a crop pair shows one anatomy in two contrasts.
        spacing: the encoder grid spacing in mm (``None`` keeps each volume's own).
        crop_size: crop edge in voxels (the network needs a multiple of 16).
        intensity: normalisation spec (see :func:`AnatSSLLib.encoders.normalise_intensity`).
        foreground_fraction: share of crops centred on bright anatomy (above the 60th
            percentile of the first contrast) rather than anywhere.
        bias_field_std: > 0 multiplies each crop of each channel by its own smooth random field
            ``exp(g)``, ``g`` a trilinear interpolation of normal values (this standard
            deviation) on a 4-per-axis grid: an MRI-like bias field drawn independently per view, so
            that paired views always differ by one (our simulated subjects already draw one field per
            contrast, at std 0.12 over the whole head; this one is stronger and more local).
    """

    def __init__(
        self,
        subjects: Sequence[Image | str | os.PathLike | Sequence[Image | str | os.PathLike]],
        *,
        spacing: Sequence[float] | None = (2.0, 2.0, 2.0),
        crop_size: int = 64,
        intensity: dict | None = None,
        foreground_fraction: float = 0.9,
        bias_field_std: float = 0.0,
    ) -> None:
        if len(subjects) == 0:
            raise InputError("no training volumes given")
        self.crop_size = int(crop_size)
        if self.crop_size % 16:
            raise InputError(f"crop size must be a multiple of 16 (the network downsamples 4 times), got {crop_size}")
        self.subjects: list[np.ndarray] = []  # per subject: (n_contrasts, *S) float32
        self.names: list[str] = []
        fingerprint = hashlib.sha256()
        for entry in subjects:
            arrays, grid0 = [], None
            for image in subject_images(entry):
                check_volume(image, ndim=3, name=image.name)
                grid = to_encoder_grid(image, None if spacing is None else tuple(spacing))
                if grid0 is not None and not grid.same_geometry(grid0, atol=1e-3):
                    raise InputError(f"{image.name}: not on the grid of {grid0.name}; contrasts of one subject must be co-registered")
                grid0 = grid0 or grid
                arrays.append(pad_to_size(normalise_intensity(grid.array, intensity), self.crop_size))
                fingerprint.update(np.ascontiguousarray(image.array).tobytes())
            self.subjects.append(np.stack(arrays))
            self.names.append(grid0.name)
        self.data_fingerprint = "sha256:" + fingerprint.hexdigest()[:32]
        self.foreground_fraction = float(foreground_fraction)
        self.bias_field_std = float(bias_field_std)
        self._fg = [np.argwhere(a[0] > np.percentile(a[0], 60)) for a in self.subjects]

    def __len__(self) -> int:
        return len(self.subjects)

    @property
    def max_contrasts(self) -> int:
        return max(a.shape[0] for a in self.subjects)

    def sample(self, n: int, rng: np.random.Generator, channels: int = 1) -> np.ndarray:
        """``n`` crops ``(n, channels, c, c, c)`` float32.

        With ``channels=2`` each crop holds two different contrasts of one subject at the same
        place (the same contrast twice when the subject has only one).
        """
        c = self.crop_size
        out = np.empty((n, channels, c, c, c), dtype=np.float32)
        for b in range(n):
            v = int(rng.integers(len(self.subjects)))
            arr = self.subjects[v]
            shape = np.asarray(arr.shape[1:])
            if rng.random() < self.foreground_fraction and len(self._fg[v]):
                centre = self._fg[v][int(rng.integers(len(self._fg[v])))]
                start = np.clip(centre - c // 2, 0, shape - c)
            else:
                start = np.array([int(rng.integers(0, s - c + 1)) for s in shape])
            sl = tuple(slice(int(s), int(s) + c) for s in start)
            k = arr.shape[0]
            picks = rng.permutation(k)[:channels] if k >= channels else rng.integers(k, size=channels)
            for ch, contrast in enumerate(picks):
                out[b, ch] = arr[(int(contrast),) + sl]
                if self.bias_field_std > 0:
                    out[b, ch] *= _smooth_field(rng, self.bias_field_std, c)
        return out

    def torch_sampler(self, channels: int = 1):
        """``fn(generator, n) -> Tensor (n, channels, c, c, c)``: crops drawn from a torch generator
        (what :class:`AnatSSLLib.methods.ld.LDTask` asks for)."""
        import torch

        def sample(generator, n: int):
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            return torch.from_numpy(self.sample(n, np.random.default_rng(seed), channels))

        return sample


def _smooth_field(rng: np.random.Generator, std: float, size: int, control: int = 4) -> np.ndarray:
    """``exp`` of a trilinearly upsampled ``control^3`` grid of normal values: a smooth positive field ``size^3``."""
    from scipy.ndimage import zoom

    coarse = rng.normal(0.0, std, (control,) * 3)
    return np.exp(zoom(coarse, size / control, order=1, mode="nearest")).astype(np.float32)
