"""The bundled default encoder on real anatomy: expert landmarks carried from the template to a
simulated subject, against the exact ground truth and against the same network with random weights.

The subject is the MNI 2009c template under a random affine and a smooth diffeomorphic warp, with
its own bias field and noise, on a 3 mm grid (``population_small``): the AFIDs move 3-10 mm, so the
identity is far off, and the answer is known exactly. The thresholds leave a margin
over what the default encoder measured here (see the constants) and stay well under the random
network's error, so a default that stops matching anatomy fails.
"""

from __future__ import annotations

import numpy as np
import pytest

# Mean radial error (mm) over the 32 AFIDs, template T1 -> subject 0 of population_small. Measured:
# 2.26 mm with the bundled default, 4.02 mm with random weights of the same network.
MAX_T1_MEAN_MM = 3.0


def _errors(encoder, template, subject, contrast):
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    locator = LandmarkLocator(EmbeddingStore(encoder))
    (found,) = locator.locate(template.t1, template.landmarks, [subject.image(contrast)])
    truth = subject.landmarks()
    assert found.labels == truth.labels
    return np.linalg.norm(found.positions - truth.positions, axis=1), found


def test_default_encoder_finds_the_afids_in_a_new_subject(template_2mm, population_small):
    from AnatSSLLib.encoders import load_encoder, random_weights_like

    encoder = load_encoder(None, device="cpu")
    subject = population_small.subjects[0]
    identity = np.linalg.norm(template_2mm.landmarks.positions - subject.landmarks().positions, axis=1)
    err, found = _errors(encoder, template_2mm, subject, "t1")
    random_err, _ = _errors(random_weights_like(encoder), template_2mm, subject, "t1")
    assert identity.mean() > 3.0  # the subject really differs from the template
    assert err.mean() <= MAX_T1_MEAN_MM, (err.mean(), err.round(1))
    assert err.mean() < 0.8 * random_err.mean(), (err.mean(), random_err.mean())
    assert found.confidence is not None and np.all(np.isfinite(found.confidence))
