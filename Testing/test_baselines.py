"""Registration and patch-matching baselines on the real MNI152 2009c T1w (autoafids wheel), downsampled.

Targets are made by resampling the reference through a known affine, so the true position of every
reference point in the target is known exactly: the target is ``target(x) = reference(A(x))``, hence a
reference point ``p`` lies at ``A^-1(p)`` in the target.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from AnatSSLLib.baselines import (  # noqa: E402
    MethodUnavailable,
    NCCLevel,
    NCCPatchMatching,
    RegistrationLandmarks,
    RegistrationSegmentation,
    ants_available,
    ncc_map,
)
from AnatSSLLib.baselines import registration as registration_module  # noqa: E402
from AnatSSLLib.errors import InputError  # noqa: E402
from AnatSSLLib.image import Image  # noqa: E402
from AnatSSLLib.metrics import dice_per_label, radial_errors  # noqa: E402
from AnatSSLLib.points import PointSet  # noqa: E402

_STEM = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"


def _t1_path() -> pathlib.Path:
    spec = importlib.util.find_spec("autoafids")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoafids data wheel not installed (pip install --no-deps autoafids==0.1.4)")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "resources" / _STEM
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


def _downsample(img, spacing: float):
    size = [int(round(n * s / spacing)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    smooth = sitk.SmoothingRecursiveGaussian(img, spacing / 2.0)
    return sitk.Resample(smooth, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), (spacing,) * 3,
                         img.GetDirection(), 0.0, sitk.sitkFloat32)


@pytest.fixture(scope="module")
def t1_1mm():
    return sitk.ReadImage(str(_t1_path()), sitk.sitkFloat32)


@pytest.fixture(scope="module")
def ref3(t1_1mm):
    return _downsample(t1_1mm, 3.0)


@pytest.fixture(scope="module")
def ref4(t1_1mm):
    return _downsample(t1_1mm, 4.0)


def _centre(img) -> np.ndarray:
    return np.array(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in img.GetSize()]))


def _known_affine(img, degrees=6.0, scale=(1.05, 0.97, 1.0), shift=(4.0, -3.0, 2.5)):
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    tx = sitk.AffineTransform(3)
    tx.SetCenter(tuple(_centre(img)))
    tx.SetMatrix(tuple((rot @ np.diag(scale)).ravel()))
    tx.SetTranslation(shift)
    return tx


def _points(img) -> PointSet:
    c = _centre(img)
    offsets = [(0, 0, 0), (20, 10, -10), (-25, 30, 15), (30, -40, 5), (0, 50, 20), (-15, -45, -20)]
    return PointSet([f"p{i}" for i in range(len(offsets))], np.array([c + o for o in offsets]))


def _truth(tx, points: PointSet) -> PointSet:
    inv = tx.GetInverse()
    return PointSet(points.labels, np.array([inv.TransformPoint(tuple(p)) for p in points.positions]))


def _target(ref, tx, grid=None):
    grid = grid if grid is not None else ref
    return sitk.Resample(ref, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def test_affine_registration_recovers_known_affine_under_1mm(ref3):
    tx = _known_affine(ref3)
    reference = Image.from_sitk(ref3, "reference")
    target = Image.from_sitk(_target(ref3, tx), "target")
    points = _points(ref3)
    method = RegistrationLandmarks("affine")
    method.prepare(reference, points)
    errors = radial_errors(method.locate(target), _truth(tx, points))
    assert max(errors.values()) < 1.0, errors
    # Doing nothing would be far off: the known affine moves these points by several mm.
    moved = radial_errors(points, _truth(tx, points))
    assert np.mean(list(moved.values())) > 4.0


def test_affine_registration_honours_anisotropic_target_grid(ref3):
    """Target on an anisotropic, shifted grid: the errors are physical mm, the points still land under 1.5 mm."""
    tx = _known_affine(ref3, degrees=-4.0, scale=(1.0, 1.04, 0.96), shift=(-3.0, 2.0, 4.0))
    grid = sitk.Image([48, 76, 40], sitk.sitkFloat32)
    grid.SetSpacing((4.0, 3.0, 4.8))
    grid.SetOrigin(tuple(np.array(ref3.GetOrigin()) + np.array([-2.0, 1.0, 3.0])))
    grid.SetDirection(ref3.GetDirection())
    target = Image.from_sitk(_target(ref3, tx, grid), "anisotropic target")
    assert target.spacing == (4.0, 3.0, 4.8)
    points = _points(ref3)
    method = RegistrationLandmarks("affine")
    method.prepare(Image.from_sitk(ref3, "reference"), points)
    errors = radial_errors(method.locate(target), _truth(tx, points))
    assert max(errors.values()) < 1.5, errors


def test_bspline_registration_maps_points_in_the_right_direction(ref4):
    """Affine then B-spline: the composite transform order and the fixed/moving roles give sub-2 mm errors."""
    tx = _known_affine(ref4, degrees=8.0, shift=(5.0, -4.0, 3.0))
    points = _points(ref4)
    method = RegistrationLandmarks("bspline", settings=registration_module.RegistrationSettings(bspline_iterations=15))
    method.prepare(Image.from_sitk(ref4, "reference"), points)
    errors = radial_errors(method.locate(Image.from_sitk(_target(ref4, tx), "target")), _truth(tx, points))
    assert np.mean(list(errors.values())) < 1.5, errors
    assert max(errors.values()) < 2.5, errors


def test_registration_segmentation_carries_labels_onto_target_grid(ref4):
    tx = _known_affine(ref4)
    ref_arr = sitk.GetArrayFromImage(ref4)
    labels = np.zeros(ref_arr.shape, np.uint8)
    labels[ref_arr > np.percentile(ref_arr, 60)] = 1
    labels[ref_arr > np.percentile(ref_arr, 85)] = 2
    lab_img = sitk.GetImageFromArray(labels)
    lab_img.CopyInformation(ref4)
    truth = Image.from_sitk(sitk.Resample(lab_img, ref4, tx, sitk.sitkNearestNeighbor, 0, lab_img.GetPixelID()), "truth")
    target = Image.from_sitk(_target(ref4, tx), "target")
    method = RegistrationSegmentation("affine")
    method.prepare(Image.from_sitk(ref4, "reference"), Image.from_sitk(lab_img, "labels"))
    out = method.segment(target)
    assert out.same_geometry(target)
    dice = dice_per_label(out, truth, [1, 2])
    assert dice[1] > 0.9 and dice[2] > 0.85, dice
    # Without registration (labels copied as they are) the overlap is clearly worse.
    unregistered = dice_per_label(target.with_array(labels), truth, [1, 2])
    assert unregistered[2] < dice[2] - 0.1, (unregistered, dice)


def test_ncc_map_finds_a_planted_patch():
    rng = np.random.default_rng(0)
    search = rng.normal(size=(15, 15, 15))
    patch = search[4:9, 6:11, 2:7].copy()
    ncc = ncc_map(search, 3.0 * patch + 7.0)  # NCC ignores gain and offset
    assert ncc.shape == (11, 11, 11)
    assert np.unravel_index(np.argmax(ncc), ncc.shape) == (4, 6, 2)
    assert ncc.max() == pytest.approx(1.0, abs=1e-9)
    assert ncc_map(search, np.ones((5, 5, 5))).max() == 0.0  # a flat patch matches nothing


def test_ncc_patch_matching_finds_translation_on_anisotropic_grid(ref3):
    shift = np.array([7.0, -9.0, 5.0])
    grid = sitk.Image([56, 70, 50], sitk.sitkFloat32)
    grid.SetSpacing((3.5, 3.2, 3.9))
    grid.SetOrigin(ref3.GetOrigin())
    grid.SetDirection(ref3.GetDirection())
    target = Image.from_sitk(_target(ref3, sitk.TranslationTransform(3, tuple(-shift)), grid), "target")
    points = _points(ref3)
    method = NCCPatchMatching(levels=[NCCLevel(4.0, 32.0, 20.0), NCCLevel(2.0, 16.0, 4.0)], init="none")
    method.prepare(Image.from_sitk(ref3, "reference"), points)
    found = method.locate(target)
    truth = PointSet(points.labels, points.positions + shift)
    errors = radial_errors(found, truth)
    assert np.median(list(errors.values())) < 1.5, errors
    assert found.confidence is not None and np.all(found.confidence > 0.8)


def test_unknown_kind_and_missing_prepare_are_input_errors(ref4):
    with pytest.raises(InputError, match="registration kind"):
        RegistrationLandmarks("rigidish")
    with pytest.raises(InputError, match="prepare"):
        RegistrationLandmarks("affine").locate(Image.from_sitk(ref4))


def test_syn_without_antspyx_is_unavailable(monkeypatch):
    monkeypatch.setattr(registration_module, "ants_available", lambda: False)
    with pytest.raises(MethodUnavailable, match="antspyx"):
        RegistrationLandmarks("syn")


@pytest.mark.skipif(not ants_available(), reason="antspyx not installed (the optional 'ants' extra)")
def test_ants_syn_maps_reference_points_into_target(ref4):
    """ANTs maps points opposite to images: forward transforms take reference (fixed) points to the target."""
    tx = _known_affine(ref4)
    points = _points(ref4)
    settings = registration_module.RegistrationSettings(syn_iterations=(20, 10, 0))
    method = RegistrationLandmarks("syn", settings=settings)
    method.prepare(Image.from_sitk(ref4, "reference"), points)
    errors = radial_errors(method.locate(Image.from_sitk(_target(ref4, tx), "target")), _truth(tx, points))
    assert np.mean(list(errors.values())) < 1.5, errors
