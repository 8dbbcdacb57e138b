"""Smoke tests of benchmarks/bench_awcl.py's pieces on a tiny synthetic tagged set (a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from AnatSSLLib.cache import EncoderCache
from AnatSSLLib.methods.awcl_data import TaggedImageSet

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_awcl.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_awcl", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_awcl"] = module
    spec.loader.exec_module(module)
    return module


def _toy_set(n_scans: int = 4, per_scan: int = 10, size: int = 32) -> TaggedImageSet:
    """Two fine classes (a bright square top-left or bottom-right, label 1), one coarse class; every
    fifth image untagged (its true tag kept in ``true_fine_tag``)."""
    rng = np.random.default_rng(0)
    n = n_scans * per_scan
    images = rng.uniform(0, 0.2, (n, 1, size, size)).astype(np.float32)
    labels = np.zeros((n, size, size), np.int64)
    fine_true = []
    for i in range(n):
        top = i % 2 == 0
        r0, c0 = (4, 4) if top else (18, 18)
        images[i, 0, r0 : r0 + 10, c0 : c0 + 10] += 0.7
        labels[i, r0 : r0 + 10, c0 : c0 + 10] = 1
        fine_true.append("top_left" if top else "bottom_right")
    tagged = [i % 5 != 4 for i in range(n)]
    return TaggedImageSet(
        images=images,
        scan_ids=[f"sub-{i // per_scan:03d}" for i in range(n)],
        coarse=["square" if t else None for t in tagged],
        fine=[f if t else None for f, t in zip(fine_true, tagged)],
        labels=labels,
        extra={"true_fine_tag": fine_true, "true_coarse_tag": ["square"] * n},
    )


def test_split_holds_out_last_subjects_and_large_labels(bench):
    data = _toy_set()
    tr, te, held = bench.split_subjects(data, 1)
    assert held == ["sub-003"]
    assert {data.scan_ids[i] for i in te} == {"sub-003"} and "sub-003" not in {data.scan_ids[i] for i in tr}
    assert len(tr) == 30 and len(te) == 10
    # the square covers 100/1024 ~ 9.8 % of the pixels: label 1 is "large" at 1 %, not at 20 %
    assert bench.large_labels(data, tr) == [1]
    assert bench.large_labels(data, tr, fraction=0.2) == []
    with pytest.raises(ValueError):
        bench.split_subjects(data, 4)


def test_configurations_cover_the_issue_grid(bench):
    names = [c[0] for c in bench.configurations([0.25, 0.5, 0.75, 1.0])]
    assert names[:2] == ["random_init", "instance_r0"]
    assert "awcl_coarse_r0.25" in names and "awcl_fine_r1" in names and len(names) == 10


def test_summary_and_verdict_known_answer(bench):
    runs = {
        "instance_r0": {"0": dict(probe_accuracy=0.5, probe_macro_f1=0.4, seg_frozen_dice_all=0.2, seg_frozen_dice_large=0.6),
                        "1": dict(probe_accuracy=0.7, probe_macro_f1=0.6, seg_frozen_dice_all=0.2, seg_frozen_dice_large=0.6)},
        "awcl_fine_r0.5": {"0": dict(probe_accuracy=0.8, probe_macro_f1=0.8, seg_frozen_dice_all=0.3, seg_frozen_dice_large=0.7)},
    }  # fmt: skip
    s = bench.summarise(runs)
    assert s["instance_r0"]["probe_accuracy"] == pytest.approx(0.6)
    assert s["instance_r0"]["probe_accuracy_spread"] == pytest.approx(0.1)
    assert s["instance_r0"]["probe_accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert s["instance_r0"]["seg_frozen_dice_all"] == pytest.approx(0.2)
    v = bench.verdict(runs, [0.5, 1.0])  # paired by seed: only seed 0 is common
    assert v["awcl_fine_r0.5"]["seeds"] == ["0"]
    assert v["awcl_fine_r0.5"]["probe_accuracy_delta"] == pytest.approx(0.3)
    assert v["awcl_fine_r0.5"]["seg_frozen_dice_all_seeds_ahead"] == 1
    assert v["awcl_fine_r0.5"]["bar"] == {"probe+seg_frozen": {"beats": True, "clearly": False}}  # 1 seed: no se
    assert "awcl_fine_r1" not in v
    assert v["fine_ratios_beating_instance"] == {"probe+seg_frozen": ["awcl_fine_r0.5"]}
    assert v["fine_ratios_clearly_beating_instance"] == {"probe+seg_frozen": []}
    # metrics missing from older runs (no probe1_*) are skipped, not a KeyError
    assert "probe1_accuracy" not in s["instance_r0"] and "probe1_accuracy_delta" not in v["awcl_fine_r0.5"]


def test_verdict_bar_per_probe_and_protocol(bench):
    """Fine ahead on the label-scarce probe and the frozen protocol on every seed, behind on the full
    probe's accuracy: ``probe1+seg_frozen`` is met (clearly), ``probe+seg_*`` and ``*+seg_finetune`` not."""
    def run(p, p1, frozen, ft):
        return dict(probe_accuracy=p, probe_macro_f1=p, probe1_accuracy=p1, probe1_macro_f1=p1,
                    seg_frozen_dice_all=frozen, seg_finetune_dice_all=ft)  # fmt: skip

    runs = {
        "instance_r0": {"0": run(0.9, 0.80, 0.20, 0.30), "1": run(0.9, 0.82, 0.22, 0.30), "2": run(0.9, 0.81, 0.21, 0.30)},
        "awcl_fine_r1": {"0": run(0.8, 0.90, 0.25, 0.29), "1": run(0.85, 0.91, 0.26, 0.28), "2": run(0.8, 0.92, 0.27, 0.31)},
    }  # fmt: skip
    v = bench.verdict(runs, [1.0])
    bar = v["awcl_fine_r1"]["bar"]
    assert set(bar) == {"probe+seg_frozen", "probe+seg_finetune", "probe1+seg_frozen", "probe1+seg_finetune"}
    assert bar["probe1+seg_frozen"] == {"beats": True, "clearly": True}
    assert bar["probe+seg_frozen"]["beats"] is False and bar["probe1+seg_finetune"]["beats"] is False
    assert v["fine_ratios_clearly_beating_instance"]["probe1+seg_frozen"] == ["awcl_fine_r1"]
    assert v["awcl_fine_r1"]["seg_frozen_dice_all_delta"] == pytest.approx(0.05)
    assert v["awcl_fine_r1"]["seg_frozen_dice_all_delta_se"] == pytest.approx(0.01 / np.sqrt(3), abs=1e-4)


