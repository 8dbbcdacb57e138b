"""Metrics in mm, the benchmark harness and its reports, and the ``anatssl bench`` command."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from AnatSSLLib import bench
from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image
from AnatSSLLib.metrics import dice_per_label, precision_at_k, radial_errors, summarize_errors
from AnatSSLLib.points import PointSet


# ---- metrics ---------------------------------------------------------------------------------
def test_radial_errors_are_physical_mm_with_anisotropic_oblique_spacing():
    """One voxel step along each axis of a (0.5, 2, 3) mm oblique grid is sqrt(0.25 + 4 + 9) mm."""
    a = np.deg2rad(30)
    direction = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    grid = Image(np.zeros((4, 5, 6)), (0.5, 2.0, 3.0), (10.0, -5.0, 2.0), direction)
    truth = PointSet(["a", "b"], grid.index_to_physical([[1, 1, 1], [2, 3, 1]]))
    pred = PointSet(["b", "a", "extra"], grid.index_to_physical([[2, 3, 1], [2, 2, 2], [0, 0, 0]]))
    errors = radial_errors(pred, truth)
    assert list(errors) == ["a", "b"]
    assert errors["a"] == pytest.approx(math.sqrt(0.25 + 4 + 9))
    assert errors["b"] == pytest.approx(0.0)
    with pytest.raises(InputError, match="lack 1"):
        radial_errors(PointSet(["a"], [[0, 0, 0]]), truth)


def test_summarize_errors_known_values():
    s = summarize_errors({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0})
    assert s["n"] == 5 and s["mean"] == 3.0 and s["median"] == 3.0 and s["max"] == 5.0
    assert s["p90"] == pytest.approx(4.6)
    assert s["within_2mm"] == pytest.approx(0.4) and s["within_4mm"] == pytest.approx(0.8)
    empty = summarize_errors([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


def test_dice_per_label_and_grid_check():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1  # 32 voxels
    b[1:3] = 1  # 32 voxels, 16 shared
    a[3, 0, 0] = 2
    img_a = Image(a, (1, 1, 1), (0, 0, 0), np.eye(3), "a")
    img_b = img_a.with_array(b, "b")
    d = dice_per_label(img_a, img_b)
    assert d[1] == pytest.approx(0.5) and d[2] == 0.0
    assert math.isnan(dice_per_label(img_a, img_b, [7])[7])
    shifted = Image(b, (1, 1, 1), (0, 0, 1), np.eye(3), "shifted")
    with pytest.raises(InputError, match="share one grid"):
        dice_per_label(img_a, shifted)


def test_precision_at_k():
    assert precision_at_k([[True, False], [False, True]], 1) == 0.5
    assert precision_at_k([[True, True, False]], 10) == pytest.approx(0.2)
    with pytest.raises(InputError):
        precision_at_k([[True]], 0)


# ---- an in-memory population (same interface as AnatSSLLib.data.Population) ------------------
@dataclasses.dataclass
class FakeSubject:
    name: str
    images: dict
    points: PointSet
    label_map: Image
    rater2: PointSet | None = None
    contrasts: tuple = ("t1",)

    def image(self, contrast):
        if contrast not in self.images:
            raise InputError(f"{self.name}: no contrast {contrast!r}")
        return self.images[contrast]

    def landmarks(self):
        return self.points

    def labels(self):
        return self.label_map

    def landmarks_rater2(self):
        if self.rater2 is None:
            raise InputError(f"{self.name}: no second-rater landmarks")
        return self.rater2


@dataclasses.dataclass
class FakePopulation:
    template: FakeSubject
    subjects: list
    label_names: dict
    path: str = "memory"
    meta: dict = dataclasses.field(default_factory=lambda: {"simulated": True})


def _blob_volume(centre_ijk, shape=(24, 28, 26), spacing=(2.0, 2.0, 2.0)):
    k, j, i = np.indices(shape)
    r2 = (i - centre_ijk[0]) ** 2 + ((j - centre_ijk[1]) / 1.5) ** 2 + ((k - centre_ijk[2]) / 0.8) ** 2
    arr = np.exp(-r2 / 30.0) * 100 + np.exp(-((i - centre_ijk[0] - 4) ** 2 + (j - centre_ijk[1]) ** 2 + (k - centre_ijk[2] + 3) ** 2) / 6.0) * 60
    return Image(arr.astype(np.float32), spacing, (0.0, 0.0, 0.0), np.eye(3), "blob")


def _subject(name, shift_vox, rater2=None):
    centre = np.array([12.0, 14.0, 13.0]) + shift_vox
    img = _blob_volume(centre)
    pts = PointSet(["A", "B"], img.index_to_physical([centre, centre + [4, 0, -3]]), descriptions=["blob", "bump"])
    labels = img.with_array((img.array > 50).astype(np.uint8))
    return FakeSubject(name, {"t1": img}, pts, labels, rater2)


@pytest.fixture
def population():
    template = _subject("template", np.zeros(3))
    template.rater2 = PointSet(["A", "B"], template.points.positions + [[1.0, 0, 0], [0, 0, 2.0]])
    subjects = [_subject("sub-000", np.array([2, -1, 1])), _subject("sub-001", np.array([-2, 2, 0]))]
    return FakePopulation(template, subjects, {1: "blob"})


class Oracle:
    """Knows the truth: returns each target's own landmarks (errors must be 0)."""

    name = "oracle"

    def __init__(self, population):
        self.lookup = {id(s.image("t1")): s for s in population.subjects}

    def prepare(self, reference, ref_points):
        self.labels = ref_points.labels

    def locate(self, target):
        return self.lookup[id(target)].landmarks()


