"""AWCL: loss known answers, anatomy-aware pair sampling, network, a tiny real training and the
downstream evaluation on real 2009c slices."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from AnatSSLLib.errors import InputError
from AnatSSLLib.methods.awcl import (
    AnatomyAwarePairSampler,
    AWCLTask,
    augment_views,
    awcl_loss,
    awcl_positive_mask,
)
from AnatSSLLib.methods.awcl_data import read_tagged_images
from AnatSSLLib.networks.awcl_net import AWCLNet, awcl_resnet2d
from test_awcl_data import write_slice_set

# four unit vectors with simple dot products: z0.z1 = 0, z0.z2 = .6, z0.z3 = -.8, z1.z2 = .8,
# z1.z3 = .6, z2.z3 = 0 (views 0, 1 = first views of samples 0, 1; views 2, 3 their second views)
Z4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-0.8, 0.6]])
FACTOR = 0.5 / 0.07


# ------------------------------------------------------------------------------- loss KATs


def test_no_tags_is_nt_xent():
    from monai.losses import ContrastiveLoss

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    ours = awcl_loss(torch.cat([a, b]), [-1] * 12, tau=0.5, base_tau=None)
    monai = ContrastiveLoss(temperature=0.5)(a, b)  # independent NT-Xent (SimCLR)
    assert float(ours) == pytest.approx(float(monai), rel=1e-5)
    assert float(awcl_loss(torch.cat([a, b]), [-1] * 12)) == pytest.approx(FACTOR * float(monai), rel=1e-5)
    # distinct tags on every pair are the same as no tags
    assert float(awcl_loss(torch.cat([a, b]), list(range(6)) * 2, base_tau=None)) == pytest.approx(float(monai), rel=1e-5)


def test_hand_computed_four_views():
    e = math.exp
    # tags: sample 0 tagged (3), sample 1 untagged: A(0)={2}, A(1)={3}, A(2)={0}, A(3)={1}
    l0 = -math.log(e(1.2) / (e(0.0) + e(1.2) + e(-1.6)))
    l1 = -math.log(e(1.2) / (e(0.0) + e(1.6) + e(1.2)))
    l2 = -math.log(e(1.2) / (e(1.2) + e(1.6) + e(0.0)))
    l3 = -math.log(e(1.2) / (e(-1.6) + e(1.2) + e(0.0)))
    expected = FACTOR * (l0 + l1 + l2 + l3) / 4
    assert expected == pytest.approx(4.7717157, abs=1e-6)
    assert float(awcl_loss(Z4, [3, -1, 3, -1], tau=0.5, base_tau=0.07)) == pytest.approx(expected, abs=1e-5)
    per = awcl_loss(Z4, [3, -1, 3, -1], reduction="none")
    assert per.tolist() == pytest.approx([FACTOR * v for v in (l0, l1, l2, l3)], abs=1e-5)


def test_all_tags_equal_every_view_is_positive():
    e = math.exp
    s = Z4 @ Z4.t() / 0.5
    # A(i) = O(i): L^i = -(1/3) sum_{p != i} (s_ip - log sum_{a != i} exp s_ia)
    expected = 0.0
    for i in range(4):
        others = [k for k in range(4) if k != i]
        lse = math.log(sum(e(float(s[i, a])) for a in others))
        expected += -sum(float(s[i, p]) - lse for p in others) / 3
    expected *= FACTOR / 4
    assert float(awcl_loss(Z4, [7, 7, 7, 7])) == pytest.approx(expected, abs=1e-5)
    mask = awcl_positive_mask(torch.tensor([7, 7, 7, 7]))
    assert mask.tolist() == (~torch.eye(4, dtype=torch.bool)).tolist()


def test_rule_is_per_anchor_not_sample_zero():
    # sample 0 untagged, samples 1 and 2 share tag 5: the reference code would ignore all tags
    # because sample 0 is untagged; per anchor, views of samples 1 and 2 are mutual positives.
    mask = awcl_positive_mask(torch.tensor([-1, 5, 5, -1, 5, 5]))
    assert mask[0].nonzero().flatten().tolist() == [3]
    assert mask[1].nonzero().flatten().tolist() == [2, 4, 5]
    # two untagged samples are not positives of each other (unique pseudo-tags)
    mask = awcl_positive_mask(torch.tensor([-1, -1, 4, -1, -1, 4]))
    assert mask[0].nonzero().flatten().tolist() == [3] and mask[1].nonzero().flatten().tolist() == [4]
    with pytest.raises(InputError, match="2N entries"):
        awcl_positive_mask(torch.tensor([1, 2, 3]))


def test_loss_gradient_pulls_same_tag_views_together():
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    tags = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    loss = awcl_loss(z, tags)
    loss.backward()
    with torch.no_grad():
        z2 = z - 0.05 * z.grad
    assert float(awcl_loss(z2, tags)) < float(loss.detach())


# --------------------------------------------------------------------------------- sampler


TAGS = ["a"] * 5 + ["b"] * 4 + ["c"] + [None] * 6
SCANS = ["s1", "s2", "s3", "s1", "s2", "s1", "s2", "s3", "s3", "s1"] + ["s1", "s2", "s3", "s1", "s2", "s3"]


def _draw(ratio: float, n_batches: int = 300, n: int = 12):
    s = AnatomyAwarePairSampler(TAGS, SCANS, ratio=ratio, granularity="fine")
    g = torch.Generator().manual_seed(3)
    out = [s.sample(n, g) for _ in range(n_batches)]
    return s, {k: torch.cat([b[k] for b in out]) for k in ("anchor", "partner", "kept", "tags")}


def test_sampler_ratio_zero_is_always_self():
    s, d = _draw(0.0)
    assert torch.equal(d["anchor"], d["partner"])
    assert (d["tags"] == -1).all() and not d["kept"].any()


def test_sampler_ratio_one_always_another_same_tag_image():
    s, d = _draw(1.0)
    tag_of = s.tag_ids
    a, p = d["anchor"], d["partner"]
    tagged = tag_of[a] >= 0
    peers = torch.tensor([tag_of[i] >= 0 and int((tag_of == tag_of[i]).sum()) > 1 for i in a.tolist()])
    assert (p[peers] != a[peers]).all()  # another image whenever the tag has one
    assert (tag_of[p] == tag_of[a]).all()  # never across tags
    assert torch.equal(p[~peers], a[~peers])  # untagged and the single "c": self view
    assert torch.equal(d["tags"][tagged], tag_of[a][tagged]) and (d["tags"][~tagged] == -1).all()
    # partners come from the same scan and from other scans
    same_scan = [SCANS[i] == SCANS[j] for i, j in zip(a[peers].tolist(), p[peers].tolist())]
    assert 0.1 < np.mean(same_scan) < 0.7
    # the partner is uniform over the other members: each of a's 4 peers about 1/4 of the time
    first_a = p[a == 0]
    counts = np.bincount(first_a.numpy(), minlength=5)[1:5]
    assert counts.min() > 0.12 * counts.sum()


def test_sampler_intermediate_ratio_statistics():
    s, d = _draw(0.3, n_batches=500)
    tag_of = s.tag_ids
    tagged = tag_of[d["anchor"]] >= 0
    frac = float(d["kept"][tagged].float().mean())
    n = int(tagged.sum())
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    # anchors without replacement inside a batch; all images get drawn about equally
    s2 = AnatomyAwarePairSampler(TAGS, SCANS, ratio=0.3)
    b = s2.sample(16, torch.Generator().manual_seed(0))
    assert sorted(b["anchor"].tolist()) == list(range(16))
    counts = np.bincount(d["anchor"].numpy(), minlength=16)
    assert counts.min() > 0.7 * counts.mean()


def test_sampler_deterministic_and_checks():
    s = AnatomyAwarePairSampler({"coarse": ["x", "x", "y"], "fine": ["p", "q", "r"]}, ["1", "1", "2"], 1.0, "coarse")
    b1, b2 = s.sample(3, torch.Generator().manual_seed(5)), s.sample(3, torch.Generator().manual_seed(5))
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert s.tag_names == ["x", "y"]
    with pytest.raises(InputError, match="anatomy ratio"):
        AnatomyAwarePairSampler(["a"], ["s"], ratio=1.5)
    with pytest.raises(InputError, match="granularity"):
        AnatomyAwarePairSampler(["a"], ["s"], ratio=0.5, granularity="medium")


# ----------------------------------------------------------------------- views and network


def test_augment_views_deterministic_and_in_range():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    v1 = augment_views(x, torch.Generator().manual_seed(1))
    v2 = augment_views(x, torch.Generator().manual_seed(1))
    v3 = augment_views(x, torch.Generator().manual_seed(2))
    assert v1.shape == x.shape and torch.equal(v1, v2) and not torch.equal(v1, v3)
    assert 0.0 <= float(v1.min()) and float(v1.max()) <= 1.0
    # the identity crop without jitter or flip returns the image
    same = augment_views(x, None, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)


def test_network_shapes():
    net = AWCLNet(backbone="resnet10", widen_factor=0.25, proj_hidden=64, proj_dim=32)
    x = torch.rand(3, 1, 48, 48)
    z, h = net(x), net.encode(x)
    assert z.shape == (3, 32) and h.shape == (3, 128) and net.feature_dim == 128
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    enc = awcl_resnet2d(**net.encoder_params)
    enc.load_state_dict(net.encoder.state_dict())
    enc.eval(), net.eval()
    torch.testing.assert_close(enc(x), net.encode(x))
    assert [m.shape[-1] for m in enc.feature_maps(x)] == [24, 12, 6, 3, 2]
    full = AWCLNet()
    assert full.feature_dim == 512 and full.projection[0].in_features == 512 and full.projection[2].out_features == 128
    with pytest.raises(InputError, match="backbone"):
        AWCLNet(backbone="vgg")
    # MONAI's ResNet puts BatchNorm in its blocks whatever its norm argument: ours swaps them all
    group = AWCLNet(backbone="resnet10", widen_factor=0.25, norm=["group", {"num_groups": 4}])
    kinds = {type(m).__name__ for m in group.modules()}
    assert "GroupNorm" in kinds and not any("BatchNorm" in k for k in kinds)


# ----------------------------------------------------------- training and downstream (real data)


@pytest.fixture(scope="module")
def slice_csv(tmp_path_factory):
    return write_slice_set(tmp_path_factory.mktemp("awcl_slices"), per_tag_per_scan=2, untagged_every=6)


@pytest.fixture(scope="module")
def slice_set(slice_csv):
    csv_path = slice_csv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_tagged_images(csv_path, size=(48, 48))


def test_tiny_training_loss_decreases_and_caches_encoder(slice_set, tmp_path):
    from AnatSSLLib.cache import EncoderCache
    from AnatSSLLib.engine import TrainingConfig, train

    task = AWCLTask(slice_set, ratio=0.8, granularity="fine", backbone="resnet10", widen_factor=0.25,
                    proj_hidden=64, proj_dim=32)  # fmt: skip
    batch = task.make_batch(0, torch.Generator().manual_seed(0), rank=0, world_size=1, batch_size=8)
    assert batch["view1"].shape == (8, 1, 48, 48) and batch["tags"].shape == (8,)
    cache = EncoderCache(tmp_path / "cache", bundled=())
    config = TrainingConfig(steps=20, batch_size=16, lr=1e-3, weight_decay=1e-6, device="cpu", seed=0,
                            checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=0, log_every=5)  # fmt: skip
    events = []
    result = train(task, config, cache=cache, progress=events.append, name="awcl-test")
    losses = [v for _, v in result.losses]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert events[-1]["event"] == "done"
    state, manifest = cache.load(result.encoder_id)
    assert manifest.method == "awcl" and manifest.architecture == "awcl_resnet2d"
    assert manifest.embedding_dim == 128 and manifest.extra["anatomy_ratio"] == 0.8
    assert not any(k.startswith("projection") for k in state)
    enc = awcl_resnet2d(**manifest.architecture_params)
    enc.load_state_dict(state)  # strict: the cached state is exactly the encoder

    from AnatSSLLib.tools.awcl_eval import load_awcl_encoder

    loaded = load_awcl_encoder(result.encoder_id, cache=cache)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in enc.parameters())


def test_linear_probe_above_chance_on_real_slices(slice_set):
    from AnatSSLLib.tools.awcl_eval import class_labels, extract_features, linear_probe, split_by_scan

    torch.manual_seed(0)
    enc = awcl_resnet2d(backbone="resnet10", in_channels=1, widen_factor=0.25)
    tr, te = split_by_scan(slice_set.scan_ids, 0.34, seed=0)
    assert not ({slice_set.scan_ids[i] for i in tr} & {slice_set.scan_ids[i] for i in te})
    rows, y, names = class_labels(slice_set, "coarse", label_column=None)
    assert names == ["axial", "coronal", "sagittal"]
    y_all = np.full(len(slice_set), -1)
    y_all[rows] = y
    tr, te = tr[y_all[tr] >= 0], te[y_all[te] >= 0]
    feats = extract_features(enc, slice_set.images)
    res = linear_probe(feats[tr], y_all[tr], feats[te], y_all[te], 3)
    assert res["accuracy"] > 0.6 and res["macro_f1"] > 0.5  # chance is 1/3
    assert res["train_accuracy"] == pytest.approx(1.0)


def test_finetune_and_segmentation_run(slice_set):
    from AnatSSLLib.tools.awcl_eval import class_labels, finetune_classifier, finetune_segmentation, split_by_scan

    torch.manual_seed(0)
    enc = awcl_resnet2d(backbone="resnet10", in_channels=1, widen_factor=0.25)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    tr, te = split_by_scan(slice_set.scan_ids, 0.34, seed=0)
    rows, y, names = class_labels(slice_set, "fine", label_column="true_fine_tag")
    assert len(rows) == len(slice_set) and len(names) == 7
    res = finetune_classifier(enc, slice_set, tr, te, np.asarray(y), len(names), steps=6, batch_size=8)
    assert 0.0 <= res["accuracy"] <= 1.0 and math.isfinite(res["final_train_loss"])
    seg = finetune_segmentation(enc, slice_set, tr, te, freeze=True, steps=40, batch_size=8, width=16, lr=3e-3)
    assert seg["num_classes"] == 3 and set(seg["dice"]) == {1, 2}
    assert seg["mean_dice"] > 0.3  # tissue classes of the T1 slices: far above an empty prediction
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # the given encoder is untouched
    with pytest.raises(InputError, match="at least two"):
        one = slice_set.subset([i for i, c in enumerate(slice_set.coarse) if c == "axial"])
        class_labels(one, "coarse")


def test_segmentation_flip_off_keeps_left_and_right_labels_apart():
    """Lateralised labels on images in one orientation: a mirror-symmetric pair of squares, the left
    one labelled 1 and the right one 2. Without flips the decoder tells them apart by position; with
    random left-right flips (image and labels flipped together) the same picture comes with both
    labellings, so neither label can be learnt well."""
    from AnatSSLLib.methods.awcl_data import TaggedImageSet
    from AnatSSLLib.tools.awcl_eval import finetune_segmentation

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, size = 24, 32
    images = rng.uniform(0, 0.1, (n, 1, size, size)).astype(np.float32)
    labels = np.zeros((n, size, size), np.int64)
    for i in range(n):
        r = 8 + i % 8
        images[i, 0, r : r + 8, 4:12] += 0.8
        labels[i, r : r + 8, 4:12] = 1  # "left"
        images[i, 0, r : r + 8, 20:28] += 0.8
        labels[i, r : r + 8, 20:28] = 2  # its mirror image, "right"
    data = TaggedImageSet(images, [f"s{i % 4}" for i in range(n)], ["a"] * n, ["a"] * n, labels=labels)
    dice = {}
    for flip in (False, True):
        torch.manual_seed(0)
        enc = awcl_resnet2d(backbone="resnet10", in_channels=1, widen_factor=0.125)
        res = finetune_segmentation(enc, data, np.arange(18), np.arange(18, 24), freeze=True, steps=40,
                                    batch_size=8, width=8, lr=3e-3, flip=flip, seed=0)  # fmt: skip
        assert res["flip"] is flip
        dice[flip] = min(res["dice"].values())
    assert dice[False] > 0.6 and dice[True] < 0.5, dice


# ------------------------------------------------------------------------ torchrun (2 x gloo)

DDP_COMMON = """
import json, sys
import numpy as np, torch
from AnatSSLLib.engine import TrainingConfig, train
from AnatSSLLib.methods.awcl import AWCLTask
from AnatSSLLib.methods.awcl_data import TaggedImageSet

