"""The module's Qt-free logic (AnatSSL/AnatSSLBridge) end to end on real MRML nodes (slicer-core).

A random-weight LD encoder in a temporary cache is enough: a target that is the reference moved in
space has the same content on the encoder grid, so the right answer is known exactly (the landmark
tool's accuracy with a trained encoder is asserted in the library's tests).
"""

from __future__ import annotations

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image, lps_to_ras

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core is not installed (`import slicer` found another package)", allow_module_level=True)

from AnatSSLBridge import parse_description, volume_node_from_image  # noqa: E402
from AnatSSLBridge.landmarks import LandmarkPropagator  # noqa: E402

SHIFT = np.array([6.0, -9.0, 3.0])  # LPS mm, a multiple of the 3 mm encoder grid


def _on_moved_lattice(lattice, hit) -> None:
    """The hit's index entry is a lattice point of the reference moved by SHIFT, and the local step
    placed the answer within one lattice step (3 mm) of it."""
    entry = hit.entry_position if getattr(hit, "entry_position", None) is not None else hit.position
    assert np.min(np.linalg.norm(lattice + SHIFT - entry, axis=1)) < 1e-3
    assert np.linalg.norm(np.asarray(hit.position) - entry) <= 3.0


@pytest.fixture(scope="module")
def random_encoder(tmp_path_factory):
    import torch

    from AnatSSLLib.cache import EncoderCache, EncoderManifest
    from AnatSSLLib.encoders import load_encoder
    from AnatSSLLib.networks import build_network

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cache")
    cache = EncoderCache(root, bundled=[])
    manifest = EncoderManifest(method="ld", architecture="ld_unet3d", architecture_params={}, embedding_dim=32,
                               spatial_dims=3, spacing=[3.0, 3.0, 3.0],
                               intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5})
    eid = cache.save(build_network("ld_unet3d", {}).state_dict(), manifest)
    return load_encoder(eid, cache=cache, device="cpu"), root


@pytest.fixture(scope="module")
def store(random_encoder):
    from AnatSSLLib.embedding import EmbeddingStore

    return EmbeddingStore(random_encoder[0])


@pytest.fixture(scope="module")
def brain(template_2mm):
    """The 2 mm MNI template cropped around the midline landmarks (48 x 70 x 48 voxels: fast tests)."""
    import dataclasses

    box = (slice(15, 63), slice(30, 100), slice(24, 72))  # [k, j, i]

    def crop(image: Image) -> Image:
        origin = image.index_to_physical([box[2].start, box[1].start, box[0].start])
        return Image(image.array[box].copy(), image.spacing, tuple(origin), image.direction, image.name)

    return dataclasses.replace(template_2mm.copy(), t1=crop(template_2mm.t1), t2=crop(template_2mm.t2),
                               labels=crop(template_2mm.labels))


def _moved(image: Image, shift_mm, name="moved") -> Image:
    return Image(image.array, image.spacing, tuple(np.add(image.origin, shift_mm)), image.direction, name)


def _reference_markups(scene, points):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "reference points")
    for label, ras in zip(points.labels, points.to_ras()):
        node.AddControlPoint([float(x) for x in ras], label)
    return node


def _world_ras(node) -> np.ndarray:
    out, p = [], [0.0, 0.0, 0.0]
    for i in range(node.GetNumberOfControlPoints()):
        node.GetNthControlPointPositionWorld(i, p)
        out.append(list(p))
    return np.array(out)


# ---- landmarks ------------------------------------------------------------------------------------
def test_propagate_creates_then_updates_one_markups_node_per_target(scene, store, brain):
    reference = volume_node_from_image(scene, brain.t1, "T1 reference")
    target = volume_node_from_image(scene, _moved(brain.t1, SHIFT), "T1 moved")
    points = brain.landmarks.subset(["AC", "PC", "genu of CC"])
    markups = _reference_markups(scene, points)
    propagator = LandmarkPropagator(store)
    calls = []
    original = store._embed
    store._embed = lambda image, progress: calls.append(image.name) or original(image, progress)
    try:
        (result,) = propagator.propagate(scene, reference, markups, [target])
        node, table = result.markups_node, result.table_node
        assert node.GetName() == "T1 moved landmarks"
        assert [node.GetNthControlPointLabel(i) for i in range(3)] == ["AC", "PC", "genu of CC"]
        expected_ras = lps_to_ras(points.positions + SHIFT)
        err = np.linalg.norm(_world_ras(node) - expected_ras, axis=1)
        assert np.median(err) < 1.5, err
        for i in range(3):
            _, conf = parse_description(node.GetNthControlPointDescription(i))
            assert conf is not None and conf <= 1.0 + 1e-5
            assert conf == pytest.approx(result.points.confidence[i], abs=1e-9)
        # table: label, R, A, S, confidence, low-confidence flag
        t = table.GetTable()
        assert [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())] == \
            ["label", "R", "A", "S", "confidence", "low confidence"]
        assert t.GetNumberOfRows() == 3 and table.GetColumnUnitLabel("R") == "mm"
        assert t.GetValueByName(1, "label").ToString() == "PC"
        assert t.GetValueByName(1, "A").ToDouble() == pytest.approx(_world_ras(node)[1, 1], abs=1e-6)
        flags = [t.GetValueByName(r, "low confidence").ToString() for r in range(3)]
        assert flags == ["yes" if c < propagator.low_confidence else "no" for c in result.points.confidence]

        # one more reference point: same nodes updated in place, only the new point located, nothing re-embedded
        n_embedded = len(calls)
        extra = brain.landmarks.position("culmen")
        markups.AddControlPoint([float(x) for x in lps_to_ras(extra)], "culmen")
        (again,) = propagator.propagate(scene, reference, markups, [target])
        assert again.markups_node is node and again.table_node is table
        assert again.recomputed == ["culmen"]
        assert len(calls) == n_embedded
        assert node.GetNumberOfControlPoints() == 4 and table.GetTable().GetNumberOfRows() == 4
        assert np.linalg.norm(_world_ras(node)[3] - lps_to_ras(extra + SHIFT)) < 3.0  # one encoder voxel
        assert len(_nodes(scene, "vtkMRMLMarkupsFiducialNode")) == 2  # the reference and this target's
        assert len(_nodes(scene, "vtkMRMLTableNode")) == 1
    finally:
        store._embed = original


