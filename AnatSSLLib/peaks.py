"""Sub-voxel peak localisation shared by the matching methods (embedding and NCC)."""

from __future__ import annotations

import numpy as np

__all__ = ["subvoxel_peak"]


def subvoxel_peak(values: np.ndarray, best: tuple[int, ...]) -> np.ndarray:
    """Refine the integer maximum ``best`` of ``values`` by a parabola through its neighbours on each axis.

    Returns the peak position in index units (same axis order as ``values``); an axis at the edge,
    or without a proper maximum there, keeps its integer position; offsets are clipped to +-0.5.
    """
    out = np.asarray(best, dtype=float)
    for axis, b in enumerate(best):
        if 0 < b < values.shape[axis] - 1:
            lo = list(best)
            hi = list(best)
            lo[axis] -= 1
            hi[axis] += 1
            left, centre, right = values[tuple(lo)], values[tuple(best)], values[tuple(hi)]
            curv = left - 2.0 * centre + right
            if curv < 0:
                out[axis] += float(np.clip(0.5 * (left - right) / curv, -0.5, 0.5))
    return out
