"""Labelled point sets in physical space, and their files (Slicer markups, CSV).

A :class:`PointSet` holds positions in **LPS** millimetres (the ITK frame every array of the
library uses); files and Slicer nodes name their own frame and are converted on the way in and
out.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import InputError

__all__ = ["PointSet"]


@dataclasses.dataclass
class PointSet:
    """Labelled physical points.

    Args:
        labels: one label per point (e.g. the AFID name or number), unique within the set.
        positions: ``(N, 3)`` LPS millimetres.
        descriptions: optional free text per point (Slicer's control-point description).
        confidence: optional score per point (higher is surer), e.g. from the landmark tool.
    """

    labels: list[str]
    positions: np.ndarray
    descriptions: list[str] | None = None
    confidence: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = [str(label) for label in self.labels]
        self.positions = np.asarray(self.positions, dtype=float).reshape(-1, 3)
        n = len(self.labels)
        if self.positions.shape[0] != n:
            raise InputError(f"{n} labels but {self.positions.shape[0]} positions")
        if not np.all(np.isfinite(self.positions)):
            raise InputError("point positions must be finite")
        if self.descriptions is not None and len(self.descriptions) != n:
            raise InputError(f"{n} points but {len(self.descriptions)} descriptions")
        if self.confidence is not None:
            self.confidence = np.asarray(self.confidence, dtype=float).reshape(-1)
            if self.confidence.shape[0] != n:
                raise InputError(f"{n} points but {self.confidence.shape[0]} confidence values")

    def __len__(self) -> int:
        return len(self.labels)

    def position(self, label: str) -> np.ndarray:
        """LPS position of the point called ``label``."""
        try:
            return self.positions[self.labels.index(str(label))]
        except ValueError:
            raise InputError(f"no point labelled {label!r}; labels are {self.labels}") from None
