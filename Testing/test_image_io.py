"""Image files in physical space: round trips in every format, checks, resampling, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import (
    Image,
    check_points_inside,
    check_volume,
    read_image,
    resample_image,
    resample_to,
    write_image,
)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [ax for ax in range(3) if ax != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


# Oblique (rotated about x then z) and anisotropic: the case that breaks hand-made geometry.
OBLIQUE = _rotation(2, 35.0) @ _rotation(0, 20.0)
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (10.25, -20.5, 33.3)


@pytest.fixture
def volume() -> Image:
    rng = np.random.default_rng(7)
    arr = rng.integers(-500, 1500, size=(6, 7, 8)).astype(np.int16)  # (nz, ny, nx)
    return Image(arr, SPACING, ORIGIN, OBLIQUE, "oblique")


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(folder.iterdir())}


# ---- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["v.nii.gz", "v.nii", "v.nrrd", "v.nhdr", "v.mha", "v.mhd", "series/"])
def test_round_trip_keeps_voxels_and_geometry(tmp_path: Path, volume: Image, target: str) -> None:
    out = write_image(volume, str(tmp_path) + "/" + target)
    back = read_image(out)
    assert back.array.shape == (6, 7, 8)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, SPACING, atol=1e-4)
    np.testing.assert_allclose(back.origin, ORIGIN, atol=1e-4)
    np.testing.assert_allclose(back.direction, OBLIQUE, atol=1e-4)
    assert back.same_geometry(volume, atol=1e-4)
    # Nothing but the target (and a .mhd/.nhdr's data file) is left beside it.
    names = sorted(p.name for p in tmp_path.iterdir())
    assert all(not n.startswith(".") for n in names), names
    if target == "series/":
        assert len(list((tmp_path / "series").glob("*.dcm"))) == 6


def test_dicom_series_tags_describe_the_oblique_grid(tmp_path: Path, volume: Image) -> None:
    write_image(volume, tmp_path / "s", dicom=True, modality="CT")
    files = sorted((tmp_path / "s").glob("*.dcm"))
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(files[2]))
    reader.ReadImageInformation()
    ipp = [float(v) for v in reader.GetMetaData("0020|0032").split("\\")]
    iop = [float(v) for v in reader.GetMetaData("0020|0037").split("\\")]
    spacing = [float(v) for v in reader.GetMetaData("0028|0030").split("\\")]  # row, column spacing
    np.testing.assert_allclose(ipp, volume.index_to_physical((0, 0, 2)), atol=1e-4)
    np.testing.assert_allclose(iop, np.concatenate([OBLIQUE[:, 0], OBLIQUE[:, 1]]), atol=1e-6)
    np.testing.assert_allclose(spacing, [1.1, 0.8])
    assert float(reader.GetMetaData("0018|0050")) == pytest.approx(2.5)
    assert reader.GetMetaData("0008|0060").strip() == "CT"


def test_dicom_float_data_are_rescaled_int16(tmp_path: Path, volume: Image) -> None:
    values = np.random.default_rng(1).normal(size=volume.array.shape) * 100.0
    write_image(volume.with_array(values), tmp_path / "f", dicom=True)
    back = read_image(tmp_path / "f")
    assert back.same_geometry(volume)
    step = (values.max() - values.min()) / 64000
    assert np.abs(back.array - values).max() <= step * 0.51 + 1e-9


def test_dicom_left_handed_grid_reads_back_flipped_but_equivalent(tmp_path: Path, volume: Image) -> None:
    left = Image(volume.array, SPACING, ORIGIN, OBLIQUE @ np.diag([1.0, 1.0, -1.0]), "left")
    write_image(left, tmp_path / "l", dicom=True)
    back = read_image(tmp_path / "l")
    assert np.linalg.det(back.direction) > 0
    ijk = np.array([[0, 0, 0], [7, 6, 5], [3, 2, 4]])
    found = np.rint(back.physical_to_index(left.index_to_physical(ijk))).astype(int)
    np.testing.assert_array_equal(found, [[0, 0, 5], [7, 6, 0], [3, 2, 1]])
    for (i, j, k), (i2, j2, k2) in zip(ijk, found):
        assert back.array[k2, j2, i2] == left.array[k, j, i]


def test_dicom_folder_picks_largest_series_or_the_one_asked(tmp_path: Path, volume: Image) -> None:
    small = Image(volume.array[:3], SPACING, ORIGIN, OBLIQUE, "small")
    write_image(volume, tmp_path / "a", dicom=True)
    write_image(small, tmp_path / "b", dicom=True)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for sub in ("a", "b"):
        for f in (tmp_path / sub).iterdir():
            os.replace(f, mixed / f"{sub}_{f.name}")
    assert read_image(mixed).array.shape == (6, 7, 8)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(next(mixed.glob("b_*.dcm"))))
    reader.ReadImageInformation()
    uid = reader.GetMetaData("0020|000e").strip()
    np.testing.assert_array_equal(read_image(mixed, series_uid=uid).array, volume.array[:3])
    with pytest.raises(InputError, match="no DICOM series with SeriesInstanceUID"):
        read_image(mixed, series_uid="1.2.3")


def test_dicom_rewrite_replaces_previous_series_but_refuses_foreign_files(tmp_path: Path, volume: Image) -> None:
    write_image(volume, tmp_path / "s", dicom=True)
    write_image(Image(volume.array[:2], SPACING, ORIGIN, OBLIQUE), tmp_path / "s", dicom=True)
    assert len(list((tmp_path / "s").iterdir())) == 2
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="other than a DICOM series"):
        write_image(volume, tmp_path / "s", dicom=True)
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"


def test_float_nifti_is_exact(tmp_path: Path, volume: Image) -> None:
    values = np.random.default_rng(2).normal(size=volume.array.shape).astype(np.float32)
    back = read_image(write_image(volume.with_array(values), tmp_path / "f.nii.gz"))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, values)


def test_physical_point_index_round_trip(tmp_path: Path, volume: Image) -> None:
    back = read_image(write_image(volume, tmp_path / "v.nrrd"))
    ref = back.to_sitk()
    rng = np.random.default_rng(3)
    index = rng.uniform(0, 5, size=(20, 3))
    points = back.index_to_physical(index)
    for idx, p in zip(index, points):  # the same mapping as ITK's
        np.testing.assert_allclose(p, ref.TransformContinuousIndexToPhysicalPoint(idx.tolist()), atol=1e-9)
    np.testing.assert_allclose(back.physical_to_index(points), index, atol=1e-9)
    # A voxel centre maps to the voxel that holds its value.
    i, j, k = 5, 2, 4
    p = back.index_to_physical((i, j, k))
    assert ref.TransformPhysicalPointToIndex(p.tolist()) == (i, j, k)
    assert back.array[k, j, i] == volume.array[k, j, i]
    assert back.contains(p) and not back.contains(back.index_to_physical((i, j, 6.6)))


# ---- bad input ---------------------------------------------------------------------------------
def test_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "absent.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(InputError, match="garbage.nii.gz: not a readable image"):
        read_image(garbage)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(empty)


def test_four_d_vector_and_two_d_images_are_refused(tmp_path: Path, volume: Image) -> None:
    vols = [sitk.GetImageFromArray(volume.array + t) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(tmp_path / "t.nii.gz"))
    with pytest.raises(InputError, match="expected a 3D image, got a 4D image.*time series"):
        read_image(tmp_path / "t.nii.gz")
    # A 4D file holding a single volume is fine.
    sitk.WriteImage(sitk.JoinSeries(vols[:1]), str(tmp_path / "one.nii.gz"))
    assert read_image(tmp_path / "one.nii.gz").array.shape == (6, 7, 8)

    vec = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vec, str(tmp_path / "vec.nrrd"))
    with pytest.raises(InputError, match="vector image with 3 components"):
        read_image(tmp_path / "vec.nrrd")

    flat = sitk.GetImageFromArray(np.arange(30, dtype=np.int16).reshape(5, 6))
    flat.SetSpacing((0.5, 0.7))
    sitk.WriteImage(flat, str(tmp_path / "flat.mha"))
    with pytest.raises(InputError, match="expected a 3D image, got a 2D image of size \\(6, 5\\)"):
        read_image(tmp_path / "flat.mha")
    two = read_image(tmp_path / "flat.mha", ndim=None)
    assert two.ndim == 2 and two.spacing == (0.5, 0.7)
    # A one-slice volume read as 2D loses its trailing axis.
    assert read_image(write_image(volume.with_array(volume.array), tmp_path / "v.mha"), ndim=None).ndim == 3
    single = Image(volume.array[:1], SPACING, ORIGIN, np.eye(3))
    assert read_image(write_image(single, tmp_path / "s.nrrd"), ndim=2).array.shape == (7, 8)


def test_zero_and_negative_spacing_are_refused(tmp_path: Path) -> None:
    raw = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    for label, spacing in (("zero", "1 0 1"), ("negative", "1 1 -2")):
        header = tmp_path / f"{label}.mhd"
        header.write_text(
            "ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\nElementType = MET_SHORT\n"
            f"ElementSpacing = {spacing}\nElementDataFile = {label}.raw\n"
        )
        (tmp_path / f"{label}.raw").write_bytes(raw.tobytes())
        with pytest.raises(InputError, match=f"{label}.mhd: voxel spacing must be positive"):
            read_image(header)
    with pytest.raises(InputError, match="spacing must be positive"):
        Image(raw, (1.0, 0.0, 1.0), (0, 0, 0), np.eye(3))


def test_check_volume(volume: Image) -> None:
    assert check_volume(volume) is volume
    values = volume.array.astype(np.float32)
    values[2, 3, 4] = np.nan
    values[5, 0, 1] = np.inf
    with pytest.raises(InputError, match=r"2 voxel\(s\) are NaN or infinite \(first at index \(i, j, k\) = \(4, 3, 2\)\)"):
        check_volume(volume.with_array(values))
    with pytest.raises(InputError, match="every voxel equals 3"):
        check_volume(volume.with_array(np.full(volume.array.shape, 3, np.int16)))
    assert check_volume(volume.with_array(np.zeros(volume.array.shape)), allow_constant=True).array.sum() == 0
    with pytest.raises(InputError, match="empty"):
        check_volume(Image(np.zeros((0, 4, 4)), SPACING, ORIGIN, np.eye(3)))
    with pytest.raises(InputError, match="expected a 3D image, got a 2D image"):
        check_volume(Image(np.arange(12.0).reshape(3, 4), (1, 1), (0, 0), np.eye(2), "slice"))
    assert check_volume(Image(np.arange(12.0).reshape(3, 4), (1, 1), (0, 0), np.eye(2)), ndim=None).ndim == 2


def test_point_outside_the_image_is_named(volume: Image) -> None:
    inside = volume.index_to_physical([[0, 0, 0], [7, 6, 5], [3.5, 3, 2]])
    check_points_inside(volume, inside, ["a", "b", "c"])  # no error
    outside = np.vstack([inside, volume.index_to_physical([[3, 3, 7.0], [-1, 0, 0]])])
    with pytest.raises(InputError, match=r"2 point\(s\) lie outside oblique .*: far at .*; neg at"):
        check_points_inside(volume, outside, ["a", "b", "c", "far", "neg"])
    with pytest.raises(InputError, match="point 4"):
        check_points_inside(volume, outside)


# ---- atomic writes -----------------------------------------------------------------------------
def test_failed_write_leaves_folder_unchanged(tmp_path: Path, volume: Image, monkeypatch) -> None:
    write_image(volume, tmp_path / "keep.nii.gz")
    before = _listing(tmp_path)

    def broken(self, image, *args):
        Path(self.GetFileName()).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", broken)
    for target in ("keep.nii.gz", "new.nrrd", "new.mhd", "series/"):
        with pytest.raises(InputError, match="disk full"):
            write_image(volume.with_array(volume.array + 1), f"{tmp_path}/{target}")
        assert _listing(tmp_path) == before


def test_failed_dicom_write_midway_keeps_previous_series(tmp_path: Path, volume: Image, monkeypatch) -> None:
    write_image(volume, tmp_path / "s", dicom=True)
    before = _listing(tmp_path / "s")
    real = sitk.ImageFileWriter.Execute
    calls = []

    def fails_third(self, image, *args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("slice 3 failed")
        return real(self, image, *args)

    monkeypatch.setattr(sitk.ImageFileWriter, "Execute", fails_third)
    with pytest.raises(InputError, match="slice 3 failed"):
        write_image(volume.with_array(volume.array + 1), tmp_path / "s", dicom=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert _listing(tmp_path / "s") == before


def test_write_refuses_unknown_targets(tmp_path: Path, volume: Image) -> None:
    with pytest.raises(InputError, match="no file extension"):
        write_image(volume, tmp_path / "noext")
    with pytest.raises(InputError, match="does not exist"):
        write_image(volume, tmp_path / "missing" / "v.nii.gz")
    with pytest.raises(InputError, match="modality"):
        write_image(volume, f"{tmp_path}/d/", modality="OT")
    assert list(tmp_path.iterdir()) == []


# ---- resampling --------------------------------------------------------------------------------
def _ramp(image: Image) -> Image:
    """An image whose value is a linear function of the LPS position."""
    k, j, i = np.indices(image.array.shape)
    p = image.index_to_physical(np.stack([i, j, k], -1))
    return image.with_array(p @ np.array([0.5, -1.5, 2.0]) + 7.0)


def test_resample_image_keeps_extent_and_values(volume: Image) -> None:
    ramp = _ramp(volume)
    iso = resample_image(ramp, 1.0)
    assert iso.spacing == (1.0, 1.0, 1.0)
    assert iso.size == (6, 8, 15)  # round(8*0.8), round(7*1.1), round(6*2.5)
    np.testing.assert_allclose(iso.direction, OBLIQUE)
    # The outer corner of voxel 0 does not move.
    np.testing.assert_allclose(iso.index_to_physical((-0.5,) * 3), ramp.index_to_physical((-0.5,) * 3), atol=1e-9)
    # Linear interpolation of a linear function is exact where the new voxel is inside the old grid.
    k, j, i = np.indices(iso.array.shape)
    p = iso.index_to_physical(np.stack([i, j, k], -1))
    inside = ramp.contains(p, margin=0.0)
    assert inside.sum() > 100
    np.testing.assert_allclose(iso.array[inside], (p @ np.array([0.5, -1.5, 2.0]) + 7.0)[inside], atol=1e-4)

    labels = volume.with_array((volume.array > 500).astype(np.uint8))
    nn = resample_image(labels, (0.4, 1.1, 2.5), interpolator="nearest")
    assert nn.array.dtype == np.uint8 and nn.size == (16, 7, 6)
    np.testing.assert_array_equal(nn.array[:, :, ::2], labels.array)
    assert resample_image(volume, 2.0, interpolator="bspline").array.dtype == np.float32
    with pytest.raises(InputError, match="unknown interpolator 'cubic'"):
        resample_image(volume, 1.0, interpolator="cubic")
    with pytest.raises(InputError, match="new spacing"):
        resample_image(volume, (1.0, 0.0, 1.0))


def test_resample_to_reference_and_transform(volume: Image) -> None:
    ramp = _ramp(volume)
    same = resample_to(ramp, volume)
    np.testing.assert_allclose(same.array, ramp.array, atol=1e-4)
    assert same.same_geometry(volume)
    # A translation t maps reference points to image points: the value is the ramp at p + t.
    t = np.eye(4)
    t[:3, 3] = [0.3, -0.2, 0.1]
    shifted = resample_to(ramp, volume, transform=t)
    interior = (slice(1, -1),) * 3
    np.testing.assert_allclose(
        shifted.array[interior], ramp.array[interior] + np.dot([0.5, -1.5, 2.0], t[:3, 3]), atol=1e-4
    )
    axial = Image(np.zeros((4, 4, 4)), (3.0, 3.0, 3.0), ORIGIN, np.eye(3), "axial")
    out = resample_to(volume, axial, interpolator="nearest", default_value=-1)
    assert out.array.dtype == np.int16 and out.same_geometry(axial)
    assert (out.array == -1).any() and np.isin(out.array[out.array != -1], volume.array).all()
    with pytest.raises(InputError, match="4x4 homogeneous matrix"):
        resample_to(ramp, volume, transform=np.eye(3))


def test_compression_is_on_except_for_plain_nifti(tmp_path: Path) -> None:
    arr = np.zeros((32, 32, 32), np.int16)
    arr[8:24, 8:24, 8:24] = 1000
    image = Image(arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "cube")
    raw = arr.nbytes
    assert write_image(image, tmp_path / "c.nii").stat().st_size > raw
    for name in ("c.nii.gz", "c.nrrd", "c.mha"):
        assert write_image(image, tmp_path / name).stat().st_size < raw / 20, name
        np.testing.assert_array_equal(read_image(tmp_path / name).array, arr)
