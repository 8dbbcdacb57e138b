"""Tests of the LD network (AnatSSLLib/networks/ld_net.py), its registry entry, and a tiny real
training run of LD's stage "ld" on MRI slices of the 2009c T1w template (autoafids wheel)."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch

from AnatSSLLib.errors import InputError
from AnatSSLLib.methods.ld import LDTask, LDViews, ld_training_step
from AnatSSLLib.networks import ARCHITECTURES, LDNet, LDOutput, build_network


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads spin against other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "dims, shape, k",
    [(2, (3, 1, 32, 48), 16), (3, (2, 1, 16, 32, 16), 8)],
)
def test_shapes_unit_norm_and_assignment_sums(dims, shape, k):
    torch.manual_seed(0)
    net = LDNet(spatial_dims=dims, num_clusters=k)
    out = net(torch.randn(*shape))
    assert isinstance(out, LDOutput)
    assert out.embedding.shape == (shape[0], 32, *shape[2:])
    assert out.assignment.shape == (shape[0], k, *shape[2:])
    assert torch.allclose(out.embedding.norm(dim=1), torch.ones(()), atol=1e-5)
    assert torch.allclose(out.assignment.sum(dim=1), torch.ones(()), atol=1e-5)
    assert bool((out.assignment >= 0).all())
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net.embed(torch.ones(*shape)), net(torch.ones(*shape)).embedding)


def test_parameter_counts_match_the_documented_sizes():
    n2 = sum(p.numel() for p in LDNet(2).parameters())
    n3 = sum(p.numel() for p in LDNet(3).parameters())
    assert 0.9e6 < n2 < 1.4e6  # "about 1 M" like the paper's VGG-tiny U-Net
    assert 0.6e6 < n3 < 1.2e6


def test_gradients_reach_both_heads_and_the_encoder():
    torch.manual_seed(0)
    net = LDNet(spatial_dims=2, num_clusters=4, embedding_dim=8)
    out = net(torch.randn(2, 1, 32, 32))
    target = torch.randn_like(out.embedding)
    ((out.embedding * target).sum() + (out.assignment[:, 0] ** 2).sum()).backward()
    for name in ("backbone.conv_0.conv_0.conv.weight", "embedding_head.3.weight", "cluster_head.0.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("dims, shape", [(2, (1, 1, 32, 40)), (3, (1, 1, 16, 16, 24)), (2, (1, 1, 32, 32, 32)), (2, (1, 2, 32, 32))])
def test_clear_error_for_bad_input(dims, shape):
    net = LDNet(spatial_dims=dims)
    with pytest.raises(InputError) as err:
        net(torch.zeros(*shape))
    assert "expected" in str(err.value) or "multiple of 16" in str(err.value)
    if shape[-1] % 16:
        assert "multiple of 16" in str(err.value)


def test_registry_round_trip():
    assert {"ld_unet2d", "ld_unet3d"} <= set(ARCHITECTURES)
    torch.manual_seed(0)
    net = build_network("ld_unet3d", {"num_clusters": 4, "features": [4, 4, 8, 8, 8, 4], "embedding_dim": 6})
    assert isinstance(net, LDNet) and net.spatial_dims == 3
    again = build_network("ld_unet3d", net.config())  # the manifest's params rebuild it
    again.load_state_dict(net.state_dict())
    net.eval(), again.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(net.embed(x), again.embed(x))
    with pytest.raises(InputError) as err:
        build_network("ld_unet4d", {})
    assert "ld_unet2d" in str(err.value) and "ld_unet3d" in str(err.value)
    with pytest.raises(InputError):
        build_network("ld_unet2d", {"spatial_dims": 3})
    with pytest.raises(InputError):
        build_network("ld_unet2d", {"no_such_argument": 1})


@pytest.mark.parametrize("dims", [2, 3])
def test_reflect_padding_hides_the_border(dims):
    """Known answer: on a constant input a reflect-padded network gives the same embedding at every
    voxel (no convolution can tell the border from the inside), a zero-padded one does not."""
    shape = (1, 1) + (32,) * dims
    x = torch.full(shape, 0.7)
    spreads = {}
    for mode in ("zeros", "reflect"):
        torch.manual_seed(0)
        net = LDNet(spatial_dims=dims, padding_mode=mode).eval()
        with torch.no_grad():
            e = net.embed(x)[0].reshape(net.embedding_dim, -1)
        spreads[mode] = float((e - e[:, :1]).abs().max())
    assert spreads["reflect"] < 1e-5
    assert spreads["zeros"] > 1e-2


def test_padding_mode_travels_with_the_manifest_and_bad_modes_are_refused():
    torch.manual_seed(0)
    net = build_network("ld_unet3d", {"features": [4, 4, 8, 8, 8, 4], "padding_mode": "reflect"})
    assert net.config()["padding_mode"] == "reflect"
    assert "padding_mode" not in LDNet(spatial_dims=3).config()  # older manifests: zeros
    again = build_network("ld_unet3d", net.config())
    assert {m.padding_mode for m in again.modules() if isinstance(m, torch.nn.Conv3d)} == {"reflect"}
    task = LDTask(spatial_dims=3, padding_mode="reflect", features=[4, 4, 8, 8, 8, 4])
    assert task.manifest_fields()["architecture_params"]["padding_mode"] == "reflect"
    with pytest.raises(InputError, match="padding_mode"):
        LDNet(spatial_dims=3, padding_mode="circle")


def test_task_builds_registered_model_and_manifest():
    task = LDTask(spatial_dims=3, stage="ld", num_clusters=8, manifest={"spacing": [2.0, 2.0, 2.0]})
    net = task.build_model()
    assert isinstance(net, LDNet) and net.num_clusters == 8
    fields = task.manifest_fields()
    assert fields["architecture"] == "ld_unet3d" and fields["embedding_dim"] == 32
    assert fields["spacing"] == [2.0, 2.0, 2.0] and fields["method"] == "ld"
    assert isinstance(build_network(fields["architecture"], fields["architecture_params"]), LDNet)


# ------------------------------------------------------------------------ tiny real training


def _t1_slices() -> torch.Tensor:
    """Axial slices of the MNI 2009c T1w (autoafids wheel), 2 mm in-plane, intensities in [0, 1]."""
    spec = importlib.util.find_spec("autoafids")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoafids (data wheel) is not installed")
    sitk = pytest.importorskip("SimpleITK")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "resources" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
    vol = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)  # k, j, i = z, y, x
    vol = vol / np.percentile(vol, 99.5)
    sl = torch.from_numpy(np.clip(vol[60:130:5], 0, 1))  # 14 axial slices through the brain
    sl = torch.nn.functional.avg_pool2d(sl.unsqueeze(1), 2)  # 1 mm -> 2 mm: 114 x 96
    return sl


def test_thirty_ld_steps_on_real_mri_reduce_the_loss():
    slices = _t1_slices()
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    def sampler(g: torch.Generator, n: int) -> torch.Tensor:
        idx = torch.randint(0, slices.shape[0], (n,), generator=g)
        y = torch.randint(10, slices.shape[2] - 64 - 10 + 1, (n,), generator=g)
        x = torch.randint(8, slices.shape[3] - 64 - 8 + 1, (n,), generator=g)
        return torch.stack([slices[i, :, a : a + 64, b : b + 64] for i, a, b in zip(idx, y, x)])

    task = LDTask(spatial_dims=2, stage="ld", grid=4, num_clusters=8, sampler=sampler)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, logs = [], {}
    for step in range(30):
        batch = task.make_batch(step, gen, batch_size=2)
        assert batch["images"].shape == (10, 1, 64, 64)
        loss, logs = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 1.0, (first, last, losses)
    assert set(logs) >= {"loss", "pd", "mix", "rd", "ent"}
    assert logs["rd"] < math.log(8)  # below chance: regions became distinct clusters
    # the ld_training_step API gives the same numbers as the task
    model.eval()
    with torch.no_grad():
        views = LDViews.from_any(batch)
        a, _ = ld_training_step(model, views, task.loss_fn, "ld")
        b, _ = task.loss(model, batch)
    assert a.item() == pytest.approx(b.item())
