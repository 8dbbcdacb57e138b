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

Files: :func:`read_image` / :func:`write_image` (NIfTI, NRRD, MetaImage, DICOM series, through
SimpleITK; writes are atomic), :func:`check_volume` for the checks a volume must pass before it is
used, :func:`resample_image` / :func:`resample_to` to move it onto another grid, and
:func:`check_points_inside` to refuse points that fall outside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import InputError

__all__ = [
    "Image",
    "Interpolator",
    "atomic_output",
    "check_points_inside",
    "check_volume",
    "lps_to_ras",
    "ras_to_lps",
    "read_image",
    "resample_image",
    "resample_to",
    "write_image",
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


# ---- atomic writes -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` atomically: yield a temporary path to write to, then move it into place.

    The temporary path has the same file name (so the extension still picks the format) inside a
    fresh hidden folder beside ``path`` (same file system, so the final ``os.replace`` is atomic).
    Extra files written into that folder (the ``.raw`` beside a ``.mhd``/``.nhdr`` header) are moved
    beside ``path`` first, the named file last. If the body raises, nothing is moved and the
    temporary folder is removed: a failed write leaves the directory as it was.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{path}: cannot write, the folder {parent} does not exist")
    tmpdir = _temporary_folder(path, parent)
    try:
        tmp = tmpdir / path.name
        yield tmp
        if not tmp.exists():
            raise InputError(f"{path}: the writer produced no file")
        for extra in tmpdir.iterdir():
            if extra.name != path.name:
                os.replace(extra, parent / extra.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _temporary_folder(target: Path, parent: Path) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise InputError(f"{target}: cannot write in {parent} ({exc.strerror or exc})") from None


# ---- reading -------------------------------------------------------------------------------------
_WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_DICOM_MODALITIES = ("MR", "CT", "PT")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _itk_reason(exc: Exception) -> str:
    """The informative last line of a (long, multi-line) ITK exception message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    return reason[:300]


def _checked_dimension(
    dim: int, size: Sequence[int], ncomp: int, spacing: Sequence[float], ndim: int | None, name: str
) -> int:
    """Check an image header; return the dimension to keep (trailing axes of size 1 are dropped)."""
    if ncomp != 1:
        raise InputError(
            f"{name}: expected a scalar image (one value per voxel), got a vector image with {ncomp} "
            f"components per voxel; extract one component first"
        )
    size = tuple(int(s) for s in size)
    keep = dim
    want = 3 if ndim is None else ndim
    if dim > want and all(s == 1 for s in size[want:]):
        keep = want
    allowed = (2, 3) if ndim is None else (ndim,)
    if keep not in allowed:
        what = " (a time series or multi-volume file: extract one volume first)" if keep == 4 else ""
        expected = "a 2D or 3D image" if ndim is None else f"a {ndim}D image"
        raise InputError(f"{name}: expected {expected}, got a {dim}D image of size {size}{what}")
    kept = tuple(float(s) for s in spacing[:keep])
    if not all(np.isfinite(s) and s > 0 for s in kept):
        raise InputError(
            f"{name}: voxel spacing must be positive, got {kept} mm; the file header is broken "
            f"(fix its spacing / pixdim)"
        )
    return keep


def _reduce_dimension(img: Any, ndim: int | None, name: str) -> Any:
    """Check a SimpleITK image and drop trailing axes of size 1 where ``ndim`` asks for fewer."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    size = list(img.GetSize())
    keep = _checked_dimension(dim, size, img.GetNumberOfComponentsPerPixel(), img.GetSpacing(), ndim, name)
    if keep == dim:
        return img
    try:
        return sitk.Extract(
            img, size[:keep] + [0] * (dim - keep), [0] * dim, sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX
        )
    except RuntimeError as exc:
        raise InputError(
            f"{name}: cannot reduce the {dim}D image of size {tuple(size)} to {keep}D: {_itk_reason(exc)}"
        ) from None


def _read_dicom_series(folder: Path, series_uid: str | None, name: str) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:
        raise InputError(f"{name}: cannot scan the folder for DICOM files: {_itk_reason(exc)}") from None
    if not uids:
        raise InputError(
            f"{name}: expected a folder holding a DICOM series (one file per slice), found no DICOM series"
        )
    files_of = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in uids}
    if series_uid is None:
        series_uid = max(uids, key=lambda uid: len(files_of[uid]))
    elif series_uid not in files_of:
        raise InputError(f"{name}: no DICOM series with SeriesInstanceUID {series_uid!r}; the folder holds {uids}")
    reader.SetFileNames(files_of[series_uid])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{name}: cannot read DICOM series {series_uid}: {_itk_reason(exc)}") from None


def read_image(
    path: str | os.PathLike,
    *,
    ndim: int | None = 3,
    name: str | None = None,
    series_uid: str | None = None,
) -> Image:
    """Read a scalar image file (or a DICOM series folder) with its geometry, through SimpleITK.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage (``.mha``,
            ``.mhd``) file, any other file SimpleITK reads, or a folder holding a DICOM series.
        ndim: the dimension required (3 or 2), or ``None`` for either. A trailing axis of size 1
            is dropped (a 4D file holding one volume, a one-slice 3D file read with ``ndim=2``).
        name: the name used in error messages and kept as ``Image.name`` (default: the path).
        series_uid: for a folder, the SeriesInstanceUID to read; by default the series with the
            most files.

    Returns:
        An :class:`Image` (array ``[k, j, i]``, geometry in LPS mm), the voxels copied once.

    Raises:
        InputError: a missing or unreadable file, a vector (multi-component) or 4D image, the
            wrong dimension, or zero / negative spacing.
    """
    import SimpleITK as sitk

    path = Path(path)
    name = name or str(path)
    if ndim not in (None, 2, 3):
        raise InputError(f"{name}: ndim must be 2, 3 or None, got {ndim!r}")
    if not path.exists():
        raise InputError(f"{name}: no such file or folder")
    if path.is_dir():
        img = _reduce_dimension(_read_dicom_series(path, series_uid, name), ndim, name)
    else:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(f"{name}: not a readable image file ({_itk_reason(exc)})") from None
        # Refuse a wrong dimension, a vector image or a bad spacing before loading the voxels.
        _checked_dimension(
            reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), reader.GetSpacing(), ndim, name
        )
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"{name}: cannot read the voxels ({_itk_reason(exc)})") from None
        img = _reduce_dimension(img, ndim, name)
    return Image.from_sitk(img, name)


