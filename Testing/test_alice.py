"""Known-answer tests of Alice (AnatSSLLib/methods/alice.py, AnatSSLLib/networks/alice_net.py).

METHODS.md 4.7 KAT: DINO CE with uniform outputs = log(#prototypes); CAFA with uniform attention
= mean of the values (before residual and LN); masked blocks = ceil(0.75 x blocks); EMA with m = 1
leaves the teacher fixed. Plus shapes, masking, view mining with a known shift, SwinUNETR weight
transfer, and 20 real training steps on crops of the 2009c T1w template.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from AnatSSLLib.errors import InputError
from AnatSSLLib.methods.alice import (
    CAFA,
    AliceLoss,
    AliceTask,
    DINOHead,
    block_mask,
    block_masks,
    crop_at,
    dino_loss,
    ema_update,
    mine_views,
    momentum_schedule,
    reconstruction_loss,
    reference_optimisation,
    teacher_temperature,
    update_centre,
)
from AnatSSLLib.networks.alice_net import (
    AliceNet,
    init_swinunetr_from_encoder,
    make_swinunetr,
    swinunetr_state_from_alice,
)

TINY_NET = {"img_size": 32, "feature_size": 12}


@pytest.fixture(scope="module")
def tiny_net() -> AliceNet:
    torch.manual_seed(0)
    return AliceNet(**TINY_NET).eval()


# ------------------------------------------------------------------------------------------ masks


@pytest.mark.parametrize(
    "shape, block, ratio, columns, n_units, n_masked",
    [
        ((32, 32, 32), 8, 0.75, True, 16, 12),  # 4 x 4 in-plane squares, ceil(12) = 12
        ((24, 24, 24), 8, 0.5, True, 9, 5),  # 3 x 3 squares, ceil(4.5) = 5
        ((32, 32, 32), 8, 0.75, False, 64, 48),  # 4^3 cubes
        ((16, 32, 32), 16, 0.6, True, 4, 3),  # 2 x 2 squares, ceil(2.4) = 3
    ],
)
def test_block_mask_counts(shape, block, ratio, columns, n_units, n_masked):
    m = block_mask(shape, block, ratio, torch.Generator().manual_seed(1), columns=columns)
    assert m.shape == shape and m.dtype == torch.bool
    unit_voxels = (block * block * shape[0]) if columns else block**3
    assert int(m.sum()) == n_masked * unit_voxels
    if columns:  # every column is all-masked or all-clear along axis 0
        assert bool((m == m[:1]).all())
        squares = m[0].reshape(shape[1] // block, block, shape[2] // block, block)
        assert bool((squares == squares[:, :1, :, :1]).all())
    assert n_masked == math.ceil(ratio * n_units)


def test_block_mask_reproducible_and_validated():
    a = block_masks(3, (32, 32, 32), 8, 0.75, torch.Generator().manual_seed(5))
    b = block_masks(3, (32, 32, 32), 8, 0.75, torch.Generator().manual_seed(5))
    assert a.shape == (3, 1, 32, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # independent draws per item
    with pytest.raises(InputError, match="divisible"):
        block_mask((30, 32, 32), 8)


# ----------------------------------------------------------------------------------- DINO terms


def test_dino_loss_uniform_student_is_log_k():
    k = 128
    teacher = torch.randn(5, 7, k)
    student = torch.zeros(5, 7, k)
    loss = dino_loss(student, teacher, torch.randn(1, 1, k), tau_s=0.1, tau_t=0.01)
    assert float(loss) == pytest.approx(math.log(k), rel=1e-6)


def test_dino_loss_hand_computed():
    # K = 2. Teacher (t - c)/tau_t = ([1, 0] - [0.5, 0]) / 0.5 = [1, 0]; P_t = softmax([1, 0]).
    # Student s/tau_s = [0, 1] / 1 -> log P_s = [-log(1+e), 1 - log(1+e)].
    t = torch.tensor([[1.0, 0.0]])
    s = torch.tensor([[0.0, 1.0]])
    c = torch.tensor([[0.5, 0.0]])
    pt = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    lps = np.array([0.0, 1.0]) - np.log(1 + np.e)
    expected = -(pt * lps).sum()
    assert float(dino_loss(s, t, c, tau_s=1.0, tau_t=0.5)) == pytest.approx(expected, rel=1e-6)


def test_update_centre_ema_without_process_group():
    c = torch.zeros(1, 3)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # mean [2, 2, 2]
    new = update_centre(c, t, m=0.9)
    assert new.shape == (1, 3)
    assert torch.allclose(new, torch.full((1, 3), 0.2))
    patch = update_centre(torch.ones(1, 1, 2), torch.zeros(4, 5, 2), m=0.9)  # tokens and rows
    assert patch.shape == (1, 1, 2) and torch.allclose(patch, torch.full((1, 1, 2), 0.9))


def test_dino_head_cosine_prototypes():
    torch.manual_seed(0)
    head = DINOHead(24, hidden=32, bottleneck=16, out_dim=10)
    out = head(torch.randn(6, 24) * 50)
    assert out.shape == (6, 10)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(10), atol=1e-6)  # g fixed to 1
    assert not head.last_layer.g.requires_grad
    assert float(out.detach().abs().max()) <= 1.0 + 1e-6  # cosine of unit bottleneck and unit prototypes


# ------------------------------------------------------------------------------------------ CAFA


def test_cafa_uniform_attention_is_mean_of_values():
    torch.manual_seed(0)
    dim = 8
    cafa = CAFA(dim, heads=2, dim_head=4, dropout=0.0)
    with torch.no_grad():
        cafa.w_q.weight.zero_()  # all scores 0 -> uniform attention
        cafa.w_v.weight.copy_(torch.eye(dim))
        cafa.w_o.weight.copy_(torch.eye(dim))
    q, kv = torch.randn(3, 5, dim), torch.randn(3, 11, dim)
    o, a = cafa.attention(q, kv)
    assert a.shape == (3, 2, 5, 11)
    assert torch.allclose(a, torch.full_like(a, 1 / 11))
    assert torch.allclose(o, kv.mean(dim=1, keepdim=True).expand(3, 5, dim), atol=1e-6)
    y = cafa(q, kv)  # residual + LN, FFN + LN: zero mean, unit variance per token
    assert y.shape == (3, 5, dim)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3)


def test_cafa_attends_to_matching_key():
    # One head, identity projections, large query: attention picks the key equal to the query.
    dim = 4
    cafa = CAFA(dim, heads=1, dim_head=dim, dropout=0.0)
    with torch.no_grad():
        for lin in (cafa.w_q, cafa.w_k, cafa.w_v, cafa.w_o):
            lin.weight.copy_(torch.eye(dim))
    kv = 20 * torch.eye(dim).unsqueeze(0)  # 4 orthogonal keys
    q = kv[:, 2:3]
    o, a = cafa.attention(q, kv)
    assert float(a.detach()[0, 0, 0, 2]) > 0.999
    assert torch.allclose(o, kv[:, 2:3], atol=1e-2)


# ---------------------------------------------------------------------------- reconstruction, EMA


def test_reconstruction_loss_all_and_masked():
    target = torch.zeros(2, 1, 4, 4, 4)
    pred = torch.zeros_like(target)
    mask = torch.zeros_like(target)
    mask[:, :, :2] = 1  # half the voxels masked
    pred[:, :, :2] = 2.0  # error 2 on the masked half only
    assert float(reconstruction_loss(pred, target)) == pytest.approx(4.0 / 2)  # mean over all
    assert float(reconstruction_loss(pred, target, mask, "masked")) == pytest.approx(4.0)
    with pytest.raises(InputError):
        reconstruction_loss(pred, target, None, "masked")


def test_ema_update_known_answers():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    assert ema_update(teacher, student, 1.0) == 2
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), t0))
    ema_update(teacher, student, 0.5)
    assert all(torch.allclose(p, (a + s) / 2) for p, a, s in zip(teacher.parameters(), t0, student.parameters()))
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(p, s) for p, s in zip(teacher.parameters(), student.parameters()))


def test_schedules():
    assert momentum_schedule(0, 100) == pytest.approx(0.996)
    assert momentum_schedule(50, 100) == pytest.approx(0.998)
    assert momentum_schedule(100, 100) == pytest.approx(1.0)
    assert teacher_temperature(0, 30) == pytest.approx(0.008)
    assert teacher_temperature(15, 30) == pytest.approx(0.009)
    assert teacher_temperature(30, 30) == pytest.approx(0.01)
    assert teacher_temperature(99, 30) == pytest.approx(0.01)


def test_reference_optimisation_makes_a_valid_training_config():
    """The code's recipe: AdamW, weight decay 0.04, 5 % warm-up (at least a step), cosine, clip 3."""
    from AnatSSLLib.engine import TrainingConfig, lr_factor

    assert reference_optimisation(1200) == {"optimizer": "adamw", "weight_decay": 0.04, "schedule": "cosine",
                                            "grad_clip": 3.0, "warmup_steps": 60}  # fmt: skip
    assert reference_optimisation(3)["warmup_steps"] == 1
    config = TrainingConfig(steps=1200, lr=1e-3, **reference_optimisation(1200))
    assert lr_factor(0, config) == pytest.approx(1 / 60) and lr_factor(59, config) == pytest.approx(1.0)
    assert lr_factor(1199, config) == pytest.approx(0.0, abs=1e-9)  # cosine to 0 at the last step