def test_seg_protocols_are_named_and_checked(bench):
    assert bench.parse_seg_protocols("frozen, finetune") == ["frozen", "finetune"]
    assert bench.SEG_PROTOCOLS["frozen"]["freeze"] is True and bench.SEG_PROTOCOLS["finetune"]["freeze"] is False
    for bad in ("frozen,frozen", "", "unfrozen"):
        with pytest.raises(ValueError, match="--seg-protocols"):
            bench.parse_seg_protocols(bad)
    args = bench.parse_args([])
    assert args.seg_protocols == "frozen,finetune" and args.seg_flip is False


def test_tiny_pretrain_and_evaluate(bench, tmp_path):
    torch.set_num_threads(1)
    data = _toy_set()
    tr, te, _ = bench.split_subjects(data, 1)
    arch = {"backbone": "resnet10", "widen_factor": 0.125, "proj_hidden": 64, "proj_dim": 16}
    encoder, facts = bench.pretrain(data.subset(tr), 0.5, "fine", arch, steps=2, batch_size=8, seed=0,
                                    cache=EncoderCache(tmp_path / "cache", bundled=()))  # fmt: skip
    assert facts["encoder_id"] and facts["samples_per_s"] > 0 and np.isfinite(facts["final_loss"])
    res = bench.evaluate_encoder(encoder, data, tr, te, seg_steps=3, seg_protocols=["frozen", "finetune"], seed=0,
                                 large=[1])  # fmt: skip
    assert res["probe_n_train"] == 30 and res["probe_n_test"] == 10  # untagged rows scored via true tags
    # two classes told apart by where a bright square is: trivially separable by the probe
    assert res["probe_train_accuracy"] == 1.0 and res["probe_accuracy"] >= 0.8
    # label-scarce probe: one of the 3 training subjects' 10 images at a time
    assert res["probe1_n_subjects"] == 3 and 0.0 <= res["probe1_accuracy"] <= 1.0
    for p in ("frozen", "finetune"):  # one foreground label: "large" = "all"
        assert 0.0 <= res[f"seg_{p}_dice_all"] <= 1.0
        assert res[f"seg_{p}_dice_large"] == pytest.approx(res[f"seg_{p}_dice_all"])
    out = tmp_path / "r.json"
    bench.atomic_write_json(out, {"runs": {"x": res}})
    assert json.loads(out.read_text())["runs"]["x"]["probe_n_test"] == 10
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []


