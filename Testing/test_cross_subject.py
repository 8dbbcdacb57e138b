"""Cross-subject views for LD pretraining: other subjects registered onto each subject's grid."""

from __future__ import annotations

import numpy as np
import pytest

from AnatSSLLib.data.cross_subject import cross_subject_views
from AnatSSLLib.errors import InputError
from AnatSSLLib.image import resample_to


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_neighbours_are_registered_onto_each_subject(population_small):
    subjects = [[s.image("t1"), s.image("t2")] for s in population_small.subjects[:3]]
    views = cross_subject_views(subjects, 1, seed=0)
    assert [len(v) for v in views] == [4, 4, 4]  # own t1, t2 + one neighbour's t1, t2
    for own, entry in zip(subjects, views):
        fixed = own[0]
        assert all(v.same_geometry(fixed) for v in entry)
        neighbour_t1 = entry[2]
        source = next(s[0] for s in subjects if neighbour_t1.name.startswith(s[0].name))
        # the affine brings the other head onto this one: far better overlap than the raw physical placement
        unregistered = resample_to(source, fixed, default_value=float(source.array.min()))
        assert _corr(neighbour_t1.array, fixed.array) > _corr(unregistered.array, fixed.array) + 0.1
        assert _corr(neighbour_t1.array, fixed.array) > 0.8


def test_bad_neighbour_counts(population_small):
    one = [population_small.subjects[0].image("t1")]
    with pytest.raises(InputError, match="at least 2 subjects"):
        cross_subject_views(one, 1)
    two = one + [population_small.subjects[1].image("t1")]
    with pytest.raises(InputError, match="neighbours must be in 1..1"):
        cross_subject_views(two, 2)
