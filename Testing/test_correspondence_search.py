"""The dense matcher's window search: the matrix-product path (wide windows) and the gather path
(narrow windows) find the same peaks, and a known displacement is recovered by both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AnatSSLLib.embedding import EmbeddedVolume
from AnatSSLLib.image import Image
from AnatSSLLib.tools.correspondence import EmbeddingCorrespondence


def _smooth_random_features(shape, seed=0, dim=8):
    from AnatSSLLib.embedding import gaussian_smooth

    g = torch.Generator().manual_seed(seed)
    return gaussian_smooth(torch.randn((dim, *shape), generator=g), (2.0, 2.0, 2.0))


@pytest.mark.parametrize("step_mm", [4.0, 0.0])
def test_dense_and_gathered_window_search_agree(step_mm, monkeypatch):
    shape = (30, 34, 28)
    grid = Image(np.zeros(shape, np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3), "moving")
    feats = _smooth_random_features(shape)
    moving = EmbeddedVolume(grid=grid, features=feats, intensity=np.zeros(shape, np.float32))
    rng = np.random.default_rng(0)
    truth_kji = rng.integers(6, np.array(shape) - 6, size=(40, 3))
    support = feats[(slice(None),) + tuple(truth_kji.T)].T  # the moving volume's own vectors: peaks known
    predicted = grid.index_to_physical((truth_kji + rng.integers(-3, 4, size=truth_kji.shape))[:, ::-1])
    matcher = EmbeddingCorrespondence(store=None)
    results = {}
    import AnatSSLLib.tools.correspondence as corr

    for mode in ("dense", "gather"):
        # force the path: the dense one is taken when a window holds over this fraction of its lattice
        monkeypatch.setattr(corr, "_DENSE_WINDOW_FRACTION", 1e-9 if mode == "dense" else 1e9)
        results[mode] = matcher._local_search(support, moving, 0.0, predicted, 16.0, step_mm)  # sigma 0: feats as they are
    (p_dense, c_dense, b_dense, m_dense), (p_gather, c_gather, b_gather, m_gather) = results["dense"], results["gather"]
    np.testing.assert_allclose(p_dense, p_gather, atol=1e-4)
    np.testing.assert_allclose(c_dense, c_gather, atol=1e-5)
    np.testing.assert_allclose(m_dense, m_gather, atol=1e-5)  # the rival's margin too
    assert np.array_equal(b_dense, b_gather)
    if step_mm == 0.0:  # every voxel searched: each point's own position is the peak
        np.testing.assert_allclose(p_gather, grid.index_to_physical(truth_kji[:, ::-1]), atol=1.0)  # sub-voxel: within half a voxel