def test_merging_reports_needs_the_same_settings(bench, tmp_path):
    """``--merge``: reports of other seeds are taken only when made with the same settings and data."""
    report = {"settings": {"steps": 800, "seeds": [0]}, "protocol": {"seg_steps": 1000}, "data": {"csv": "a.csv"}}
    other = {"settings": {"steps": 800, "seeds": [1]}, "protocol": {"seg_steps": 1000}, "data": {"csv": "a.csv"}}
    assert bench._same_settings(other, report, tmp_path / "o.json") is other  # seeds may differ
    for key, change in (("settings", {"steps": 400, "seeds": [1]}), ("protocol", {"seg_steps": 10}), ("data", {"csv": "b.csv"})):
        with pytest.raises(SystemExit, match="o.json"):
            bench._same_settings({**other, key: change}, report, tmp_path / "o.json")
    assert bench.parse_args(["--merge", "x.json", "y.json"]).merge == ["x.json", "y.json"]
    assert bench.parse_args([]).merge == []


def test_merged_runs_keep_a_repeated_run_once_and_refuse_a_different_one(bench):
    runs = {"instance_r0": {"0": dict(probe_accuracy=0.9, seg_frozen_dice_all=0.3, config_seconds=10.0)}}
    other = {"instance_r0": {"0": dict(probe_accuracy=0.9, seg_frozen_dice_all=0.3, config_seconds=12.0),
                             "1": dict(probe_accuracy=0.8, seg_frozen_dice_all=0.2)}}  # fmt: skip
    bench.merge_runs(runs, other, "other.json")
    assert sorted(runs["instance_r0"]) == ["0", "1"] and runs["instance_r0"]["0"]["config_seconds"] == 10.0
    with pytest.raises(SystemExit, match="other.json.*instance_r0 seed 1"):
        bench.merge_runs(runs, {"instance_r0": {"1": dict(probe_accuracy=0.7, seg_frozen_dice_all=0.2)}}, "other.json")


def test_merged_runs_take_a_protocol_added_later(bench):
    """A run finished before a segmentation protocol was added gains that protocol's metrics from
    the report that ran it; the metrics both hold must still agree."""
    runs = {"instance_r0": {"0": dict(probe_accuracy=0.9, seg_frozen_dice_all=0.3)}}
    bench.merge_runs(runs, {"instance_r0": {"0": dict(probe_accuracy=0.9, seg_frozen_dice_all=0.3,
                                                      seg_frozen1_dice_all=0.2)}}, "other.json")  # fmt: skip
    assert runs["instance_r0"]["0"] == dict(probe_accuracy=0.9, seg_frozen_dice_all=0.3, seg_frozen1_dice_all=0.2)
    with pytest.raises(SystemExit, match="seg_frozen1_dice_all"):
        bench.merge_runs(runs, {"instance_r0": {"0": dict(seg_frozen1_dice_all=0.25)}}, "other.json")
    # the list of protocols may differ between reports; their settings may not
    report = {"settings": {"steps": 800}, "protocol": {"seg_steps": 1000, "seg_protocols": {"frozen1": "x"}},
              "data": {"csv": "a.csv"}}  # fmt: skip
    old = {**report, "protocol": {"seg_steps": 1000, "seg_protocols": {"frozen": "y"}}}
    assert bench._same_settings(old, report, Path("o.json")) is old