class Stay:
    """Predicts the reference positions unchanged (a known, non-zero error)."""

    name = "stay"

    def prepare(self, reference, ref_points):
        self.points = ref_points

    def locate(self, target):
        return self.points


def test_landmark_benchmark_report(population, tmp_path):
    out = tmp_path / "r" / "landmarks.json"
    report = bench.run_landmark_benchmark(
        population, [Oracle(population), Stay(), "ncc"], out_json=out, command="anatssl bench landmarks test"
    )
    assert report["task"] == "landmarks" and report["command"] == "anatssl bench landmarks test"
    assert report["targets"] == ["sub-000", "sub-001"] and report["reference"] == "template"
    assert set(report["methods"]) == {"oracle", "stay", "ncc"}
    oracle = report["methods"]["oracle"]
    assert oracle["summary"]["mean"] == 0.0 and oracle["summary"]["n"] == 4 and oracle["summary"]["within_2mm"] == 1.0
    stay = report["methods"]["stay"]
    # sub-000 moved by (2,-1,1) voxels of 2 mm = 2*sqrt(6) mm; sub-001 by (-2,2,0) = 2*sqrt(8) mm.
    assert stay["per_target"]["sub-000"]["errors_mm"]["A"] == pytest.approx(2 * math.sqrt(6))
    assert stay["per_landmark"]["A"]["mean"] == pytest.approx(math.sqrt(6) + math.sqrt(8))
    assert stay["seconds_per_target"] >= 0 and "prepare_seconds" in stay
    assert report["inter_rater"]["summary"]["mean"] == pytest.approx(1.5)
    ncc = report["methods"]["ncc"]
    assert ncc["summary"]["mean"] < stay["summary"]["mean"]
    assert set(ncc["per_target"]["sub-000"]["confidence"]) == {"A", "B"}
    saved = json.loads(out.read_text())
    assert saved["methods"]["oracle"]["summary"]["mean"] == 0.0
    assert saved["machine"]["cpu_count"] >= 1 and saved["library_version"]
    assert not list(out.parent.glob("*.tmp"))
    table = bench.format_table(report, per_landmark=True)
    assert "| inter-rater floor | 1.50 |" in table and "| oracle | 0.00 |" in table
    assert "| A blob |" in table


def test_landmark_benchmark_reference_subject_and_targets(population):
    report = bench.run_landmark_benchmark(population, [Stay()], reference="sub-000", targets=["sub-001"])
    assert report["reference"] == "sub-000" and report["targets"] == ["sub-001"]
    with pytest.raises(InputError, match="reference 'sub-9'"):
        bench.run_landmark_benchmark(population, [Stay()], reference="sub-9")
    with pytest.raises(InputError, match="unknown landmark method 'magic'"):
        bench.run_landmark_benchmark(population, ["magic"])


def test_unavailable_method_is_skipped_with_a_note(population, monkeypatch):
    from AnatSSLLib.baselines import registration

    monkeypatch.setattr(registration, "ants_available", lambda: False)
    report = bench.run_landmark_benchmark(population, [Stay(), "syn"])
    assert "syn" not in report["methods"] and "antspyx" in report["skipped"]["syn"]
    assert "skipped syn" in bench.format_table(report)


def test_registry_accepts_plugin_methods(population, monkeypatch):
    seen = {}

    def factory(encoder=None, **options):
        seen["encoder"] = encoder
        return Stay()

    monkeypatch.setitem(bench.LANDMARK_METHODS, "random-encoder", factory)
    report = bench.run_landmark_benchmark(population, ["random-encoder"], encoder="enc-123")
    assert seen["encoder"] == "enc-123" and "random-encoder" in report["methods"]


class CopyLabels:
    name = "copy"

    def prepare(self, reference, reference_labels):
        self.labels = reference_labels

    def segment(self, target):
        return target.with_array(self.labels.array)


