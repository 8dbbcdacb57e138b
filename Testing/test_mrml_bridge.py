"""The Qt-free MRML bridge (AnatSSL/AnatSSLBridge) on real MRML nodes from slicer-core.

Geometry is checked against what Slicer itself computes (the node's IJKToRAS matrix, the markups
storage node's LPS file), not against the bridge's own formulas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image, lps_to_ras
from AnatSSLLib.points import PointSet

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed (`import slicer` found another package)", allow_module_level=True)

import vtk  # noqa: E402  (after the slicer-core check: slicer-core pins the vtk it needs)

from AnatSSLBridge import (  # noqa: E402
    LABEL_TAG,
    image_from_volume_node,
    labelmap_to_segmentation,
    markups_node_from_points,
    parse_description,
    points_from_markups_node,
    segment_tag,
    segmentation_to_labelmap,
    volume_node_from_image,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@pytest.fixture
def oblique_image() -> Image:
    """int16 voxels, shape (nz, ny, nx) = (6, 7, 9), spacing (0.7, 1.3, 2.5) mm, oblique LPS direction."""
    rng = np.random.default_rng(7)
    return Image(
        rng.integers(-1000, 1000, size=(6, 7, 9)).astype(np.int16),
        spacing=(0.7, 1.3, 2.5),
        origin=(12.5, -30.25, 4.0),
        direction=_rotation(0.3, -0.6, 0.9),
        name="oblique",
    )


def _ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


# ---- volumes ------------------------------------------------------------------------------------
def test_volume_round_trip_keeps_voxels_and_geometry(scene, oblique_image):
    node = volume_node_from_image(scene, oblique_image, "oblique")
    assert node.IsA("vtkMRMLScalarVolumeNode") and not node.IsA("vtkMRMLLabelMapVolumeNode")
    assert node.GetScene() is scene and node.GetDisplayNode() is not None
    assert node.GetImageData().GetDimensions() == (9, 7, 6)
    back = image_from_volume_node(node)
    assert back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, oblique_image.array)
    np.testing.assert_allclose(back.spacing, oblique_image.spacing, atol=1e-4)
    np.testing.assert_allclose(back.origin, oblique_image.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, oblique_image.direction, atol=1e-6)
    assert back.same_geometry(oblique_image, atol=1e-4)
    # the array is a copy: editing it leaves the node alone
    back.array[0, 0, 0] += 1
    assert image_from_volume_node(node).array[0, 0, 0] == oblique_image.array[0, 0, 0]


def test_physical_point_maps_to_slicer_ras(scene, oblique_image):
    node = volume_node_from_image(scene, oblique_image, "oblique")
    ijk_to_ras = _ijk_to_ras(node)
    for ijk in ([0, 0, 0], [8, 6, 5], [3.25, 1.5, 4.75]):
        lps = oblique_image.index_to_physical(ijk)
        ras_slicer = (ijk_to_ras @ np.array([*ijk, 1.0]))[:3]
        np.testing.assert_allclose(lps_to_ras(lps), ras_slicer, atol=1e-4)
    # and the other way round: Slicer's RASToIJK of an RAS point gives the image's index of its LPS twin
    ras_to_ijk = vtk.vtkMatrix4x4()
    node.GetRASToIJKMatrix(ras_to_ijk)
    ras = np.array([1.0, 2.0, 3.0])
    ijk = ras_to_ijk.MultiplyPoint([*ras, 1.0])[:3]
    np.testing.assert_allclose(ijk, oblique_image.physical_to_index(lps_to_ras(ras)), atol=1e-6)


def test_volume_update_in_place_and_labelmap(scene, oblique_image):
    node = volume_node_from_image(scene, oblique_image, "v")
    smaller = Image(np.ones((2, 3, 4), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "smaller")
    same = volume_node_from_image(scene, smaller, "ignored", node=node)
    assert same is node and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    back = image_from_volume_node(node)
    assert back.array.shape == (2, 3, 4) and back.array.dtype == np.float32 and back.same_geometry(smaller)

    labels = oblique_image.with_array((oblique_image.array > 0).astype(np.int64) * 3)
    label_node = volume_node_from_image(scene, labels, "labels", labelmap=True)
    assert label_node.IsA("vtkMRMLLabelMapVolumeNode")
    back = image_from_volume_node(label_node)
    assert back.array.dtype == np.int32  # Slicer rejects 64-bit voxels
    np.testing.assert_array_equal(back.array, labels.array)
    with pytest.raises(InputError, match="whole numbers"):
        volume_node_from_image(scene, oblique_image.with_array(np.full((6, 7, 9), 0.5)), "bad", labelmap=True)
    with pytest.raises(InputError, match="labelmap"):
        volume_node_from_image(scene, oblique_image, "x", node=label_node)


def test_volume_under_linear_transform_reads_in_world(scene, oblique_image):
    node = volume_node_from_image(scene, oblique_image, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # +10 mm towards R
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    world = image_from_volume_node(node)
    local = image_from_volume_node(node, world=False)
    np.testing.assert_allclose(np.subtract(world.origin, local.origin), [-10.0, 0.0, 0.0], atol=1e-6)  # LPS x = -R


def test_volume_errors(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="empty"):
        image_from_volume_node(empty)
    with pytest.raises(InputError, match="vtkMRMLScalarVolumeNode"):
        image_from_volume_node(scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"))
    with pytest.raises(InputError, match="vtkMRMLScene"):
        volume_node_from_image(None, Image(np.zeros((2, 2, 2)), (1, 1, 1), (0, 0, 0), np.eye(3)), "x")


# ---- markups ------------------------------------------------------------------------------------
@pytest.fixture
def landmarks() -> PointSet:
    return PointSet(
        labels=["AC", "PC", "genu"],
        positions=np.array([[1.5, -20.25, 3.0], [-0.5, 7.75, -2.0], [10.125, 0.0, 44.0]]),
        descriptions=["anterior commissure", "", "corpus callosum; genu"],
        confidence=np.array([0.87, 0.5, np.nan]),
    )


def test_markups_round_trip(scene, landmarks):
    node = markups_node_from_points(scene, landmarks, "landmarks")
    assert node.IsA("vtkMRMLMarkupsFiducialNode") and node.GetScene() is scene
    assert node.GetNumberOfControlPoints() == 3
    # the node holds RAS
    np.testing.assert_allclose(slicer.util.arrayFromMarkupsControlPoints(node), lps_to_ras(landmarks.positions))
    assert node.GetNthControlPointDescription(0) == "anterior commissure; confidence=0.87"
    assert node.GetNthControlPointDescription(1) == "confidence=0.5"
    assert node.GetNthControlPointDescription(2) == "corpus callosum; genu"
    back = points_from_markups_node(node)
    assert back.labels == landmarks.labels
    assert back.descriptions == landmarks.descriptions
    np.testing.assert_allclose(back.positions, landmarks.positions, atol=1e-9)
    np.testing.assert_array_equal(back.confidence, landmarks.confidence)  # NaN == NaN here

    # update in place; a bad input leaves the node as it was
    one = PointSet(["tip"], [[1.0, 2.0, 3.0]])
    assert markups_node_from_points(scene, one, "ignored", node=node) is node
    assert points_from_markups_node(node).labels == ["tip"] and points_from_markups_node(node).confidence is None
    with pytest.raises(InputError):
        markups_node_from_points(scene, "not points", "bad", node=node)
    assert node.GetNumberOfControlPoints() == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode") == 1


def test_markups_world_and_local(scene, landmarks):
    node = markups_node_from_points(scene, landmarks, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(2, 3, 5.0)  # +5 mm towards S
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    world = points_from_markups_node(node)
    local = points_from_markups_node(node, world=False)
    np.testing.assert_allclose(world.positions - local.positions, [[0, 0, 5.0]] * 3, atol=1e-9)
    # writing world positions into a transformed node stores them so that they read back in world
    markups_node_from_points(scene, landmarks, "", node=node)
    np.testing.assert_allclose(points_from_markups_node(node).positions, landmarks.positions, atol=1e-9)


def test_markups_save_reload_is_lps_on_disk(scene, landmarks, tmp_path):
    node = markups_node_from_points(scene, landmarks, "saved")
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    path = str(tmp_path / "landmarks.mrk.json")
    storage.SetFileName(path)
    assert storage.WriteData(node)
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)["markups"][0]
    assert saved["coordinateSystem"] == "LPS"
    points = saved["controlPoints"]
    assert [p["label"] for p in points] == landmarks.labels
    np.testing.assert_allclose([p["position"] for p in points], landmarks.positions, atol=1e-6)

    reloaded = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(reloaded)
    reader = reloaded.CreateDefaultStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(path)
    assert reader.ReadData(reloaded)
    back = points_from_markups_node(reloaded)
    assert back.labels == landmarks.labels and back.descriptions == landmarks.descriptions
    np.testing.assert_allclose(back.positions, landmarks.positions, atol=1e-6)
    np.testing.assert_array_equal(back.confidence, landmarks.confidence)


def test_markups_skip_points_being_placed(scene, landmarks):
    node = markups_node_from_points(scene, landmarks, "partly placed")
    node.UnsetNthControlPointPosition(1)  # "PC" not placed yet
    back = points_from_markups_node(node)
    assert back.labels == ["AC", "genu"]
    np.testing.assert_allclose(back.positions, landmarks.positions[[0, 2]], atol=1e-9)


def test_parse_description():
    assert parse_description("left eye; confidence=0.87") == ("left eye", 0.87)
    assert parse_description("confidence = 1e-3") == ("", 0.001)
    assert parse_description("no score here") == ("no score here", None)
    assert parse_description("") == ("", None)


# ---- segmentations ------------------------------------------------------------------------------
@pytest.fixture
def two_labels(oblique_image) -> Image:
    labels = np.zeros(oblique_image.array.shape, np.uint8)
    labels[1:4, 2:5, 1:6] = 3  # 3 x 3 x 5 = 45 voxels
    labels[4:6, 0:2, 5:9] = 7  # 2 x 2 x 4 = 16 voxels
    return oblique_image.with_array(labels, name="labels")


def test_labelmap_segmentation_round_trip(scene, oblique_image, two_labels):
    reference = volume_node_from_image(scene, oblique_image, "reference")
    names = {3: "left caudate", 7: "right putamen"}
    seg = labelmap_to_segmentation(scene, two_labels, reference, names=names, colors={7: (0.1, 0.2, 0.3)})
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    segments = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i) for i in range(2)}
    assert set(segments) == set(names.values())
    assert segment_tag(segments["right putamen"], LABEL_TAG) == "7"
    np.testing.assert_allclose(segments["right putamen"].GetColor(), (0.1, 0.2, 0.3))
    # only the working nodes are left in the scene
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1

    back, back_names = segmentation_to_labelmap(scene, seg, reference)
    assert back_names == names
    assert back.same_geometry(two_labels)
    np.testing.assert_array_equal(back.array, two_labels.array)
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0

    assert seg.CreateClosedSurfaceRepresentation()
    surface = vtk.vtkPolyData()
    segment_id = segmentation.GetSegmentIdBySegmentName("left caudate")
    seg.GetClosedSurfaceRepresentation(segment_id, surface)
    assert surface.GetNumberOfPoints() > 0
    # the surface (smoothed) wraps the segment's voxels: its centre is theirs, in RAS
    from vtk.util.numpy_support import vtk_to_numpy

    centre = vtk_to_numpy(surface.GetPoints().GetData()).mean(axis=0)
    voxels = lps_to_ras(two_labels.index_to_physical(np.argwhere(two_labels.array == 3)[:, ::-1]))
    assert np.linalg.norm(centre - voxels.mean(axis=0)) < 1.0  # mm; spacing is up to 2.5 mm


def test_segmentation_update_keeps_other_segments(scene, oblique_image, two_labels):
    reference = volume_node_from_image(scene, oblique_image, "reference")
    seg = labelmap_to_segmentation(scene, two_labels, reference, names={3: "A", 7: "B"})
    # a segment the user drew by hand
    manual = slicer.vtkSegment()
    manual.SetName("manual")
    seg.GetSegmentation().AddSegment(manual)
    moved = np.zeros_like(two_labels.array)
    moved[0, 0, 0:2] = 3
    labelmap_to_segmentation(scene, two_labels.with_array(moved), reference, names={3: "A"}, node=seg)
    segmentation = seg.GetSegmentation()
    assert sorted(segmentation.GetNthSegment(i).GetName() for i in range(3)) == ["A", "B", "manual"]
    back, names = segmentation_to_labelmap(scene, seg, reference)
    assert names[3] == "A" and names[7] == "B"
    assert int((back.array == 3).sum()) == 2 and int((back.array == 7).sum()) == 16
    assert back.array[0, 0, 0] == 3


def test_labels_on_a_cropped_grid_land_on_the_reference_grid(scene, oblique_image, two_labels):
    reference = volume_node_from_image(scene, oblique_image, "reference")
    # the label image covers only voxels i >= 1, j >= 0, k >= 1 of the reference grid
    offset = np.array([1, 0, 1])  # (i, j, k)
    crop = Image(
        two_labels.array[1:, :, 1:],
        two_labels.spacing,
        tuple(two_labels.index_to_physical(offset)),
        two_labels.direction,
        "crop",
    )
    assert int((crop.array == 3).sum()) == 45 and int((crop.array == 7).sum()) == 16
    seg = labelmap_to_segmentation(scene, crop, reference)
    back, names = segmentation_to_labelmap(scene, seg, reference)
    assert back.same_geometry(oblique_image)
    assert names == {3: "Label 3", 7: "Label 7"}
    np.testing.assert_array_equal(back.array, two_labels.array)


def test_segmentation_without_reference_and_errors(scene, two_labels):
    seg = labelmap_to_segmentation(scene, two_labels)
    back, names = segmentation_to_labelmap(scene, seg)
    assert names == {3: "Label 3", 7: "Label 7"}
    assert back.same_geometry(two_labels)
    np.testing.assert_array_equal(back.array, two_labels.array)
    with pytest.raises(InputError, match=">= 0"):
        labelmap_to_segmentation(scene, two_labels.with_array(-two_labels.array.astype(np.int16)))
    with pytest.raises(InputError, match="more than once"):
        labelmap_to_segmentation(scene, two_labels, names={3: "x", 7: "x"})
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_closed_surface_on_a_bare_scene():
    """A fresh process with no module logic: the bridge registers the converter rules itself."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(
        """
        import sys
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/AnatSSL"]
        import numpy as np, slicer
        from AnatSSLLib.image import Image
        from AnatSSLBridge import labelmap_to_segmentation
        before = len(slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules())
        labels = np.zeros((5, 6, 7), np.uint8)
        labels[1:4, 1:5, 2:6] = 1
        scene = slicer.vtkMRMLScene()
        seg = labelmap_to_segmentation(scene, Image(labels, (1, 1, 2), (0, 0, 0), np.eye(3)), closed_surface=True)
        print(before, seg.GetSegmentation().ContainsRepresentation("Closed surface"))
        """
    )
    done = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", "True"]