def test_label_scarce_protocols_train_on_one_subject_rotating_with_the_seed(bench):
    data = _toy_set()
    tr, te, _ = bench.split_subjects(data, 1)  # training subjects sub-000..sub-002
    for protocol in ("frozen1", "finetune1"):
        assert bench.SEG_PROTOCOLS[protocol]["one_subject"] and bench.SEG_PROTOCOLS[protocol]["steps"] == 500
        for seed, subject in ((0, "sub-000"), (1, "sub-001"), (2, "sub-002"), (3, "sub-000")):
            idx, test, got = bench.seg_images(data, tr, te, protocol, seed)
            assert got == subject and {data.scan_ids[i] for i in idx} == {subject} and len(idx) == 10
            assert np.array_equal(test, te)
    idx, test, got = bench.seg_images(data, tr, te, "frozen", 1)
    assert got is None and np.array_equal(idx, tr) and np.array_equal(test, te)


def test_cross_contrast_protocols_train_on_t1_and_score_on_t2(bench):
    data = _toy_set()
    data.extra["contrast"] = ["t1" if i % 3 else "t2" for i in range(len(data))]
    tr, te, _ = bench.split_subjects(data, 1)
    for protocol in ("frozen_t1t2", "finetune_t1t2"):
        idx, test, subject = bench.seg_images(data, tr, te, protocol, seed=0)
        assert subject is None and bench.SEG_PROTOCOLS[protocol]["steps"] == 500
        assert {data.extra["contrast"][i] for i in idx} == {"t1"} and set(idx) <= set(tr)
        assert {data.extra["contrast"][i] for i in test} == {"t2"} and set(test) <= set(te)
        assert len(idx) == sum(data.extra["contrast"][i] == "t1" for i in tr)
    data.extra["contrast"] = ["t1"] * len(data)
    with pytest.raises(ValueError, match="frozen_t1t2.*t2 test images"):
        bench.seg_images(data, tr, te, "frozen_t1t2", seed=0)
    assert bench.parse_seg_protocols("frozen1,finetune1") == ["frozen1", "finetune1"]


def test_resume_adds_a_protocol_to_finished_runs_without_pretraining_again(bench, tmp_path, monkeypatch):
    """``--resume`` with a new ``--seg-protocols`` evaluates the cached encoders of finished runs
    under the new protocol only: probes and earlier protocols untouched, nothing pretrained again."""
    torch.set_num_threads(1)
    data = _toy_set()
    monkeypatch.setattr(bench, "load_planes", lambda path, size: data)
    monkeypatch.setitem(bench.SEG_PROTOCOLS, "frozen1", {**bench.SEG_PROTOCOLS["frozen1"], "steps": 3})
    out = tmp_path / "r.json"
    common = ["--csv", str(tmp_path / "planes.csv"), "--work", str(tmp_path), "--size", "32", "--test-subjects", "1",
              "--configs", "random_init,instance_r0", "--widen", "0.125", "--steps", "2", "--batch-size", "8",
              "--seg-steps", "3", "--seeds", "0", "--out", str(out)]  # fmt: skip
    assert bench.main(common + ["--seg-protocols", "frozen"]) == 0
    first = json.loads(out.read_text())["runs"]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert bench.main(common + ["--seg-protocols", "frozen1", "--resume"]) == 0
    report = json.loads(out.read_text())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached  # no new pretraining
    assert set(report["protocol"]["seg_protocols"]) == {"frozen", "frozen1"}
    for name in ("random_init", "instance_r0"):
        run = report["runs"][name]["0"]
        for key in ("probe_accuracy", "probe1_accuracy", "seg_frozen_dice_all"):
            assert run[key] == first[name]["0"][key]
        assert 0.0 <= run["seg_frozen1_dice_all"] <= 1.0 and run["seg_frozen1_training_subject"] == "sub-000"
    assert "seg_frozen1_dice_all" in report["summary"]["instance_r0"]