def test_propagate_with_the_default_encoder_to_a_simulated_subject(scene, template_2mm, population_small):
    """The user's job end to end: the template T1 and a simulated subject's T1 loaded as volume nodes,
    the 32 expert AFIDs placed on the template, Propagate with the bundled default encoder; the
    subject's markups are checked against its exact ground truth (the per-subject bound of
    test_default_encoder.py, which runs the same case through the library)."""
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import load_encoder
    from test_default_encoder import MAX_SUBJECT_MEAN_MM

    subject = population_small.subjects[0]
    reference = volume_node_from_image(scene, template_2mm.t1, "MNI T1")
    target = volume_node_from_image(scene, subject.image("t1"), f"{subject.name} T1")
    markups = _reference_markups(scene, template_2mm.landmarks)
    (result,) = LandmarkPropagator(EmbeddingStore(load_encoder(None, device="cpu"))).propagate(
        scene, reference, markups, [target])
    node = result.markups_node
    truth = subject.landmarks()
    assert [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())] == truth.labels
    err = np.linalg.norm(_world_ras(node) - lps_to_ras(truth.positions), axis=1)
    assert err.mean() <= MAX_SUBJECT_MEAN_MM, err.round(1)


def _nodes(scene, cls):
    col = scene.GetNodesByClass(cls)
    return [col.GetItemAsObject(i) for i in range(col.GetNumberOfItems())]


def test_low_confidence_points_are_flagged(scene, store, brain):
    reference = volume_node_from_image(scene, brain.t1, "ref")
    target = volume_node_from_image(scene, _moved(brain.t1, SHIFT), "tgt")
    markups = _reference_markups(scene, brain.landmarks.subset(["AC", "PC"]))
    (result,) = LandmarkPropagator(store, low_confidence=2.0).propagate(scene, reference, markups, [target])
    assert result.low_confidence == ["AC", "PC"]
    node = result.markups_node
    assert all(node.GetNthControlPointDescription(i).startswith("low confidence; confidence=") for i in range(2))
    assert not node.GetNthControlPointSelected(0)
    assert result.table_node.GetTable().GetValueByName(1, "low confidence").ToString() == "yes"


def test_bad_input_leaves_no_node(scene, store, brain, random_encoder):
    reference = volume_node_from_image(scene, brain.t1, "ref")
    target = volume_node_from_image(scene, _moved(brain.t1, SHIFT), "tgt")
    labels = volume_node_from_image(scene, brain.labels, "labels", labelmap=True)
    empty_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
    markups = _reference_markups(scene, brain.landmarks.subset(["AC"]))
    loading = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "loading")
    propagator = LandmarkPropagator(store)
    before = scene.GetNumberOfNodes()
    cases = [
        ((reference, empty_points, [target]), "no points placed"),
        ((reference, markups, [reference]), "is the reference volume"),
        ((reference, markups, [labels]), "label map"),
        ((labels, markups, [target]), "label map"),
        ((reference, markups, [loading]), "still loading"),
        ((reference, markups, []), "no target volumes"),
    ]
    for args, message in cases:
        with pytest.raises(InputError, match=message):
            propagator.propagate(scene, *args)
    # a 2D encoder for 3D volumes
    encoder_2d = type(random_encoder[0])(random_encoder[0].encoder_id, _Manifest2D(random_encoder[0].manifest),
                                         random_encoder[0].model, random_encoder[0].device)
    from AnatSSLLib.embedding import EmbeddingStore

    with pytest.raises(InputError, match="encoder is 2D"):
        LandmarkPropagator(EmbeddingStore(encoder_2d)).propagate(scene, reference, markups, [target])
    assert scene.GetNumberOfNodes() == before


class _Manifest2D:
    def __init__(self, manifest):
        self.__dict__.update(vars(manifest))
        self.spatial_dims = 2