# ------------------------------------------------------------------------------------- AliceLoss


def test_alice_loss_uniform_student_and_weights():
    k, b, n = 16, 2, 5
    loss = AliceLoss(k).train()
    s_cls, t_cls = torch.zeros(2 * b, k), torch.randn(2 * b, k)
    s_patch, t_patch = torch.zeros(2 * b, n, k), torch.randn(2 * b, n, k)
    images = torch.zeros(2 * b, 1, 4, 4, 4)
    rec = torch.ones_like(images)  # MSE 1 -> L_rec = 1/2
    terms = loss(s_cls, t_cls, s_patch, t_patch, rec, images, None, tau_t=0.01)
    assert float(terms["cls"]) == pytest.approx(math.log(k), rel=1e-6)
    assert float(terms["patch"]) == pytest.approx(math.log(k), rel=1e-6)
    assert float(terms["rec"]) == pytest.approx(0.5)
    assert float(terms["loss"]) == pytest.approx(2 * math.log(k) + 10 * 0.5, rel=1e-6)
    # centres moved to 0.1 x the teacher means
    assert torch.allclose(loss.centre_cls, 0.1 * t_cls.mean(0, keepdim=True), atol=1e-6)
    no_gen = AliceLoss(k, use_generative=False)
    assert float(no_gen(s_cls, t_cls, s_patch, t_patch, rec, images, None, 0.01)["loss"]) == pytest.approx(
        2 * math.log(k), rel=1e-6
    )


