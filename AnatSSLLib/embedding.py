"""Dense embeddings of whole volumes, computed once and kept for the session.

:class:`EmbeddingStore` runs an encoder over a volume by sliding window (MONAI's
``sliding_window_inference``, so memory is bounded by the window, not the volume), keeps the
per-voxel embedding of each volume it has seen, and the centre-weighted (Gaussian-smoothed)
versions the landmark and search tools ask for. A second query on the same volumes reuses all
of it, which is what makes a second click cost milliseconds.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Callable

import numpy as np

from .encoders import LoadedEncoder, prepare_volume
from .image import Image

__all__ = [
    "EmbeddedVolume",
    "EmbeddingStore",
    "gaussian_filter",
    "gaussian_smooth",
    "unit_norm",
    "volume_key",
    "whiten_features",
]


def _cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 convolutions natively (AVX-512 BF16 or AMX), where they
    run about a third faster than float32."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def volume_key(image: Image) -> str:
    """A content key for ``image``: voxel bytes and geometry (so an edited volume is re-embedded)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(image.array).tobytes())
    h.update(np.asarray(image.spacing + image.origin, dtype=np.float64).tobytes())
    h.update(np.asarray(image.direction, dtype=np.float64).tobytes())
    h.update(str(image.array.dtype).encode())
    return h.hexdigest()