# ---- writing -------------------------------------------------------------------------------------
def _writable_array(image: Image) -> np.ndarray:
    """The voxel array in a type every format stores (bool -> uint8, float16 -> float32)."""
    arr = image.array
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{image.name}: cannot write voxels of type {arr.dtype}; expected integers or floats")
    return arr


def write_image(
    image: Image,
    path: str | os.PathLike,
    *,
    dicom: bool | None = None,
    modality: str = "MR",
) -> Path:
    """Write ``image`` to a file (format from the extension) or to a DICOM series folder, atomically.

    Args:
        image: the image; its geometry (LPS mm) is written into the file header.
        path: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` (or another extension
            SimpleITK writes). A path ending in ``/``, an existing folder or ``dicom=True`` writes
            a DICOM series there (see below).
        dicom: force (``True``) or refuse (``False``) a DICOM series; ``None`` decides from ``path``.
        modality: DICOM Modality (0008,0060) of the series: "MR", "CT" or "PT", modalities whose
            storage class keeps the slice geometry ("OT" becomes Secondary Capture, which loses it).

    Compression is on for every format but ``.nii`` and DICOM. The file is first written under
    a temporary folder beside ``path`` and then moved into place: a failed write leaves nothing.

    DICOM: one file per k-slice with ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness and SpacingBetweenSlices, so an oblique, anisotropic volume reads back on the
    same grid. Integers (and floats holding whole numbers) that fit in int16 or uint16 are stored
    as they are; other values as int16 with RescaleSlope/RescaleIntercept (read back as float64,
    within half a slope, about range / 64000).
    A left-handed direction (determinant -1) cannot be stored in DICOM: the slices are written in
    reverse order, so it reads back on the equivalent right-handed grid (k axis and origin flipped,
    same voxel at every physical point). The target folder must be new, empty, or hold only
    ``.dcm`` files (a previous series, which is replaced).

    Returns:
        The path written.
    """
    path_str = os.fspath(path)
    path = Path(path_str)
    as_dicom = dicom if dicom is not None else (path_str.endswith(("/", os.sep)) or path.is_dir())
    if as_dicom:
        if modality not in _DICOM_MODALITIES:
            raise InputError(f"{path}: DICOM modality must be one of {_DICOM_MODALITIES}, got {modality!r}")
        _write_dicom_series(image, path, modality)
        return path
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass dicom=True to write a DICOM series there")
    suffix = _suffix(path)
    if not suffix:
        raise InputError(
            f"{path}: no file extension to choose the format from; use one of {', '.join(_WRITE_SUFFIXES)} "
            f"or a folder ending in '/' for a DICOM series"
        )
    import SimpleITK as sitk

    arr = _writable_array(image)
    img = (image if arr is image.array else image.with_array(arr)).to_sitk()
    writer = sitk.ImageFileWriter()
    writer.SetUseCompression(suffix != ".nii")
    with atomic_output(path) as tmp:
        writer.SetFileName(str(tmp))
        try:
            writer.Execute(img)
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot write {image.name} ({_itk_reason(exc)})") from None
    return path


