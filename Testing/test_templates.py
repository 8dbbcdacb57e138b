"""Real anatomy with expert landmarks: the MNI152 2009c template, its label map and the 32 AFIDs."""

from __future__ import annotations

import filecmp
import pathlib

import numpy as np
import pytest

from fixtures_data import _require_data_packages

from AnatSSLLib.data import packages
from AnatSSLLib.data import templates as T
from AnatSSLLib.errors import InputError

RESOURCES = pathlib.Path(__file__).resolve().parents[1] / "Resources" / "Data"
MIDLINE = ["AC", "PC", "infracollicular sulcus", "PMJ", "superior interpeduncular fossa", "culmen",
           "intermammillary sulcus", "pineal gland", "genu of CC", "splenium of CC"]


@pytest.fixture(scope="module")
def tpl1():
    _require_data_packages()
    return T.load_template(1.0)


def _label_at(img, points):
    idx = np.round(img.physical_to_index(points)).astype(int)
    return img.array[idx[:, 2], idx[:, 1], idx[:, 0]]


def _distance_to_label(img, point, ids):
    """Distance (mm) from an LPS point to the nearest voxel centre whose label is in ``ids``."""
    k, j, i = np.nonzero(np.isin(img.array, ids))
    pts = img.index_to_physical(np.stack([i, j, k], -1))
    return float(np.min(np.linalg.norm(pts - point, axis=1)))


def test_afids_match_published_anatomy(tpl1):
    lm = tpl1.landmarks
    assert len(lm) == 32 and lm.labels[0] == "AC" and lm.labels[1] == "PC"
    assert lm.descriptions[:2] == ["AFID 1", "AFID 2"]
    ac, pc = lm.position("AC"), lm.position("PC")
    assert 25.0 <= np.linalg.norm(ac - pc) <= 30.0  # AC-PC distance of an adult brain
    # LPS: anterior is -y, so AC has the smaller y; both on the midline (x ~ 0).
    assert ac[1] < pc[1] - 20
    for name in MIDLINE:
        assert abs(lm.position(name)[0]) < 2.0, name
    # Right structures at negative LPS x, left at positive, roughly mirror images.
    for r in [n for n in lm.labels if n.startswith("R ")]:
        left, right = lm.position("L " + r[2:]), lm.position(r)
        assert right[0] < -1.5 and left[0] > 1.5, r
        assert abs(left[0] + right[0]) < 4.0 and abs(left[2] - right[2]) < 4.0, r


def test_second_rater_is_the_inter_rater_floor(tpl1):
    d = tpl1.inter_rater_mm()
    assert d.shape == (32,)
    assert tpl1.landmarks_rater2.labels == tpl1.landmarks.labels
    assert 0.5 < d.mean() < 1.0 and 1.5 < d.max() < 3.0  # 0.77 mm mean, 2.41 mm max (DATA.md)


def test_template_grid_and_labels(tpl1):
    t1, t2, lab = tpl1.t1, tpl1.t2, tpl1.labels
    assert t1.array.shape == (193, 229, 193) and t1.spacing == (1.0, 1.0, 1.0)
    assert t1.same_geometry(t2) and t1.same_geometry(lab)
    assert lab.array.dtype == np.uint8
    assert tpl1.label_names == T.LABEL_NAMES
    names = set(tpl1.label_names.values())
    assert {"background", "csf", "gm", "wm", "bone", "soft_tissue", "thalamus_left", "hippocampus_right"} <= names
    present = set(np.unique(lab.array).tolist())
    assert present == set(T.LABEL_NAMES), f"missing labels {set(T.LABEL_NAMES) - present}"
    vox_ml = 1e-3
    for side in ("left", "right"):
        ids = {v: k for k, v in T.LABEL_NAMES.items()}
        assert 6 < (lab.array == ids[f"thalamus_{side}"]).sum() * vox_ml < 16
        assert 2 < (lab.array == ids[f"hippocampus_{side}"]).sum() * vox_ml < 8
    # Sides: "left" structures lie at positive LPS x.
    for name in ("thalamus", "putamen", "caudate", "hippocampus"):
        ids = {v: k for k, v in T.LABEL_NAMES.items()}
        xl = lab.index_to_physical(np.argwhere(lab.array == ids[f"{name}_left"])[:, ::-1])[:, 0].mean()
        xr = lab.index_to_physical(np.argwhere(lab.array == ids[f"{name}_right"])[:, ::-1])[:, 0].mean()
        assert xl > 10 and xr < -10, name