def _smoothing_matrix(size: int, sigma: float, dtype, device, padding: str = "replicate"):
    """``(size, size)`` matrix ``M`` with ``M @ line`` = the line convolved by a normalised Gaussian
    (cut at 3 sigma). ``padding="replicate"``: the taps that fall outside are folded onto the end
    samples; ``"zeros"``: they are dropped (the line is zero outside)."""
    import torch

    radius = max(1, int(np.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    matrix = np.zeros((size, size))
    rows = np.arange(size)
    for offset, weight in zip(range(-radius, radius + 1), taps):
        cols = rows + offset
        if padding == "zeros":
            inside = (cols >= 0) & (cols < size)
            np.add.at(matrix, (rows[inside], cols[inside]), weight)
        else:
            np.add.at(matrix, (rows, np.clip(cols, 0, size - 1)), weight)
    return torch.as_tensor(matrix, dtype=dtype, device=device)


def gaussian_filter(features, sigma_vox: tuple[float, ...], padding: str = "replicate", step: int | tuple[int, ...] = 1):
    """Each channel of ``features`` (``(C, *S)``) filtered by a normalised Gaussian of standard
    deviation ``sigma_vox`` (voxels, one per spatial axis, in ``[k, j, i]`` order, cut at 3 sigma;
    axes with sigma <= 0 untouched). Borders: ``padding="replicate"`` (edge values continue) or
    ``"zeros"`` (zero outside, as for a normalised convolution). ``step`` (one for all axes or one
    per axis): keep every ``step``-th output voxel from index 0, computed directly (each axis's pass
    then reads an already reduced volume). Returns ``(C, *S')``, ``S'_a = ceil(S_a / step_a)``."""
    import torch

    if padding not in ("replicate", "zeros"):
        raise ValueError(f"gaussian_filter padding must be 'replicate' or 'zeros', got {padding!r}")
    steps = (step,) * len(sigma_vox) if isinstance(step, int) else tuple(step)
    x = features.contiguous()
    for axis, (sigma, stride) in enumerate(zip(sigma_vox, steps)):
        if sigma <= 0 and stride == 1:
            continue
        # One matrix product per axis with the (size x size) banded filter matrix: BLAS runs it
        # several times faster than a 1D convolution over every line, and memory stays that of the
        # volume (a depthwise 3D convolution with a long kernel can ask for many gigabytes). The
        # volume is viewed as (lines before, size, lines after), so that no axis is moved and
        # copied: 40 % faster than moving the axis last.
        shape = tuple(x.shape)
        size = shape[axis + 1]
        if sigma > 0:
            matrix = _smoothing_matrix(size, float(sigma), x.dtype, x.device, padding)[::stride]
        else:
            matrix = torch.eye(size, dtype=x.dtype, device=x.device)[::stride]
        out_shape = shape[: axis + 1] + (matrix.shape[0],) + shape[axis + 2 :]
        before, after = int(np.prod(shape[: axis + 1])), int(np.prod(shape[axis + 2 :]))
        if after == 1:
            x = (x.reshape(before, size) @ matrix.T).reshape(out_shape)
        else:
            x = torch.matmul(matrix, x.reshape(before, size, after)).reshape(out_shape)
    return x


def unit_norm(features):
    """``features`` ``(D, *S)`` scaled to unit L2 norm along ``D`` (as ``F.normalize(x, dim=0)``,
    eps 1e-12). Accumulating the squares channel by channel reads memory in order: 2.5x faster
    on a CPU than ``F.normalize``'s strided reduction for a 32-channel head volume."""
    import torch

    flat = features.reshape(features.shape[0], -1)
    squares = torch.zeros(flat.shape[1], dtype=flat.dtype, device=flat.device)
    for row in flat:
        squares.addcmul_(row, row)
    return features * squares.clamp_min_(1e-24).rsqrt_().reshape(1, *features.shape[1:])


def gaussian_smooth(features, sigma_vox: tuple[float, ...], step: int | tuple[int, ...] = 1):
    """Centre-weighted average of a feature map, then per-voxel L2 normalisation.

    ``features`` is ``(D, *S)``; :func:`gaussian_filter` (LD's W_c on every channel, every
    ``step``-th voxel), then unit norm along ``D``. Returns ``(D, *S')``.
    """
    return unit_norm(gaussian_filter(features, sigma_vox, step=step))


def whiten_features(features, mask: np.ndarray | None = None):
    """Per-volume ZCA whitening of an embedding, then unit norm per voxel.

    ``features`` ``(D, *S)``; ``mask`` ``(*S)`` bool picks the voxels whose mean and covariance
    are estimated (the anatomy: the background's near-constant embedding would dominate them).
    Returns ``normalize(W (e - mu))`` with ``W = C^-1/2`` (eigenvalues below ``1e-6`` of the
    largest are clamped), so that over ``mask`` every direction of the embedding carries equal
    variance before the cosine comparisons.

    Why: an encoder trained on one contrast spends most of its variance on a few intensity-driven
    directions; on a volume of another contrast those directions move, and a cosine dominated by
    them matches the wrong anatomy. Whitening each volume by its own statistics removes that
    volume-level shift (an instance normalisation of the embedding) and lets the weaker, more
    anatomical directions count. Measured with the default LD encoder, template T1 -> 4 subjects,
    landmark error T1 1.64 -> 1.45 mm, T2 8.93 -> 6.07 mm. Not in the LD paper: our addition.
    """
    import torch

    d = features.shape[0]
    flat = features.reshape(d, -1)
    sel = flat if mask is None else flat[:, torch.as_tensor(np.asarray(mask, bool).reshape(-1))]
    if sel.shape[1] <= d:  # too few voxels to estimate a covariance: use them all
        sel = flat
    n = sel.shape[1]
    mean = sel.mean(dim=1, keepdim=True)
    # E[x x^T] - mu mu^T from one float32 product (unit-norm inputs: no cancellation to fear),
    # the eigen-decomposition in float64
    cov = (sel @ sel.T).double() / n - mean.double() @ mean.double().T
    cov = cov * (n / max(1, n - 1))
    eigval, eigvec = torch.linalg.eigh(cov)
    eigval = eigval.clamp_min(float(eigval.max()) * 1e-6 + 1e-30)
    transform = eigvec @ torch.diag(eigval.rsqrt()) @ eigvec.T
    shift = (transform @ mean.double()).to(flat.dtype)
    white = torch.addmm(-shift, transform.to(flat.dtype), flat)  # W x - W mu
    return unit_norm(white).reshape(features.shape)


# normalised intensity above which a voxel counts as anatomy for the whitening statistics
_WHITEN_FOREGROUND = 0.1


@dataclasses.dataclass
class EmbeddedVolume:
    """One volume's dense embedding on the encoder grid.

    Attributes:
        grid: the resampled image whose geometry maps embedding voxels to LPS mm.
        features: ``(D, *S)`` float32 tensor, unit norm along ``D``, indexed like ``grid.array``.
        intensity: the normalised input the network saw, ``(*S)`` float32 in ``[0, 1]``.
        smoothed: centre-weighted versions keyed by ``(sigma_mm, lattice step per axis)``.
    """

    grid: Image
    features: object
    intensity: np.ndarray
    smoothed: dict = dataclasses.field(default_factory=dict)

    def smoothed_features(self, sigma_mm: float, step: int | tuple[int, ...] = 1):
        """``features`` averaged by a Gaussian of ``sigma_mm`` (cached), unit norm per voxel; with
        ``step`` > 1 only on every ``step``-th voxel (:meth:`lattice` gives its geometry), computed
        directly at a fraction of the cost: for searches on a coarse lattice."""
        steps = self._steps(step)
        key = (round(float(sigma_mm), 4), steps)
        if key not in self.smoothed:
            if key[0] <= 0:
                self.smoothed[key] = self.features[(slice(None),) + tuple(slice(None, None, s) for s in steps)]
            else:
                sigma_vox = tuple(key[0] / s for s in reversed(self.grid.spacing))
                self.smoothed[key] = gaussian_smooth(self.features, sigma_vox, step=steps)
        return self.smoothed[key]

    def lattice(self, step: int | tuple[int, ...] = 1) -> Image:
        """The geometry of every ``step``-th voxel of ``grid`` (index 0 kept), as an empty image."""
        steps = self._steps(step)
        if all(s == 1 for s in steps):
            return self.grid
        shape = tuple(-(-n // s) for n, s in zip(self.grid.array.shape, steps))
        return Image(
            np.zeros(shape, dtype=np.uint8),
            spacing=tuple(sp * st for sp, st in zip(self.grid.spacing, reversed(steps))),
            origin=self.grid.origin,
            direction=self.grid.direction,
            name=f"{self.grid.name} (every {steps} voxels)",
        )

    def _steps(self, step) -> tuple[int, ...]:
        nd = self.grid.ndim
        steps = (int(step),) * nd if np.isscalar(step) else tuple(int(v) for v in step)
        if len(steps) != nd or min(steps) < 1:
            raise ValueError(f"lattice step must be a positive integer or {nd} of them, got {step!r}")
        return steps


class EmbeddingStore:
    """Embeds volumes with one encoder and keeps the results (least recently used first out).

    Args:
        encoder: a loaded encoder whose network has ``embed(x) -> (B, D, *S)``.
        roi_size: sliding-window size in voxels (multiple of 16); bounds memory: a volume whose
            padded size has no more voxels than the window is embedded in one window of its own
            shape (a 114 x 140 x 101 head at the encoders' 2 mm: one 128 x 144 x 112 window instead
            of two overlapping 128^3 ones). The default, 128, holds a head at 2 mm in one window;
            96 needed up to eight overlapping windows. Measured on one CPU thread with the default
            LD network and that head (before the one-window rule): 12.3 s and 2.3 GB peak process
            memory, against 23.7 s and 1.5 GB with 96; the landmark error was the same (1.63
            against 1.66 mm, template T1 -> 4 subjects).
        cpu_bfloat16: run the network in bfloat16 on the CPU (None: where the CPU computes it
            natively, AVX-512 BF16 or AMX). Off by default: it is about a third faster there, but
            its rounding (cosine to the float32 embedding 0.9994) made one CPU's answers differ
            from another's by more than noise does (mean landmark error 2.79 against 2.25 mm on
            one subject), and a scan must get the same landmarks on every workstation. On CUDA the
            network runs in mixed precision anyway (:func:`AnatSSLLib.device.autocast`).
        overlap: sliding-window overlap fraction.
        max_volumes: how many embedded volumes to keep.
        whiten: whiten each volume's embedding by its own statistics over the anatomy
            (:func:`whiten_features`): what the landmark and segmentation tools match (the
            default); the search tool keeps the raw embedding (``whiten=False``: its indexes
            hold raw vectors).
    """

    def __init__(
        self,
        encoder: LoadedEncoder,
        *,
        roi_size: int | tuple[int, ...] = 128,
        overlap: float = 0.25,
        max_volumes: int = 16,
        sw_batch_size: int = 1,
        cpu_bfloat16: bool | None = False,
        whiten: bool = True,
    ) -> None:
        self.encoder = encoder
        self.whiten = bool(whiten)
        self.cpu_bfloat16 = _cpu_has_bfloat16() if cpu_bfloat16 is None else bool(cpu_bfloat16)
        nd = encoder.spatial_dims
        self.roi_size = (roi_size,) * nd if isinstance(roi_size, int) else tuple(roi_size)
        self.overlap = overlap
        self.max_volumes = max_volumes
        self.sw_batch_size = sw_batch_size
        self._volumes: collections.OrderedDict[str, EmbeddedVolume] = collections.OrderedDict()

    def __contains__(self, image: Image) -> bool:
        return volume_key(image) in self._volumes

    def clear(self) -> None:
        self._volumes.clear()

    def get(self, image: Image, progress: Callable[[float], None] | None = None, key: str | None = None) -> EmbeddedVolume:
        """The embedding of ``image``, computed on first use. ``key``: its :func:`volume_key`, if the
        caller has it already (hashing a volume is most of what a query on a kept one costs)."""
        key = key or volume_key(image)
        if key in self._volumes:
            self._volumes.move_to_end(key)
            return self._volumes[key]
        embedded = self._embed(image, progress)
        self._volumes[key] = embedded
        while len(self._volumes) > self.max_volumes:
            self._volumes.popitem(last=False)
        return embedded

    def _embed(self, image: Image, progress) -> EmbeddedVolume:
        import torch
        from monai.inferers import sliding_window_inference

        from .device import autocast

        grid, array = prepare_volume(image, self.encoder)
        x = torch.from_numpy(array)[None, None].to(self.encoder.device)
        model = self.encoder.model
        predictor = model.embed if hasattr(model, "embed") else model
        layout = torch.contiguous_format
        if x.ndim == 5 and x.device.type == "cpu":
            # oneDNN's 3D convolutions run about 30 % faster on a CPU with channels-last tensors
            # (measured with the default LD network, one thread); the values are the same
            layout = torch.channels_last_3d
            model.to(memory_format=layout)
        whole = tuple(max(16, int(np.ceil(s / 16.0)) * 16) for s in array.shape)
        if np.prod(whole) <= np.prod(self.roi_size):
            # the whole volume in one window of no more voxels than roi_size: a 114 x 140 x 101 head
            # would otherwise take two overlapping 128^3 windows, twice the network's work
            roi = whole
        else:
            roi = tuple(min(r, w) for r, w in zip(self.roi_size, whole))
        cpu_bf16 = x.device.type == "cpu" and self.cpu_bfloat16
        with torch.no_grad(), autocast(self.encoder.device), torch.autocast("cpu", torch.bfloat16, enabled=cpu_bf16):
            out = sliding_window_inference(
                x,
                roi_size=roi,
                sw_batch_size=self.sw_batch_size,
                predictor=lambda patch: predictor(patch.contiguous(memory_format=layout)).float().contiguous(),
                overlap=self.overlap,
                mode="gaussian",
                padding_mode="replicate",
                progress=False,
            )
        features = unit_norm(out[0].float()).cpu()
        if self.whiten:
            features = whiten_features(features, array > _WHITEN_FOREGROUND)
        if progress is not None:
            progress(1.0)
        return EmbeddedVolume(grid=grid, features=features, intensity=array)