# ---- search ---------------------------------------------------------------------------------------
def test_search_from_point_and_segment_finds_the_moved_copy(scene, store, brain):
    from AnatSSLLib.tools.search import EmbeddingSearch

    from AnatSSLBridge import labelmap_to_segmentation
    from AnatSSLBridge.search import (add_volume_nodes_to_index, hit_from_table_row, hits_to_table,
                                      search_from_point, search_from_segment)

    reference = volume_node_from_image(scene, brain.t1, "query T1")
    moved = volume_node_from_image(scene, _moved(brain.t1, SHIFT), "moved T1")
    search = EmbeddingSearch(store, grid_mm=3.0, sigma_mm=4.0)
    index = search.new_index()
    assert add_volume_nodes_to_index(search, index, [reference, moved]) == ["query T1", "moved T1"]
    assert add_volume_nodes_to_index(search, index, [moved]) == ["moved T1"]  # re-adding replaces
    assert index.volume_names() == ["query T1", "moved T1"]

    # a query on the region lattice near AC: its copy in the moved volume is an index entry, at +SHIFT
    from AnatSSLLib.tools.search import region_entries

    _, lattice = region_entries(store.get(brain.t1), grid_mm=3.0, sigma_mm=4.0)
    ac = brain.landmarks.position("AC")
    point_lps = lattice[np.argmin(np.linalg.norm(lattice - ac, axis=1))]
    hits = search_from_point(search, index, reference, lps_to_ras(point_lps), k=3)
    assert hits[0].volume == "moved T1" and len(hits) == 1  # one per volume; the query's own volume left out
    table = hits_to_table(scene, hits)
    name, node_id, ras = hit_from_table_row(table, 0)
    assert name == "moved T1" and node_id == moved.GetID()
    np.testing.assert_allclose(ras, lps_to_ras(hits[0].position), atol=1e-4)
    assert table.GetColumnUnitLabel("R") == "mm"
    # the hit is an entry of the moved copy: a lattice point of the reference moved by SHIFT (random
    # weights tie hundreds of places at cosine ~1, so which one is not asserted here)
    assert hits[0].score == pytest.approx(1.0, abs=5e-3)
    _on_moved_lattice(lattice, hits[0])

    # a region: a small box around AC painted as a segment on the query volume
    box = np.zeros(brain.t1.array.shape, np.uint8)
    k, j, i = np.round(brain.t1.physical_to_index(point_lps[None])[0][::-1]).astype(int)
    box[k - 2:k + 3, j - 2:j + 3, i - 2:i + 3] = 1
    seg = labelmap_to_segmentation(scene, brain.t1.with_array(box, name="box"), reference,
                                   names={1: "AC region"}, closed_surface=False)
    segment_id = seg.GetSegmentation().GetSegmentIdBySegmentName("AC region")
    region_hits = search_from_segment(scene, search, index, reference, seg, segment_id, k=2)
    assert region_hits[0].volume == "moved T1"
    _on_moved_lattice(lattice, region_hits[0])
    hits_to_table(scene, region_hits, node=table)  # refilled in place
    assert table.GetTable().GetNumberOfRows() == len(region_hits)
    with pytest.raises(InputError, match="no segment"):
        search_from_segment(scene, search, index, reference, seg, "nope")


# ---- cross-modality segmentation ------------------------------------------------------------------
class _ResampleSegmenter:
    """Test stand-in for CrossModalitySegmenter: co-registered volumes, so resampling is the answer."""

    def __init__(self):
        self.calls = 0

    def segment(self, reference, reference_labels, target):
        import SimpleITK as sitk

        self.calls += 1
        out = sitk.Resample(reference_labels.to_sitk(), target.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        return Image.from_sitk(out, name="labels")


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_segmentation_fills_segments_keeps_manual_ones_and_undoes_at_once(scene, brain):
    from AnatSSLBridge import labelmap_to_segmentation, segmentation_to_labelmap
    from AnatSSLBridge.segmentation import transfer_segmentation

    ids = sorted(int(v) for v in np.unique(brain.labels.array) if v)[:2]
    ref_labels = brain.labels.with_array(np.where(np.isin(brain.labels.array, ids),
                                                         brain.labels.array, 0).astype(np.uint8))
    t1 = volume_node_from_image(scene, brain.t1, "T1")
    t2 = volume_node_from_image(scene, brain.t2, "T2")
    reference_seg = labelmap_to_segmentation(scene, ref_labels, t1, names={ids[0]: "left thing", ids[1]: "right thing"},
                                             colors={ids[0]: (1.0, 0.0, 0.0), ids[1]: (0.0, 0.0, 1.0)},
                                             closed_surface=False)
    # the user's segmentation on T2: a manual segment, and "right thing" with the user's own colour
    manual = np.zeros(ref_labels.array.shape, np.uint8)
    manual[5:8, 5:8, 5:8] = 1
    manual[10:12, 10:12, 10:12] = 2
    output = labelmap_to_segmentation(scene, ref_labels.with_array(manual), t2, names={1: "manual", 2: "right thing"},
                                      colors={1: (0.0, 1.0, 0.0), 2: (1.0, 1.0, 0.0)}, closed_surface=False)
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetSegmentationNode(output)
    editor.SetSourceVolumeNode(t2)
    assert editor.UpdateAlignedSourceVolume()
    before = output.GetSegmentation().GetNumberOfSegments()
    undo_calls = []

    segmenter = _ResampleSegmenter()
    node, counts = transfer_segmentation(scene, segmenter, t1, reference_seg, t2, output,
                                         save_undo_state=lambda: undo_calls.append(editor.SaveStateForUndo()))
    assert node is output and len(undo_calls) == 1 and segmenter.calls == 1
    segmentation = output.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert sorted(names) == ["left thing", "manual", "right thing"]
    right = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("right thing"))
    left = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("left thing"))
    assert right.GetColor() == pytest.approx((1.0, 1.0, 0.0))  # the user's colour is kept
    assert left.GetColor() == pytest.approx((1.0, 0.0, 0.0))  # a new segment takes the reference colour
    labels, by_value = segmentation_to_labelmap(scene, output, t2)
    value = {n: v for v, n in by_value.items()}
    for name, original in (("left thing", ids[0]), ("right thing", ids[1])):
        assert _dice(labels.array == value[name], ref_labels.array == original) > 0.97
        assert counts[name] == int((ref_labels.array == original).sum())
    assert (labels.array == value["manual"]).sum() == 27  # the manual segment untouched

    editor.Undo()  # one undo reverts the whole transfer
    segmentation = output.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == before
    labels, by_value = segmentation_to_labelmap(scene, output, t2)
    value = {n: v for v, n in by_value.items()}
    assert (labels.array == value["right thing"]).sum() == 8


