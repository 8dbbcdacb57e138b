"""Raw-intensity patch matching baseline: normalised cross-correlation (NCC), coarse to fine.

For each reference landmark a cube of intensities around it is cut from the reference volume; the
landmark is found in a target volume by sliding that cube over a search box and taking the position
of highest NCC. Two or more levels run coarse to fine: a wide search on a smoothed coarse grid,
then a narrow search on a finer grid around the coarse hit. The search starts from the reference
position shifted by the difference of the two volumes' intensity centroids (``init="centroid"``),
so the volumes need only overlap roughly in physical space.

Patches and search boxes are sampled on axis-aligned LPS grids in mm (trilinear interpolation),
so differing voxel sizes or orientations of reference and target are handled. NCC is computed with
FFT correlation and box sums (``O(N log N)`` per landmark and level); time is bounded by the
level settings, not by the image size. Raw intensities make this a same-contrast baseline: across
contrasts (T1 -> T2) it is expected to fail, which is the point of reporting it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage, signal

from ..errors import InputError
from ..image import Image
from ..peaks import subvoxel_peak
from ..points import PointSet

__all__ = ["NCCLevel", "NCCPatchMatching", "RegisteredNCC", "ncc_map"]


@dataclasses.dataclass(frozen=True)
class NCCLevel:
    """One level of the search.

    Args:
        spacing_mm: grid step of patch and search box (mm); the images are Gaussian-smoothed with
            sigma = spacing/2 mm before sampling when that exceeds their voxel size.
        patch_mm: edge of the cubic patch (mm).
        search_mm: half-width of the search box around the current estimate (mm).
    """

    spacing_mm: float
    patch_mm: float
    search_mm: float

    def __post_init__(self) -> None:
        if not (self.spacing_mm > 0 and self.patch_mm >= self.spacing_mm and self.search_mm >= 0):
            raise InputError(
                f"NCC level needs spacing_mm > 0, patch_mm >= spacing_mm, search_mm >= 0; got {self}"
            )

    @property
    def patch_half(self) -> int:
        return max(1, int(round(self.patch_mm / (2 * self.spacing_mm))))

    @property
    def search_half(self) -> int:
        return int(round(self.search_mm / self.spacing_mm))


def _box_sum_valid(a: np.ndarray, m: int) -> np.ndarray:
    """Sums of ``a`` over every ``m x m x m`` window fully inside ``a`` (shape ``a.shape - m + 1``)."""
    out = a
    for axis in range(a.ndim):
        c = np.cumsum(out, axis=axis)
        pad = [(0, 0)] * a.ndim
        pad[axis] = (1, 0)
        c = np.pad(c, pad)
        hi = [slice(None)] * a.ndim
        lo = [slice(None)] * a.ndim
        hi[axis] = slice(m, None)
        lo[axis] = slice(None, -m)
        out = c[tuple(hi)] - c[tuple(lo)]
    return out


def ncc_map(search: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of ``patch`` (``m^3``) at every valid position of ``search`` (``(n+m-1)^3``).

    Returns an ``n^3`` array in [-1, 1]; flat windows (no variance) score 0.
    """
    m = patch.shape[0]
    t = patch.astype(np.float64) - patch.mean()
    norm_t = float(np.sqrt(np.sum(t * t)))
    s = search.astype(np.float64)
    out_shape = tuple(d - m + 1 for d in s.shape)
    if norm_t <= 1e-12 or min(out_shape) < 1:
        return np.zeros(tuple(max(1, d) for d in out_shape))
    num = signal.fftconvolve(s, t[::-1, ::-1, ::-1], mode="valid")
    n = t.size
    s1 = _box_sum_valid(s, m)
    s2 = _box_sum_valid(s * s, m)
    var = np.maximum(s2 - s1 * s1 / n, 0.0)
    den = norm_t * np.sqrt(var)
    with np.errstate(invalid="ignore", divide="ignore"):
        ncc = np.where(den > 1e-9 * max(norm_t, 1.0), num / den, 0.0)
    return np.clip(ncc, -1.0, 1.0)


def _offsets(half: int, step: float) -> np.ndarray:
    """LPS offsets (mm) of a cubic grid ``(2h+1)^3 x 3``, array order [z, y, x] like the sampled block."""
    r = np.arange(-half, half + 1) * step
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    return np.stack([x, y, z], axis=-1)


class _Sampler:
    """Trilinear sampling of an image (smoothed per level) at LPS points."""

    def __init__(self, image: Image):
        if image.ndim != 3:
            raise InputError(f"{image.name}: NCC patch matching needs a 3D image, got shape {image.array.shape}")
        self.image = image
        self._cache: dict[float, np.ndarray] = {}

    def array(self, spacing_mm: float) -> np.ndarray:
        if spacing_mm not in self._cache:
            a = np.asarray(self.image.array, dtype=np.float32)
            vox = np.asarray(self.image.spacing[::-1], dtype=float)  # array axes z, y, x
            sigma_mm = np.sqrt(np.maximum((spacing_mm / 2.0) ** 2 - (vox / 2.0) ** 2, 0.0))
            sigma = sigma_mm / vox
            self._cache[spacing_mm] = ndimage.gaussian_filter(a, sigma) if np.any(sigma > 0.25) else a
        return self._cache[spacing_mm]

    def sample(self, points: np.ndarray, spacing_mm: float) -> np.ndarray:
        idx = self.image.physical_to_index(points.reshape(-1, 3))
        coords = idx[:, ::-1].T  # (k, j, i) rows for map_coordinates
        vals = ndimage.map_coordinates(self.array(spacing_mm), coords, order=1, mode="nearest")
        return vals.reshape(points.shape[:-1])

    def centroid(self) -> np.ndarray:
        a = np.asarray(self.image.array, dtype=np.float64)
        w = a - a.min()
        total = w.sum()
        if total <= 0:
            return self.image.index_to_physical((np.asarray(self.image.size) - 1) / 2.0)
        k, j, i = np.indices(a.shape, sparse=True)
        idx = np.array([(w * i).sum(), (w * j).sum(), (w * k).sum()]) / total
        return self.image.index_to_physical(idx)


