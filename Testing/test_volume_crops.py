"""VolumeCrops: paired crops of one subject at one place, and the per-view bias-field option."""

from __future__ import annotations

import numpy as np

from AnatSSLLib.datasets import VolumeCrops


def _subject(population_small):
    s = population_small.subjects[0]
    return [s.image("t1"), s.image("t1")]  # the same contrast twice: paired crops must then be equal


def test_paired_crops_show_the_same_place(population_small):
    data = VolumeCrops([_subject(population_small)], spacing=(3.0, 3.0, 3.0), crop_size=16)
    crops = data.sample(4, np.random.default_rng(0), channels=2)
    assert crops.shape == (4, 2, 16, 16, 16)
    assert np.array_equal(crops[:, 0], crops[:, 1])


def test_bias_field_makes_views_differ_by_a_smooth_positive_factor(population_small):
    data = VolumeCrops([_subject(population_small)], spacing=(3.0, 3.0, 3.0), crop_size=16, bias_field_std=0.3)
    crops = data.sample(4, np.random.default_rng(0), channels=2)
    body = (crops[:, 0] > 0.2) & (crops[:, 1] > 0.2)
    ratio = crops[:, 1][body] / crops[:, 0][body]
    assert ratio.min() > 0.2 and ratio.max() < 5 and ratio.std() > 0.05  # different, but by a bounded factor
    # smooth: neighbouring voxels' ratios agree far better than the ratio varies overall
    r = np.where(body, crops[:, 1] / np.maximum(crops[:, 0], 1e-6), np.nan)
    step = np.nanmean(np.abs(np.diff(r, axis=-1)))
    assert step < 0.5 * np.nanstd(r)  # white noise would give about 1.1 x the std