def test_segmentation_bad_input_changes_nothing(scene, brain):
    from AnatSSLBridge import labelmap_to_segmentation
    from AnatSSLBridge.segmentation import transfer_segmentation

    t1 = volume_node_from_image(scene, brain.t1, "T1")
    t2 = volume_node_from_image(scene, brain.t2, "T2")
    lab = volume_node_from_image(scene, brain.labels, "labels", labelmap=True)
    empty_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    box = np.zeros(brain.t1.array.shape, np.uint8)
    box[20:30, 20:30, 20:30] = 1
    seg = labelmap_to_segmentation(scene, brain.t1.with_array(box), t1, names={1: "box"}, closed_surface=False)
    segmenter = _ResampleSegmenter()
    before = scene.GetNumberOfNodes()
    for args, message in (((t1, seg, t1, None), "also the target"),
                          ((t1, seg, lab, None), "label map"),
                          ((t1, empty_seg, t2, None), "has no segments"),
                          ((t1, seg, t2, seg), "is the reference segmentation")):
        with pytest.raises(InputError, match=message):
            transfer_segmentation(scene, segmenter, *args)
    assert scene.GetNumberOfNodes() == before and segmenter.calls == 0


def test_cross_modality_segmenter_if_available(scene, store, brain):
    tools = pytest.importorskip("AnatSSLLib.tools.segmentation")
    from AnatSSLBridge import labelmap_to_segmentation, segmentation_to_labelmap
    from AnatSSLBridge.segmentation import transfer_segmentation

    t1 = volume_node_from_image(scene, brain.t1, "T1")
    t2 = volume_node_from_image(scene, brain.t2, "T2")
    biggest = int(np.bincount(brain.labels.array.ravel().astype(int))[1:].argmax()) + 1
    ref = brain.labels.with_array((brain.labels.array == biggest).astype(np.uint8))
    seg = labelmap_to_segmentation(scene, ref, t1, names={1: "structure"}, closed_surface=False)
    node, counts = transfer_segmentation(scene, tools.CrossModalitySegmenter(store), t1, seg, t2)
    assert node.GetSegmentation().GetSegmentIdBySegmentName("structure")
    assert counts["structure"] > 0
    labels, names = segmentation_to_labelmap(scene, node, t2)
    # co-registered T1 -> T2 with random weights: well above chance (trained accuracy: the library's tests)
    assert _dice(labels.array > 0, ref.array > 0) > 0.45



def test_cross_modality_segmentation_with_the_default_encoder_to_a_simulated_t2(scene, template_2mm, population_small):
    """The Segment Editor effect's job end to end: the template T1 with its 25-label segmentation, a
    simulated subject's T2 as the editor's source volume; the transfer fills the subject's segmentation
    with the bundled default encoder (registration start, the T2 mapped into the T1's contrast, as the
    module runs it), and the segments are checked against the subject's exact labels. Measured here:
    mean tissue Dice 0.70 (csf, gm, wm and the 12 deep nuclei; white matter 0.79), against 0.50 for
    the affine registration's labels (library, AnatSSLLib.tools.segmentation)."""
    from AnatSSLBridge import labelmap_to_segmentation, segmentation_to_labelmap
    from AnatSSLBridge.segmentation import transfer_segmentation

    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import load_encoder
    from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

    subject = population_small.subjects[0]
    t1 = volume_node_from_image(scene, template_2mm.t1, "MNI T1")
    t2 = volume_node_from_image(scene, subject.image("t2"), f"{subject.name} T2")
    names = {k: v for k, v in template_2mm.label_names.items() if k}
    reference = labelmap_to_segmentation(scene, template_2mm.labels, t1, names=names, closed_surface=False)
    segmenter = CrossModalitySegmenter(EmbeddingStore(load_encoder(None, device="cpu"), whiten=True),
                                       contrast="match")
    node, counts = transfer_segmentation(scene, segmenter, t1, reference, t2)
    assert set(counts) == set(names.values())
    labels, by_value = segmentation_to_labelmap(scene, node, t2)
    value = {n: v for v, n in by_value.items()}
    truth = np.asarray(subject.labels().array)
    assert labels.array.shape == truth.shape  # on the T2's own grid
    tissue = [1, 2, 3] + list(range(8, 20))
    dice = {k: _dice(labels.array == value[names[k]], truth == k) for k in tissue}
    assert np.mean(list(dice.values())) > 0.6, dice
    assert dice[3] > 0.7, dice  # white matter

# ---- pretraining job ------------------------------------------------------------------------------
def test_pretrain_job_runs_reports_progress_and_is_cancelled(tmp_path, population_small):
    import time

    from AnatSSLBridge.jobs import PretrainJob

    def job(steps):
        return PretrainJob(population=population_small.path, cache_dir=tmp_path / "cache", device="cpu",
                           ld_steps=steps, pd_steps=1, batch_size=1, crop=16, spacing_mm=6.0,
                           run_dir=tmp_path / f"run{steps}", name="tiny")

    done = job(2)
    assert done.command()[1:4] == ["-m", "AnatSSLLib.cli", "pretrain"] and "--cancel-file" in done.command()
    done.start()
    events = done.wait(timeout=240)
    kinds = [e["event"] for e in events]
    assert done.returncode == 0, [e for e in events if e["event"] in ("log", "error")]
    assert "progress" in kinds and kinds[-1] == "exit" and "summary" in kinds
    assert done.encoder_id and done.encoder_id.startswith("ld-")
    from AnatSSLBridge.jobs import describe_event

    lines = [describe_event(e) for e in events]
    assert any(line.startswith("New encoder ld-") for line in lines) and all(lines)
    from AnatSSLLib.cache import EncoderCache

    assert done.encoder_id in EncoderCache(tmp_path / "cache", bundled=[]).ids()

    long = job(5000)
    long.start()
    deadline = time.monotonic() + 180
    seen = []
    while time.monotonic() < deadline and not any(e["event"] == "progress" for e in seen):
        seen += long.poll()
        time.sleep(0.2)
    long.cancel(grace_s=60)
    seen += long.wait(timeout=120)
    assert long.returncode == 3, seen[-5:]  # cancelled with a checkpoint, not killed
    assert any(e["event"] == "cancelled" for e in seen)