class NCCPatchMatching:
    """Landmark baseline: raw-intensity NCC patch matching, coarse to fine (``LandmarkMethod`` protocol).

    Args:
        levels: search levels, coarse first; default: 4 mm grid, 32 mm patch, +-36 mm search, then
            2 mm grid, 16 mm patch, +-6 mm search.
        init: ``"centroid"`` (shift by the difference of intensity centroids) or ``"none"``.

    ``locate`` returns the best positions (LPS mm) with ``confidence`` = NCC at the final level.
    """

    name = "ncc"
    description = "raw-intensity NCC patch matching, coarse to fine"

    def __init__(self, levels: list[NCCLevel] | None = None, init: str = "centroid"):
        self.levels = list(levels) if levels else [NCCLevel(4.0, 32.0, 36.0), NCCLevel(2.0, 16.0, 6.0)]
        if init not in ("centroid", "none"):
            raise InputError(f"NCCPatchMatching: init must be 'centroid' or 'none', got {init!r}")
        self.init = init
        self._patches: list[np.ndarray] | None = None
        self._points: PointSet | None = None
        self._centroid: np.ndarray | None = None

    def prepare(self, reference: Image, ref_points: PointSet) -> None:
        """Cut one patch per landmark and level from ``reference`` (landmarks in LPS mm)."""
        sampler = _Sampler(reference)
        self._points = ref_points
        self._patches = []
        for level in self.levels:
            grid = _offsets(level.patch_half, level.spacing_mm)
            self._patches.append(
                np.stack([sampler.sample(p + grid, level.spacing_mm) for p in ref_points.positions])
                if len(ref_points)
                else np.zeros((0,) + grid.shape[:-1])
            )
        self._centroid = sampler.centroid()

    def locate(self, target: Image, start: np.ndarray | None = None) -> PointSet:
        """Best NCC match of every prepared landmark in ``target`` (LPS mm, with NCC confidence).

        ``start``: ``(N, 3)`` LPS mm where each landmark's search begins (default: ``init``'s guess).
        """
        if self._patches is None or self._points is None:
            raise InputError("ncc: call prepare(reference, points) before locate(target)")
        sampler = _Sampler(target)
        if start is not None:
            current = np.array(start, dtype=float).reshape(len(self._points), -1)
        else:
            shift = sampler.centroid() - self._centroid if self.init == "centroid" else np.zeros(3)
            current = self._points.positions + shift
        score = np.zeros(len(self._points))
        for level, patches in zip(self.levels, self._patches):
            half = level.patch_half + level.search_half
            grid = _offsets(half, level.spacing_mm)
            for n in range(len(current)):
                block = sampler.sample(current[n] + grid, level.spacing_mm)
                ncc = ncc_map(block, patches[n])
                best = np.unravel_index(int(np.argmax(ncc)), ncc.shape)  # (z, y, x) in the valid map
                sub = subvoxel_peak(ncc, best)
                step = (sub[::-1] - level.search_half) * level.spacing_mm
                current[n] = current[n] + step
                score[n] = float(ncc[best])
        return PointSet(list(self._points.labels), current, descriptions=self._points.descriptions, confidence=score)


class RegisteredNCC(NCCPatchMatching):
    """NCC patch matching started from a SimpleITK affine registration (Mattes MI) instead of the
    centroid shift, optionally on the target mapped into the reference's contrast
    (:mod:`AnatSSLLib.contrast`): the landmark tool's cross-contrast pipeline with raw-intensity NCC
    in place of the embedding, as a baseline for it.

    Args:
        match_contrast: map each target's intensities into the reference's contrast first.
        levels: as :class:`NCCPatchMatching`; default: 4 mm grid, 32 mm patch, +-12 mm search (the
            affine is a few mm off, and a wider search finds far look-alikes: +-36 mm, the centroid
            start's, gave a 14.5 mm mean against 3.4 mm median, template T1 -> 4 T2 subjects), then
            2 mm grid, 16 mm patch, +-6 mm search.
    """

    def __init__(self, match_contrast: bool = True, levels: list[NCCLevel] | None = None):
        super().__init__(levels=levels or [NCCLevel(4.0, 32.0, 12.0), NCCLevel(2.0, 16.0, 6.0)], init="none")
        self.match_contrast = bool(match_contrast)
        self.name = "ncc+registration" + ("+contrast" if self.match_contrast else "")
        self.description = "NCC patch matching from a MI affine" + (" on the target in the reference's contrast" if match_contrast else "")
        self._reference: Image | None = None

    def prepare(self, reference: Image, ref_points: PointSet) -> None:
        super().prepare(reference, ref_points)
        self._reference = reference

    def locate(self, target: Image, start: np.ndarray | None = None) -> PointSet:
        if self._reference is None or self._points is None:
            raise InputError(f"{self.name}: call prepare(reference, points) before locate(target)")
        from ..contrast import fit_intensity_transfer, map_points
        from ..tools.correspondence import affine_from_sitk
        from .registration import register

        affine = affine_from_sitk(register(self._reference, target, "affine"))  # reference -> target
        if self.match_contrast:
            target = fit_intensity_transfer(target, self._reference, affine).apply(target)
        return super().locate(target, start=map_points(affine, self._points.positions) if start is None else start)
