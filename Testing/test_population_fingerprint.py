"""The test population is the same on every machine: its content fingerprints (sha256 of each array,
``population.json``) match the files on disk and the values two machines of the CI kind produced.

The landmark and segmentation tests' bounds are only portable if the subjects are: a synthesis step
whose result depended on the CPU (a multithreaded ITK reduction, FFT smoothing, float32
accumulation) would show here first, before any tool is blamed.
"""

from __future__ import annotations

import numpy as np

# population_small (4 subjects, 3 mm, t1 and t2, seed 0): the T1 arrays and the landmark positions
# as generated on two different 2-core CI machines (identical there, bit for bit).
KNOWN_T1 = {"sub-000": "b30b07040f37", "sub-001": "957403a6cd6c", "sub-002": "6ad9ba0b9043", "sub-003": "87fedc7f35b2"}
KNOWN_LANDMARKS = {"sub-000": "ae46653dcaef", "sub-001": "14f68a512637", "sub-002": "8ca7dcfbbf29", "sub-003": "a6978b4c5a7e"}


def test_population_small_is_the_same_everywhere(population_small):
    from AnatSSLLib.data.synth import fingerprint

    recorded = population_small.meta["fingerprints"]
    for s in population_small.subjects:
        on_disk = {c: fingerprint(s.image(c).array) for c in ("t1", "t2")}
        on_disk["labels"] = fingerprint(s.labels().array)
        on_disk["landmarks"] = fingerprint(np.asarray(s.landmarks().positions, np.float64))
        assert {k: recorded[s.name][k] for k in on_disk} == on_disk, s.name  # the files are what was generated
        assert len(recorded[s.name]["warp"]) == 12
        assert on_disk["t1"] == KNOWN_T1[s.name], (s.name, "T1 differs from the CI machines' (synthesis is machine-dependent)")
        assert on_disk["landmarks"] == KNOWN_LANDMARKS[s.name], s.name