@pytest.mark.skipif(not hasattr(__import__("os"), "killpg"), reason="POSIX process groups (Windows uses taskkill /T)")
def test_pretrain_job_kill_ends_the_process_tree(tmp_path):
    from AnatSSLBridge.jobs import PretrainJob

    job = PretrainJob(data=[str(tmp_path)], cache_dir=tmp_path, python=_sleeper(tmp_path))
    job.start()
    job.cancel(grace_s=0.5)  # the fake job ignores the cancel file: killed after the grace period
    events = job.wait(timeout=30)
    assert job.returncode is not None and job.returncode < 0
    assert events[-1]["event"] == "exit"


def _sleeper(tmp_path):
    """A fake interpreter that prints one progress line, then sleeps in a child process."""
    import os
    import sys

    script = tmp_path / "fake_python"
    script.write_text("#!/bin/sh\necho '{\"event\": \"start\", \"total\": 9}'\n"
                      f"{sys.executable} -c 'import time; time.sleep(60)'\n")
    os.chmod(script, 0o755)
    return str(script)


def test_result_tables_show_titles_as_header_and_view_rows_map_to_hits(scene):
    """Issue 29, defect 2: with the node's default (titles as the view's row 0) a click on row k opened
    hit k + 1. The tables now put the titles in the header, and the view row is mapped explicitly
    (``qMRMLTableModel.mrmlTableRowIndex`` is not wrapped for Python)."""
    from AnatSSLBridge.landmarks import fill_landmark_table
    from AnatSSLBridge.search import hit_from_table_row, hits_to_table, table_row_of_view_row
    from AnatSSLLib.index import SearchHit
    from AnatSSLLib.points import PointSet

    hits = [SearchHit(f"volume {n}", np.array([n, 0.0, 0.0]), 1.0 - n / 10) for n in (1, 2, 3)]
    table = hits_to_table(scene, hits)
    assert table.GetUseColumnTitleAsColumnHeader()
    assert [hit_from_table_row(table, table_row_of_view_row(table, r))[0] for r in range(3)] == \
        ["volume 1", "volume 2", "volume 3"]
    points = PointSet(["AC", "PC"], np.zeros((2, 3)), confidence=np.array([0.9, 0.2]))
    assert fill_landmark_table(scene, points, 0.5).GetUseColumnTitleAsColumnHeader()
    plain = scene.AddNewNodeByClass("vtkMRMLTableNode")  # a table made elsewhere: titles are view row 0
    assert table_row_of_view_row(plain, 0) == -1 and table_row_of_view_row(plain, 2) == 1


def test_pretrain_job_from_recipe_and_finished_only_after_the_exit_event(tmp_path):
    """Defects 3 and 11: a job runs a named recipe; ``finished`` turns True only when the exit event
    (queued after every output line) has been polled, not when the process ends."""
    import sys

    from AnatSSLBridge.jobs import PretrainJob
    from AnatSSLLib.recipes import RECIPES

    job = PretrainJob.from_recipe("default", population="pop", cache_dir=tmp_path, device="cpu", name="x")
    command = job.command()
    assert command.count("--method") == 1 and command[command.index("--method") + 1] == "ld"
    assert " ".join(RECIPES["default"].cli_args[2:]) in " ".join(command)
    with pytest.raises(InputError, match="default, paper"):
        PretrainJob.from_recipe("fast", population="pop")
    script = tmp_path / "fake.py"
    script.write_text('import json, sys\nprint(json.dumps({"event": "summary", "encoder_id": "ld-new"}))\n')
    job = PretrainJob(population="pop", cache_dir=tmp_path, python=sys.executable)
    job.command = lambda: [sys.executable, str(script)]
    job.start()
    job._process.wait(timeout=60)
    assert not job.running and not job.finished  # ended, but nothing polled yet
    deadline = __import__("time").monotonic() + 30
    while not job.finished and __import__("time").monotonic() < deadline:
        job.poll()
    assert job.finished and job.returncode == 0 and job.encoder_id == "ld-new"


def test_pretrain_job_bad_settings():
    from AnatSSLBridge.jobs import PretrainJob

    with pytest.raises(InputError, match="either"):
        PretrainJob(cache_dir="x")
    with pytest.raises(InputError, match="steps"):
        PretrainJob(population="p", ld_steps=0)
    with pytest.raises(InputError, match="device"):
        PretrainJob(population="p", device="gpu")


# ---- dependencies ---------------------------------------------------------------------------------
def test_dependency_plan_never_pips_torch_or_slicer_packages():
    from AnatSSLBridge.dependencies import NEVER_PIP, install_plan, missing_modules

    assert missing_modules() == []  # the test environment has everything
    present = {"numpy", "SimpleITK", "vtk", "tqdm"}
    plan = install_plan(find_spec=lambda name: object() if name in present else None)
    assert plan.torch is True
    assert plan.pip == ["monai>=1.3", "safetensors>=0.4", "faiss-cpu>=1.7"]
    assert all(not r.lower().startswith(tuple(n.lower() for n in NEVER_PIP)) for r in plan.pip)
    assert "PyTorch extension" in plan.describe()
    assert install_plan().empty


