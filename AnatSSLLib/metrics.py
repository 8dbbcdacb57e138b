"""Accuracy metrics in physical units: landmark radial errors (mm) and label overlap (Dice).

Every distance is measured between physical positions (LPS mm), never between voxel indices, so
anisotropic spacing and oblique grids are honoured by construction.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np

from .errors import InputError
from .image import Image
from .points import PointSet

__all__ = [
    "radial_errors",
    "summarize_errors",
    "dice_per_label",
    "precision_at_k",
]


def radial_errors(pred: PointSet, truth: PointSet) -> dict[str, float]:
    """Euclidean distance (mm) from each true landmark to the predicted one with the same label.

    Args:
        pred: predicted positions, LPS mm; must hold every label of ``truth`` (extra labels are ignored).
        truth: ground-truth positions, LPS mm.

    Returns:
        ``{label: error_mm}`` in the order of ``truth.labels``.

    Raises:
        InputError: a label of ``truth`` has no prediction.
    """
    index = {label: n for n, label in enumerate(pred.labels)}
    missing = [label for label in truth.labels if label not in index]
    if missing:
        raise InputError(
            f"predicted landmarks lack {len(missing)} of the {len(truth)} true labels: {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; predicted labels are {pred.labels[:8]}"
        )
    out: dict[str, float] = {}
    for n, label in enumerate(truth.labels):
        out[label] = float(np.linalg.norm(pred.positions[index[label]] - truth.positions[n]))
    return out


def summarize_errors(errors: Mapping[str, float] | Iterable[float]) -> dict[str, float]:
    """Summary of radial errors in mm.

    Args:
        errors: ``{label: mm}`` (from :func:`radial_errors`, possibly pooled over targets) or a
            sequence of mm values.

    Returns:
        ``{"n", "mean", "std", "median", "p90", "max", "within_2mm", "within_4mm"}``; the last two
        are fractions in [0, 1]. With no errors every value but ``n`` is NaN.
    """
    values = np.asarray(list(errors.values()) if isinstance(errors, Mapping) else list(errors), dtype=float)
    if values.size == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "std": nan, "median": nan, "p90": nan, "max": nan,
                "within_2mm": nan, "within_4mm": nan}
    if not np.all(np.isfinite(values)):
        raise InputError(f"radial errors must be finite, got {values[~np.isfinite(values)][:4].tolist()}")
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
        "within_2mm": float(np.mean(values <= 2.0)),
        "within_4mm": float(np.mean(values <= 4.0)),
    }


def dice_per_label(a: Image, b: Image, labels: Iterable[int] | None = None) -> dict[int, float]:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` per label of two label maps on the same grid.

    Args:
        a, b: integer label images with identical geometry (size, spacing, origin, direction).
        labels: labels to score; by default every non-zero label present in either image.

    Returns:
        ``{label: dice}``; NaN for a label absent from both images.

    Raises:
        InputError: the grids differ (resample one onto the other first).
    """
    if not a.same_geometry(b):
        raise InputError(
            f"dice_per_label: {a.name!r} and {b.name!r} must share one grid; got shapes {a.array.shape} vs "
            f"{b.array.shape}, spacing {a.spacing} vs {b.spacing}, origin {a.origin} vs {b.origin}; "
            "resample one label map onto the other's grid (nearest neighbour) first"
        )
    x = np.asarray(a.array)
    y = np.asarray(b.array)
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(x), np.unique(y)) if v != 0)
    out: dict[int, float] = {}
    for label in labels:
        in_a = x == label
        in_b = y == label
        total = int(in_a.sum()) + int(in_b.sum())
        out[int(label)] = float("nan") if total == 0 else 2.0 * int(np.logical_and(in_a, in_b).sum()) / total
    return out


def precision_at_k(relevant: Iterable[Iterable[bool]], k: int) -> float:
    """Mean over queries of the fraction of the top ``k`` results that are relevant.

    Args:
        relevant: per query, a ranked sequence of booleans (result is a true match); a query with
            fewer than ``k`` results counts the missing ones as wrong.
        k: cut-off, at least 1.
    """
    if k < 1:
        raise InputError(f"precision_at_k: k must be at least 1, got {k}")
    scores = [sum(bool(r) for r in list(ranked)[:k]) / k for ranked in relevant]
    return float(np.mean(scores)) if scores else math.nan