def test_alice_loss_cross_view_pairing():
    # cls loss pairs the teacher's Q with the student's K: a student matching the teacher's
    # *other* view scores lower than one matching its own view.
    k = 4
    t = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])  # Q -> prototype 0, K -> prototype 1
    swapped = torch.tensor([[0, 10.0, 0, 0], [10.0, 0, 0, 0]])
    z = torch.zeros(2, 1, k)
    img = torch.zeros(2, 1, 2, 2, 2)
    loss = AliceLoss(k).eval()
    good = loss(swapped, t, z, z, img, img, None, 0.01)["cls"]
    bad = loss(t, t, z, z, img, img, None, 0.01)["cls"]
    assert float(good) < 1e-3 < float(bad)


# --------------------------------------------------------------------------------------- network


def test_alice_net_shapes_and_embed(tiny_net):
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = tiny_net(x)
        e = tiny_net.embed(torch.rand(1, 1, 30, 31, 32))
    assert out.cls.shape == (2, 192)  # 16 * fs
    assert out.enc_tokens.shape == (2, 8, 96)  # (32/16)^3 tokens of 8 * fs
    assert out.dec_tokens.shape == (2, 64, 48)  # (32/8)^3 tokens of 4 * fs
    assert out.reconstruction.shape == (2, 1, 32, 32, 32)
    assert e.shape == (1, 32, 30, 31, 32)
    assert torch.allclose(e.norm(dim=1), torch.ones(1, 30, 31, 32), atol=1e-5)
    with pytest.raises(InputError, match="multiple of 32"):
        tiny_net(torch.rand(1, 1, 32, 32, 30))


def test_masked_voxels_do_not_reach_the_network(tiny_net):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 32, 32, 32, generator=g)
    mask = block_masks(1, (32, 32, 32), 8, 0.75, g)
    x2 = torch.where(mask.bool(), torch.rand(x.shape, generator=g), x)  # differs only where masked
    with torch.no_grad():
        a, b, clean = tiny_net(x, mask), tiny_net(x2, mask), tiny_net(x)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-6)
    assert not torch.allclose(a.cls, clean.cls, atol=1e-4)  # the mask does change the output
    # the mask token replaces masked patch tokens: changing it changes the masked output only
    net2 = AliceNet(**TINY_NET).eval()
    net2.load_state_dict(tiny_net.state_dict())
    with torch.no_grad():
        net2.mask_token.add_(1.0)
        assert not torch.allclose(net2(x, mask).cls, a.cls, atol=1e-5)
        assert torch.allclose(net2(x).cls, clean.cls, atol=1e-6)