# ---- background runs: one at a time, cancel, the scene changing during a run ----------------------
def test_task_runner_runs_one_task_at_a_time_and_delivers_on_poll():
    import threading

    from AnatSSLBridge.jobs import TaskCancelled, TaskRunner

    runner = TaskRunner()
    release = threading.Event()
    delivered = []

    def work(progress, cancelled):
        progress(0.25)
        release.wait(10)
        return 6 * 7

    runner.start("Propagating landmarks", work, lambda result, error: delivered.append((result, error)))
    # pressing the button again while it runs: refused with a plain message, the first run goes on
    with pytest.raises(InputError, match="still busy \\(propagating landmarks\\)"):
        runner.start("Propagating landmarks", work)
    assert runner.busy and runner.poll() is False and delivered == []
    release.set()
    assert runner.wait(10) and delivered == [(42, None)] and not runner.busy
    assert runner.task is None and runner.poll() is False

    # an error in the work arrives as the error, on the polling thread
    runner.start("Searching", lambda p, c: 1 / 0, lambda r, e: delivered.append((r, type(e))))
    assert runner.wait(10) and delivered[-1] == (None, ZeroDivisionError)

    # a cancelled run never delivers its result, even when the work finished anyway
    release.clear()
    runner.start("Indexing volumes", work, lambda r, e: delivered.append((r, e)))
    assert runner.fraction == pytest.approx(0.25) or runner.fraction == 0.0
    assert runner.cancel("the scene was closed")
    release.set()
    assert runner.wait(10)
    result, error = delivered[-1]
    assert result is None and isinstance(error, TaskCancelled) and isinstance(error, InputError)
    assert "the scene was closed; nothing was changed" in str(error)
    assert runner.cancel() is False  # nothing running


def test_landmarks_in_a_worker_thread_and_the_scene_closing_during_the_run(scene, store, brain):
    from AnatSSLBridge.jobs import TaskCancelled, TaskRunner

    reference = volume_node_from_image(scene, brain.t1, "ref")
    target = volume_node_from_image(scene, _moved(brain.t1, SHIFT), "tgt")
    markups = _reference_markups(scene, brain.landmarks.subset(["AC", "PC"]))
    propagator = LandmarkPropagator(store)
    runner = TaskRunner()
    out = []

    def run(then=None):
        plan = propagator.prepare(scene, reference, markups, [target])  # main thread: reads the nodes
        runner.start("Propagating landmarks", lambda p, c: propagator.compute(plan, progress=p, cancelled=c),
                     lambda computed, error: out.append((plan, computed, error)))
        if then is not None:
            then()
        assert runner.wait(120)
        return out[-1]

    # cancelled (Cancel pressed): nothing computed is written
    plan, computed, error = run(then=lambda: runner.cancel())
    assert computed is None and isinstance(error, TaskCancelled)
    before = scene.GetNumberOfNodes()

    # the target removed during the run: the write is refused, nothing is created
    plan, computed, error = run()
    assert error is None and len(computed) == 1
    scene.RemoveNode(target)
    with pytest.raises(InputError, match="'tgt' was removed \\(or the scene closed\\) during the run"):
        propagator.write(scene, plan, computed)
    assert scene.GetNumberOfNodes() == before - 1
    assert not _nodes(scene, "vtkMRMLTableNode")

    # the scene closed during the run
    target = volume_node_from_image(scene, _moved(brain.t1, SHIFT), "tgt")
    plan, computed, error = run()
    assert error is None
    scene.Clear(0)
    with pytest.raises(InputError, match="during the run; nothing was written"):
        propagator.write(scene, plan, computed)
    assert not _nodes(scene, "vtkMRMLMarkupsFiducialNode") and not _nodes(scene, "vtkMRMLTableNode")


def _editor_for(scene, segmentation_node, source_volume_node):
    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(scene)
    editor.SetSegmentEditorNode(scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    editor.SetSegmentationNode(segmentation_node)
    editor.SetSourceVolumeNode(source_volume_node)
    assert editor.UpdateAlignedSourceVolume()
    return editor


def _two_segment_reference(scene, brain):
    from AnatSSLBridge import labelmap_to_segmentation

    t1 = volume_node_from_image(scene, brain.t1, "T1")
    t2 = volume_node_from_image(scene, brain.t2, "T2")
    labels = np.zeros(brain.t1.array.shape, np.uint8)
    labels[10:20, 20:30, 15:25] = 1
    labels[25:35, 35:45, 20:30] = 2
    reference = labelmap_to_segmentation(scene, brain.t1.with_array(labels), t1, names={1: "caudate", 2: "putamen"},
                                         colors={1: (0.9, 0.6, 0.2), 2: (0.2, 0.4, 0.9)}, closed_surface=False)
    return t1, t2, labels, reference


def test_segment_editor_effect_flow_in_a_worker_thread_with_one_undo(scene, brain):
    """What the effect does: prepare (main thread), compute (thread, progress), write with one undo state."""
    from AnatSSLBridge import segmentation_to_labelmap
    from AnatSSLBridge.jobs import TaskRunner
    from AnatSSLBridge.segmentation import compute_transfer, prepare_transfer, write_transfer

    t1, t2, labels, reference = _two_segment_reference(scene, brain)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "T2 work")
    output.SetReferenceImageGeometryParameterFromVolumeNode(t2)
    output.GetSegmentation().AddEmptySegment("manual", "manual", [0.0, 1.0, 0.0])
    editor = _editor_for(scene, output, t2)

    class Store:  # records the embedding stage (the real store's cache is what makes it worth doing first)
        def __init__(self):
            self.embedded = []

        def get(self, image):
            self.embedded.append(image.name)

    segmenter = _ResampleSegmenter()
    segmenter.store = Store()
    plan = prepare_transfer(scene, t1, reference, t2, output)
    assert [name for _, name, _ in plan.segments] == ["caudate", "putamen"]
    runner, fractions, delivered, saved = TaskRunner(), [], [], []

    def work(progress, cancelled):
        return compute_transfer(segmenter, plan, progress=lambda f: (fractions.append(f), progress(f)),
                                cancelled=cancelled)

    runner.start("Transferring the segmentation", work, lambda result, error: delivered.append((result, error)))
    assert runner.wait(60)
    result, error = delivered[0]
    assert error is None and fractions == [0.4, 0.7, 1.0] and segmenter.store.embedded == ["T1", "T2"]
    assert output.GetSegmentation().GetNumberOfSegments() == 1  # nothing written by the thread
    node, counts = write_transfer(plan, result, save_undo_state=lambda: saved.append(editor.SaveStateForUndo()),
                                  editor_segmentation_node=output)
    assert node is output and len(saved) == 1
    assert counts == {"caudate": 1000, "putamen": 1000}
    segmentation = output.GetSegmentation()
    by_name = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i)
               for i in range(segmentation.GetNumberOfSegments())}
    assert sorted(by_name) == ["caudate", "manual", "putamen"]
    assert by_name["caudate"].GetColor() == pytest.approx((0.9, 0.6, 0.2))
    assert by_name["putamen"].GetColor() == pytest.approx((0.2, 0.4, 0.9))
    back, names = segmentation_to_labelmap(scene, output, t2)
    value = {n: v for v, n in names.items()}
    assert _dice(back.array == value["caudate"], labels == 1) == 1.0
    editor.Undo()
    assert output.GetSegmentation().GetNumberOfSegments() == 1


