"""The simulated population: exact landmark ground truth, alignment, determinism, contrasts, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from AnatSSLLib.cli import main
from AnatSSLLib.data import synth as S
from AnatSSLLib.data.population import load_population
from AnatSSLLib.errors import InputError


@pytest.fixture(scope="module")
def subject(template_2mm):
    """One simulated subject at 3 mm with every contrast (seed 7)."""
    return S.synthesize_subject(template_2mm, 7, S.CONTRASTS, 3.0)


def _nearest(img, points):
    idx = np.round(img.physical_to_index(points)).astype(int)
    return img.array[idx[:, 2], idx[:, 1], idx[:, 0]]


def _linear(img, points):
    return ndi.map_coordinates(img.array.astype(float), img.physical_to_index(points)[:, ::-1].T, order=1)


def test_landmarks_are_the_exact_inverse(subject, template_2mm):
    tr, q = subject["transform"], subject["landmarks"].positions
    p = template_2mm.landmarks.positions
    np.testing.assert_allclose(tr.to_template(q), p, atol=1e-5)  # mm
    # The warp is not trivial: several mm of deformation on top of the affine.
    z = q @ tr.affine[:3, :3].T + tr.affine[:3, 3]
    deformation = np.linalg.norm(z - p, axis=1)
    assert 1.0 < deformation.mean() < 15.0
    params = subject["parameters"]
    assert params["simulated"] is True
    assert 0 <= params["rotation_deg"] <= 15.0 and np.all(np.abs(np.array(params["scales"]) - 1) <= 0.1)


def test_images_labels_and_landmarks_are_aligned(subject, template_2mm):
    lab = subject["labels"]
    assert lab.array.dtype == np.uint8
    for c, img in subject["images"].items():
        assert img.same_geometry(lab), c
    q = subject["landmarks"].positions
    assert lab.contains(q, margin=0.0).all()
    # A subject voxel is the template seen through the known map: label at the voxel nearest each
    # landmark == template label at that voxel's centre mapped to the template.
    idx = np.round(lab.physical_to_index(q))
    centres = lab.index_to_physical(idx)
    expected = _nearest(template_2mm.labels, subject["transform"].to_template(centres))
    assert (expected == _nearest(lab, centres)).mean() >= 0.95
    # The grid is the subject's own: not the template's spacing, and the FOV crops the head.
    assert not np.allclose(lab.spacing, template_2mm.labels.spacing)
    assert lab.array.size < template_2mm.labels.array.size * (2 / 3) ** 3 * 1.2


def test_landmarks_sit_on_the_same_anatomy(population_small):
    tpl = population_small.template
    t_lab, t_t1, p = tpl.labels(), tpl.image("t1"), tpl.landmarks().positions
    assert len(p) == 32 and population_small.meta["simulated"] is True
    label_hits, corr = [], []
    for sub in population_small.subjects:
        lab, t1, q = sub.labels(), sub.image("t1"), sub.landmarks().positions
        assert sub.landmarks().labels == tpl.landmarks().labels
        assert lab.same_geometry(t1) and lab.contains(q).all()
        # Same structure: the subject's label at q is among the template's labels near p.
        radius = float(max(lab.spacing))
        near = []
        for point in p:
            offsets = np.mgrid[-1:2, -1:2, -1:2].reshape(3, -1).T * (radius / 2)
            near.append(set(_nearest(t_lab, point + offsets).tolist()))
        got = _nearest(lab, q)
        label_hits.append(np.mean([g in n for g, n in zip(got, near)]))
        # Same intensity (up to bias field, noise and resampling): T1 at p vs at q.
        corr.append(np.corrcoef(_linear(t_t1, p), _linear(t1, q))[0, 1])
    assert np.mean(label_hits) >= 0.85, label_hits
    assert min(corr) > 0.7 and np.mean(corr) > 0.8, corr


def test_population_files(population_small):
    meta = population_small.meta
    assert meta["generator"] == "anatssl data synth" and meta["n"] == 4 and meta["res_mm"] == 3.0
    assert meta["contrasts"] == ["t1", "t2"] and meta["landmark_set"] == "AFIDs (32)"
    assert [s.name for s in population_small.subjects] == ["sub-000", "sub-001", "sub-002", "sub-003"]
    assert population_small.label_names[3] == "wm" and population_small.label_names[24] == "bone"
    tpl = population_small.template
    assert len(tpl.landmarks_rater2()) == 32
    sub = population_small.subjects[1]
    assert sub.contrasts == ("t1", "t2")
    with pytest.raises(InputError, match="no contrast 'ct'"):
        sub.image("ct")
    tr = sub.transform()
    assert tr["simulated"] is True and len(tr["affine_subject_to_template_lps"]) == 4
    spacings = {tuple(np.round(s.labels().spacing, 3)) for s in population_small.subjects}
    assert len(spacings) == 4  # every subject has its own grid
    assert any(max(s) / min(s) > 1.3 for s in spacings)  # some anisotropic


def test_determinism(template_2mm, subject):
    # The geometry and labels are drawn before the contrasts, so a t1-only rerun repeats them.
    again = S.synthesize_subject(template_2mm, 7, ("t1",), 3.0)
    np.testing.assert_array_equal(again["images"]["t1"].array, subject["images"]["t1"].array)
    np.testing.assert_array_equal(again["labels"].array, subject["labels"].array)
    np.testing.assert_array_equal(again["landmarks"].positions, subject["landmarks"].positions)
    other = S.synthesize_subject(template_2mm, 7, ("t1",), 3.0, index=1)
    assert not np.allclose(other["landmarks"].positions, subject["landmarks"].positions)


def test_synthesised_contrasts_keep_tissue_ordering(subject):
    lab = subject["labels"].array
    groups = {"csf": [1, 4, 5, 6, 7], "gm": [2, 8, 9, 10, 11, 12, 13, 16, 17, 22], "wm": [3, 23],
              "bone": [24], "air": [0]}
    med = {}
    for c, img in subject["images"].items():
        med[c] = {}
        for g, ids in groups.items():
            inner = ndi.binary_erosion(np.isin(lab, ids))  # away from partial-volume edges
            med[c][g] = float(np.median(img.array[inner]))
    assert med["t1"]["wm"] > med["t1"]["gm"] > med["t1"]["csf"]
    assert med["t2"]["csf"] > med["t2"]["gm"] > med["t2"]["wm"]
    assert med["ct"]["bone"] > 300 > med["ct"]["gm"] > med["ct"]["wm"] > med["ct"]["csf"] > -100 > med["ct"]["air"]
    assert med["pd"]["csf"] > med["pd"]["gm"] > med["pd"]["wm"] > med["pd"]["air"]
    assert med["flair"]["gm"] > med["flair"]["wm"] > med["flair"]["csf"] > med["flair"]["air"]
    assert subject["images"]["ct"].array.dtype == np.int16


def test_cli_synth_writes_a_deterministic_population(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main(["data", "synth", "--n", "1", "--contrasts", "t1,ct", "--seed", "3", "--res", "4",
                     "--out", str(out)]) == 0
    pa, pb = load_population(a), load_population(b)
    for c in ("t1", "ct"):
        np.testing.assert_array_equal(pa.subjects[0].image(c).array, pb.subjects[0].image(c).array)
    np.testing.assert_array_equal(pa.subjects[0].landmarks().positions, pb.subjects[0].landmarks().positions)
    meta = json.loads((a / "population.json").read_text())
    assert meta["seed"] == 3 and meta["simulated"] is True and meta["contrasts"] == ["t1", "ct"]
    assert sorted(p.name for p in a.iterdir()) == ["population.json", "sub-000", "template"]
    assert sorted(p.name for p in (a / "template").iterdir()) == [
        "ct.nii.gz", "labels.nii.gz", "landmarks.mrk.json", "landmarks_rater2.mrk.json", "t1.nii.gz"]
    assert sorted(p.name for p in (a / "sub-000").iterdir()) == [
        "ct.nii.gz", "labels.nii.gz", "landmarks.mrk.json", "t1.nii.gz", "transform.json"]

    # Not empty: refused, nothing touched; --force replaces.
    capsys.readouterr()
    before = (a / "sub-000" / "t1.nii.gz").stat().st_mtime_ns
    assert main(["data", "synth", "--n", "1", "--res", "4", "--out", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not empty" in err[0] and "--force" in err[0]
    assert (a / "sub-000" / "t1.nii.gz").stat().st_mtime_ns == before
    assert main(["data", "synth", "--n", "1", "--res", "4", "--seed", "4", "--out", str(a), "--force"]) == 0
    assert load_population(a).meta["seed"] == 4 and not (a / "sub-000" / "ct.nii.gz").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "0"], "n: expected a whole number"),
        (["--n", "1", "--contrasts", "t1,ultrasound"], "unknown contrast 'ultrasound'"),
        (["--n", "1", "--res", "0.25"], "resolution: expected 1 to 8 mm"),
        (["--n", "1", "--res", "12"], "resolution: expected 1 to 8 mm"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["data", "synth", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_missing_data_package_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    from AnatSSLLib.data import templates

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "spm_runtime" else real(name, *a))
    monkeypatch.setenv("ANATSSL_DATA_CACHE", str(tmp_path / "cache"))  # force a label-map build
    templates.forget_loaded()
    try:
        assert main(["data", "synth", "--n", "1", "--res", "4", "--out", str(tmp_path / "out")]) == 2
    finally:
        templates.forget_loaded()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps spm-runtime==25.1.2.post4" in err[0]
    assert not (tmp_path / "out").exists()


def test_interrupted_run_leaves_no_half_subject(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = S.write_points

    def failing(points, path, **kw):
        calls["n"] += 1
        if "sub-001" in str(path) or calls["n"] > 3:
            raise KeyboardInterrupt
        return real(points, path, **kw)

    monkeypatch.setattr(S, "write_points", failing)
    out = tmp_path / "pop"
    with pytest.raises(KeyboardInterrupt):
        S.synthesize_population(out, 2, ("t1",), seed=1, res_mm=4.0)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sub-000", "template"]  # no tmp folder, no half sub-001, no population.json
    with pytest.raises(InputError, match="population.json"):
        load_population(out)


def test_contrast_names_and_n_validated_in_python():
    assert S.parse_contrasts("T1, t2,ct") == ("t1", "t2", "ct")
    with pytest.raises(InputError):
        S.parse_contrasts("")
    with pytest.raises(InputError, match="n:"):
        S.synthesize_population("/nonexistent/never", 1.5)