def test_real_contrasts_follow_tissue_ordering(tpl1):
    lab = tpl1.labels.array
    med = {c: {t: np.median(getattr(tpl1, c).array[lab == i]) for t, i in (("csf", 4), ("gm", 2), ("wm", 3))}
           for c in ("t1", "t2")}
    assert med["t1"]["wm"] > med["t1"]["gm"] > med["t1"]["csf"]
    assert med["t2"]["csf"] > med["t2"]["gm"] > med["t2"]["wm"]


def test_landmarks_sit_on_their_structures(tpl1):
    lab, lm = tpl1.labels, tpl1.landmarks
    ids = {v: k for k, v in T.LABEL_NAMES.items()}
    vent = [ids["lateral_ventricle_left"], ids["lateral_ventricle_right"]]
    for name in ("R LV at AC", "L LV at AC", "R LV at PC", "L LV at PC"):
        assert _distance_to_label(lab, lm.position(name), vent) < 3.0, name
    # The occipital horns are collapsed in the average template: a little CSF at their tip.
    for name in ("L ventral occipital horn", "R ventral occipital horn"):
        assert _distance_to_label(lab, lm.position(name), vent + [ids["csf"]]) < 4.5, name
    for name in ("AC", "genu of CC", "splenium of CC"):
        assert _distance_to_label(lab, lm.position(name), [ids["wm"]]) < 2.0, name
    for name in ("R MB", "L MB"):
        assert _distance_to_label(lab, lm.position(name), [ids["ventral_dc"]]) < 2.5, name
    for name in ("PMJ", "infracollicular sulcus"):
        assert _distance_to_label(lab, lm.position(name), [ids["brainstem"]]) < 3.0, name
    # Every AFID is inside the brain, not in bone, soft tissue or air.
    assert not np.isin(_label_at(lab, lm.positions), [0, ids["bone"], ids["soft_tissue"]]).any()


def test_load_template_2mm(template_2mm, tpl1):
    t = template_2mm
    assert t.t1.array.shape == (97, 115, 97) and t.res_mm == 2.0
    assert t.t1.same_geometry(t.labels) and t.t1.same_geometry(t.t2)
    np.testing.assert_allclose(t.t1.origin, tpl1.t1.origin)
    np.testing.assert_allclose(t.landmarks.positions, tpl1.landmarks.positions)
    # The copy is private: changing it does not change the next load.
    t2 = T.load_template(2.0)
    t2.t1.array[:] = 0
    assert T.load_template(2.0).t1.array.max() > 1000


@pytest.mark.parametrize("res", [0.5, 9.0, "two"])
def test_resolution_out_of_range(res):
    with pytest.raises(InputError, match="resolution"):
        T.load_template(res)


