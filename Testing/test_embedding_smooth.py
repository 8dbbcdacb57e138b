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