def test_swinunetr_weight_transfer(tiny_net):
    seg = make_swinunetr(tiny_net.config(), out_channels=3)
    x = torch.rand(1, 1, 32, 32, 32)
    seg.eval()
    with torch.no_grad():
        before = seg(x)
    loaded = init_swinunetr_from_encoder(seg, tiny_net.state_dict())
    own = seg.state_dict()
    assert set(own) - set(loaded) == {k for k in own if k.startswith("out.")}
    for key in loaded:
        assert torch.equal(own[key], tiny_net.state_dict()["unetr." + key])
    with torch.no_grad():
        after = seg(x)
    assert after.shape == (1, 3, 32, 32, 32) and not torch.allclose(before, after)
    # an AliceModel state works too (teacher by default), and a mismatched network is refused
    state = {f"teacher.{k}": v for k, v in tiny_net.state_dict().items()}
    assert set(swinunetr_state_from_alice(state)) == set(loaded)
    wrong = make_swinunetr({**tiny_net.config(), "feature_size": 24}, out_channels=3)
    with pytest.raises(InputError, match="make_swinunetr"):
        init_swinunetr_from_encoder(wrong, tiny_net.state_dict())


# ---------------------------------------------------------------------------------- view mining


def _blob_volume(shape=(64, 72, 64), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, np.float32)
    v[8:-8, 8:-8, 8:-8] = rng.random((shape[0] - 16, shape[1] - 16, shape[2] - 16)).astype(np.float32) + 0.1
    return v


def test_mine_views_cross_volume_known_shift():
    a = _blob_volume()
    shift = np.array([3, -5, 4])
    b = np.zeros_like(a)
    b[3:, :-5, 4:] = a[:-3, 5:, :-4]  # B[x] = A[x - shift]
    calls = []

    def matcher(p):  # a poor answer for the first 3 tries, then the true point
        calls.append(p)
        return p + shift, (0.5 if len(calls) <= 3 else 0.95)

    views = mine_views(a, b, 16, matcher, np.random.default_rng(0), min_score=0.7)
    assert views.mode == "cross" and views.accepted and views.tries == 4
    assert np.array_equal(views.centre_k - views.centre_q, shift)
    assert a[tuple(views.centre_q.astype(int))] > 0
    assert np.array_equal(views.q, views.k)  # same anatomy, voxel for voxel (A's border is empty)
    # never above the threshold: the best try comes back, flagged
    never = mine_views(a, b, 16, lambda p: (p, 0.1), np.random.default_rng(0), retries=5)
    assert not never.accepted and never.tries == 5 and never.score == pytest.approx(0.1)
    with pytest.raises(InputError, match="matcher"):
        mine_views(a, b, 16, None)


def test_mine_views_same_volume_offset():
    a = _blob_volume()
    views = mine_views(a, None, 16, rng=np.random.default_rng(1), augment=False)
    off = views.offset.astype(int)
    assert views.mode == "same" and np.all(np.abs(off) <= 4)
    assert np.array_equal(views.q, crop_at(a, views.centre_q, 16))
    assert np.array_equal(views.k, crop_at(a, views.centre_k, 16))
    # overlap: q[x + off] == k[x]
    lo, hi = np.maximum(0, -off), np.minimum(16, 16 - off)
    kk = views.k[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    qq = views.q[lo[0] + off[0]:hi[0] + off[0], lo[1] + off[1]:hi[1] + off[1], lo[2] + off[2]:hi[2] + off[2]]
    assert kk.size > 0 and np.array_equal(qq, kk)
    aug = mine_views(a, None, 16, rng=np.random.default_rng(1))  # same draw, augmented
    assert not np.allclose(aug.q, views.q)


def test_task_batches_are_reproducible_and_sharded():
    vols = [_blob_volume(seed=0), _blob_volume(seed=1)]
    task = AliceTask(vols, steps=10, crop=32, matcher=lambda a, b, p: (p, 0.9))
    g = lambda: torch.Generator().manual_seed(123)  # noqa: E731
    full = task.make_batch(4, g(), batch_size=4)
    again = task.make_batch(4, g(), batch_size=4)
    half = task.make_batch(4, g(), rank=1, world_size=2, batch_size=4)
    assert full["q"].shape == (4, 1, 32, 32, 32) and full["mask_q"].shape == (4, 1, 32, 32, 32)
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert all(torch.equal(full[k][2:], half[k]) for k in full)
    assert not torch.equal(full["centre_q"][0], full["centre_q"][1])  # per-item crop coordinates
    assert float(full["mask_q"].mean()) == pytest.approx(0.75)


# ------------------------------------------------------------------------------- model and training


def test_alice_model_ema_catch_up_and_freeze():
    vol = _blob_volume()
    task = AliceTask([vol], steps=4, crop=32, freeze_last_layer_steps=1, head_hidden=32, head_bottleneck=16,
                     out_dim=16)
    torch.manual_seed(0)
    model = task.build_model()
    for p_t, p_s in zip(model.teacher.parameters(), model.student.parameters()):
        assert torch.equal(p_t, p_s) and not p_t.requires_grad
    assert torch.equal(model.teacher_head.dino.last_layer.v, model.student_head.dino.last_layer.v)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    proto0 = [p.detach().clone() for p in model.prototype_parameters()]
    batch = task.make_batch(0, torch.Generator().manual_seed(0), batch_size=1)
    loss, metrics = task.loss(model, batch)
    assert set(metrics) >= {"cls", "patch", "rec"} and math.isfinite(float(loss.detach()))
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(proto0, model.prototype_parameters()))  # frozen at step 0
    assert int(model.loss_calls) == 1 and int(model.ema_updates) == 0
    s0 = model.student.unetr.encoder1.layer.conv1.conv.weight
    t_before = model.teacher.unetr.encoder1.layer.conv1.conv.weight.detach().clone()
    task.after_step(model, 1)  # the post-step hook = the catch-up at the next loss call
    m = task.momentum(0)
    t_after = model.teacher.unetr.encoder1.layer.conv1.conv.weight
    assert torch.allclose(t_after, m * t_before + (1 - m) * s0.detach(), atol=1e-7)
    assert int(model.ema_updates) == 1
    task.loss(model, batch)  # nothing more due: no second update
    assert int(model.ema_updates) == 1


