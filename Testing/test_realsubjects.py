"""Real second subjects (Colin27 MRI, InVesalius CT) and the landmark picture."""

from __future__ import annotations

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.points import PointSet
from AnatSSLLib.data import realsubjects as R

needs_colin = pytest.mark.skipif(
    not R.COLIN27_PATH.is_file(), reason="Colin27 missing: apt-get install -y mricron-data"
)
needs_ct = pytest.mark.skipif(
    not R.INVESALIUS_PATH.is_file(), reason="InVesalius CT missing: apt-get install -y invesalius-examples"
)


@needs_colin
def test_colin27_is_a_1mm_head_in_mni_space():
    img = R.load_colin27()
    assert img.array.shape == (181, 217, 181) and img.spacing == (1.0, 1.0, 1.0)
    # the MNI origin (AC) lies inside the head, in brain tissue brighter than the background
    assert img.contains([0.0, 0.0, 0.0])
    i, j, k = np.round(img.physical_to_index([0.0, 0.0, 0.0])).astype(int)
    assert img.array[k, j, i] > 4 * np.percentile(img.array, 5) + 1
    # a RAS file read as LPS: the first voxel is at the right, anterior, inferior corner
    assert img.origin[0] > 0 and img.origin[1] > 0 and img.origin[2] < 0
    brain = R.load_colin27(brain_only=True)
    assert brain.same_geometry(img) and (brain.array == 0).mean() > (img.array == 0).mean()


@needs_ct
def test_invesalius_ct_in_hounsfield_units():
    ct = R.load_invesalius_ct()
    assert ct.array.shape == (108, 256, 256) and ct.array.dtype == np.int16
    assert ct.spacing == pytest.approx((0.957, 0.957, 1.5), abs=1e-3)
    assert ct.array.min() == -1024 and ct.array.max() > 2000
    np.testing.assert_allclose(ct.index_to_physical((np.array(ct.size) - 1) / 2.0), 0.0, atol=1e-6)
    # slices run inferior to superior: the head narrows towards the vertex (high k, +z)
    head = ct.array > -300
    assert head[100].sum() < 0.8 * head[60].sum()
    assert ct.index_to_physical([0, 0, 100])[2] > ct.index_to_physical([0, 0, 60])[2]
    # the face is anterior (-y in LPS): at nose level, tissue reaches further anterior than posterior
    rows = np.nonzero(head[30].any(axis=1))[0]
    y_front = ct.index_to_physical([128, rows.max(), 30])[1]
    assert y_front < 0
    bone = (ct.array >= 226).mean()
    assert 0.02 < bone < 0.2


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(InputError, match="apt-get install -y mricron-data"):
        R.load_colin27(tmp_path / "ch2.nii.gz")
    with pytest.raises(InputError, match="apt-get install -y invesalius-examples"):
        R.load_invesalius_ct(tmp_path / "Cranium.inv3")


@needs_ct
def test_render_landmarks_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (bench extra)")
    import SimpleITK as sitk

    ct = R.load_invesalius_ct()
    pts = PointSet(["centre", "up"], [[0.0, 0.0, 0.0], [0.0, 0.0, 25.0]], ["volume centre", "25 mm up"])
    out = R.render_landmarks_png(ct, pts, tmp_path / "lm.png", "InVesalius CT", window=(-100, 150),
                                 reference=PointSet(["centre"], [[5.0, 0.0, 0.0]]))  # fmt: skip
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 400
    assert png[..., :3].std() > 20  # a picture, not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["lm.png"]
    with pytest.raises(InputError, match="no points"):
        R.render_landmarks_png(ct, PointSet([], np.zeros((0, 3))), tmp_path / "x.png")
