"""Baselines every benchmark claim is compared to: image registration and raw-intensity patch matching.

- :mod:`.registration`: SimpleITK affine and affine + B-spline (Mattes MI), ANTs SyN (optional
  ``antspyx``); landmark and label-transfer methods.
- :mod:`.patch_matching`: normalised cross-correlation patch matching for landmarks (also from a
  registration affine, on the target mapped into the reference's contrast).

The fourth baseline of the benchmarks, the same encoder with random weights, is supplied by the
encoder tools and registered in :data:`AnatSSLLib.bench.LANDMARK_METHODS`.
"""

from __future__ import annotations

from .patch_matching import NCCLevel, NCCPatchMatching, RegisteredNCC, ncc_map
from .registration import (
    MethodUnavailable,
    RegistrationKind,
    RegistrationLandmarks,
    RegistrationSegmentation,
    RegistrationSettings,
    ants_available,
    register,
    resample_labels,
    transform_points,
)

__all__ = [
    "MethodUnavailable",
    "NCCLevel",
    "NCCPatchMatching",
    "RegisteredNCC",
    "RegistrationKind",
    "RegistrationLandmarks",
    "RegistrationSegmentation",
    "RegistrationSettings",
    "ants_available",
    "ncc_map",
    "register",
    "resample_labels",
    "transform_points",
]
