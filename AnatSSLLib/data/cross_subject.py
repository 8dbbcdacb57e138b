"""Cross-subject views: other subjects' volumes registered onto each subject, as extra paired views.

Why. Patch discrimination (LD) treats every other patch as a negative, so the same anatomy in
another head is only ever pushed away; our feature probe measured the result: trained LD encoders
match anatomy *across* subjects worse than the same network with random weights
(``benchmarks/README.md``). Alice answers this by mining views of the same anatomy in different
volumes with an anatomical matcher (SAM). Here the matcher is an affine registration: each
subject's ``neighbours`` other subjects are registered onto it (SimpleITK, Mattes mutual
information, :func:`AnatSSLLib.baselines.registration.register`) and resampled onto its grid.
Listed with the subject's own contrasts, they become "contrasts" of that subject for
:class:`~AnatSSLLib.datasets.VolumeCrops`, whose paired crops are taken at the same voxel: a pair
is then, most of the time, the same place in two different heads (up to the residual non-linear
misalignment of an affine, a few millimetres), and patch discrimination pulls them together.

This is our extension (in the spirit of Alice's cross-volume mining; neither LD paper nor code
has it). It needs no label and no template: only the unlabelled training volumes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..datasets import subject_images
from ..errors import InputError
from ..image import Image, resample_to

__all__ = ["cross_subject_views"]


def cross_subject_views(
    subjects: Sequence,
    neighbours: int,
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[Image]]:
    """Each subject's contrasts followed by those of ``neighbours`` other subjects, registered onto it.

    Args:
        subjects: one entry per subject: an image or path, or a list of co-registered contrasts
            of that subject (the first one is used for registration).
        neighbours: how many other subjects to register onto each (drawn without replacement,
            from ``seed``); at most ``len(subjects) - 1``.
        seed: the neighbour draw.
        progress: called as ``progress(done, total)`` after each registration.

    Returns:
        per subject, a list of images on that subject's first-contrast grid: its own contrasts,
        then each neighbour's contrasts resampled (linear) through the affine.

    Raises:
        InputError: fewer than 2 subjects, or ``neighbours`` outside ``1..len(subjects)-1``.
    """
    from ..baselines.registration import register

    entries = [subject_images(e) for e in subjects]
    n = len(entries)
    if n < 2:
        raise InputError(f"cross-subject views need at least 2 subjects, got {n}")
    if not 1 <= int(neighbours) <= n - 1:
        raise InputError(f"cross-subject views: neighbours must be in 1..{n - 1} for {n} subjects, got {neighbours}")
    rng = np.random.default_rng(seed)
    total, done = n * int(neighbours), 0
    out: list[list[Image]] = []
    for i, own in enumerate(entries):
        fixed = own[0]
        others = [j for j in range(n) if j != i]
        views = list(own)
        for j in rng.choice(others, size=int(neighbours), replace=False):
            moving = entries[int(j)]
            transform = register(fixed, moving[0], "affine")  # fixed point -> moving point
            views.extend(_resampled(m, fixed, transform) for m in moving)
            done += 1
            if progress is not None:
                progress(done, total)
        out.append(views)
    return out


def _resampled(moving: Image, fixed: Image, transform) -> Image:
    """``moving`` on ``fixed``'s grid through ``transform``; outside it, the moving volume's minimum."""
    moved = resample_to(moving, fixed, transform=transform, default_value=float(np.min(moving.array)))
    return moved.with_array(moved.array, name=f"{moving.name} on {fixed.name}")
