"""A **simulated** population grown from the real MNI152 2009c template, with exact landmark truth.

The subjects are not real people: each one is the single template anatomy (see
:mod:`.templates`) under a random affine (rotation up to 15 degrees about a random axis, scale
up to 10 % per axis, shift) and a random smooth diffeomorphic deformation (a stationary velocity
field from smoothed noise, exponentiated by scaling and squaring), seen through a new voxel grid
(changed, often anisotropic spacing; partially cropped field of view), with a smooth multiplicative
bias field and noise. Contrasts:

- ``t1``, ``t2``: the real T1w and T2w template intensities, warped;
- ``ct``, ``pd``, ``flair``: synthesised from the label map with per-label intensity distributions
  (label-driven synthesis; each subject draws its own label means around fixed references that keep
  the tissue ordering: CT bone > grey > white > CSF > air in HU, PD CSF > grey > white, FLAIR
  grey > white > CSF).

The map from a subject's physical point ``y`` (LPS mm) to the template is
``x = D(A(y))`` with ``A`` affine and ``D(z) = z + u(z)`` the exponentiated velocity field
(trilinear between template voxels). Every image voxel is sampled through exactly this map, and
each template landmark ``p`` is carried to the subject by *solving* ``D(A(q)) = p`` at that point
(fixed-point iteration to 1e-8 voxel), never through an approximate inverse field, so landmarks
and images agree to numerical precision.

Deterministic for a seed: subject ``i`` of a population with seed ``s`` depends on ``(s, i)`` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..errors import InputError
from ..image import Image
from ..points import PointSet, write_points
from .templates import RES_RANGE, TISSUE_OF_LABEL, Template, _check_res, load_template, template_grid

__all__ = [
    "CONTRASTS",
    "SynthSettings",
    "SubjectTransform",
    "synthesize_subject",
    "synthesize_population",
    "synthetic_contrast",
    "parse_contrasts",
    "write_image",
]

CONTRASTS = ("t1", "t2", "ct", "pd", "flair")

# Reference intensity per tissue class for the label-driven contrasts (CT in HU, PD/FLAIR in a.u.).
_REFERENCE = {
    "ct": {"air": -1000.0, "csf": 8.0, "gm": 40.0, "wm": 30.0, "bone": 1000.0, "soft": 45.0},
    "pd": {"air": 0.0, "csf": 1000.0, "gm": 800.0, "wm": 620.0, "bone": 120.0, "soft": 700.0},
    "flair": {"air": 0.0, "csf": 150.0, "gm": 700.0, "wm": 500.0, "bone": 80.0, "soft": 650.0},
}
# Label-specific refinements of the class references (deep grey matter between grey and white).
_LABEL_OFFSET = {
    "ct": {8: -3.0, 9: -3.0, 14: -2.0, 15: -2.0, 20: 1.0, 21: 2.0},
    "pd": {8: -60.0, 9: -60.0, 14: -100.0, 15: -100.0},
    "flair": {8: -60.0, 9: -60.0, 14: -80.0, 15: -80.0},
}
# Spread within a label (fraction of the class reference, or HU for CT).
_WITHIN_SD = {"ct": {"bone": 150.0, "air": 5.0, "default": 4.0}, "pd": 0.03, "flair": 0.03}


@dataclasses.dataclass(frozen=True)
class SynthSettings:
    """Random ranges of the simulated subjects (all distances in mm).

    Attributes:
        max_rotation_deg: rotation angle about a random axis, uniform in ``[0, max]``.
        max_scale: per-axis scale factor in ``[1 - max, 1 + max]``.
        max_shift_mm: per-axis translation in ``[-max, max]``.
        svf_std_mm: standard deviation of each velocity component (before exponentiation).
        svf_spacing_mm: control-point spacing of the smooth noise (larger = smoother).
        svf_steps: scaling-and-squaring steps.
        field_spacing_mm: voxel size of the grid carrying the field (trilinear in between; the
            field is smooth, so a coarse grid loses nothing and is fast).
        spacing_factors: in-plane and through-plane spacing factor ranges, times ``res_mm``.
        anisotropic_prob: probability of a thick-slice (anisotropic) grid.
        max_crop: largest fraction of the head's extent cropped from one side, per axis.
        bias_std: standard deviation of the log bias field (MR contrasts).
        noise_frac: noise standard deviation relative to the white-matter intensity (MR).
        ct_noise_hu: CT noise standard deviation in HU.
        label_jitter: relative per-subject spread of the label means (label-driven contrasts).
    """

    max_rotation_deg: float = 15.0
    max_scale: float = 0.10
    max_shift_mm: float = 15.0
    svf_std_mm: float = 3.0
    svf_spacing_mm: float = 32.0
    svf_steps: int = 7
    field_spacing_mm: float = 4.0
    spacing_factors: tuple[float, float, float, float] = (0.9, 1.3, 1.5, 2.0)
    anisotropic_prob: float = 0.5
    max_crop: float = 0.15
    bias_std: float = 0.12
    noise_frac: float = 0.02
    ct_noise_hu: float = 6.0
    label_jitter: float = 0.03

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_contrasts(contrasts: str | Sequence[str]) -> tuple[str, ...]:
    """Validate contrast names (``"t1,t2"`` or a sequence) against :data:`CONTRASTS`."""
    if isinstance(contrasts, str):
        contrasts = [c for c in contrasts.split(",")]
    names = tuple(str(c).strip().lower() for c in contrasts if str(c).strip())
    if not names:
        raise InputError(f"contrasts: expected one or more of {', '.join(CONTRASTS)}, got none")
    unknown = [c for c in names if c not in CONTRASTS]
    if unknown:
        raise InputError(f"contrasts: unknown contrast {unknown[0]!r}; expected some of {', '.join(CONTRASTS)}")
    return tuple(dict.fromkeys(names))


# ---- geometry -----------------------------------------------------------------------------------
def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _cubic_upsampling_matrix(n_ctrl: int, n_out: int) -> np.ndarray:
    """``(n_out, n_ctrl)`` matrix of cubic B-spline interpolation from ``n_ctrl`` evenly spread
    control values to ``n_out`` samples spanning the same interval (mirror boundary)."""
    from scipy import ndimage as ndi

    pos = np.linspace(0, n_ctrl - 1, n_out)
    w = np.empty((n_out, n_ctrl))
    for m in range(n_ctrl):
        unit = np.zeros(n_ctrl)
        unit[m] = 1.0
        w[:, m] = ndi.map_coordinates(unit, pos[None], order=3, mode="mirror")
    return w


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], ctrl: tuple[int, ...], channels: int) -> np.ndarray:
    """``(channels, *shape)`` smooth noise: Gaussian noise on a ``ctrl`` grid, cubic up-sampling
    (separable, one small matrix per axis)."""
    coarse = rng.standard_normal((channels, *ctrl))
    out = coarse
    for axis, (c, n) in enumerate(zip(ctrl, shape)):
        w = _cubic_upsampling_matrix(c, n)
        out = np.moveaxis(np.tensordot(w, out, axes=([1], [axis + 1])), 0, axis + 1)
    return out.astype(np.float32)


def _torch_sample(volume, idx_kji):
    """Trilinear sample ``volume`` ``(C, nz, ny, nx)`` (torch) at voxel coords ``(N, 3)`` in (k, j, i) order
    (torch float tensor), clamped at the border: returns ``(C, N)``."""
    import torch
    import torch.nn.functional as F

    shape = torch.tensor(volume.shape[1:], dtype=idx_kji.dtype)
    norm = 2.0 * idx_kji / (shape - 1).clamp(min=1) - 1.0
    grid = norm.flip(-1).reshape(1, -1, 1, 1, 3)  # grid_sample wants (x, y, z) = (i, j, k)
    out = F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(volume.shape[0], -1)


def _exp_velocity(v: np.ndarray, steps: int) -> np.ndarray:
    """Displacement ``(3, nz, ny, nx)`` of exp(v) by scaling and squaring; ``v`` and the result are
    in template voxel units, components ordered (k, j, i)."""
    import torch

    with torch.no_grad():
        u = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) / (2.0**steps)
        shape = u.shape[1:]
        base = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"), -1)
        base = base.reshape(-1, 3)
        for _ in range(steps):
            pts = base + u.reshape(3, -1).T
            u = u + _torch_sample(u, pts).reshape(u.shape)
    return u.numpy()


@dataclasses.dataclass
class SubjectTransform:
    """The known map from a subject's physical space to the template's (both LPS mm).

    ``to_template(y) = D(A(y))``: ``A`` is the 4x4 ``affine`` (subject LPS -> template LPS) and
    ``D(z) = z + u(z)``, ``u`` the displacement ``disp`` (``(3, nz, ny, nx)`` in voxels of ``grid``,
    components (k, j, i), trilinear between voxels, clamped outside) on ``grid``, a coarse grid over
    the template's field of view (same origin and axes).
    """

    affine: np.ndarray
    disp: np.ndarray
    grid: Image

    def _disp_at(self, idx_kji: np.ndarray) -> np.ndarray:
        from scipy import ndimage as ndi

        if getattr(self, "_disp64", None) is None or self._disp64.shape != self.disp.shape:
            self._disp64 = np.asarray(self.disp, np.float64)
        return np.stack(
            [ndi.map_coordinates(self._disp64[c], idx_kji.T, order=1, mode="nearest") for c in range(3)], axis=-1
        )

    def _ijk_to_kji(self, pts_lps: np.ndarray) -> np.ndarray:
        return self.grid.physical_to_index(pts_lps)[:, ::-1]

    def to_template(self, points: np.ndarray) -> np.ndarray:
        """Subject LPS points ``(N, 3)`` -> template LPS points ``(N, 3)``."""
        y = np.asarray(points, float).reshape(-1, 3)
        z = y @ self.affine[:3, :3].T + self.affine[:3, 3]
        zk = self._ijk_to_kji(z)
        xk = zk + self._disp_at(zk)
        return self.grid.index_to_physical(xk[:, ::-1])

    def from_template(self, points: np.ndarray, tol_vox: float = 1e-8, max_iter: int = 500) -> np.ndarray:
        """Template LPS points ``(N, 3)`` -> subject LPS points ``(N, 3)``, the exact inverse at each
        point: solves ``z + u(z) = p`` by fixed-point iteration ``z <- p - u(z)`` (damped if needed).

        Raises:
            InputError: the iteration did not converge (a field too strong to be invertible).
        """
        p = np.asarray(points, float).reshape(-1, 3)
        pk = self._ijk_to_kji(p)
        z = pk - self._disp_at(pk)
        step = 1.0
        for it in range(max_iter):
            residual = pk - (z + self._disp_at(z))
            err = np.abs(residual).max()
            if err < tol_vox:
                break
            if it and it % 100 == 0:
                step *= 0.5
            z = z + step * residual
        else:
            raise InputError(f"landmark inversion did not converge (residual {err:.2e} voxel)")
        zp = self.grid.index_to_physical(z[:, ::-1])
        inv = np.linalg.inv(self.affine)
        return zp @ inv[:3, :3].T + inv[:3, 3]


# ---- contrasts ----------------------------------------------------------------------------------
def _label_means(contrast: str, rng: np.random.Generator | None, jitter: float) -> np.ndarray:
    """Mean intensity of every label id (0..255) for a label-driven contrast, jittered per subject."""
    ref = _REFERENCE[contrast]
    means = np.zeros(256, np.float64)
    for lab, tissue in TISSUE_OF_LABEL.items():
        means[lab] = ref[tissue] + _LABEL_OFFSET[contrast].get(lab, 0.0)
    if rng is not None and jitter > 0:
        if contrast == "ct":
            # HU: soft-tissue contrasts are a few HU apart; jitter them in HU, bone and air relatively.
            noise = rng.standard_normal(256)
            soft = np.array([TISSUE_OF_LABEL.get(i, "air") not in ("air", "bone") for i in range(256)])
            means = np.where(soft, means + 1.0 * noise, means * (1 + jitter * noise))
        else:
            means = means * (1 + jitter * rng.standard_normal(256))
    return means


def synthetic_contrast(labels: np.ndarray, contrast: str, rng: np.random.Generator | None = None,
                       jitter: float = 0.0, blur_vox: float = 0.4) -> np.ndarray:
    """A label-driven CT-, PD- or FLAIR-like image (float32, same shape as ``labels``): per-label
    Gaussian intensities (means from reference values, jittered per subject with ``rng``), bone with
    a smooth texture, then a slight blur (``blur_vox``) for partial volume. Simulated, not measured."""
    from scipy import ndimage as ndi

    if contrast not in _REFERENCE:
        raise InputError(f"contrast {contrast!r}: label-driven synthesis knows {', '.join(_REFERENCE)}")
    means = _label_means(contrast, rng, jitter)
    img = means[labels].astype(np.float32)
    gen = rng if rng is not None else np.random.default_rng(12345)
    sd = _WITHIN_SD[contrast]
    tissue = np.array([TISSUE_OF_LABEL.get(i, "air") for i in range(256)])
    if contrast == "ct":
        per_label = np.array([sd.get(t, sd["default"]) for t in tissue], np.float32)
    else:
        per_label = np.abs(means).astype(np.float32) * float(sd)
    texture = ndi.gaussian_filter(gen.standard_normal(labels.shape).astype(np.float32), 1.0) * 2.5
    img += per_label[labels] * texture
    if blur_vox > 0:
        img = ndi.gaussian_filter(img, blur_vox)
    return img.astype(np.float32)


# ---- one subject -------------------------------------------------------------------------------
def _subject_rng(seed: int | np.random.Generator, index: int = 0) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng([int(seed), int(index)])


def _head_box(template: Template) -> tuple[np.ndarray, np.ndarray]:
    """Template LPS bounding box corners (8, 3) of the head (labels > 0)."""
    nz = np.nonzero(template.labels.array)
    lo = np.array([nz[2].min(), nz[1].min(), nz[0].min()], float)
    hi = np.array([nz[2].max(), nz[1].max(), nz[0].max()], float)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    return template.labels.index_to_physical(corners), template.labels.index_to_physical((lo + hi) / 2)


def synthesize_subject(template: Template, rng_or_seed: int | np.random.Generator,
                       contrasts: Sequence[str] = ("t1", "t2"), res_mm: float = 2.0,
                       settings: SynthSettings | None = None, index: int = 0) -> dict:
    """Simulate one subject from ``template`` (a :class:`~.templates.Template` at any resolution).

    Args:
        template: the anatomy seed; its grid carries the deformation field.
        rng_or_seed: a numpy Generator, or an int seed (with ``index``, the subject's stream).
        contrasts: names from :data:`CONTRASTS`.
        res_mm: nominal voxel size of the subject grid (each axis gets a random factor).
        settings: the random ranges (:class:`SynthSettings`).

    Returns:
        ``{"images": {contrast: Image}, "labels": Image (uint8), "landmarks": PointSet (LPS),
        "transform": SubjectTransform, "parameters": dict (JSON-able)}``, all on one subject grid.
        The data are simulated.
    """
    import torch

    contrasts = parse_contrasts(contrasts)
    res = _check_res(res_mm)
    s = settings or SynthSettings()
    rng = _subject_rng(rng_or_seed, index)
    grid = template.labels
    tres = np.asarray(grid.spacing)

    # 1. Random affine A: subject LPS -> template LPS, about the head centre.
    corners, centre = _head_box(template)
    axis = rng.standard_normal(3)
    angle = np.deg2rad(rng.uniform(0.0, s.max_rotation_deg))
    rot = _rotation(axis, angle)
    scales = rng.uniform(1 - s.max_scale, 1 + s.max_scale, 3)
    shift = rng.uniform(-s.max_shift_mm, s.max_shift_mm, 3)
    lin = rot @ np.diag(1.0 / scales)  # the subject is the template scaled by `scales`, rotated by rot^T
    affine = np.eye(4)
    affine[:3, :3] = lin
    affine[:3, 3] = centre - lin @ (centre + shift)
    inv_affine = np.linalg.inv(affine)

    # 2. Stationary velocity field on a coarse grid over the template (voxels), exponentiated.
    fgrid = template_grid(grid, max(float(s.field_spacing_mm), float(tres.max())))
    fres = np.asarray(fgrid.spacing)
    shape = fgrid.array.shape
    ctrl = tuple(max(4, int(round(n * r / s.svf_spacing_mm)) + 1) for n, r in zip(shape, fres[::-1]))
    v = _smooth_noise(rng, shape, ctrl, 3)
    v *= (s.svf_std_mm / fres[::-1]).reshape(3, 1, 1, 1).astype(np.float32) / max(v.std(), 1e-6)
    disp = _exp_velocity(v, s.svf_steps)
    transform = SubjectTransform(affine, disp, fgrid)

    # 3. Landmarks: exact inverse at each point.
    q = transform.from_template(template.landmarks.positions)
    landmarks = PointSet(list(template.landmarks.labels), q, list(template.landmarks.descriptions or []) or None)

    # 4. Subject grid: new (maybe anisotropic) spacing, the head's box in subject space, cropped.
    f_lo, f_hi, a_lo, a_hi = s.spacing_factors
    factors = rng.uniform(f_lo, f_hi, 3)
    thick_axis = -1
    if rng.uniform() < s.anisotropic_prob:
        thick_axis = int(rng.integers(3))
        factors[thick_axis] = rng.uniform(a_lo, a_hi)
    spacing = res * factors
    direction = np.asarray(grid.direction)
    max_disp_mm = float(np.max(np.linalg.norm(disp * fres[::-1].reshape(3, 1, 1, 1), axis=0)))
    sub_corners = corners @ inv_affine[:3, :3].T + inv_affine[:3, 3]
    local = sub_corners @ direction  # coordinates along the grid axes
    lo, hi = local.min(0) - 0.5 * max_disp_mm, local.max(0) + 0.5 * max_disp_mm
    extent = hi - lo
    crop = np.zeros((3, 2))
    for ax in range(3):
        side = int(rng.integers(2))
        crop[ax, side] = rng.uniform(0.0, s.max_crop)
    lo = lo + crop[:, 0] * extent
    hi = hi - crop[:, 1] * extent
    lm_local = q @ direction
    lo = np.minimum(lo, lm_local.min(0) - 15.0)  # never crop a landmark (or its neighbourhood) away
    hi = np.maximum(hi, lm_local.max(0) + 15.0)
    size = np.floor((hi - lo) / spacing).astype(int) + 1
    origin = direction @ lo
    sub_grid = Image(np.zeros(size[::-1], np.uint8), spacing, origin, direction, "subject grid")

    # 5. Sample every contrast and the labels through x = D(A(y)).
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in sub_grid.array.shape], indexing="ij")
    y = sub_grid.index_to_physical(np.stack([i.ravel(), j.ravel(), k.ravel()], -1))
    del i, j, k
    z = y @ affine[:3, :3].T + affine[:3, 3]
    zf = fgrid.physical_to_index(z)[:, ::-1]  # (k, j, i) on the field grid
    with torch.no_grad():
        zf_t = torch.from_numpy(zf.astype(np.float32))
        xf = zf_t + _torch_sample(torch.from_numpy(disp), zf_t).T
        # field-grid voxels -> template voxels (same origin and axes, another spacing)
        xk = xf * torch.from_numpy((fres / tres)[::-1].copy().astype(np.float32))
        del zf_t, xf

        def warp(array: np.ndarray, order: int, fill: float = 0.0) -> np.ndarray:
            import torch.nn.functional as F

            vol = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
            sh = torch.tensor(array.shape, dtype=torch.float32)
            g = (2.0 * xk / (sh - 1) - 1.0).flip(-1).reshape(1, -1, 1, 1, 3)
            out = F.grid_sample(vol - fill, g, mode="nearest" if order == 0 else "bilinear",
                                padding_mode="zeros", align_corners=True)
            return (out.reshape(sub_grid.array.shape) + fill).numpy()

        labels_sub = warp(grid.array, 0).round().astype(np.uint8)
        images: dict[str, Image] = {}
        bias_ctrl = (4, 4, 4)
        params_contrast: dict[str, dict] = {}
        wm_mask = np.isin(labels_sub, (3, 23))
        for c in contrasts:
            if c in ("t1", "t2"):
                src = getattr(template, c).array.astype(np.float32)
                img = warp(src, 1)
            else:
                src = synthetic_contrast(grid.array, c, rng, s.label_jitter)
                img = warp(src, 1, fill=-1000.0 if c == "ct" else 0.0)
            if c == "ct":
                img = img + rng.normal(0.0, s.ct_noise_hu, img.shape).astype(np.float32)
                img = np.clip(np.round(img), -1024, 3071).astype(np.int16)
                params_contrast[c] = {"noise_hu": s.ct_noise_hu}
            else:
                bias = np.exp(s.bias_std * _smooth_noise(rng, img.shape, bias_ctrl, 1)[0])
                img = img * bias
                ref = float(np.median(img[wm_mask])) if wm_mask.any() else float(np.percentile(img, 99))
                sd = s.noise_frac * ref
                n1 = rng.normal(0.0, sd, img.shape).astype(np.float32)
                n2 = rng.normal(0.0, sd, img.shape).astype(np.float32)
                img = np.sqrt((img + n1) ** 2 + n2**2)  # Rician magnitude noise
                img = np.clip(np.round(img), 0, 32767).astype(np.int16)
                params_contrast[c] = {"bias_log_std": s.bias_std, "noise_sd": sd}
            images[c] = sub_grid.with_array(img, name=c)
    labels_img = sub_grid.with_array(labels_sub, name="labels")

    moved = np.linalg.norm(q - template.landmarks.positions, axis=1)
    params = {
        "simulated": True,
        "affine_subject_to_template_lps": affine.tolist(),
        "rotation_axis": (axis / np.linalg.norm(axis)).tolist(),
        "rotation_deg": float(np.rad2deg(angle)),
        "scales": scales.tolist(),
        "shift_mm": shift.tolist(),
        "svf": {"std_mm": s.svf_std_mm, "control_spacing_mm": s.svf_spacing_mm, "steps": s.svf_steps,
                "field_spacing_mm": fres.tolist(), "max_displacement_mm": max_disp_mm},
        "spacing_mm": spacing.tolist(),
        "thick_axis": thick_axis,
        "size": [int(n) for n in size],
        "origin_lps": origin.tolist(),
        "direction": direction.tolist(),
        "crop_fraction_low_high": crop.tolist(),
        "contrasts": params_contrast,
        "landmark_shift_mm": {"mean": float(moved.mean()), "max": float(moved.max())},
        "template_res_mm": float(template.res_mm),
    }
    return {"images": images, "labels": labels_img, "landmarks": landmarks, "transform": transform,
            "parameters": params}


def fingerprint(array) -> str:
    """sha256 of an array's C-ordered bytes, first 12 hex digits (the arrays as written: int16 images)."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:12]


def subject_fingerprint(subject: dict) -> dict[str, str]:
    """Fingerprints of one :func:`synthesize_subject` result: each contrast, the labels, the
    landmark positions (float64 LPS) and the warp (affine and displacement)."""
    out = {c: fingerprint(img.array) for c, img in subject["images"].items()}
    out["labels"] = fingerprint(subject["labels"].array)
    out["landmarks"] = fingerprint(np.asarray(subject["landmarks"].positions, np.float64))
    out["warp"] = fingerprint(np.concatenate([np.asarray(subject["transform"].affine, np.float64).ravel(),
                                              np.asarray(subject["transform"].disp, np.float64).ravel()]))
    return out


# ---- writing ------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | os.PathLike, path: str | os.PathLike, folder: bool = False) -> None:
    """Give a temporary file (0600) or folder (0700) the usual permissions, then rename it into place."""
    os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
    os.replace(tmp, path)


def write_image(image: Image, path: str | os.PathLike) -> pathlib.Path:
    """Write ``image`` as NIfTI (or any SimpleITK format) atomically, compressed."""
    import SimpleITK as sitk

    path = pathlib.Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(image.to_sitk(), tmp, True)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _write_json(obj: dict, path: pathlib.Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
    _publish(tmp, path)


def _write_template(template: Template, contrasts: Sequence[str], folder: pathlib.Path) -> None:
    folder.mkdir()
    for c in contrasts:
        if c in ("t1", "t2"):
            img = getattr(template, c)
            write_image(img.with_array(np.round(img.array).astype(np.int16), name=c), folder / f"{c}.nii.gz")
        else:
            arr = synthetic_contrast(template.labels.array, c, None, 0.0)
            write_image(template.labels.with_array(np.round(arr).astype(np.int16), name=c), folder / f"{c}.nii.gz")
    write_image(template.labels, folder / "labels.nii.gz")
    write_points(template.landmarks, folder / "landmarks.mrk.json")
    write_points(template.landmarks_rater2, folder / "landmarks_rater2.mrk.json")


def _check_n(n: int) -> int:
    try:
        value = int(n)
    except (TypeError, ValueError):
        raise InputError(f"n: expected a whole number of subjects >= 1, got {n!r}") from None
    if value != n or value < 1:
        raise InputError(f"n: expected a whole number of subjects >= 1, got {n!r}")
    return value


def _owned(name: str) -> bool:
    return name in ("population.json", "template") or name.startswith("sub-") or name.startswith(".tmp-")


def synthesize_population(out_dir: str | os.PathLike, n: int, contrasts: str | Sequence[str] = ("t1", "t2"),
                          seed: int = 0, res_mm: float = 2.0, force: bool = False,
                          progress: Callable[[int, int], None] | None = None,
                          settings: SynthSettings | None = None) -> pathlib.Path:
    """Write a simulated population of ``n`` subjects to ``out_dir``.

    Layout: ``population.json`` (``"simulated": true``, seed, settings, label names, subjects),
    ``template/`` (the undeformed template at ``res_mm``: contrasts, ``labels.nii.gz``,
    ``landmarks.mrk.json``, ``landmarks_rater2.mrk.json``) and one ``sub-XXX/`` per subject
    (``<contrast>.nii.gz``, ``labels.nii.gz``, ``landmarks.mrk.json`` in LPS, ``transform.json``).
    Each subject is written to a temporary folder and renamed, so an interrupted run leaves no half
    subject; ``population.json`` is written last.

    Args:
        progress: called as ``progress(done, total)`` after the template and each subject.

    Raises:
        InputError: ``n < 1``, an unknown contrast, ``res_mm`` out of range, ``out_dir`` not empty
            without ``force`` (nothing is touched), or a missing data package.
    """
    n = _check_n(n)
    contrasts = parse_contrasts(contrasts)
    res = _check_res(res_mm)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InputError(f"seed: expected an integer, got {seed!r}") from None
    settings = settings or SynthSettings()
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise InputError(f"output folder {out}: is not empty; choose an empty folder or pass --force to replace it")
        foreign = [p.name for p in out.iterdir() if not _owned(p.name)]
        if foreign:
            raise InputError(f"output folder {out}: holds files that are not a population ({', '.join(sorted(foreign)[:3])}); "
                             "refusing to replace it even with --force")
    template = load_template(res)  # may raise the one-line pip error before anything is written
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for p in out.iterdir():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    total = n + 1
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-template-", dir=out))
    try:
        _write_template(template, contrasts, tmp / "t")
        _publish(tmp / "t", out / "template", folder=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        progress(1, total)
    names = []
    fingerprints: dict[str, dict[str, str]] = {}
    for idx in range(n):
        name = f"sub-{idx:03d}"
        subject = synthesize_subject(template, seed, contrasts, res, settings, index=idx)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=out))
        try:
            for c, img in subject["images"].items():
                write_image(img, tmp / f"{c}.nii.gz")
            write_image(subject["labels"], tmp / "labels.nii.gz")
            write_points(subject["landmarks"], tmp / "landmarks.mrk.json")
            fingerprints[name] = subject_fingerprint(subject)
            _write_json({"subject": name, "seed": [seed, idx], **subject["parameters"]}, tmp / "transform.json")
            _publish(tmp, out / name, folder=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        names.append(name)
        if progress:
            progress(idx + 2, total)

    meta = {
        "generator": "anatssl data synth",
        "library_version": __version__,
        "seed": seed,
        "n": n,
        "contrasts": list(contrasts),
        "res_mm": res,
        "simulated": True,
        "description": "Simulated subjects: the MNI152 2009c template under random affine and diffeomorphic "
                       "warps, with bias field, noise, new grids and cropping; landmarks are the 32 expert AFIDs "
                       "mapped through the known transform. Not real subjects.",
        "subjects": names,
        "label_names": {str(k): v for k, v in template.label_names.items()},
        "landmark_set": "AFIDs (32)",
        "frame": "LPS",
        "settings": settings.as_dict(),
        "res_range_mm": list(RES_RANGE),
        # content of every subject (sha256 of each array, first 12 hex digits): two machines that
        # generate the same population write the same fingerprints
        "fingerprints": fingerprints,
    }
    _write_json(meta, out / "population.json")
    return out
