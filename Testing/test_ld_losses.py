"""Known-answer tests of LD's loss terms, patch pooling and views (AnatSSLLib/methods/ld.py).

Each case is built by hand and its answer worked out in the test (METHODS.md 2.8 KAT).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from AnatSSLLib.errors import InputError
from AnatSSLLib.methods.ld import (
    LDLoss,
    LDViews,
    apply_flip_rot90,
    area_balance_loss,
    average_patches,
    centre_weighted_patches,
    cluster_centres,
    dense_correspondence_loss,
    entropy_loss,
    gaussian_pool_at,
    gaussian_smooth_embedding,
    make_ld_batch,
    mixup_loss,
    overlap_patch_pairs,
    patch_discrimination_loss,
    pixel_region_loss,
    region_discrimination_loss,
    region_embeddings,
    undo_flip_rot90,
    unwarp_features,
)

TAU = 0.1
TAU_R = 0.2


def _eye(n: int, d: int | None = None) -> torch.Tensor:
    return torch.eye(n, d or n, dtype=torch.float64)


# --------------------------------------------------------------------------------- PD criterion


def test_pd_loss_orthogonal_embeddings():
    # 4 mutually orthogonal unit vectors, pairs (0,2), (1,3): every off-diagonal dot is 0, so
    # P(k|i) = 1/3 for each of the 3 other rows; L = -[log(1/3) + 2 log(1 - 1/3)].
    f = _eye(4)
    pair = torch.tensor([2, 3, 0, 1])
    expected = math.log(3) - 2 * math.log(2 / 3)
    assert patch_discrimination_loss(f, pair, TAU).item() == pytest.approx(expected, abs=1e-9)


def test_pd_loss_identical_pairs_orthogonal_negatives():
    # f = [e1, e2, e1, e2], pairs (0,2), (1,3): positive dot 1, the two negatives dot 0.
    # P(pos|i) = e^{10} / (e^{10} + 2), P(neg|i) = 1 / (e^{10} + 2).
    f = torch.stack([_eye(2)[0], _eye(2)[1], _eye(2)[0], _eye(2)[1]])
    pair = torch.tensor([2, 3, 0, 1])
    z = math.exp(1 / TAU) + 2
    expected = -(math.log(math.exp(1 / TAU) / z) + 2 * math.log(1 - 1 / z))
    assert patch_discrimination_loss(f, pair, TAU).item() == pytest.approx(expected, rel=1e-9)
    # the aligned case is better than the orthogonal one
    assert expected < math.log(3) - 2 * math.log(2 / 3)


def test_pd_loss_gradient_and_bad_pairs():
    f = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1).requires_grad_()
    pair = torch.tensor([3, 4, 5, 0, 1, 2])
    patch_discrimination_loss(f, pair, TAU, detach_keys=False).backward()
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    with pytest.raises(InputError):
        patch_discrimination_loss(f.detach(), torch.tensor([0, 4, 5, 0, 1, 2]), TAU)  # i paired with itself


def test_mixup_loss_lam_one_equals_pd_against_a():
    g = torch.Generator().manual_seed(1)
    f_mix, f_a, f_b = (torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1) for _ in range(3))
    pair = torch.tensor([5, 6, 7, 8, 9, 0, 1, 2, 3, 4])
    expected = patch_discrimination_loss(torch.cat([f_mix, f_a]), pair, TAU)
    assert mixup_loss(f_mix, f_a, f_b, 1.0, TAU).item() == pytest.approx(expected.item(), rel=1e-9)  # 1e-10 in the normalisation
    # lam = 0 pairs with B; per-patch lam tensors work too
    expected_b = patch_discrimination_loss(torch.cat([f_mix, f_b]), pair, TAU)
    assert mixup_loss(f_mix, f_a, f_b, torch.zeros(5, dtype=torch.float64), TAU).item() == pytest.approx(expected_b.item(), rel=1e-9)


def test_mixup_target_is_detached():
    f_mix = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    f_a = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1).requires_grad_()
    f_b = torch.nn.functional.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1).requires_grad_()
    loss = mixup_loss(f_mix.requires_grad_(), f_a, f_b, 0.5, TAU)
    loss.backward()
    assert f_a.grad is None and f_b.grad is None and f_mix.grad.abs().sum() > 0


# --------------------------------------------------------------------------- region terms


def test_region_discrimination_log_k_when_r_orthogonal_to_c():
    # D = 4, K = 2: centres e1, e2; every region embedding in span(e3, e4) -> all logits 0,
    # softmax over K is uniform, L_RD = log K exactly (whatever tau_r).
    c = _eye(4)[:2]
    r = torch.nn.functional.normalize(torch.tensor([[[0, 0, 1, 2], [0, 0, 3, -1]], [[0, 0, -1, 1], [0, 0, 0, 1]], [[0, 0, 1, 0], [0, 0, 5, 5]]], dtype=torch.float64), dim=2)
    assert region_discrimination_loss(r, c, TAU_R).item() == pytest.approx(math.log(2), abs=1e-12)
    k8 = _eye(16)[:8]
    r8 = _eye(16)[8:].unsqueeze(0).repeat(2, 1, 1)  # 2 images, K = 8 regions, all orthogonal to c
    assert region_discrimination_loss(r8, k8, TAU_R).item() == pytest.approx(math.log(8), abs=1e-12)


def test_region_discrimination_perfect_clusters():
    # r_{n,k} = c_k, centres orthonormal: P(k) = e^{1/tau} / (e^{1/tau} + (K-1)).
    k = 4
    c = _eye(k)
    r = c.unsqueeze(0).repeat(3, 1, 1)
    expected = math.log(1 + (k - 1) * math.exp(-1 / TAU_R))
    assert region_discrimination_loss(r, c, TAU_R).item() == pytest.approx(expected, rel=1e-10)
    assert torch.allclose(cluster_centres(r), c)


def test_cluster_centres_normalised_mean():
    r = torch.stack([_eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)])
    s = 1 / math.sqrt(2)
    assert torch.allclose(cluster_centres(r), torch.tensor([[s, s], [s, s]], dtype=torch.float64))


def test_region_embeddings_hard_assignment():
    # 1 image 2x3, D = 2, K = 2: left column region 0, the rest region 1.
    e = torch.tensor([[[1.0, 0.0, 0.0], [0.6, 0.0, 1.0]], [[0.0, 1.0, 1.0], [0.8, 1.0, 0.0]]], dtype=torch.float64).unsqueeze(0)
    e = e / e.norm(dim=1, keepdim=True)
    a = torch.zeros(1, 2, 2, 3, dtype=torch.float64)
    a[0, 0, :, 0] = 1
    a[0, 1, :, 1:] = 1
    r = region_embeddings(e, a)
    # region 0 pixels: (1, 0), (0.6, 0.8) -> mean (0.8, 0.4) -> normalised (2, 1)/sqrt(5)
    assert torch.allclose(r[0, 0], torch.tensor([2.0, 1.0], dtype=torch.float64) / math.sqrt(5))
    # region 1 pixels: (0,1), (0,1), (0,1), (1,0) -> mean (0.25, 0.75) -> (1, 3)/sqrt(10)
    assert torch.allclose(r[0, 1], torch.tensor([1.0, 3.0], dtype=torch.float64) / math.sqrt(10))


def test_entropy_one_hot_zero_uniform_half_one_bit():
    one_hot = torch.zeros(2, 4, 3, 3)
    one_hot[:, 1] = 1
    assert entropy_loss(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.full((2, 2, 4, 4, 4), 0.5)
    assert entropy_loss(half).item() == pytest.approx(1.0, abs=1e-7)
    # a = 1/4: H = -(1/4 log2 1/4 + 3/4 log2 3/4) = 2 - (3/4) log2 3
    q = torch.full((1, 4, 2, 2), 0.25, dtype=torch.float64)
    assert entropy_loss(q).item() == pytest.approx(2 - 0.75 * math.log2(3), rel=1e-12)


def test_entropy_gradient_is_finite_at_one_hot_voxels():
    # float32 assignments reach exactly 0 and 1 at confident voxels; the gradient must stay finite
    a = torch.tensor([[[1.0, 0.5]], [[0.0, 0.5]]], dtype=torch.float32).unsqueeze(0).requires_grad_(True)  # 1, K=2, 1, 2
    loss = entropy_loss(a)
    loss.backward()
    assert torch.isfinite(a.grad).all()
    assert loss.item() == pytest.approx(0.5, abs=1e-6)  # voxel 1 one-hot (0 bits), voxel 2 half (1 bit)


def test_area_balance_loss():
    uniform = torch.full((2, 4, 4, 4), 0.25)
    assert area_balance_loss(uniform).item() == pytest.approx(0.0, abs=1e-12)
    # all mass in cluster 0 (K = 2): areas (1, 0), target 1/2 -> ((1/2)^2 + (1/2)^2) / 2 = 1/4
    a = torch.zeros(1, 2, 3, 3)
    a[:, 0] = 1
    assert area_balance_loss(a).item() == pytest.approx(0.25)


def test_pixel_region_loss_log_k_when_orthogonal():
    e = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    e[:, 3] = 1  # every pixel e4
    r = _eye(4)[:3].unsqueeze(0)  # K = 3 regions e1..e3, orthogonal to every pixel
    a = torch.softmax(torch.randn(1, 3, 2, 2, dtype=torch.float64), dim=1)
    assert pixel_region_loss(e, a, r, TAU_R).item() == pytest.approx(math.log(3), abs=1e-12)


# --------------------------------------------------------------------------- pooling


def test_wc_averaging_constant_field_returns_it():
    v = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64) / 5
    e2 = v.view(1, 3, 1, 1).expand(2, 3, 32, 32).contiguous()
    p = centre_weighted_patches(e2, grid=4)
    assert p.shape == (2, 16, 3) and torch.allclose(p, v.expand(2, 16, 3))
    assert torch.allclose(average_patches(e2, 4), v.expand(2, 16, 3))
    assert torch.allclose(gaussian_smooth_embedding(e2, 3.0), e2)  # borders included
    e3 = v.view(1, 3, 1, 1, 1).expand(1, 3, 16, 16, 16).contiguous()
    assert torch.allclose(centre_weighted_patches(e3, grid=2, sigma=5.0), v.expand(1, 8, 3))
    assert torch.allclose(gaussian_smooth_embedding(e3, (1.0, 2.0, 6.0)), e3)
    corner = gaussian_pool_at(e3, torch.tensor([[0.0, 0.0, 0.0], [15.0, 2.5, 7.2]]), 4.0)
    assert torch.allclose(corner, v.expand(1, 2, 3))


def test_wc_is_centre_sensitive_and_matches_smoothing():
    # a field equal to e1 in one voxel column and e2 elsewhere: the patch whose centre is near
    # it weights it more than uniform pooling does.
    e = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    e[:, 1] = 1
    e[0, :, 3:5, 3:5] = torch.tensor([1.0, 0.0], dtype=torch.float64).view(2, 1, 1)  # at patch (0,0)'s centre 3.5
    wc = centre_weighted_patches(e, grid=2)  # sigma = 8/4 = 2
    avg = average_patches(e, grid=2)
    assert wc[0, 0, 0] > avg[0, 0, 0] > 0 and wc[0, 1, 0] < 1e-3
    # the grid pooling is gaussian_pool_at at the patch centres (8/2 - 0.5 + 8 * g)
    centres = torch.tensor([[3.5, 3.5], [3.5, 11.5], [11.5, 3.5], [11.5, 11.5]])
    assert torch.allclose(wc, gaussian_pool_at(e, centres, 2.0), atol=1e-12)
    # smoothing at integer voxels equals pooling at those points (same truncated kernel)
    s = gaussian_smooth_embedding(e, 1.5)
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [15.0, 7.0]])
    pooled = gaussian_pool_at(e, pts, 1.5)
    for n, (i, j) in enumerate(pts.long().tolist()):
        assert torch.allclose(pooled[0, n], s[0, :, i, j], atol=1e-12)


# --------------------------------------------------------------------------- views


@pytest.mark.parametrize("d", [2, 3])
def test_undo_flip_rot90_restores_patch_correspondence(d):
    g = torch.Generator().manual_seed(d)
    shape = (8,) * d
    combos = list(itertools.product(*[(False, True)] * d, range(4)))
    n = len(combos)
    x = torch.randn(n, 3, *shape, generator=g, dtype=torch.float64)
    flips = torch.tensor([c[:d] for c in combos])
    k = torch.tensor([c[d] for c in combos])
    y = apply_flip_rot90(x, flips, k)
    assert torch.equal(undo_flip_rot90(y, flips, k), x)  # exact on the full map
    grid = 4
    for pool in (average_patches, centre_weighted_patches):
        want = pool(x, grid)  # patches of the untransformed map, row-major grid
        got = pool(y, grid)   # patches of the transformed view ...
        got = got.transpose(1, 2).reshape(n, 3, *(grid,) * d)
        got = undo_flip_rot90(got, flips, k).reshape(n, 3, -1).transpose(1, 2)  # ... un-done on the grid
        assert torch.allclose(got, want, atol=1e-12)
    # and a non-trivial transform really moves cells
    assert not torch.allclose(average_patches(y, grid)[1:], average_patches(x, grid)[1:])


def test_make_ld_batch_identity_settings_give_exact_views():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g)
    v = make_ld_batch(
        x, torch.Generator().manual_seed(3), rotate_deg=(0.0,), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
        view_rotate_deg=0.0, brightness=0.0, contrast=0.0, gamma=(1.0, 1.0),
    )
    assert v.images.shape == (10, 1, 16, 16) and v.lam.shape == (2,)
    a1, b1, a2, b2, m = v.images.split(2)
    # the shared flip is the same for both views: undoing view 2's flip/rot90 gives view 1
    assert torch.allclose(undo_flip_rot90(torch.cat([a2, b2]), v.flips, v.rot90_k), torch.cat([a1, b1]), atol=1e-5)
    # each view is the input up to the shared flip
    for i in range(4):
        view = torch.cat([a1, b1])[i]
        assert any(torch.allclose(view, torch.flip(x[i], dims=dims), atol=1e-5) for dims in [(), (1,), (2,), (1, 2)])
    lam = v.lam.view(2, 1, 1, 1)
    assert torch.allclose(m, lam * a1 + (1 - lam) * b1, atol=1e-6)
    assert bool(((v.lam >= 0.2) & (v.lam <= 0.8)).all())


def test_make_ld_batch_3d_and_reproducible():
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) * 100
    v1 = make_ld_batch(x, torch.Generator().manual_seed(7))
    v2 = make_ld_batch(x, torch.Generator().manual_seed(7))
    assert v1.images.shape == (5, 1, 16, 16, 16) and v1.flips.shape == (2, 3)
    assert torch.equal(v1.images, v2.images)
    assert float(v1.images.min()) >= float(x.min()) - 1e-4 and float(v1.images.max()) <= float(x.max()) + 1e-4
    with pytest.raises(InputError):
        make_ld_batch(torch.rand(3, 1, 16, 16))  # odd number of images


def test_ld_loss_terms_and_weights():
    g = torch.Generator().manual_seed(0)
    v = make_ld_batch(torch.rand(4, 1, 16, 16, generator=g), g)
    e = torch.nn.functional.normalize(torch.randn(10, 8, 16, 16, generator=g), dim=1)
    a = torch.softmax(torch.randn(10, 4, 16, 16, generator=g), dim=1)
    total_pd, t_pd = LDLoss("pd", grid=4)(e, a, v)
    assert set(t_pd) == {"pd", "mix"}
    assert total_pd.item() == pytest.approx((t_pd["pd"] + t_pd["mix"]).item(), rel=1e-6)
    total, t = LDLoss("ld", grid=4)(e, a, v.as_dict())
    assert {"pd", "mix", "rd", "ent", "area"} <= set(t)
    want = t["pd"] + t["mix"] + 10 * t["rd"] + 0.1 * t["ent"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(InputError):
        LDLoss("xyz")
    assert isinstance(LDViews.from_any(v.as_dict()), LDViews)


def test_ld_loss_rewards_aligned_views():
    # A "model" whose embedding follows the image content: with view 2 an exact flip/rot90 of
    # view 1, undoing it makes positives identical, so L_PD is lower than with view 2 shuffled.
    g = torch.Generator().manual_seed(5)
    x = torch.rand(4, 1, 16, 16, generator=g)
    v = make_ld_batch(
        x, g, rotate_deg=(0.0,), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), view_rotate_deg=0.0,
        brightness=0.0, contrast=0.0, gamma=(1.0, 1.0),
    )
    proj = torch.randn(8, 1, 3, 3, generator=g)
    e = torch.nn.functional.normalize(torch.nn.functional.conv2d(v.images, proj, padding=1), dim=1)
    loss = LDLoss("pd", grid=4, pooling="average")
    _, aligned = loss(e, None, v)
    wrong = LDViews(v.images, v.lam, v.flips, (v.rot90_k + 1) % 4)
    _, misaligned = loss(e, None, wrong)
    assert aligned["pd"] < misaligned["pd"]


# ------------------------------------------------------------------------------ view warp (ours)


def _smooth_field(size: int) -> torch.Tensor:
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij")
    return torch.stack([torch.sin(2 * x) + 2, torch.cos(3 * y), torch.sin(2 * z + x)])[None]


def test_unwarp_features_inverts_a_smooth_warp():
    size = 24
    f = _smooth_field(size)
    control = torch.randn((1, 3, 4, 4, 4), generator=torch.Generator().manual_seed(1)) * 1.5  # voxels
    dense = torch.nn.functional.interpolate(control, size=(size,) * 3, mode="trilinear", align_corners=True)
    warp = (dense * (2.0 / size)).flip(1).movedim(1, -1)  # normalised x-y-z
    identity = torch.nn.functional.affine_grid(torch.eye(3, 4)[None], [1, 3] + [size] * 3, align_corners=False)
    warped = torch.nn.functional.grid_sample(f, identity + warp, padding_mode="border", align_corners=False)
    inner = (slice(None), slice(None)) + (slice(4, -4),) * 3
    truth = torch.nn.functional.normalize(f, dim=1)[inner]
    undone = unwarp_features(warped, warp)[inner]
    assert (undone - truth).abs().max() < 0.03
    assert (torch.nn.functional.normalize(warped, dim=1)[inner] - truth).abs().max() > 0.15  # the warp mattered


def test_warped_views_pass_through_batch_rows_and_loss():
    x = torch.rand(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    v = make_ld_batch(x, torch.Generator().manual_seed(2), view_warp_vox=1.5)
    assert v.warp.shape == (4, 16, 16, 16, 3)
    assert v.rows(slice(0, 1)).warp.shape == (2, 16, 16, 16, 3)
    assert torch.equal(LDViews.from_any(v.as_dict()).warp, v.warp)
    e = torch.nn.functional.normalize(torch.randn(10, 8, 16, 16, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    total, terms = LDLoss("pd", grid=4)(e, None, v)
    assert torch.isfinite(total) and set(terms) == {"pd", "mix"}
    assert make_ld_batch(x, torch.Generator().manual_seed(2)).warp is None  # off by default, as the paper


# ----------------------------------------------------------------- views from other crops (ours)


def _translation(t: torch.Tensor) -> torch.Tensor:
    """pair_map of a pure shift: view 2 at x shows view 1 at x + t, so y -> y - t."""
    d = t.shape[1]
    return torch.cat([torch.eye(d).expand(t.shape[0], d, d), -t.unsqueeze(-1)], dim=2)


def test_overlap_patch_pairs_without_shift_are_the_centre_weighted_patches():
    e = torch.nn.functional.normalize(torch.randn(2, 5, 16, 16, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    p1, p2, valid = overlap_patch_pairs(e, e, _translation(torch.zeros(2, 3)), grid=4)
    want = centre_weighted_patches(e, 4)
    assert torch.allclose(p1, want, atol=1e-5) and torch.allclose(p2, want, atol=1e-5) and bool(valid.all())


def test_overlap_patch_pairs_meet_at_the_same_anatomy():
    # two crops of one field, the second moved by t: e2(x) = e1(x + t). Cell g of the overlap must
    # give nearly the same vector in both; pairing cells without the shift must not.
    field = _smooth_field(40)
    t = torch.tensor([[5.0, -3.0, 7.0]])
    e1 = field[:, :, 8:32, 8:32, 8:32]
    e2 = field[:, :, 13:37, 5:29, 15:39]
    p1, p2, valid = overlap_patch_pairs(e1, e2, _translation(t), grid=4)
    assert p1.shape == (1, 64, 3) and bool(valid.all())
    paired = (p1 * p2).sum(-1)
    unshifted = (centre_weighted_patches(e1, 4) * centre_weighted_patches(e2, 4)).sum(-1)
    assert float(paired.min()) > 0.995
    assert float((1 - unshifted).mean()) > 10 * float((1 - paired).mean())
    with pytest.raises(InputError):
        overlap_patch_pairs(e1, e2, _translation(torch.tensor([[24.0, 0.0, 0.0]])), grid=4)  # no overlap


def _view_settings(**extra):
    return dict(rotate_deg=(0.0, 0.0, 0.0), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), view_rotate_deg=0.0,
                brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), **extra)


@pytest.mark.parametrize("extra", [dict(view_shift=0.25), dict(view_shift=0.2, view_turn_deg=12.0, view_zoom=0.1)])
def test_other_crop_views_follow_their_pair_map(extra):
    from scipy.ndimage import map_coordinates

    x = _smooth_field(32)[:, :1].repeat(4, 1, 1, 1, 1) * torch.linspace(1, 2, 4).view(4, 1, 1, 1, 1)
    v = make_ld_batch(x, torch.Generator().manual_seed(4), flip_rot90=False, shared_flip=False, **_view_settings(**extra))
    assert v.pair_map.shape == (4, 3, 4)
    assert torch.equal(LDViews.from_any(v.as_dict()).pair_map, v.pair_map)
    assert v.rows(slice(1, 2)).pair_map.shape == (2, 3, 4)
    # view 1 at y shows what view 2 shows at pair_map @ [y, 1]: compare where both are inside
    a1, a2 = v.images[0, 0].double().numpy(), v.images[4, 0].double().numpy()
    ys = torch.stack(torch.meshgrid(*[torch.arange(10, 22)] * 3, indexing="ij"), -1).reshape(-1, 3).double()
    xs = ys @ v.pair_map[0, :, :3].double().T + v.pair_map[0, :, 3].double()
    inside = ((xs > 0) & (xs < 31)).all(1)
    assert int(inside.sum()) > 100
    at_view2 = map_coordinates(a2, xs[inside].T.numpy(), order=1)
    at_view1 = a1[tuple(ys[inside].long().T.numpy())]
    assert abs(at_view1 - at_view2).max() < 0.03 * float(a1.max() - a1.min())
    assert make_ld_batch(x, torch.Generator().manual_seed(4)).pair_map is None  # off by default, as the paper


def test_other_crop_views_pass_through_the_loss():
    # an embedding that follows the content scores its positives better with the map than without
    noise = torch.rand(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    v = make_ld_batch(noise, torch.Generator().manual_seed(4), **_view_settings(view_shift=0.25))
    proj = torch.randn(8, 1, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    e = torch.nn.functional.normalize(torch.nn.functional.conv3d(v.images, proj, padding=1), dim=1)
    loss = LDLoss("pd", grid=4)
    _, mapped = loss(e, None, v)
    _, ignored = loss(e, None, LDViews(v.images, v.lam, v.flips, v.rot90_k))
    assert mapped["pd"] < ignored["pd"] and torch.isfinite(mapped["mix"])
    # the paper's views keep their random stream when the extension is off
    plain = make_ld_batch(noise, torch.Generator().manual_seed(4))
    assert plain.pair_map is None and torch.equal(plain.images, make_ld_batch(noise, torch.Generator().manual_seed(4)).images)


def test_pd_loss_within_image_negatives():
    # two images, one patch pair each: inside its own group a row's only candidate is its positive,
    # so P(pair|i) = 1 and there are no negatives: the loss is 0, whatever the other image holds
    f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [1.0, 0.1], [0.9, 0.3]]), dim=1)
    pairs = torch.tensor([1, 0, 3, 2])
    groups = torch.tensor([0, 0, 1, 1])
    assert patch_discrimination_loss(f, pairs, TAU, groups=groups).item() == pytest.approx(0.0, abs=1e-6)
    assert patch_discrimination_loss(f, pairs, TAU).item() > 1.0  # the paper's batch negatives
    with pytest.raises(InputError):
        patch_discrimination_loss(f, pairs, TAU, groups=torch.tensor([0, 1, 0, 1]))  # a pair across groups


@pytest.mark.parametrize("extra", [{}, dict(view_shift=0.2, view_turn_deg=10.0)])
def test_ld_loss_with_image_negatives(extra):
    g = torch.Generator().manual_seed(0)
    v = make_ld_batch(torch.rand(4, 1, 16, 16, 16, generator=g), g, **extra)
    e = torch.nn.functional.normalize(torch.randn(10, 8, 16, 16, 16, generator=g), dim=1)
    _, batch = LDLoss("pd", grid=4)(e, None, v)
    _, image = LDLoss("pd", grid=4, negatives="image")(e, None, v)
    assert torch.isfinite(image["pd"]) and image["pd"] < batch["pd"]  # fewer negatives, smaller sums
    assert image["mix"] == batch["mix"]
    with pytest.raises(InputError):
        LDLoss("pd", negatives="subject")


def test_view_blur_and_noise():
    x = torch.zeros(2, 1, 16, 16, 16)
    x[:, :, 8] = 1.0  # a sheet: blur spreads it only along axis 0
    from AnatSSLLib.methods.ld import _blur_each

    y = _blur_each(x, torch.tensor([[1.5, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(y[0].sum(), x[0].sum(), rtol=1e-4) and float(y[0, 0, 7, 3, 3]) > 0.1
    assert torch.equal(y[1], x[1])
    img = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = make_ld_batch(img, torch.Generator().manual_seed(1), flip_rot90=False)
    noisy = make_ld_batch(img, torch.Generator().manual_seed(1), flip_rot90=False, view_blur=1.0, view_noise=0.1)
    assert noisy.images.shape == plain.images.shape and not torch.allclose(noisy.images, plain.images)
    assert float(noisy.images.min()) >= float(img.min()) - 1e-4 and float(noisy.images.max()) <= float(img.max()) + 1e-4


def test_random_intensity_remap_known_answers():
    from AnatSSLLib.methods.ld import random_intensity_remap

    u = torch.linspace(0, 1, 11).view(1, 1, 11).repeat(2, 1, 1)
    zigzag = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]])
    out = random_intensity_remap(u, zigzag, torch.tensor([True, True]))
    assert torch.allclose(out[0, 0], torch.tensor([1, 0.5, 0, 0.5, 1, 0.5, 0, 0.5, 1, 0.5, 0.0]), atol=1e-6)
    assert torch.allclose(out[1], u[1], atol=1e-6)  # the identity transfer function
    kept = random_intensity_remap(u, zigzag, torch.tensor([False, True]))
    assert torch.equal(kept[0], u[0])
    img = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    plain = make_ld_batch(img, torch.Generator().manual_seed(1), flip_rot90=False)
    remapped = make_ld_batch(img, torch.Generator().manual_seed(1), flip_rot90=False, view_remap=1.0)
    assert not torch.allclose(remapped.images, plain.images)
    assert float(remapped.images.min()) >= float(img.min()) - 1e-4 and float(remapped.images.max()) <= float(img.max()) + 1e-4


def test_assignment_consistency_known_answers():
    from AnatSSLLib.methods.ld import assignment_consistency_loss

    one_hot = torch.eye(4)[[0, 2, 1]]
    assert assignment_consistency_loss(one_hot, one_hot).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((3, 4), 0.25)
    assert assignment_consistency_loss(uniform, uniform).item() == pytest.approx(math.log(4), rel=1e-5)
    assert assignment_consistency_loss(one_hot, torch.eye(4)[[1, 2, 1]]).item() > 5  # one cell disagrees
    with pytest.raises(InputError):
        assignment_consistency_loss(one_hot, uniform[:2])


def test_ld_loss_consistency_term_on_other_crop_views():
    g = torch.Generator().manual_seed(0)
    v = make_ld_batch(torch.rand(4, 1, 16, 16, 16, generator=g), g, view_shift=0.2, view_warp_vox=1.0)
    e = torch.nn.functional.normalize(torch.randn(10, 8, 16, 16, 16, generator=g), dim=1)
    a = torch.softmax(torch.randn(10, 4, 16, 16, 16, generator=g), dim=1)
    total, terms = LDLoss("ld", grid=4, w_cons=2.0)(e, a, v)
    assert "cons" in terms and torch.isfinite(terms["cons"])
    want = terms["pd"] + terms["mix"] + 10 * terms["rd"] + 0.1 * terms["ent"] + 2.0 * terms["cons"]
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    _, plain = LDLoss("ld", grid=4)(e, a, v)
    assert "cons" not in plain  # off by default, as the paper


# ------------------------------------------------------------------ dense correspondence (ours)


def _lattice_one_hot(shape=(8, 8), stride=4) -> torch.Tensor:
    """1, 4, *shape: a distinct one-hot vector at each lattice point (2, 2), (2, 6), (6, 2), (6, 6),
    a constant unit vector elsewhere (never read at integer lattice points)."""
    e = torch.zeros(1, 4, *shape, dtype=torch.float64)
    e[:, 0] = 1.0
    for n, (i, j) in enumerate(itertools.product(range(stride // 2, shape[0], stride), range(stride // 2, shape[1], stride))):
        e[0, :, i, j] = 0.0
        e[0, n, i, j] = 1.0
    return e


def test_dense_correspondence_known_answer_identical_views():
    # 4 lattice points, orthogonal embeddings, the same in both views: each row's softmax has
    # exp(1/tau) on the diagonal and exp(0) at 3 others
    e = _lattice_one_hot()
    want = math.log(1.0 + 3.0 * math.exp(-1.0 / TAU))
    assert dense_correspondence_loss(e, e.clone(), None, stride=4, tau=TAU).item() == pytest.approx(want, rel=1e-9)
    # every other point within the exclusion radius: the softmax has one entry, the loss is 0
    assert dense_correspondence_loss(e, e.clone(), None, stride=4, tau=TAU, exclusion=6.0).item() == pytest.approx(0.0, abs=1e-12)
    # view 2 with two points swapped: those two rows score their positive 0 and a wrong point
    # 1/tau (loss log(e^(1/tau) + 3)); the other two rows are as before
    swapped = e.clone()
    swapped[0, :, 2, 2], swapped[0, :, 6, 6] = e[0, :, 6, 6], e[0, :, 2, 2]
    got = dense_correspondence_loss(e, swapped, None, stride=4, tau=TAU).item()
    assert got == pytest.approx(0.5 * math.log(math.exp(1.0 / TAU) + 3.0) + 0.5 * want, rel=1e-9)


def test_dense_correspondence_follows_the_pair_map():
    # view 2 is view 1 moved by one voxel along axis 0: x = y + (1, 0)
    e = _lattice_one_hot((9, 8))
    e2 = torch.roll(e, shifts=1, dims=2)
    shift = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    want = math.log(1.0 + 3.0 * math.exp(-1.0 / TAU))
    assert dense_correspondence_loss(e, e2, shift, stride=4, tau=TAU).item() == pytest.approx(want, rel=1e-9)
    assert dense_correspondence_loss(e, e2, None, stride=4, tau=TAU).item() > 1.0
    # moved by 4 voxels: points at y0 = 6 land at 10, outside the 9 rows of view 2, and are left out;
    # the two points left (y0 = 2) still find each other
    far = torch.tensor([[[1.0, 0.0, 4.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    e4 = torch.roll(e, shifts=4, dims=2)
    assert dense_correspondence_loss(e, e4, far, stride=4, tau=TAU).item() == pytest.approx(
        math.log(1.0 + math.exp(-1.0 / TAU)), rel=1e-9)


def test_dense_term_in_ld_loss_and_bad_input():
    g = torch.Generator().manual_seed(0)
    v = make_ld_batch(torch.rand(4, 1, 16, 16, generator=g), g)
    e = torch.nn.functional.normalize(torch.randn(10, 8, 16, 16, generator=g), dim=1)
    total, t = LDLoss("pd", grid=4, w_dense=0.5)(e, None, v)
    assert set(t) == {"pd", "mix", "dense"}
    assert total.item() == pytest.approx((t["pd"] + t["mix"] + 0.5 * t["dense"]).item(), rel=1e-6)
    with pytest.raises(InputError):
        dense_correspondence_loss(e[:2], e[:3])