def test_segment_editor_effect_guards(scene, brain):
    from AnatSSLBridge.jobs import TaskCancelled, TaskRunner
    from AnatSSLBridge.segmentation import compute_transfer, prepare_transfer, write_transfer

    t1, t2, _, reference = _two_segment_reference(scene, brain)
    labelmap = volume_node_from_image(scene, brain.labels, "labels", labelmap=True)
    output = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "T2 work")
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "another")
    segmenter = _ResampleSegmenter()
    before = scene.GetNumberOfNodes()
    # bad input: refused before anything runs
    for args, message in (((t2, reference, t2, output), "is also the target \\(the Segment Editor's source volume\\)"),
                          ((labelmap, reference, t2, output), "reference volume 'labels': is a label map"),
                          ((t1, labelmap, t2, output), "is a label map volume, not a segmentation; convert it"),
                          ((t1, reference, labelmap, output), "target volume 'labels': is a label map")):
        with pytest.raises(InputError, match=message):
            prepare_transfer(scene, *args)
    with pytest.raises(InputError, match="but the encoder is 2D"):
        prepare_transfer(scene, t1, reference, t2, output, spatial_dims=2)

    # Apply pressed twice: the second is refused while the first runs
    runner = TaskRunner()
    plan = prepare_transfer(scene, t1, reference, t2, output)
    import threading

    gate = threading.Event()
    delivered = []
    runner.start("Transferring the segmentation", lambda p, c: (gate.wait(10), compute_transfer(segmenter, plan))[1],
                 lambda r, e: delivered.append((r, e)))
    with pytest.raises(InputError, match="still busy"):
        runner.start("Transferring the segmentation", lambda p, c: None)
    gate.set()
    assert runner.wait(60) and delivered[0][1] is None
    result = delivered[0][0]

    saved = []
    # the editor switched to another segmentation during the run: its undo state would be the wrong one
    with pytest.raises(InputError, match="switched to another segmentation"):
        write_transfer(plan, result, save_undo_state=lambda: saved.append(1), editor_segmentation_node=other)
    # the segmentation node removed during the run
    scene.RemoveNode(output)
    with pytest.raises(InputError, match="segmentation 'T2 work' was removed \\(or the scene was closed\\)"):
        write_transfer(plan, result, save_undo_state=lambda: saved.append(1))
    assert saved == [] and output.GetSegmentation().GetNumberOfSegments() == 0

    # cancelled: the segmenter does not even start; nothing is written
    calls = segmenter.calls
    with pytest.raises(TaskCancelled, match="segmentation was not changed"):
        compute_transfer(segmenter, plan, cancelled=lambda: True)
    assert segmenter.calls == calls

    # the scene closed during a run that was to create a new segmentation
    plan = prepare_transfer(scene, t1, reference, t2, None)
    result = compute_transfer(segmenter, plan)
    scene.Clear(0)
    with pytest.raises(InputError, match="target volume 'T2' was removed \\(or the scene was closed\\)"):
        write_transfer(plan, result)
    assert not _nodes(scene, "vtkMRMLSegmentationNode")
    assert before > 0


def _slice_views(scene):
    """Red, Yellow and Green slice views (slice + composite nodes), as the Slicer application has."""
    views = []
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        slice_node = scene.CreateNodeByClass("vtkMRMLSliceNode")  # with the scene's orientation presets
        slice_node.UnRegister(None)  # CreateNodeByClass hands over a reference (as Slicer's layout manager does)
        slice_node.SetLayoutName(name)
        assert getattr(slice_node, f"SetOrientationTo{orientation}")()
        scene.AddNode(slice_node)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        scene.AddNode(composite)
        views.append((slice_node, composite))
    return views


def _centre(slice_node) -> np.ndarray:
    m = slice_node.GetSliceToRAS()
    return np.array([m.GetElement(r, 3) for r in range(3)])