def toy_task():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48] / 47.0
    imgs, tags = [], []
    for n in range(16):
        k = n % 4  # four "anatomies": blobs at four places
        cy, cx = [(0.3, 0.3), (0.3, 0.7), (0.7, 0.3), (0.7, 0.7)][k] + rng.normal(0, 0.03, 2)
        imgs.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02) + 0.05 * rng.random((48, 48)))
        tags.append(None if n % 5 == 4 else f"t{k}")
    data = TaggedImageSet(np.clip(np.stack(imgs)[:, None], 0, 1).astype(np.float32),
                          [f"s{n % 3}" for n in range(16)], tags, tags)
    return AWCLTask(data, ratio=0.7, backbone="resnet10", widen_factor=0.125, norm=["group", {"num_groups": 4}],
                    proj_hidden=32, proj_dim=16)

def toy_config():
    return TrainingConfig(steps=4, batch_size=8, lr=1e-3, device="cpu", seed=0, log_every=100)
"""

DDP_MAIN = """
if __name__ == "__main__":
    torch.set_num_threads(1)
    result = train(toy_task(), toy_config())
    import torch.distributed as dist
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        open(sys.argv[1], "w").write(json.dumps(result.losses))
"""


def test_two_gloo_processes_match_one_process(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "awcl_ddp.py"
    script.write_text(DDP_COMMON + DDP_MAIN)
    out = tmp_path / "losses.json"
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([*launcher, "--standalone", "--nproc_per_node=2", str(script), str(out)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = [v for _, v in json.loads(out.read_text())]
    ns: dict = {}
    exec(DDP_COMMON, ns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = [v for _, v in ns["train"](ns["toy_task"](), ns["toy_config"]()).losses]
    finally:
        torch.set_num_threads(threads)
    # gathered projections: the global batch's negatives and tag positives on every rank
    np.testing.assert_allclose(ddp, single, rtol=1e-4)


def test_eval_command_line(slice_csv, tmp_path, capsys):
    import argparse
    import json

    from AnatSSLLib.tools.awcl_eval import add_eval_arguments

    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    out = tmp_path / "res" / "eval.json"
    args = parser.parse_args(["--csv", str(slice_csv), "--encoder", "random", "--backbone", "resnet10",
                              "--task", "probe", "--granularity", "coarse", "--size", "48",
                              "--test-fraction", "0.34", "--out", str(out)])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.run(args) == 0
    res = json.loads(out.read_text())
    assert res == json.loads(capsys.readouterr().out)
    assert res["classes"] == ["axial", "coronal", "sagittal"] and res["n_test_scans"] == 1
    assert 0.0 <= res["probe"]["accuracy"] <= 1.0 and "macro_f1" in res["probe"]
    assert args.no_flip is False  # segmentation flips by default; --no-flip turns them off
    assert parser.parse_args(["--csv", "x.csv", "--encoder", "random", "--no-flip"]).no_flip is True
