"""Low-level geometry shared by the tools: sampling a field at physical points, the anatomy mask,
robust affine fits and SimpleITK affines as matrices. Everything here works on arrays and
homogeneous matrices in LPS millimetres, with no knowledge of encoders."""

from __future__ import annotations

import numpy as np

from .errors import InputError

__all__ = ["affine_from_sitk", "fit_affine_ransac", "foreground_mask", "homogeneous", "sample_field", "sample_unit_vectors"]


def foreground_mask(intensity: np.ndarray, threshold: float = 0.05, sigma_vox: float = 1.5) -> np.ndarray:
    """Anatomy mask of a normalised ``[0, 1]`` volume: smoothed intensity above ``threshold``, holes filled."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(np.asarray(intensity, dtype=np.float32), sigma_vox)
    mask = smooth > threshold
    if not mask.any():
        return np.ones_like(mask)
    return ndimage.binary_fill_holes(mask)


def homogeneous(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def fit_affine_ransac(
    src: np.ndarray,
    dst: np.ndarray,
    *,
    threshold_mm: float = 10.0,
    iterations: int = 1000,
    weights: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Robust affine ``dst ≈ src @ M[:nd].T + M[nd]`` from point pairs ``(N, nd)`` (mm).

    RANSAC on minimal sets of ``nd + 1`` pairs (the set with most inliers within
    ``threshold_mm`` wins), then weighted least squares refits down-weighting pairs by their residual (a ramp from
    ``threshold_mm`` to 1.5 times it). Returns the
    ``(nd + 1, nd + 1)`` homogeneous matrix (``dst_h = M @ src_h``) and the inlier mask.

    Raises:
        InputError: fewer than ``nd + 2`` pairs.
    """
    src = np.asarray(src, float)
    dst = np.asarray(dst, float)
    n, nd = src.shape
    if n < nd + 2:
        raise InputError(f"affine fit: need at least {nd + 2} matched points, got {n}")
    w = np.ones(n) if weights is None else np.asarray(weights, float)
    rng = np.random.default_rng(seed)
    xh = homogeneous(src)
    best = np.zeros(n, bool)
    best_score = -1.0
    for _ in range(iterations):
        pick = rng.choice(n, nd + 1, replace=False)
        a = xh[pick]
        if abs(np.linalg.det(a)) < 1e-6 * max(1.0, np.abs(a).max() ** nd):
            continue
        m = np.linalg.solve(a, dst[pick])  # (nd+1, nd)
        lin = m[:nd].T
        sv = np.linalg.svd(lin, compute_uv=False)
        if sv.min() < 0.5 or sv.max() > 2.0:  # implausible scaling: not an anatomy match
            continue
        inl = np.linalg.norm(xh @ m - dst, axis=1) < threshold_mm
        score = float(w[inl].sum())
        if score > best_score:
            best_score, best = score, inl
    if best.sum() < nd + 2:
        best = np.ones(n, bool)
    sw = np.sqrt(w[best])[:, None]
    m, *_ = np.linalg.lstsq(xh[best] * sw, dst[best] * sw, rcond=None)
    # Refits weighted by a ramp of the residual (full within the threshold, none beyond 1.5 times
    # it) instead of a hard inlier cut: a pair whose residual crosses the threshold on noise then
    # moves the affine a little, not by a whole pair's pull; two consensus sets that tell the same
    # affine converge to it.
    for _ in range(4):
        res = np.linalg.norm(xh @ m - dst, axis=1)
        soft = w * np.clip((1.5 * threshold_mm - res) / (0.5 * threshold_mm), 0.0, 1.0)
        if (soft > 0).sum() < nd + 2:
            break
        sw = np.sqrt(soft)[:, None]
        m, *_ = np.linalg.lstsq(xh * sw, dst * sw, rcond=None)
    best = np.linalg.norm(xh @ m - dst, axis=1) < threshold_mm
    out = np.eye(nd + 1)
    out[:nd, :] = m.T
    return out, best


def affine_from_sitk(transform, nd: int = 3) -> np.ndarray:
    """The homogeneous ``(nd + 1, nd + 1)`` matrix of any affine SimpleITK transform (LPS mm).

    Read off the images of the origin and of the unit points (exact for an affine map, whatever
    the transform's class, centre or nesting in a composite).
    """
    base = np.asarray(transform.TransformPoint((0.0,) * nd), float)
    out = np.eye(nd + 1)
    out[:nd, nd] = base
    for a in range(nd):
        unit = [0.0] * nd
        unit[a] = 100.0
        out[:nd, a] = (np.asarray(transform.TransformPoint(tuple(unit)), float) - base) / 100.0
    return out


def sample_field(field, kji: np.ndarray):
    """Trilinear/bilinear sample of a ``(C, *S)`` tensor at continuous ``[k, j, i]`` ``(N, nd)`` -> ``(N, C)`` (border clamped)."""
    import torch
    import torch.nn.functional as F

    nd = field.ndim - 1
    shape = np.asarray(field.shape[1:], float)
    # grid_sample wants (x, y[, z]) = (i, j[, k]) in [-1, 1], align_corners=True
    norm = 2.0 * np.clip(kji, 0, shape - 1) / np.maximum(shape - 1, 1) - 1.0
    grid = torch.as_tensor(norm[:, ::-1].copy(), dtype=field.dtype).reshape(1, *([1] * (nd - 1)), -1, nd)
    out = F.grid_sample(field.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(field.shape[0], -1).T


def sample_unit_vectors(field, kji: np.ndarray):
    """:func:`sample_field` of a ``(D, *S)`` embedding, each sampled vector scaled to unit norm -> ``(N, D)``."""
    import torch

    return torch.nn.functional.normalize(sample_field(field, np.asarray(kji, float)), dim=1)