def test_search_panel_queries_in_a_worker_thread_and_row_jumps(scene, store, brain):
    """The Search panel: point, segment and whole-volume queries; clicking a row shows that volume there."""
    from AnatSSLLib.tools.search import EmbeddingSearch, region_entries

    from AnatSSLBridge import labelmap_to_segmentation
    from AnatSSLBridge.jobs import TaskRunner
    from AnatSSLBridge.search import (add_volume_nodes_to_index, hits_to_table, jump_to_hit, point_query, run_query,
                                      search_from_volume, segment_query, volume_query)

    query_node = volume_node_from_image(scene, brain.t1, "query T1")
    moved = volume_node_from_image(scene, _moved(brain.t1, SHIFT), "moved T1")
    t2 = volume_node_from_image(scene, brain.t2, "other T2")
    search = EmbeddingSearch(store, grid_mm=3.0, sigma_mm=4.0)
    index = search.new_index()
    with pytest.raises(InputError, match="there is no index"):
        run_query(search, index, volume_query(query_node))
    add_volume_nodes_to_index(search, index, [query_node, moved, t2])
    views = _slice_views(scene)

    _, lattice = region_entries(store.get(brain.t1), grid_mm=3.0, sigma_mm=4.0)
    point_lps = lattice[np.argmin(np.linalg.norm(lattice - brain.landmarks.position("AC"), axis=1))]
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query point")
    points.AddControlPoint([0.0, 0.0, -500.0], "far away")  # an earlier point: only the last one counts
    points.AddControlPoint([float(x) for x in lps_to_ras(point_lps)], "AC")
    box = np.zeros(brain.t1.array.shape, np.uint8)
    k, j, i = np.round(brain.t1.physical_to_index(point_lps[None])[0][::-1]).astype(int)
    box[k - 2:k + 3, j - 2:j + 3, i - 2:i + 3] = 1
    seg = labelmap_to_segmentation(scene, brain.t1.with_array(box), query_node, names={1: "AC region"},
                                   closed_surface=False)
    queries = {
        "point": point_query(query_node, points),
        "segment": segment_query(scene, query_node, seg, seg.GetSegmentation().GetSegmentIdBySegmentName("AC region")),
        "volume": volume_query(query_node),
    }
    runner, answers = TaskRunner(), {}
    for kind, query in queries.items():  # the queries were read on the main thread; the thread reads no node
        runner.start("Searching", lambda p, c, q=query: run_query(search, index, q, k=5),
                     lambda hits, error, kind=kind: answers.setdefault(kind, (hits, error)))
        assert runner.wait(60)
    for kind in ("point", "segment"):
        hits, error = answers[kind]
        assert error is None and sorted(h.volume for h in hits) == ["moved T1", "other T2"]  # one per volume, not itself
        # the moved copy's best place is on the reference lattice moved by SHIFT, with a top score (random
        # weights make many places tie at cosine ~1, so the rank among ties is not asserted)
        hit = next(h for h in hits if h.volume == "moved T1")
        _on_moved_lattice(lattice, hit)
        assert hit.score == pytest.approx(hits[0].score, abs=1e-3)
    hits, error = answers["volume"]
    assert error is None and [h.volume for h in hits][0] == "moved T1" and len(hits) == 2  # itself left out
    assert all(h.position is None for h in hits)
    assert hits[0].score == pytest.approx(1.0, abs=1e-3) and hits[0].score > hits[1].score
    assert [h.volume for h in search_from_volume(search, index, query_node, k=1)] == ["moved T1"]

    # a point hit: that volume in every view, all views centred on the hit
    table = hits_to_table(scene, answers["point"][0])
    row = [h.volume for h in answers["point"][0]].index("moved T1")
    volume, ras, whole = jump_to_hit(scene, table, row)
    assert volume is moved and not whole
    np.testing.assert_allclose(ras, lps_to_ras(answers["point"][0][row].position), atol=1e-4)
    for slice_node, composite in views:
        assert composite.GetBackgroundVolumeID() == moved.GetID()
        np.testing.assert_allclose(_centre(slice_node), ras, atol=1e-4)
    # a whole-volume hit: NaN position in the table; the views go to the middle of that volume
    table = hits_to_table(scene, hits, node=table)
    assert np.isnan(table.GetTable().GetValueByName(1, "R").ToDouble())
    volume, ras, whole = jump_to_hit(scene, table, 1)
    assert volume is t2 and whole
    bounds = [0.0] * 6
    t2.GetRASBounds(bounds)
    np.testing.assert_allclose(ras, [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2,
                                     (bounds[4] + bounds[5]) / 2])
    assert all(c.GetBackgroundVolumeID() == t2.GetID() for _, c in views)
    np.testing.assert_allclose(_centre(views[0][0]), ras, atol=1e-4)
    # a hit in a volume that is not loaded (any more)
    scene.RemoveNode(t2)
    with pytest.raises(InputError, match="volume 'other T2' is not loaded"):
        jump_to_hit(scene, table, 1)
    with pytest.raises(InputError, match="no row 7"):
        jump_to_hit(scene, table, 7)

    # bad queries, refused on the main thread with the fix in the message
    empty = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "empty")
    with pytest.raises(InputError, match="no point placed"):
        point_query(query_node, empty)
    with pytest.raises(InputError, match="lies outside the query volume 'query T1'"):
        point_query(query_node, [0.0, 0.0, -500.0])
    with pytest.raises(InputError, match="no query segment"):
        segment_query(scene, query_node, seg, "")
    labels = volume_node_from_image(scene, brain.labels, "labels", labelmap=True)
    with pytest.raises(InputError, match="query volume 'labels': is a label map"):
        volume_query(labels)
    with pytest.raises(InputError, match="but the encoder is 2D"):  # an encoder for the wrong dimensionality
        volume_query(query_node, spatial_dims=2)