def _t1w_2mm() -> np.ndarray:
    from AnatSSLLib.data.packages import autoafids_resources
    from AnatSSLLib.image import read_image

    try:
        res = autoafids_resources()
    except InputError as exc:
        pytest.skip(str(exc))
    image = read_image(res / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz")
    arr = image.array.astype(np.float32)[::2, ::2, ::2]  # [k, j, i]
    hi = float(np.percentile(arr[arr > 0], 99.5))
    return np.clip(arr / hi, 0.0, 1.0)


def test_tiny_training_on_real_t1w_loss_goes_down():
    # 8 engine steps (about 5 s each on 2 CPU cores), crops 32^3 of the real 2009c T1w at 2 mm,
    # SwinUNETR fs 12, batch 1. The reconstruction term falls steadily; the DINO terms (teacher
    # temperature 0.01) are noisy at batch 1, so the total is checked only to be finite and the
    # generative term (weight 10 in the total) to fall.
    from AnatSSLLib.engine import TrainingConfig, train

    vol = _t1w_2mm()
    assert vol.shape == (97, 115, 97)
    task = AliceTask([vol], steps=8, crop=32, body_threshold=0.1)
    config = TrainingConfig(steps=8, batch_size=1, lr=1e-3, optimizer="adamw", device="cpu", seed=0,
                            checkpoint_every=0, checkpoint_dir=None, log_every=1)
    events = []
    result = train(task, config, progress=events.append)
    losses = [v for _, v in result.losses]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    rec = [e["metrics"]["rec"] for e in events if e["event"] == "progress"]
    assert len(rec) == 8
    assert np.mean(rec[-3:]) < 0.7 * np.mean(rec[:3])
    assert any(e["event"] == "done" for e in events)
    assert {"cls", "patch", "rec", "tau_t", "momentum"} <= set(result.metrics)
    fields = task.manifest_fields()
    assert fields["architecture"] == "alice_swin3d" and fields["embedding_dim"] == 32


def _centre_worker(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        teacher = torch.full((2, 3), float(rank))  # rank 0: zeros, rank 1: ones -> global mean 0.5
        new = update_centre(torch.zeros(1, 3), teacher, m=0.5)
        if rank == 0:
            torch.save(new, out_file)
    finally:
        dist.destroy_process_group()


def test_update_centre_all_reduces_under_a_process_group(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "centre.pt"
    mp.start_processes(_centre_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True,
                       start_method="fork")
    assert torch.allclose(torch.load(out), torch.full((1, 3), 0.25))


def test_export_state_loads_into_registry_net():
    from AnatSSLLib.networks.alice_net import build_alice_net

    task = AliceTask([_blob_volume()], steps=3, crop=32, head_hidden=32, head_bottleneck=16, out_dim=16)
    model = task.build_model()
    model.loss_calls += 2  # two optimizer steps taken, no EMA applied yet
    state = task.export_state(model)
    assert int(model.ema_updates) == 2
    net = build_alice_net(**task.manifest_fields()["architecture_params"])
    net.load_state_dict(state)  # strict: every key matches
    assert torch.equal(net.mask_token, model.teacher.mask_token)