def _dicom_text(text: str) -> str:
    """Printable ASCII without the value separator (backslash)."""
    return "".join(c if " " <= c <= "~" and c != "\\" else "_" for c in text)


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) holding ``value`` as precisely as fits."""
    value = float(value)
    if value == 0:
        return "0"
    for digits in range(15, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise InputError(f"cannot write {value} as a DICOM decimal string")


def _dicom_pixels(arr: np.ndarray, name: str) -> tuple[np.ndarray, dict[str, str]]:
    """The array to hand to GDCM and the rescale tags that go with it."""
    finite = np.isfinite(arr) if np.issubdtype(arr.dtype, np.floating) else None
    if finite is not None and not finite.all():
        raise InputError(f"{name}: cannot write NaN or infinite voxels to DICOM")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    is_int = np.issubdtype(arr.dtype, np.integer) or bool(np.all(arr == np.round(arr)))
    if is_int and lo >= -32768 and hi <= 32767:
        return arr.astype(np.int16, copy=False), {}
    if is_int and lo >= 0 and hi <= 65535:
        return arr.astype(np.uint16, copy=False), {}
    # Quantise to int16 with a slope and intercept written as DICOM strings, so the stored values
    # are exact integers and reading applies exactly the same rescale.
    intercept = float(_ds((lo + hi) / 2))
    slope = float(_ds(max(hi - intercept, intercept - lo, 1e-12) / 32000))
    stored = np.clip(np.round((arr.astype(np.float64) - intercept) / slope), -32767, 32767)
    tags = {
        "0028|1052": _ds(intercept),
        "0028|1053": _ds(slope),
        "0028|0100": "16",
        "0028|0101": "16",
        "0028|0102": "15",
        "0028|0103": "1",
    }
    return stored * slope + intercept, tags


def _write_dicom_series(image: Image, folder: Path, modality: str) -> None:
    import SimpleITK as sitk

    if image.ndim == 2:  # one slice, 1 mm thick
        d3 = np.eye(3)
        d3[:2, :2] = image.direction
        image = Image(image.array[None], (*image.spacing, 1.0), (*image.origin, 0.0), d3, image.name)
    if np.linalg.det(image.direction) < 0:
        flipped = image.direction.copy()
        flipped[:, 2] *= -1
        last = image.index_to_physical((0, 0, image.size[2] - 1))
        image = Image(image.array[::-1], image.spacing, tuple(last), flipped, image.name)
    pixels, tags = _dicom_pixels(_writable_array(image), image.name)
    volume = sitk.GetImageFromArray(np.ascontiguousarray(pixels))
    volume.SetSpacing(image.spacing)
    volume.SetOrigin(image.origin)
    volume.SetDirection(tuple(image.direction.ravel()))

    folder = Path(os.fspath(folder).rstrip("/" + os.sep) or ".")
    if folder.exists():
        if not folder.is_dir():
            raise InputError(f"{folder}: exists and is not a folder; cannot write a DICOM series there")
        others = [p.name for p in folder.iterdir() if p.suffix.lower() != ".dcm"]
        if others:
            raise InputError(
                f"{folder}: holds files other than a DICOM series ({', '.join(sorted(others)[:5])}); "
                f"write the series into a new or empty folder"
            )
    parent = folder.parent
    if not parent.is_dir():
        raise InputError(f"{folder}: cannot write, the folder {parent} does not exist")

    def uid() -> str:
        return f"2.25.{uuid.uuid4().int}"

    shared = {
        "0008|0060": modality,
        "0008|0008": "DERIVED\\SECONDARY",
        "0008|103e": _dicom_text(image.name)[-64:],
        "0020|000d": uid(),  # StudyInstanceUID
        "0020|000e": uid(),  # SeriesInstanceUID
        "0020|0052": uid(),  # FrameOfReferenceUID
        "0020|0011": "1",
        "0018|0050": _ds(image.spacing[2]),  # SliceThickness
        "0018|0088": _ds(image.spacing[2]),  # SpacingBetweenSlices
        **tags,
    }
    tmpdir = _temporary_folder(folder, parent)
    old = None
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        nk = volume.GetSize()[2]
        width = max(4, len(str(nk)))
        for k in range(nk):
            slice_k = volume[:, :, k : k + 1]  # stays 3D: origin, direction and spacing are written by GDCM
            for key, value in shared.items():
                slice_k.SetMetaData(key, value)
            slice_k.SetMetaData("0008|0018", uid())  # SOPInstanceUID
            slice_k.SetMetaData("0020|0013", str(k + 1))  # InstanceNumber
            writer.SetFileName(str(tmpdir / f"slice{k:0{width}d}.dcm"))
            try:
                writer.Execute(slice_k)
            except RuntimeError as exc:
                raise InputError(
                    f"{folder}: cannot write DICOM slice {k} of {image.name} ({_itk_reason(exc)})"
                ) from None
        if folder.exists() and any(folder.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=parent))
            os.replace(folder, old / "series")
        elif folder.exists():
            folder.rmdir()
        os.replace(tmpdir, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.replace(old / "series", folder)  # put the previous series back
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---- checks --------------------------------------------------------------------------------------
def check_volume(
    image: Image,
    *,
    ndim: int | None = 3,
    name: str | None = None,
    allow_constant: bool = False,
) -> Image:
    """Check that ``image`` can be used: right dimension, not empty, finite, and with contrast.

    Args:
        image: the image to check.
        ndim: the dimension required (2 or 3), or ``None`` for either.
        name: the name used in error messages (default ``image.name``).
        allow_constant: accept a volume whose voxels are all equal (no contrast).

    Returns:
        ``image`` itself, so that calls can be chained.

    Raises:
        InputError: wrong dimension, no voxels, NaN/Inf voxels, or (unless ``allow_constant``) a
            constant volume.
    """
    name = name or image.name
    arr = image.array
    if ndim is not None and image.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}D image, got a {image.ndim}D image of shape {arr.shape}")
    if arr.size == 0:
        raise InputError(f"{name}: the image is empty (array shape {arr.shape}); expected at least one voxel")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputError(f"{name}: expected numeric voxels, got type {arr.dtype}")
    if np.iscomplexobj(arr):
        raise InputError(f"{name}: expected real voxels, got complex type {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            first = tuple(int(v) for v in reversed(np.argwhere(bad)[0]))
            raise InputError(
                f"{name}: {int(bad.sum())} voxel(s) are NaN or infinite (first at index (i, j, k) = {first}); "
                f"expected finite values"
            )
    if not allow_constant:
        lo, hi = arr.min(), arr.max()
        if lo == hi:
            raise InputError(f"{name}: every voxel equals {lo}; expected an image with contrast")
    return image


def check_points_inside(
    image: Image,
    points: Any,
    labels: Sequence[str] | None = None,
    *,
    margin: float = 0.5,
    name: str | None = None,
) -> None:
    """Raise :class:`InputError` naming every point that lies outside ``image``.

    Args:
        image: the image the points belong to.
        points: a :class:`~AnatSSLLib.points.PointSet` or an ``(N, ndim)`` array of LPS mm.
        labels: names for the points of an array (default ``point 0``, ``point 1``, ...); a
            PointSet's own labels are used otherwise.
        margin: how far outside the centres of the edge voxels a point may lie, in voxels (0.5 =
            the outer face of the edge voxels).
        name: the image name used in the message (default ``image.name``).
    """
    name = name or image.name
    if hasattr(points, "positions") and hasattr(points, "labels"):
        labels = list(points.labels) if labels is None else list(labels)
        points = points.positions
    pts = np.asarray(points, dtype=float).reshape(-1, image.ndim)
    labels = [f"point {i}" for i in range(len(pts))] if labels is None else [str(lab) for lab in labels]
    if len(labels) != len(pts):
        raise InputError(f"{len(pts)} points but {len(labels)} labels")
    inside = image.contains(pts, margin=margin)
    if inside.all():
        return
    extremes = [(-margin, s - 1 + margin) for s in image.size]
    corners = np.array(np.meshgrid(*extremes, indexing="ij")).reshape(image.ndim, -1).T
    phys = image.index_to_physical(corners)
    box = ", ".join(f"{lo:.1f}..{hi:.1f}" for lo, hi in zip(phys.min(0), phys.max(0)))
    outside = [f"{labels[i]} at {tuple(round(float(v), 2) for v in pts[i])}" for i in np.flatnonzero(~inside)]
    raise InputError(
        f"{len(outside)} point(s) lie outside {name} (which spans LPS mm {box}): {'; '.join(outside)}"
    )


# ---- resampling ----------------------------------------------------------------------------------
class Interpolator(str, enum.Enum):
    """How voxel values are interpolated when an image is resampled."""

    LINEAR = "linear"
    NEAREST = "nearest"  # labels and masks
    BSPLINE = "bspline"  # cubic B-spline

    @classmethod
    def of(cls, value: "Interpolator | str") -> "Interpolator":
        try:
            return cls(str(getattr(value, "value", value)).lower())
        except ValueError:
            raise InputError(
                f"unknown interpolator {value!r}; expected one of {[m.value for m in cls]}"
            ) from None


def _resample(
    image: Image,
    size: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: np.ndarray,
    interpolator: Interpolator | str,
    default_value: float,
    transform: Any = None,
    name: str | None = None,
) -> Image:
    import SimpleITK as sitk

    interp = Interpolator.of(interpolator)
    arr = _writable_array(image)
    src = (image if arr is image.array else image.with_array(arr)).to_sitk()
    f = sitk.ResampleImageFilter()
    f.SetSize([int(s) for s in size])
    f.SetOutputSpacing([float(s) for s in spacing])
    f.SetOutputOrigin([float(o) for o in origin])
    f.SetOutputDirection([float(d) for d in np.asarray(direction).ravel()])
    f.SetDefaultPixelValue(float(default_value))
    f.SetInterpolator(
        {Interpolator.LINEAR: sitk.sitkLinear, Interpolator.NEAREST: sitk.sitkNearestNeighbor,
         Interpolator.BSPLINE: sitk.sitkBSpline}[interp]
    )
    if interp is not Interpolator.NEAREST and not np.issubdtype(image.array.dtype, np.floating):
        f.SetOutputPixelType(sitk.sitkFloat32)
    if transform is not None:
        f.SetTransform(_as_transform(transform, image.ndim))
    out = f.Execute(src)
    return Image.from_sitk(out, name or image.name)


def _as_transform(transform: Any, ndim: int) -> Any:
    import SimpleITK as sitk

    if isinstance(transform, sitk.Transform):
        return transform
    m = np.asarray(transform, dtype=float)
    if m.shape != (ndim + 1, ndim + 1):
        raise InputError(
            f"transform: expected a SimpleITK transform or a {ndim + 1}x{ndim + 1} homogeneous matrix, "
            f"got shape {m.shape}"
        )
    t = sitk.AffineTransform(ndim)
    t.SetMatrix(m[:ndim, :ndim].ravel().tolist())
    t.SetTranslation(m[:ndim, ndim].tolist())
    return t


def resample_image(
    image: Image,
    spacing: float | Sequence[float],
    *,
    interpolator: Interpolator | str = "linear",
    default_value: float = 0.0,
) -> Image:
    """Resample ``image`` to a new voxel spacing over the same physical extent.

    The new grid keeps the direction and the outer corner of voxel 0 (the origin is moved by half
    the change of spacing), and has ``round(old extent / new spacing)`` voxels per axis (at least 1).

    Args:
        image: the image.
        spacing: new voxel size in mm, one number (isotropic) or one per axis ``(x, y[, z])``.
        interpolator: "linear", "nearest" (labels; keeps the voxel type) or "bspline"; linear
            and bspline give float32 for integer input.
        default_value: value of new voxels that fall outside the image.
    """
    sp = np.asarray(spacing, dtype=float)
    if sp.ndim == 0:
        sp = np.full(image.ndim, float(sp))
    if sp.shape != (image.ndim,) or not np.all(np.isfinite(sp) & (sp > 0)):
        raise InputError(f"{image.name}: new spacing must be {image.ndim} positive numbers (mm), got {spacing!r}")
    old = np.asarray(image.spacing)
    size = np.maximum(1, np.round(np.asarray(image.size) * old / sp)).astype(int)
    origin = np.asarray(image.origin) + image.direction @ ((sp - old) / 2)
    return _resample(image, size, sp, origin, image.direction, interpolator, default_value)


def resample_to(
    image: Image,
    reference: Image,
    *,
    interpolator: Interpolator | str = "linear",
    transform: Any = None,
    default_value: float = 0.0,
) -> Image:
    """Resample ``image`` onto the grid of ``reference`` (its size, spacing, origin, direction).

    Args:
        image: the image to move.
        reference: the image whose grid the result takes (only its geometry is used).
        interpolator: "linear", "nearest" or "bspline" (see :func:`resample_image`).
        transform: ``None`` (the two share the physical space), a ``SimpleITK.Transform`` or an
            ``(ndim+1, ndim+1)`` homogeneous matrix. Either maps a point of the *reference*
            (LPS mm) to the point of ``image`` to sample there (ITK's fixed-to-moving convention).
        default_value: value where the reference grid falls outside ``image``.
    """
    if reference.ndim != image.ndim:
        raise InputError(
            f"{image.name}: a {image.ndim}D image cannot be resampled onto the {reference.ndim}D grid "
            f"of {reference.name}"
        )
    return _resample(
        image, reference.size, reference.spacing, reference.origin, reference.direction,
        interpolator, default_value, transform,
    )
