"""Registration baselines: landmarks and labels carried from a reference volume by image registration.

Three kinds:

- ``"affine"``: SimpleITK, moments initialisation then a 12-parameter affine, Mattes mutual
  information (works across contrasts), three resolution levels.
- ``"bspline"``: the affine, then a free-form B-spline on top (control points every
  ``bspline_spacing_mm``), Mattes MI, L-BFGS-B, two levels.
- ``"syn"``: ANTs symmetric normalisation (affine + SyN, Mattes MI) through ``antspyx``, an optional
  extra (``pip install anatssl[ants]``); :class:`MethodUnavailable` is raised when it is absent.

**Direction of the transforms (the part that is easy to get wrong).** An ITK/ANTs registration of
a *fixed* image F and a *moving* image M returns T with ``T(x_F) = x_M``: it maps points of the
fixed space to the moving space; that is what resampling M onto F's grid needs. Hence:

- *Landmarks* go from the reference into the target, so :class:`RegistrationLandmarks` registers
  the **reference as fixed** and the **target as moving**, then maps each reference point
  directly: ``p_target = T(p_reference)``. No inverse is needed, which matters because a B-spline
  has no closed-form inverse. (ANTs: ``apply_transforms_to_points`` with the forward transforms,
  since ANTs maps points the opposite way to images.)
- *Labels* must be resampled onto the target grid, which needs ``T(x_target) = x_reference``, so
  :class:`RegistrationSegmentation` registers the **target as fixed** and the **reference as
  moving** and resamples the reference labels with nearest-neighbour (ANTs: ``genericLabel``).

All coordinates are LPS mm, the frame of ITK, ANTs and :class:`~AnatSSLLib.image.Image`.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import os
import tempfile

import numpy as np

from ..errors import AnatSSLError, InputError
from ..image import Image
from ..points import PointSet

__all__ = [
    "MethodUnavailable",
    "RegistrationKind",
    "RegistrationSettings",
    "register",
    "transform_points",
    "resample_labels",
    "ants_available",
    "RegistrationLandmarks",
    "RegistrationSegmentation",
]


class MethodUnavailable(AnatSSLError):
    """A benchmark method cannot run here (an optional package is missing); the message says how to get it."""


class RegistrationKind(str, enum.Enum):
    AFFINE = "affine"
    BSPLINE = "bspline"
    SYN = "syn"


def _kind(kind: RegistrationKind | str) -> RegistrationKind:
    try:
        return RegistrationKind(str(kind).lower() if not isinstance(kind, RegistrationKind) else kind)
    except ValueError:
        raise InputError(
            f"registration kind must be one of {[k.value for k in RegistrationKind]}, got {kind!r}"
        ) from None


@dataclasses.dataclass
class RegistrationSettings:
    """Registration settings, chosen for brain volumes at about 2 mm (the defaults take seconds on a CPU).

    Args:
        histogram_bins: Mattes mutual-information bins.
        sampling: fraction of fixed voxels sampled (random, ``seed``) for the metric.
        affine_shrink / affine_sigmas_mm: pyramid of the affine stage (shrink factors, Gaussian
            sigmas in mm).
        affine_iterations: gradient-descent iterations per level.
        bspline_spacing_mm: B-spline control-point spacing in mm.
        bspline_sampling: metric sampling fraction of the B-spline stage (Mattes MI derivatives cost
            grows with the number of control points, so it samples less than the affine stage).
        bspline_shrink / bspline_sigmas_mm / bspline_iterations: pyramid and L-BFGS-B iterations.
        syn_transform: ANTs ``type_of_transform`` (``"SyN"``, ``"SyNRA"``, ``"SyNOnly"`` ...).
        syn_iterations: ANTs SyN iterations per level.
        seed: random seed of the metric sampling.
        threads: threads of the metric (None: SimpleITK's default, the machine's cores). The
            metric's per-thread sums are added in another order with another thread count, so a
            fixed count gives the same answer on every machine (the tools use 1).
    """

    histogram_bins: int = 32
    sampling: float = 0.2
    affine_shrink: tuple[int, ...] = (4, 2, 1)
    affine_sigmas_mm: tuple[float, ...] = (4.0, 2.0, 0.0)
    affine_iterations: int = 200
    bspline_spacing_mm: float = 32.0
    bspline_sampling: float = 0.05
    bspline_shrink: tuple[int, ...] = (2, 1)
    bspline_sigmas_mm: tuple[float, ...] = (2.0, 0.0)
    bspline_iterations: int = 40
    syn_transform: str = "SyN"
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    seed: int = 1
    threads: int | None = None


def _float_sitk(image: Image):
    import SimpleITK as sitk

    if image.ndim != 3:
        raise InputError(f"{image.name}: registration baselines need a 3D image, got shape {image.array.shape}")
    return sitk.Cast(image.to_sitk(), sitk.sitkFloat32)


def _method(settings: RegistrationSettings, shrink, sigmas, sampling: float):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, settings.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if settings.threads is not None:
        reg.SetNumberOfThreads(int(settings.threads))
    return reg


#: the start of an affine registration is kept only when its metric beats the optimiser's answer by
#: this fraction (Mattes MI is negative, lower is better)
_KEEP_START_MARGIN = 0.02


def _affine(fixed, moving, settings: RegistrationSettings, initial: np.ndarray | None = None):
    import SimpleITK as sitk

    if initial is None:
        init = sitk.CenteredTransformInitializer(
            fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
    else:
        init = _sitk_affine(initial, fixed)
    reg = _method(settings, settings.affine_shrink, settings.affine_sigmas_mm, settings.sampling)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-3,
        numberOfIterations=settings.affine_iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=False)
    result = reg.Execute(fixed, moving)
    if initial is not None:
        start, end = _mattes(fixed, moving, init, settings), _mattes(fixed, moving, result, settings)
        # the optimiser left a clearly better start: seen on a thick-slice (6 mm) T2, where the
        # coarse levels pull the affine tens of mm off even from the right answer. The margin keeps
        # near-ties with the optimiser's answer, which moves smoothly with the image, where a bare
        # comparison would jump between the two on noise at the fourth decimal.
        if start < end - _KEEP_START_MARGIN * abs(end):
            return init
    return result


def _sitk_affine(matrix: np.ndarray, fixed):
    """A homogeneous fixed -> moving matrix (LPS mm) as a SimpleITK affine centred on ``fixed``."""
    import SimpleITK as sitk

    m = np.asarray(matrix, float)
    out = sitk.AffineTransform(3)
    out.SetMatrix(tuple(m[:3, :3].ravel()))
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()]))
    out.SetCenter(tuple(centre))
    out.SetTranslation(tuple(m[:3, :3] @ centre + m[:3, 3] - centre))
    return out


def _mattes(fixed, moving, transform, settings: RegistrationSettings) -> float:
    """Mattes mutual information (negated: lower is better) of the two images under ``transform``, at full resolution."""
    reg = _method(settings, [1], [0.0], settings.sampling)
    reg.SetInitialTransform(transform)
    return float(reg.MetricEvaluate(fixed, moving))


def _bspline(fixed, moving, affine, settings: RegistrationSettings):
    import SimpleITK as sitk

    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, int(round(e / settings.bspline_spacing_mm))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    reg = _method(settings, settings.bspline_shrink, settings.bspline_sigmas_mm, settings.bspline_sampling)
    reg.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=settings.bspline_iterations,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=2 * settings.bspline_iterations,
        costFunctionConvergenceFactor=1e7,
    )
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    # x_moving = affine(bspline(x_fixed)); CompositeTransform([A, B]) applies B first.
    return sitk.CompositeTransform([affine, bspline])


def register(
    fixed: Image,
    moving: Image,
    kind: RegistrationKind | str = "affine",
    settings: RegistrationSettings | None = None,
    initial: np.ndarray | None = None,
):
    """Register ``moving`` to ``fixed`` with SimpleITK; returns a ``SimpleITK.Transform`` mapping fixed -> moving.

    The returned transform maps a fixed-space point (LPS mm) to the corresponding moving-space
    point, as ITK defines it. ``kind`` is ``"affine"`` or ``"bspline"`` (``"syn"`` goes through
    :func:`_ants_register`, which returns ANTs transform files). ``initial``: a homogeneous
    ``4 x 4`` fixed -> moving affine (LPS mm) to start the affine stage from, in place of the
    alignment of the two images' intensity moments; the start is returned as it is when the
    optimised affine ends with a worse mutual information at full resolution.
    """
    settings = settings or RegistrationSettings()
    kind = _kind(kind)
    if kind is RegistrationKind.SYN:
        raise InputError("register(): 'syn' is an ANTs registration; use RegistrationLandmarks('syn') or _ants_register")
    f = _float_sitk(fixed)
    m = _float_sitk(moving)
    affine = _affine(f, m, settings, initial)
    if kind is RegistrationKind.AFFINE:
        return affine
    return _bspline(f, m, affine, settings)


def transform_points(transform, points: PointSet) -> PointSet:
    """Apply a SimpleITK transform to every point (LPS mm in, LPS mm out); labels are kept."""
    moved = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points.positions]).reshape(-1, 3)
    return PointSet(list(points.labels), moved, descriptions=points.descriptions)


def resample_labels(labels: Image, grid: Image, transform) -> Image:
    """Labels of a moving image resampled, nearest neighbour, onto ``grid`` through ``transform`` (grid -> labels space)."""
    import SimpleITK as sitk

    lab = labels.to_sitk()
    ref = grid.to_sitk()
    out = sitk.Resample(lab, ref, transform, sitk.sitkNearestNeighbor, 0, lab.GetPixelID())
    return Image.from_sitk(out, name=f"{labels.name} on {grid.name}")


# ---- ANTs ------------------------------------------------------------------------------------
def ants_available() -> bool:
    """Whether ``antspyx`` (module ``ants``) can be imported."""
    return importlib.util.find_spec("ants") is not None


def _require_ants():
    if not ants_available():
        raise MethodUnavailable(
            "ANTs SyN baseline skipped: antspyx is not installed (pip install 'anatssl[ants]' or pip install antspyx)"
        )
    import ants

    return ants


def _to_ants(image: Image):
    ants = _require_ants()
    if image.ndim != 3:
        raise InputError(f"{image.name}: the ANTs baseline needs a 3D image, got shape {image.array.shape}")
    # ANTs arrays are indexed [i, j, k]; Image arrays are [k, j, i]. Geometry is ITK's (LPS).
    return ants.from_numpy(
        np.ascontiguousarray(image.array.T, dtype=np.float32),
        origin=list(image.origin),
        spacing=list(image.spacing),
        direction=np.asarray(image.direction, dtype=float),
    )


def _ants_register(fixed: Image, moving: Image, settings: RegistrationSettings, workdir: str) -> dict:
    ants = _require_ants()
    return ants.registration(
        _to_ants(fixed),
        _to_ants(moving),
        type_of_transform=settings.syn_transform,
        reg_iterations=tuple(settings.syn_iterations),
        outprefix=os.path.join(workdir, "reg_"),
        random_seed=settings.seed,
    )


def _ants_points(points: PointSet, transforms: list[str]) -> PointSet:
    import pandas as pd

    ants = _require_ants()
    frame = pd.DataFrame(np.asarray(points.positions, dtype=float), columns=["x", "y", "z"])
    out = ants.apply_transforms_to_points(3, frame, transforms)
    return PointSet(list(points.labels), out[["x", "y", "z"]].to_numpy(dtype=float), descriptions=points.descriptions)


# ---- benchmark methods -----------------------------------------------------------------------
class RegistrationLandmarks:
    """Landmark baseline: register reference (fixed) to target (moving), map reference points forward.

    Implements the benchmark's ``LandmarkMethod`` protocol (``prepare`` then ``locate``).
    ``confidence`` is not defined for registration and is left ``None``.

    Args:
        kind: ``"affine"``, ``"bspline"`` (SimpleITK) or ``"syn"`` (ANTs, optional).
        settings: registration settings (defaults suit 2 mm brain volumes).

    Raises:
        MethodUnavailable: ``kind="syn"`` and antspyx is not installed.
    """

    def __init__(self, kind: RegistrationKind | str = "affine", settings: RegistrationSettings | None = None):
        self.kind = _kind(kind)
        self.settings = settings or RegistrationSettings()
        if self.kind is RegistrationKind.SYN:
            _require_ants()
        self.name = self.kind.value
        self.description = {
            RegistrationKind.AFFINE: "SimpleITK affine, Mattes MI",
            RegistrationKind.BSPLINE: "SimpleITK affine then B-spline, Mattes MI",
            RegistrationKind.SYN: f"ANTs {self.settings.syn_transform}, Mattes MI",
        }[self.kind]
        self._reference: Image | None = None
        self._points: PointSet | None = None

    def prepare(self, reference: Image, ref_points: PointSet) -> None:
        """Remember the reference volume and its landmarks (LPS mm); registration happens per target."""
        self._reference = reference
        self._points = ref_points

    def locate(self, target: Image) -> PointSet:
        """Reference landmarks carried into ``target`` (LPS mm)."""
        if self._reference is None or self._points is None:
            raise InputError(f"{self.name}: call prepare(reference, points) before locate(target)")
        if self.kind is RegistrationKind.SYN:
            with tempfile.TemporaryDirectory(prefix="anatssl_ants_") as tmp:
                reg = _ants_register(self._reference, target, self.settings, tmp)
                # ANTs maps points opposite to images: the forward (fixed -> moving) list takes
                # reference (fixed) points to the target (moving).
                return _ants_points(self._points, reg["fwdtransforms"])
        transform = register(self._reference, target, self.kind, self.settings)
        return transform_points(transform, self._points)


class RegistrationSegmentation:
    """Segmentation baseline: register target (fixed) to reference (moving), pull reference labels onto the target grid.

    Implements the benchmark's ``SegmentationMethod`` protocol.

    Args:
        kind: ``"affine"``, ``"bspline"`` or ``"syn"``.
        settings: registration settings.
    """

    def __init__(self, kind: RegistrationKind | str = "affine", settings: RegistrationSettings | None = None):
        self.kind = _kind(kind)
        self.settings = settings or RegistrationSettings()
        if self.kind is RegistrationKind.SYN:
            _require_ants()
        self.name = self.kind.value
        self._reference: Image | None = None
        self._labels: Image | None = None

    def prepare(self, reference: Image, reference_labels: Image) -> None:
        """Remember the reference volume and its label map (any integer labels, same physical extent)."""
        self._reference = reference
        self._labels = reference_labels

    def segment(self, target: Image) -> Image:
        """Reference labels resampled onto ``target``'s grid (nearest neighbour)."""
        if self._reference is None or self._labels is None:
            raise InputError(f"{self.name}: call prepare(reference, labels) before segment(target)")
        if self.kind is RegistrationKind.SYN:
            ants = _require_ants()
            with tempfile.TemporaryDirectory(prefix="anatssl_ants_") as tmp:
                reg = _ants_register(target, self._reference, self.settings, tmp)
                warped = ants.apply_transforms(
                    fixed=_to_ants(target),
                    moving=_to_ants(self._labels),
                    transformlist=reg["fwdtransforms"],
                    interpolator="genericLabel",
                )
            array = np.rint(warped.numpy().T).astype(self._labels.array.dtype)
            return target.with_array(array, name=f"{self._labels.name} on {target.name}")
        transform = register(target, self._reference, self.kind, self.settings)
        return resample_labels(self._labels, target, transform)
