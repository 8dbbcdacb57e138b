"""The bundled default encoder on real anatomy: expert landmarks carried from the template to four
simulated subjects, against the exact ground truth and against the same network with random weights.

Each subject is the MNI 2009c template under a random affine and a smooth diffeomorphic warp, with
its own bias field and noise, on a 3 mm grid (``population_small``): the AFIDs move 3-10 mm, so the
identity is far off, and the answer is known exactly. The tools run with their defaults, as the
command line runs them.

Bounds: set from the measured spread, not from one draw (``benchmarks/bench_stability.py``,
``benchmarks/results/stability.json``): a subject's mean error moves at most 0.20 mm under 1e-3
relative noise on its target (0.10 mm under 1e-4); each bound sits at least 0.5 mm above the
measured value it guards (see the constants).
"""

from __future__ import annotations

import numpy as np

# Mean radial error (mm) over the 32 AFIDs, template T1 -> each subject of population_small's T1,
# the tool's defaults: measured 1.91, 1.89, 1.15, 1.50 (mean 1.61).
MAX_MEAN_MM = 2.3  # over the four subjects
MAX_SUBJECT_MEAN_MM = 2.8  # any one subject


def _errors(encoder, template, subjects, contrast):
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    locator = LandmarkLocator.for_encoder(encoder)
    found = locator.locate(template.t1, template.landmarks, [s.image(contrast) for s in subjects])
    for f, s in zip(found, subjects):
        assert f.labels == s.landmarks().labels
        assert f.confidence is not None and np.all(np.isfinite(f.confidence))
    err = np.array([np.linalg.norm(f.positions - s.landmarks().positions, axis=1).mean() for f, s in zip(found, subjects)])
    return err, [d.mode for d in locator.last_decisions]


def test_default_encoder_finds_the_afids_in_new_subjects(template_2mm, population_small):
    from AnatSSLLib.encoders import load_encoder, random_weights_like

    encoder = load_encoder(None, device="cpu")
    subjects = population_small.subjects
    identity = [np.linalg.norm(template_2mm.landmarks.positions - s.landmarks().positions, axis=1).mean() for s in subjects]
    err, modes = _errors(encoder, template_2mm, subjects, "t1")
    random_err, _ = _errors(random_weights_like(encoder), template_2mm, subjects, "t1")
    assert min(identity) > 3.0  # the subjects really differ from the template
    assert modes == ["same"] * len(subjects)  # T1 targets of a T1 reference are matched as they are
    assert err.mean() <= MAX_MEAN_MM and err.max() <= MAX_SUBJECT_MEAN_MM, err.round(2)
    assert err.mean() < 0.9 * random_err.mean(), (err.round(2), random_err.round(2))


# Template T1 -> the same four subjects' T2 with the plain command: each target is found to have
# another contrast and mapped into the reference's before matching (contrast="auto"). The second
# subject's T2 has 6 mm slices. Measured 2.70, 2.31, 2.82, 2.24 (mean 2.52). Against the same
# pipeline told to match the T2 as it is.
MAX_T2_MEAN_MM = 3.4
MAX_T2_SUBJECT_MEAN_MM = 4.0


def test_default_encoder_finds_the_afids_across_contrasts(template_2mm, population_small, tmp_path, capsys):
    """As a user would: ``anatssl landmarks`` (no option but the files) from the template's T1 and
    its AFIDs to the four subjects' T2 files; the markups it writes are checked against the ground
    truth, and against the library told to skip contrast handling (``contrast="same"``)."""
    from AnatSSLLib.cli import main
    from AnatSSLLib.image import write_image
    from AnatSSLLib.points import read_points, write_points
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    subjects = population_small.subjects
    truth = [s.landmarks().positions for s in subjects]
    ref = write_image(template_2mm.t1, tmp_path / "template_t1.nii.gz")
    pts = write_points(template_2mm.landmarks, tmp_path / "afids.mrk.json")
    paths = [str(s.folder / "t2.nii.gz") for s in subjects]
    code = main(["landmarks", "--device", "cpu", "--reference", str(ref), "--points", str(pts), "--targets", *paths,
                 "--out", str(tmp_path / "found")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("contrast=match (auto") == len(subjects), printed
    found = [read_points(tmp_path / "found" / f"{s.name}_t2.mrk.json") for s in subjects]
    assert all(f.labels == template_2mm.landmarks.labels for f in found)
    assert all(d.startswith("contrast=match (auto") for f in found for d in f.descriptions)
    err = np.array([np.linalg.norm(f.positions - t, axis=1).mean() for f, t in zip(found, truth)])

    plain_found = LandmarkLocator.for_encoder(None, contrast="same").locate(
        template_2mm.t1, template_2mm.landmarks, [s.image("t2") for s in subjects])
    plain = np.array([np.linalg.norm(f.positions - t, axis=1).mean() for f, t in zip(plain_found, truth)])
    assert err.mean() <= MAX_T2_MEAN_MM and err.max() <= MAX_T2_SUBJECT_MEAN_MM, err.round(2)
    assert err.mean() < 0.75 * plain.mean(), (err.round(2), plain.round(2))
