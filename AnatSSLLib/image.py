"""Images in physical space: a voxel array that never travels without its geometry.

Conventions (the same as ITK/SimpleITK, which does the file I/O):

- ``Image.array`` is indexed ``[k, j, i]`` (numpy order, slowest axis first), as
  ``SimpleITK.GetArrayFromImage`` returns it; a 3D image has shape ``(nz, ny, nx)``.
- A voxel *index* is written ``(i, j, k)`` (fastest axis first) and may be continuous.
- ``spacing`` (mm) and ``origin`` (mm) are in ``(x, y, z)`` order; ``direction`` is a 3x3 matrix
  whose columns are the physical directions of the i, j and k axes.
- Physical coordinates are **LPS** millimetres (the ITK and file frame). Slicer shows RAS; convert
  with :func:`lps_to_ras` / :func:`ras_to_lps` at the boundary, never in between.

    physical = origin + direction @ (spacing * index)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .errors import InputError

__all__ = [
    "Image",
    "lps_to_ras",
    "ras_to_lps",
]

_LPS_RAS = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(points: np.ndarray | Sequence[float]) -> np.ndarray:
    """Convert physical points ``(..., 3)`` from LPS to RAS millimetres (negate x and y)."""
    return np.asarray(points, dtype=float) * _LPS_RAS


def ras_to_lps(points: np.ndarray | Sequence[float]) -> np.ndarray:
    """Convert physical points ``(..., 3)`` from RAS to LPS millimetres (negate x and y)."""
    return np.asarray(points, dtype=float) * _LPS_RAS


@dataclasses.dataclass
class Image:
    """A 2D or 3D scalar image with its geometry.

    Args:
        array: voxel values, indexed ``[k, j, i]`` (3D) or ``[j, i]`` (2D).
        spacing: voxel size in mm, ``(x, y[, z])``; every entry must be positive.
        origin: physical position (LPS mm) of the centre of voxel index 0.
        direction: ``ndim x ndim`` matrix, columns are the axis directions (orthonormal).
        name: where the image came from (a path or a node name), used in error messages.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    name: str = "image"

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        ndim = self.array.ndim
        if ndim not in (2, 3):
            raise InputError(f"{self.name}: expected a 2D or 3D image, got an array of shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(ndim, ndim)
        if len(self.spacing) != ndim or len(self.origin) != ndim:
            raise InputError(
                f"{self.name}: spacing {self.spacing} and origin {self.origin} must have {ndim} entries "
                f"for an image of shape {self.array.shape}"
            )
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise InputError(f"{self.name}: spacing must be positive and finite, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)):
            raise InputError(f"{self.name}: origin must be finite, got {self.origin}")
        if not np.allclose(self.direction.T @ self.direction, np.eye(ndim), atol=1e-4):
            raise InputError(f"{self.name}: direction must be orthonormal, got {self.direction.tolist()}")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return self.array.ndim

    @property
    def size(self) -> tuple[int, ...]:
        """Number of voxels along ``(i, j[, k])`` (the reverse of ``array.shape``)."""
        return tuple(reversed(self.array.shape))

    @property
    def index_to_physical_matrix(self) -> np.ndarray:
        """``(ndim+1) x (ndim+1)`` homogeneous matrix mapping an index ``(i, j, k)`` to LPS mm."""
        m = np.eye(self.ndim + 1)
        m[: self.ndim, : self.ndim] = self.direction @ np.diag(self.spacing)
        m[: self.ndim, self.ndim] = self.origin
        return m

    def index_to_physical(self, index: np.ndarray | Sequence[float]) -> np.ndarray:
        """Continuous voxel indices ``(..., ndim)`` in ``(i, j, k)`` order to LPS mm ``(..., ndim)``."""
        idx = np.asarray(index, dtype=float)
        return idx * np.asarray(self.spacing) @ self.direction.T + np.asarray(self.origin)

    def physical_to_index(self, points: np.ndarray | Sequence[float]) -> np.ndarray:
        """LPS mm ``(..., ndim)`` to continuous voxel indices ``(..., ndim)`` in ``(i, j, k)`` order."""
        pts = np.asarray(points, dtype=float)
        return (pts - np.asarray(self.origin)) @ self.direction / np.asarray(self.spacing)

    def contains(self, points: np.ndarray | Sequence[float], margin: float = 0.5) -> np.ndarray:
        """Whether LPS points ``(..., ndim)`` lie inside the image (within ``margin`` voxels of its edge voxels)."""
        idx = self.physical_to_index(points)
        upper = np.asarray(self.size, dtype=float) - 1 + margin
        return np.all((idx >= -margin) & (idx <= upper), axis=-1)

    def same_geometry(self, other: "Image", atol: float = 1e-4) -> bool:
        """True when ``other`` has the same grid (size, spacing, origin, direction) within ``atol`` mm."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Image":
        """A new image on the same grid holding ``array`` (which must have the same shape)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputError(f"{name or self.name}: array shape {array.shape} differs from the grid {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction.copy(), name or self.name)

    # ---- SimpleITK bridge -------------------------------------------------------------------
    def to_sitk(self):
        """This image as a ``SimpleITK.Image`` (a copy)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, img, name: str = "image") -> "Image":
        """An :class:`Image` from a scalar ``SimpleITK.Image`` (array copied)."""
        import SimpleITK as sitk

        if img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"{name}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        return cls(
            sitk.GetArrayFromImage(img),
            img.GetSpacing(),
            img.GetOrigin(),
            np.array(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension()),
            name,
        )
