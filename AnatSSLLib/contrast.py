"""Bridging two contrasts: a volume's intensities mapped into another volume's contrast.

Our encoders are not contrast-invariant: the T1 and the T2 embedding of one place differ more than
the embeddings of neighbouring places (``benchmarks/README.md``), so matching a T1 reference to a T2
target compares unlike things. Where the two volumes can be roughly aligned, the relation between
their intensities can be read off their joint histogram instead: for each intensity ``s`` of the
target (the *source* here), the mean intensity of the reference at the corresponding places,
``E[r | s]``. Passing the target through that transfer function gives a
*pseudo-reference-contrast* copy of it, which the encoder then matches to the reference within one
contrast. This is the adaptive intensity correction of multimodal registration (Guimond, Roche,
Ayache, Meunier, "Three-dimensional multimodal brain warping using the demons algorithm and
adaptive intensity corrections", IEEE TMI 20(1), 2001), fitted here once on a rough (affine)
alignment, or again through a finer one; not part of the LD paper: our addition to its tools.

A function of the source intensity alone cannot separate tissues that share one source intensity
but differ in the reference: white matter and the skull are both dark in T2, while white matter is
bright and the skull dark in T1. The transfer is therefore also conditioned on the source's
intensity smoothed over ``context_sigma_mm`` (a voxel's neighbourhood: brain around white
matter, scalp and air around the skull), ``E[r | s, G_σ * s]``, read off a 2D joint histogram, with
the 1D function where a cell of that histogram holds too few pairs. Measured with the default
encoder, template T1 -> 3 T2 subjects of a validation population (landmark error, tissue Dice of
the segmentation tool): 1D 2.89 mm and 0.619; with the smoothed intensity at 4, 8, 12, 16 mm:
2.44/0.682, 2.35/0.695, 2.29/0.706, 2.19/0.695, hence the default of 12 mm.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from .encoders import normalise_intensity
from .errors import InputError
from .image import Image

__all__ = [
    "CONTRAST_CHOICES",
    "ContrastDecision",
    "IntensityTransfer",
    "check_contrast_pair",
    "decide_contrast",
    "fit_intensity_transfer",
    "intensity_correlation",
    "looks_like_ct",
    "map_points",
]

#: what ``--contrast`` / ``contrast=`` accepts: decide per target, never map, always map
CONTRAST_CHOICES = ("auto", "same", "match")

#: normalised intensity above which a reference voxel counts as tissue for the contrast decision
TISSUE_LEVEL = 0.3

#: with ``contrast="auto"``, a target whose intensities correlate at least this well with the
#: reference's over the reference's tissue (Pearson, :func:`intensity_correlation`, under the
#: embedding's global affine) is matched as it is; below it, it is first mapped into the
#: reference's contrast. Measured with the default encoder, template T1 reference, 4 simulated
#: subjects at 2 mm: T1 targets 0.67-0.73, T2 0.27-0.36, PD 0.21-0.29, FLAIR 0.20-0.33; the
#: threshold sits 0.14 from the nearest, so noise does not flip the decision.
SAME_CONTRAST_MIN_CORRELATION = 0.5

#: normalised intensity above which a voxel counts as anatomy for the joint histogram
_ANATOMY = 0.02


def _smoothed(norm: np.ndarray, image: Image, sigma_mm: float) -> np.ndarray:
    """``norm`` (``image``'s normalised intensities) smoothed by a Gaussian of ``sigma_mm``."""
    from scipy import ndimage

    return ndimage.gaussian_filter(norm, [sigma_mm / s for s in reversed(image.spacing)])


def _bin(values: np.ndarray, bins: int) -> np.ndarray:
    return np.clip((values * bins).astype(int), 0, bins - 1)


@dataclasses.dataclass(frozen=True)
class IntensityTransfer:
    """A transfer function from one normalised contrast (the source's) into another (the reference's).

    Attributes:
        centres: ``(bins,)`` source intensities (normalised to [0, 1], bin centres).
        values: ``(bins,)`` the mean reference intensity of each source-intensity bin (``E[r | s]``,
            gaps interpolated linearly).
        table: ``(bins, context_bins)`` the mean reference intensity of each (intensity, smoothed
            intensity) cell (``E[r | s, G_σ * s]``), blended towards ``values`` where the cell held
            few pairs (fully below ``min_count / 2``), read bilinearly between cell centres; None
            without context.
        context_sigma_mm: σ of the smoothed intensity the table is indexed by (0: no context).
        samples: how many point pairs the function was fitted on.
    """

    centres: np.ndarray
    values: np.ndarray
    table: np.ndarray | None
    context_sigma_mm: float
    samples: int

    def apply(self, image: Image) -> Image:
        """``image`` (any intensity range) normalised as the encoders normalise it, then mapped:
        a float32 image in the reference's normalised contrast, with ``image``'s geometry."""
        norm = normalise_intensity(image.array)
        if self.table is None:
            mapped = np.interp(norm, self.centres, self.values)
        else:
            from scipy import ndimage

            # bilinear between cell centres: a voxel whose intensity crosses a bin edge moves smoothly
            context = _smoothed(norm, image, self.context_sigma_mm)
            rows, cols = self.table.shape
            coords = np.stack([norm.ravel() * rows - 0.5, context.ravel() * cols - 0.5])
            mapped = ndimage.map_coordinates(self.table, coords, order=1, mode="nearest").reshape(norm.shape)
        return image.with_array(mapped.astype(np.float32), name=f"{image.name} (in the reference's contrast)")


def map_points(transform: np.ndarray | Callable[[np.ndarray], np.ndarray], points: np.ndarray) -> np.ndarray:
    """``(N, nd)`` LPS points through a homogeneous ``(nd+1, nd+1)`` matrix or a callable."""
    points = np.asarray(points, float)
    if callable(transform):
        return np.asarray(transform(points), float)
    m = np.asarray(transform, float)
    nd = points.shape[1]
    if m.shape != (nd + 1, nd + 1):
        raise InputError(f"expected a {nd + 1}x{nd + 1} homogeneous matrix, got shape {m.shape}")
    return points @ m[:nd, :nd].T + m[:nd, nd]


def fit_intensity_transfer(
    source: Image,
    reference: Image,
    reference_to_source: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    source_to_reference: np.ndarray | Callable[[np.ndarray], np.ndarray] | None = None,
    context_sigma_mm: float = 12.0,
    bins: int = 64,
    context_bins: int = 16,
    min_count: int = 20,
    max_samples: int = 200_000,
) -> IntensityTransfer:
    """The function taking ``source``'s intensities into ``reference``'s contrast (module docstring).

    Give the correspondence in whichever direction you have it (LPS mm -> LPS mm: a homogeneous
    matrix, e.g. an affine registration's, or a callable such as
    :meth:`~AnatSSLLib.tools.correspondence.Correspondence.transform_points`):
    ``reference_to_source`` samples the reference's anatomy and reads the source where each sample
    lands; ``source_to_reference`` samples the source's anatomy and reads the reference. Anatomy is
    normalised intensity above 0.02, on a regular sub-grid of at most ``max_samples`` voxels;
    values are read by trilinear interpolation, and pairs landing outside the other volume are
    dropped. The pairs are binned by source intensity (``bins`` equal bins over [0, 1]) and, with
    ``context_sigma_mm`` > 0, also by the source's intensity smoothed over that many mm
    (``context_bins`` bins); a bin with at least ``min_count`` pairs gets their mean reference
    intensity. The 1D function fills its empty bins by linear interpolation (held flat beyond the
    ends); a 2D cell's mean is blended with the 1D function's by its count (its own from
    ``1.5 * min_count`` pairs, the 1D function's below ``min_count / 2``), so that no value jumps
    when a count crosses a threshold.

    Raises:
        InputError: not exactly one of the two maps, volumes of different dimension, or fewer than
            two bins can be estimated (the map carries one volume's anatomy outside the other).
    """
    if (reference_to_source is None) == (source_to_reference is None):
        raise InputError("fit_intensity_transfer: give exactly one of reference_to_source and source_to_reference")
    if source.ndim != reference.ndim:
        raise InputError(f"{source.name}: a {source.ndim}D image cannot take the contrast of the {reference.ndim}D {reference.name}")
    source_norm = normalise_intensity(source.array)
    context = _smoothed(source_norm, source, context_sigma_mm) if context_sigma_mm > 0 else None
    if reference_to_source is not None:
        kji, landed, inside = _samples(reference, reference_to_source, source, max_samples)
        ref_values = normalise_intensity(reference.array)[tuple(kji.T)][inside]
        src_values, src_context = _read(source, landed[inside], source_norm, context)
    else:
        kji, landed, inside = _samples(source, source_to_reference, reference, max_samples, norm=source_norm)
        src_values = source_norm[tuple(kji.T)][inside]
        src_context = None if context is None else context[tuple(kji.T)][inside]
        ref_values, _ = _read(reference, landed[inside], normalise_intensity(reference.array), None)
    index = _bin(src_values, bins)
    sums = np.bincount(index, weights=ref_values, minlength=bins)
    counts = np.bincount(index, minlength=bins)
    centres = (np.arange(bins) + 0.5) / bins
    known = counts >= min_count
    if known.sum() < 2:
        raise InputError(
            f"{source.name}: too few places of one volume's anatomy fall inside the other ({int(inside.sum())} of "
            f"{len(inside)} samples) to relate its contrast to {reference.name}'s; check that the two volumes show the "
            f"same anatomy"
        )
    values = np.interp(centres, centres[known], sums[known] / counts[known])
    table = None
    if src_context is not None:
        cell = index * context_bins + _bin(src_context, context_bins)
        cell_sums = np.bincount(cell, weights=ref_values, minlength=bins * context_bins).reshape(bins, context_bins)
        cell_counts = np.bincount(cell, minlength=bins * context_bins).reshape(bins, context_bins)
        # a cell's own mean counts fully from 1.5 x min_count pairs and not at all below half of it:
        # a cell whose count crosses a hard threshold would switch its voxels' values at once
        trust = np.clip((cell_counts - 0.5 * min_count) / float(min_count), 0.0, 1.0)
        table = trust * (cell_sums / np.maximum(cell_counts, 1)) + (1.0 - trust) * values[:, None]
    return IntensityTransfer(centres=centres, values=values, table=table, context_sigma_mm=float(context_sigma_mm),
                             samples=int(inside.sum()))


def _samples(sampled: Image, sampled_to_other, other: Image, max_samples: int, norm: np.ndarray | None = None):
    """Voxel indices ``[k, j, i]`` of ``sampled``'s anatomy on a regular sub-grid, where they land
    in ``other`` (LPS mm) through ``sampled_to_other``, and which land inside it."""
    norm = normalise_intensity(sampled.array) if norm is None else norm
    anatomy = norm > _ANATOMY
    step = max(1, int(np.ceil((int(anatomy.sum()) / max_samples) ** (1.0 / sampled.ndim))))
    sub = anatomy[tuple(slice(None, None, step) for _ in range(sampled.ndim))]
    kji = np.argwhere(sub) * step
    landed = map_points(sampled_to_other, sampled.index_to_physical(kji[:, ::-1].astype(float)))
    return kji, landed, other.contains(landed)


def _read(image: Image, lps: np.ndarray, norm: np.ndarray, context: np.ndarray | None):
    """``norm`` (and ``context``, if given) of ``image`` at LPS points, trilinear."""
    import torch

    from .geometry import sample_field

    maps = [norm] if context is None else [norm, context]
    values = sample_field(torch.as_tensor(np.stack(maps).astype(np.float32)), image.physical_to_index(lps)[:, ::-1]).numpy()
    return values[:, 0], (values[:, 1] if context is not None else None)


# ---- which targets need mapping ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ContrastDecision:
    """How one target is matched to the reference.

    Attributes:
        mode: ``"same"`` (matched as it is) or ``"match"`` (mapped into the reference's contrast first).
        requested: what the caller asked for (``"auto"``, ``"same"`` or ``"match"``).
        correlation: with ``"auto"``, the intensity correlation the decision was read from.
    """

    mode: str
    requested: str
    correlation: float | None = None

    def describe(self) -> str:
        """One line for the console and the outputs, e.g. ``contrast=match (auto: r=-0.41 < 0.50)``."""
        if self.requested != "auto":
            return f"contrast={self.mode} (requested)"
        sign = ">=" if self.mode == "same" else "<"
        return f"contrast={self.mode} (auto: intensity correlation with the reference {self.correlation:.2f} {sign} {SAME_CONTRAST_MIN_CORRELATION:.2f})"


def check_contrast_choice(contrast: str) -> str:
    """``contrast`` if it is one of :data:`CONTRAST_CHOICES`, else an :class:`InputError`."""
    if contrast not in CONTRAST_CHOICES:
        raise InputError(f"contrast must be one of {', '.join(CONTRAST_CHOICES)}, got {contrast!r}")
    return contrast


def decide_contrast(correlation: float | None, requested: str = "auto") -> ContrastDecision:
    """The :class:`ContrastDecision` for a target whose intensities correlate with the reference's
    by ``correlation`` (only read with ``requested="auto"``)."""
    check_contrast_choice(requested)
    if requested != "auto":
        return ContrastDecision(requested, requested, correlation)
    mode = "same" if correlation >= SAME_CONTRAST_MIN_CORRELATION else "match"
    return ContrastDecision(mode, "auto", float(correlation))


def intensity_correlation(
    reference: np.ndarray, reference_grid: Image, target: np.ndarray, target_grid: Image, reference_to_target: np.ndarray,
    mask: np.ndarray | None = None, max_samples: int = 50_000,
) -> float:
    """Pearson correlation of two volumes' normalised intensities at corresponding places of the
    reference's tissue.

    ``reference`` / ``target``: normalised arrays ``[k, j, i]`` on the grids ``reference_grid`` /
    ``target_grid``; ``reference_to_target``: a homogeneous affine (LPS mm). The reference's voxels
    above :data:`TISSUE_LEVEL` (within ``mask``, if given) are sampled on a regular sub-grid of at
    most ``max_samples`` voxels and the target read there (trilinear); pairs landing outside it
    are dropped. The tissue level leaves out air and the head's outline, which every contrast
    shares and which would make any two head scans correlate.

    Raises:
        InputError: fewer than 100 pairs, or a volume constant over them (no correlation exists).
    """
    import torch

    from .geometry import sample_field

    reference = np.asarray(reference, np.float32)
    tissue = reference > TISSUE_LEVEL
    if mask is not None:
        tissue &= np.asarray(mask, bool)
    step = max(1, int(np.ceil((int(tissue.sum()) / max_samples) ** (1.0 / reference.ndim))))
    kji = np.argwhere(tissue[tuple(slice(None, None, step) for _ in range(reference.ndim))]) * step
    landed = map_points(reference_to_target, reference_grid.index_to_physical(kji[:, ::-1].astype(float)))
    inside = target_grid.contains(landed)
    if int(inside.sum()) < 100:
        raise InputError(
            f"{target_grid.name}: only {int(inside.sum())} places of {reference_grid.name}'s anatomy fall inside it under "
            f"the alignment; check that the two volumes show the same anatomy"
        )
    a = reference[tuple(kji[inside].T)].astype(np.float64)
    b = sample_field(torch.as_tensor(np.asarray(target, np.float32)[None]), target_grid.physical_to_index(landed[inside])[:, ::-1])
    b = b.numpy()[:, 0].astype(np.float64)
    sa, sb = a.std(), b.std()
    if sa < 1e-6 or sb < 1e-6:
        which = reference_grid.name if sa < 1e-6 else target_grid.name
        raise InputError(f"{which}: the intensities are constant over the anatomy; no contrast to match")
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


def looks_like_ct(image: Image) -> bool:
    """Whether ``image`` holds Hounsfield units (air near -1000), as a CT does and an MR does not."""
    arr = np.asarray(image.array)
    return bool(np.issubdtype(arr.dtype, np.number) and arr.size and np.percentile(arr, 1) < -500)


def check_contrast_pair(reference: Image, target: Image, contrast: str = "auto") -> None:
    """Refuse a pair whose contrasts the tools cannot bridge (before any heavy work).

    A CT and an MR volume: the transfer function needs the tissues that differ in the reference
    to differ in the target too, and CT shows grey matter, white matter and CSF within a few
    Hounsfield units of each other. With ``contrast="same"`` the caller takes responsibility.

    Raises:
        InputError: one of the two volumes is a CT and the other is not.
    """
    check_contrast_choice(contrast)
    if contrast == "same":
        return
    ref_ct, tgt_ct = looks_like_ct(reference), looks_like_ct(target)
    if ref_ct != tgt_ct:
        kind = ("CT", "MR") if tgt_ct else ("MR", "CT")
        raise InputError(
            f"{target.name}: looks like {kind[0]} (values in Hounsfield units: {'yes' if tgt_ct else 'no'}) while the "
            f"reference {reference.name} looks like {kind[1]}; matching {kind[0]} to an {kind[1]} reference is not "
            f"supported: use a reference volume of the target's modality (with its own points or labels), or pass "
            f"--contrast same to try anyway"
        )