def test_committed_copy_matches_the_wheel():
    _require_data_packages()
    res = packages.autoafids_resources()
    assert filecmp.cmp(RESOURCES / "afids_groundtruth.fcsv", res / f"{T.AFID_STEM}_desc-groundtruth_afids.fcsv", False)
    assert filecmp.cmp(RESOURCES / "afids_rater2.fcsv", res / f"{T.AFID_STEM}_T1w.fcsv", False)
    for lic in ("LICENSE-AFIDs-MIT.txt", "LICENSE-MNI-ICBM2009.txt", "README.md"):
        assert (RESOURCES / lic).stat().st_size > 200
    t1, _, _, _ = T.load_template_images(2.0)
    committed = T._read_image(RESOURCES / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz", "committed")
    assert committed.same_geometry(t1)
    assert np.abs(committed.array - t1.array).max() <= 0.5 + 1e-3
    # No label map is committed (its sources are CC BY-NC / GPL-2).
    assert not list(RESOURCES.glob("*label*"))


def test_committed_copy_used_without_autoafids(monkeypatch):
    real = packages.package_dir

    def fake(module):
        if module == "autoafids":
            raise InputError("data package 'autoafids' is not installed; install it with: pip install --no-deps autoafids==0.1.4")
        return real(module)

    monkeypatch.setattr(packages, "package_dir", fake)
    t1, t2, lm, lm2 = T.load_template_images(2.0)
    assert t1.array.shape == (97, 115, 97) and len(lm) == 32 and len(lm2) == 32
    t1b, _, _, _ = T.load_template_images(4.0)
    assert t1b.spacing == (4.0, 4.0, 4.0)


def test_missing_package_gives_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepmriprep" else real(name, *a))
    with pytest.raises(InputError) as exc:
        packages.package_dir("deepmriprep")
    msg = str(exc.value)
    assert "\n" not in msg and "pip install --no-deps deepmriprep==0.3.0" in msg
    assert packages.install_command("autoafids", "spm_runtime") == \
        "pip install --no-deps autoafids==0.1.4 spm-runtime==25.1.2.post4"


def test_label_map_is_built_once_and_cached(tmp_path, monkeypatch):
    _require_data_packages()
    monkeypatch.setenv("ANATSSL_DATA_CACHE", str(tmp_path))
    T.forget_loaded()
    try:
        first = T.load_template(4.0)
        cached = list(tmp_path.glob("mni2009c_labels_1mm_*.nii.gz"))
        assert len(cached) == 1 and not list(tmp_path.glob(".tmp-*"))
        stamp = cached[0].stat().st_mtime_ns
        T.forget_loaded()
        second = T.load_template(4.0)
        assert cached[0].stat().st_mtime_ns == stamp  # read back, not rebuilt
        np.testing.assert_array_equal(first.labels.array, second.labels.array)
    finally:
        T.forget_loaded()


def test_load_afids_frames(tmp_path):
    text = ("# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
            "vtkMRMLMarkupsFiducialNode_2,1,2,3,0,0,0,1,1,1,0,2,PC,\n"
            "vtkMRMLMarkupsFiducialNode_1,-4,5,6,0,0,0,1,1,1,0,1,AC,\n")
    path = tmp_path / "a.fcsv"
    path.write_text(text)
    ps = T.load_afids(path)
    assert ps.labels == ["AC", "PC"]
    np.testing.assert_allclose(ps.positions, [[4, -5, 6], [-1, -2, 3]])  # RAS -> LPS
    path.write_text("garbage\n")
    with pytest.raises(InputError, match="fcsv"):
        T.load_afids(path)


def test_cli_template_export_and_info(tmp_path, capsys):
    from AnatSSLLib.cli import main
    from AnatSSLLib.points import read_points

    _require_data_packages()
    out = tmp_path / "tpl"
    assert main(["data", "template", "--res", "4", "--contrasts", "t1,flair", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "flair.nii.gz", "labels.nii.gz", "landmarks.mrk.json", "landmarks_rater2.mrk.json", "t1.nii.gz"]
    tpl = T.load_template(4.0)
    back = read_points(out / "landmarks.mrk.json")
    assert back.labels == tpl.landmarks.labels
    np.testing.assert_allclose(back.positions, tpl.landmarks.positions, atol=1e-6)
    t1 = T._read_image(out / "t1.nii.gz", "t1")
    assert t1.same_geometry(tpl.t1) and np.abs(t1.array - tpl.t1.array).max() <= 0.5 + 1e-3
    assert main(["data", "template", "--res", "4", "--out", str(out)]) == 2  # not empty
    assert main(["data", "info"]) == 0
    assert "autoafids" in capsys.readouterr().out
