"""The centre-weighted average (LD's W_c) matches a reference Gaussian filter, also for wide kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from AnatSSLLib.embedding import gaussian_smooth


@pytest.mark.parametrize("sigma_vox", [(1.0, 1.5, 2.0), (12.0, 12.0, 12.0)])
def test_gaussian_smooth_matches_scipy(sigma_vox):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4, 10, 12, 14)).astype(np.float32)
    # a kernel wider than the volume (sigma 12 voxels on 10-14 voxels) must still work: replicate borders
    expected = np.stack([ndimage.gaussian_filter(f, sigma_vox, mode="nearest", truncate=3.0) for f in features])
    expected /= np.linalg.norm(expected, axis=0, keepdims=True)
    got = gaussian_smooth(torch.from_numpy(features), sigma_vox).numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, atol=1e-5)


@pytest.mark.parametrize("sigma_vox", [(1.0, 1.5, 2.0), (0.0, 3.0, 9.0)])
def test_gaussian_filter_with_zero_padding_matches_scipy(sigma_vox):
    """Zero padding (the normalised convolution of sparse displacements uses it): the kernel mass
    outside the volume is lost, as in scipy's ``mode="constant"``."""
    from AnatSSLLib.embedding import gaussian_filter

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 10, 12, 14)).astype(np.float32)
    expected = np.stack([ndimage.gaussian_filter(c, sigma_vox, mode="constant", truncate=3.0) for c in x])
    got = gaussian_filter(torch.from_numpy(x), sigma_vox, padding="zeros").numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)
    ones = gaussian_filter(torch.ones(1, 10, 12, 14), (2.0, 2.0, 2.0), padding="zeros")[0]
    assert float(ones[5, 6, 7]) > 0.9 and float(ones[0, 0, 0]) < 0.25  # about half the mass lost per axis at the corner


def test_whitening_gives_identity_covariance_over_the_anatomy_only():
    """``whiten_features``: over the mask the whitened embedding (before the unit norm) has zero
    mean and identity covariance, whatever the voxels outside; the output has unit norm."""
    from AnatSSLLib.embedding import whiten_features

    rng = np.random.default_rng(1)
    d, shape = 6, (12, 14, 16)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mix = rotation * np.array([5.0, 2.0, 1.0, 0.5, 0.2, 0.1])  # correlated channels, variances 25 to 0.01
    features = (mix @ rng.normal(size=(d, int(np.prod(shape))))).reshape(d, *shape) + 3.0
    mask = np.zeros(shape, bool)
    mask[2:10, 3:12, 4:14] = True
    features[:, ~mask] = 100.0  # a constant background that would dominate unmasked statistics
    got = whiten_features(torch.from_numpy(features.astype(np.float32)), mask).numpy()
    np.testing.assert_allclose(np.linalg.norm(got, axis=0), 1.0, atol=1e-5)

    # the reference: the ZCA transform estimated on the masked voxels in float64
    x = features[:, mask]
    centred = x - x.mean(axis=1, keepdims=True)
    w, v = np.linalg.eigh(centred @ centred.T / (x.shape[1] - 1))
    white = (v @ np.diag(w**-0.5) @ v.T) @ centred
    np.testing.assert_allclose(white @ white.T / (x.shape[1] - 1), np.eye(d), atol=1e-6)  # the reference is right
    expected = white / np.linalg.norm(white, axis=0, keepdims=True)
    np.testing.assert_allclose(got[:, mask], expected, atol=1e-4)


def test_a_strided_map_is_every_step_th_voxel_of_the_full_one():
    """``smoothed_features(sigma, step)`` equals the full-resolution map at every step-th voxel, and
    ``lattice(step)`` places those voxels where the full grid has them."""
    from AnatSSLLib.embedding import EmbeddedVolume, gaussian_filter
    from AnatSSLLib.image import Image

    rng = np.random.default_rng(2)
    feats = torch.from_numpy(rng.normal(size=(5, 11, 12, 13)).astype(np.float32))
    full = gaussian_filter(feats, (1.0, 2.0, 0.0))
    np.testing.assert_allclose(gaussian_filter(feats, (1.0, 2.0, 0.0), step=(2, 3, 2)).numpy(),
                               full[:, ::2, ::3, ::2].numpy(), atol=1e-5)
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    grid = Image(np.zeros((11, 12, 13), np.float32), spacing=(2.0, 2.0, 2.5), origin=(5.0, -3.0, 1.0), direction=direction)
    vol = EmbeddedVolume(grid=grid, features=feats, intensity=np.zeros((11, 12, 13), np.float32))
    coarse, lattice = vol.smoothed_features(4.0, 2), vol.lattice(2)
    np.testing.assert_allclose(coarse.numpy(), vol.smoothed_features(4.0)[:, ::2, ::2, ::2].numpy(), atol=1e-5)
    assert coarse.shape[1:] == lattice.array.shape == (6, 6, 7)
    np.testing.assert_allclose(lattice.index_to_physical([[3, 2, 1]]), grid.index_to_physical([[6, 4, 2]]))
