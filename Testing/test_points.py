"""Point files: Slicer markups JSON and .fcsv, plain CSV, frames, confidence, bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image, check_points_inside, read_image
from AnatSSLLib.points import MARKUPS_SCHEMA, PointSet, read_points, write_points


def _afids_dir() -> Path:
    spec = importlib.util.find_spec("autoafids")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoafids data wheel not installed (pip install --no-deps autoafids==0.1.4)")
    return Path(spec.submodule_search_locations[0]) / "resources"


AFIDS = "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"


@pytest.fixture
def points() -> PointSet:
    return PointSet(
        ["AC", "PC", "LMS, left"],
        [[1.25, -2.5, 3.0], [0.1, 25.0, -1.0 / 3.0], [-30.0, 10.0, 12.345678901234]],
        ["anterior commissure", "", "label with, a comma"],
        [0.873, 0.51234567891234, np.nan],
    )


# ---- the real AFIDs file ---------------------------------------------------------------------------
def test_afids_fcsv_is_read_in_lps() -> None:
    path = _afids_dir() / AFIDS
    afids = read_points(path)
    assert len(afids) == 32
    assert afids.labels == [str(n) for n in range(1, 33)]
    assert afids.descriptions[:2] == ["AC", "PC"]
    assert afids.confidence is None
    # The file is RAS (CoordinateSystem = 0): x and y change sign.
    first = next(line for line in path.read_text().splitlines() if not line.startswith("#")).split(",")
    ras = np.array([float(v) for v in first[1:4]])
    np.testing.assert_allclose(afids.positions[0], ras * [-1, -1, 1])
    np.testing.assert_allclose(afids.to_ras()[0], ras)
    ac, pc = afids.subset(["1", "2"]).positions
    assert 25.0 < np.linalg.norm(ac - pc) < 30.0
    assert pc[1] > ac[1]  # PC is posterior of AC: larger P (LPS y)


def test_afids_lie_inside_the_template() -> None:
    t1 = read_image(_afids_dir() / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz", name="T1w")
    assert t1.array.shape == (193, 229, 193)
    afids = read_points(_afids_dir() / AFIDS)
    check_points_inside(t1, afids)
    moved = PointSet(afids.labels, afids.positions + [0.0, 0.0, 150.0])
    with pytest.raises(InputError, match=r"lie outside T1w .*: 1 at"):
        check_points_inside(t1, moved)


# ---- Slicer markups JSON -----------------------------------------------------------------------------
SLICER5_JSON = {
    "@schema": MARKUPS_SCHEMA,
    "markups": [
        {
            "type": "Fiducial",
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "locked": False,
            "fixedNumberOfControlPoints": False,
            "labelFormat": "%N-%d",
            "lastUsedControlPointNumber": 3,
            "controlPoints": [
                {
                    "id": "1", "label": "F-1", "description": "", "associatedNodeID": "vtkMRMLScalarVolumeNode1",
                    "position": [-12.5, 30.25, 4.0], "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": True, "locked": False, "visibility": True, "positionStatus": "defined",
                },
                {
                    "id": "2", "label": "F-2", "description": "", "associatedNodeID": "",
                    "position": [0.0, 0.0, 0.0], "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": True, "locked": False, "visibility": True, "positionStatus": "undefined",
                },
                {
                    "id": "3", "label": "F-3", "description": "tip", "associatedNodeID": "",
                    "position": [1.0, -2.0, 3.5], "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": False, "locked": True, "visibility": True, "positionStatus": "defined",
                },
            ],
            "measurements": [],
            "display": {"visibility": True, "opacity": 1.0, "color": [0.4, 1.0, 1.0], "glyphType": "Sphere3D"},
        }
    ],
}


def test_slicer_saved_markups_json(tmp_path: Path) -> None:
    path = tmp_path / "F.mrk.json"
    path.write_text(json.dumps(SLICER5_JSON, indent=4))
    with pytest.warns(UserWarning, match=r"no defined position: \['F-2'\]"):
        pts = read_points(path)
    assert pts.labels == ["F-1", "F-3"]
    np.testing.assert_array_equal(pts.positions, [[-12.5, 30.25, 4.0], [1.0, -2.0, 3.5]])
    assert pts.descriptions == ["", "tip"] and pts.confidence is None

    ras = json.loads(json.dumps(SLICER5_JSON))
    ras["markups"][0]["coordinateSystem"] = "RAS"
    ras["markups"][0]["coordinateUnits"] = ["mm", "UCUM", "millimeter"]
    del ras["markups"][0]["controlPoints"][1]
    path.write_text(json.dumps(ras))
    np.testing.assert_array_equal(read_points(path).positions, [[12.5, -30.25, 4.0], [-1.0, 2.0, 3.5]])


@pytest.mark.parametrize("frame", ["LPS", "RAS"])
def test_markups_json_round_trip(tmp_path: Path, points: PointSet, frame: str) -> None:
    path = write_points(points, tmp_path / "landmarks.mrk.json", frame=frame)
    doc = json.loads(path.read_text())
    assert doc["@schema"] == MARKUPS_SCHEMA
    markup = doc["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == frame and markup["coordinateUnits"] == "mm"
    cp = markup["controlPoints"]
    assert [c["label"] for c in cp] == points.labels
    assert cp[0]["description"] == "anterior commissure; confidence=0.873"
    assert cp[1]["description"] == "confidence=0.51234567891234"
    assert cp[2]["description"] == "label with, a comma"
    assert all(c["positionStatus"] == "defined" and c["associatedNodeID"] == "" and not c["locked"] for c in cp)
    expected = points.positions if frame == "LPS" else points.to_ras()
    np.testing.assert_array_equal([c["position"] for c in cp], expected)
    assert cp[0]["orientation"] == ([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0] if frame == "LPS" else list(np.eye(3).ravel()))

    back = read_points(path)
    assert back.labels == points.labels
    np.testing.assert_allclose(back.positions, points.positions, atol=1e-12)
    assert back.descriptions == points.descriptions
    np.testing.assert_array_equal(back.confidence, points.confidence)  # NaN stays NaN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landmarks.mrk.json"]


# ---- CSV --------------------------------------------------------------------------------------------
def test_csv_round_trip_and_frames(tmp_path: Path, points: PointSet) -> None:
    path = write_points(points, tmp_path / "p.csv", frame="RAS")
    lines = path.read_text().splitlines()
    assert lines[0] == "label,x,y,z,frame,confidence,description"
    assert lines[1].startswith("AC,-1.25,2.5,3.0,RAS,0.873,")
    back = read_points(path)
    assert back.labels == points.labels and back.descriptions == points.descriptions
    np.testing.assert_array_equal(back.positions, points.positions)
    np.testing.assert_array_equal(back.confidence, points.confidence)

    plain = tmp_path / "plain.csv"
    plain.write_text("label,x,y,z\nA,1,2,3\nB,-4,5.5,6\n")
    got = read_points(plain)  # no frame given: LPS
    np.testing.assert_array_equal(got.positions, [[1, 2, 3], [-4, 5.5, 6]])
    assert got.descriptions is None and got.confidence is None
    plain.write_text("# frame: RAS\nlabel,x,y,z,confidence\nA,1,2,3,0.5\nB,-4,5.5,6,\n")
    got = read_points(plain)
    np.testing.assert_array_equal(got.positions, [[-1, -2, 3], [4, -5.5, 6]])
    np.testing.assert_array_equal(got.confidence, [0.5, np.nan])
    plain.write_text("label,x,y,z,frame\nA,1,2,3,RAS\nB,1,2,3,LPS\n")
    np.testing.assert_array_equal(read_points(plain).positions, [[-1, -2, 3], [1, 2, 3]])


def test_point_set_helpers(points: PointSet) -> None:
    sub = points.subset(["PC", "AC"])
    assert sub.labels == ["PC", "AC"] and sub.descriptions == ["", "anterior commissure"]
    np.testing.assert_array_equal(sub.confidence, [0.51234567891234, 0.873])
    np.testing.assert_array_equal(sub.position("AC"), [1.25, -2.5, 3.0])
    with pytest.raises(InputError, match=r"no point labelled \['XX'\]"):
        points.subset(["AC", "XX"])
    again = PointSet.from_ras(points.labels, points.to_ras())
    np.testing.assert_array_equal(again.positions, points.positions)
    np.testing.assert_array_equal(points.to_ras()[0], [-1.25, 2.5, 3.0])


# ---- bad input and atomic writes -------------------------------------------------------------------
def test_bad_point_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        read_points(tmp_path / "absent.mrk.json")
    bad = tmp_path / "bad.mrk.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_points(bad)
    doc = json.loads(json.dumps(SLICER5_JSON))
    doc["markups"][0]["coordinateSystem"] = "IJK"
    bad.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="coordinateSystem must be RAS or LPS, got 'IJK'"):
        read_points(bad)
    doc["markups"][0]["coordinateSystem"] = "LPS"
    doc["markups"][0]["coordinateUnits"] = "inch"
    bad.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="coordinateUnits must be mm"):
        read_points(bad)
    fcsv = tmp_path / "ijk.fcsv"
    fcsv.write_text("# Markups fiducial file version = 4.6\n# CoordinateSystem = 2\nvtkMRMLMarkupsFiducialNode_1,1,2,3,0,0,0,1,1,1,0,A,,\n")
    with pytest.raises(InputError, match="IJK"):
        read_points(fcsv)
    fcsv.write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                    "a,1,2,3,0,0,0,1,1,1,0,A,\"d, with comma\",\nb,x,2,3,0,0,0,1,1,1,0,B,,\n")
    with pytest.raises(InputError, match="line 5: expected numbers"):
        read_points(fcsv)
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("name,x,y,z\nA,1,2,3\n")
    with pytest.raises(InputError, match=r"header lacks \['label'\]"):
        read_points(csv_file)
    with pytest.raises(InputError, match="unknown point file type"):
        (tmp_path / "p.txt").write_text("label,x,y,z\n")
        read_points(tmp_path / "p.txt")


def test_fcsv_in_lps_keeps_quoted_descriptions(tmp_path: Path) -> None:
    fcsv = tmp_path / "lps.fcsv"
    fcsv.write_text("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                    "a,1,2,3,0,0,0,1,1,1,0,A,\"d, with comma; confidence=0.25\",\n")
    got = read_points(fcsv)
    np.testing.assert_array_equal(got.positions, [[1, 2, 3]])
    assert got.descriptions == ["d, with comma"] and got.confidence.tolist() == [0.25]


def test_failed_point_write_leaves_folder_unchanged(tmp_path: Path, points: PointSet, monkeypatch) -> None:
    target = write_points(points, tmp_path / "keep.mrk.json")
    before = target.read_bytes()
    import AnatSSLLib.points as points_module

    real_markups = points_module._markups_json

    def text_then_fail(*args):
        real_markups(*args)
        raise OSError("disk full")

    monkeypatch.setattr(points_module, "_markups_json", text_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_points(points.subset(["AC"]), target)

    import os

    def replace_fails(src, dst):
        raise OSError("rename failed")

    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError, match="rename failed"):
        write_points(points.subset(["AC"]), tmp_path / "new.csv")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.mrk.json"]
    assert target.read_bytes() == before
    with pytest.raises(InputError, match="unknown point file type"):
        write_points(points, tmp_path / "p.txt")
    with pytest.raises(InputError, match="frame must be RAS or LPS"):
        write_points(points, tmp_path / "p.csv", frame="XYZ")


def test_slicer_reads_our_markups_file_and_we_read_its_file(tmp_path: Path, points: PointSet, scene) -> None:
    """Slicer's own markups JSON storage node (slicer-core) loads what we write; we read what it saves."""
    import slicer

    ours = write_points(points, tmp_path / "ours.mrk.json")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = scene.AddNode(slicer.vtkMRMLMarkupsJsonStorageNode())
    storage.SetFileName(str(ours))
    assert storage.ReadData(node)
    assert node.GetNumberOfControlPoints() == 3
    for i, label in enumerate(points.labels):
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPosition(i, ras)  # the node holds RAS
        np.testing.assert_allclose(ras, points.to_ras()[i], atol=1e-9)
        assert node.GetNthControlPointLabel(i) == label
    assert node.GetNthControlPointDescription(0) == "anterior commissure; confidence=0.873"
    node.SetNthControlPointPosition(1, 5.0, 6.0, 7.0)  # RAS
    storage.SetFileName(str(tmp_path / "slicer.mrk.json"))
    assert storage.WriteData(node)
    back = read_points(tmp_path / "slicer.mrk.json")
    assert back.labels == points.labels and back.descriptions == points.descriptions
    np.testing.assert_allclose(back.positions[1], [-5.0, -6.0, 7.0])
    np.testing.assert_allclose(back.positions[[0, 2]], points.positions[[0, 2]], atol=1e-9)
    np.testing.assert_array_equal(back.confidence, points.confidence)


def test_markups_units_duplicates_and_extra_markups(tmp_path: Path) -> None:
    doc = json.loads(json.dumps(SLICER5_JSON))
    markup = doc["markups"][0]
    markup["coordinateUnits"] = "um"
    del markup["controlPoints"][1]
    markup["controlPoints"][1]["label"] = "F-1"
    doc["markups"].append(json.loads(json.dumps(markup)))
    path = tmp_path / "um.mrk.json"
    path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning) as record:
        pts = read_points(path)
    messages = " ".join(str(w.message) for w in record)
    assert "reading only the first" in messages and "occur more than once" in messages
    np.testing.assert_allclose(pts.positions, [[-0.0125, 0.03025, 0.004], [0.001, -0.002, 0.0035]])
    np.testing.assert_allclose(pts.position("F-1"), [-0.0125, 0.03025, 0.004])