def test_segmentation_benchmark_dice(population, tmp_path):
    report = bench.run_segmentation_benchmark(population, [CopyLabels()], out_json=tmp_path / "seg.json")
    entry = report["methods"]["copy"]
    assert report["labels"] == {"1": "blob"}
    for target in ("sub-000", "sub-001"):
        expected = dice_per_label(population.template.labels(), next(s for s in population.subjects if s.name == target).labels())[1]
        assert entry["per_target"][target][1] == pytest.approx(expected)
    assert 0.0 < entry["mean_dice"] < 1.0
    assert "| **mean** |" in bench.format_table(report)


class PerfectSearch:
    name = "perfect"

    def index(self, volumes):
        self.names = [n for n, _ in volumes]

    def query(self, image, point, k):
        return [(n, self.truth[n].position(self.label_of(point)), 1.0) for n in self.names][:k]


def test_search_and_pretrain_need_an_encoder(population):
    with pytest.raises(InputError, match="no encoder given"):
        bench.run_search_benchmark(population)
    with pytest.raises(InputError, match="no encoder given"):
        bench.run_pretrain_benchmark()


def test_search_benchmark_precision(population):
    searcher = PerfectSearch()
    searcher.truth = {s.name: s.landmarks() for s in population.subjects}
    tpl = population.template.landmarks()
    searcher.label_of = lambda p: tpl.labels[int(np.argmin(np.linalg.norm(tpl.positions - p, axis=1)))]
    report = bench.run_search_benchmark(population, searcher, ks=(1, 10))
    assert report["precision_at_1"] == 1.0
    assert report["precision_at_10"] == pytest.approx(0.2)  # two targets, one true match each
    assert report["n_queries"] == 2


class HalfRightSearch(PerfectSearch):
    """Best answer in the first target is the true landmark; in the second it is 10 mm off."""

    def best_in_each(self, image, point):
        label = self.label_of(point)
        first, second = self.names
        return [(first, self.truth[first].position(label), 1.0),
                (second, self.truth[second].position(label) + np.array([10.0, 0.0, 0.0]), 0.5)]


def test_search_benchmark_top_answer_per_subject(population):
    searcher = HalfRightSearch()
    searcher.truth = {s.name: s.landmarks() for s in population.subjects}
    tpl = population.template.landmarks()
    searcher.label_of = lambda p: tpl.labels[int(np.argmin(np.linalg.norm(tpl.positions - p, axis=1)))]
    report = bench.run_search_benchmark(population, searcher, ks=(1, 10))
    assert report["top_answer_precision"] == pytest.approx(0.5)
    assert report["top_answer_error_mm"]["mean"] == pytest.approx(5.0)
    assert set(report["top_answer_per_landmark"].values()) == {0.5}
    assert "top_answer_precision" in bench.format_table(report)


def test_pretrain_benchmark_throughput():
    class Probe:
        name = "sleepy"
        batch_size = 4
        device = "cpu"
        steps = 0

        def step(self):
            Probe.steps += 1
            sum(range(20000))

    report = bench.run_pretrain_benchmark(Probe(), steps=5, warmup=1)
    assert Probe.steps == 6 and report["samples_per_second"] > 0 and report["peak_memory_bytes"] > 0
    assert "| sleepy | cpu | 4 |" in bench.format_table(report)


# ---- command line ----------------------------------------------------------------------------
def test_cli_bench_landmarks_on_a_synthesized_population(tmp_path, capsys):
    data = pytest.importorskip("AnatSSLLib.data")
    from AnatSSLLib.cli import main

    try:
        folder = data.synthesize_population(tmp_path / "pop", 2, contrasts=("t1",), seed=3, res_mm=4.0)
    except InputError as exc:  # a data wheel missing
        pytest.skip(str(exc))
    out = tmp_path / "bench.json"
    rc = main(["bench", "landmarks", "--population", str(folder), "--methods", "ncc", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("anatssl") and report["methods"]["ncc"]["summary"]["n"] == 2 * 32
    assert report["inter_rater"]["summary"]["n"] == 32
    assert "| ncc |" in capsys.readouterr().out
    rc = main(["bench", "landmarks", "--population", str(folder), "--methods", "nope", "--no-progress"])
    assert rc == 2 and "unknown landmark method 'nope'" in capsys.readouterr().err
    rc = main(["bench", "search", "--population", str(folder)])
    assert rc == 2 and "no encoder given" in capsys.readouterr().err


def test_encoder_search_method_on_real_encoder(population):
    from AnatSSLLib.tools.search import EncoderSearch

    searcher = bench.SEARCH_METHODS["encoder"](encoder=None)  # the bundled default encoder
    assert isinstance(searcher, EncoderSearch)
    report = bench.run_search_benchmark(population, searcher, ks=(1, 10))
    tpl = population.template.landmarks()
    best = searcher.best_in_each(population.template.image("t1"), tpl.positions[0])
    assert sorted(name for name, _, _ in best) == ["sub-000", "sub-001"]  # one best place per indexed volume
    assert 0.0 <= report["top_answer_precision"] <= 1.0 and np.isfinite(report["top_answer_error_mm"]["median"])
