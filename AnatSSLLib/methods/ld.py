"""LD (unsupervised local discrimination): views, patch pooling, loss terms and the training task.

Chen, Wang, Wang, Li, Fang, Li, Bai, Peng, Meng, Wang, "Unsupervised local discrimination for
medical images", IEEE TPAMI 2023 (arXiv 2108.09440), extending IPMI 2021 (arXiv 2012.09333).
Reference code (no licence; read, not copied): https://github.com/HuaiChen-1994/LDLearning
@ 72f5a74, ``retinal code/step1_ld_pretraining/{step1_train_pd_mixup,step2_train_ld,BatchAverage,
my_utils}.py`` and ``models/my_models.py``. Formulas as in METHODS.md section 2.

One file = the method: the view sampler (:func:`make_ld_batch`, :func:`undo_flip_rot90`), patch
pooling (:func:`average_patches`, :func:`centre_weighted_patches`, :func:`gaussian_pool_at`,
:func:`gaussian_smooth_embedding`), the loss terms (:func:`patch_discrimination_loss`,
:func:`mixup_loss`, :func:`region_embeddings`, :func:`cluster_centres`,
:func:`region_discrimination_loss`, :func:`entropy_loss`, :func:`area_balance_loss`,
:func:`pixel_region_loss`), their combination :class:`LDLoss`, one step
(:func:`ld_training_step`) and the engine's task (:class:`LDTask`). The network is
:class:`AnatSSLLib.networks.LDNet`.

Batch layout (as in the reference): ``[A1, B1, A2, B2, M]``, five groups of B images each. A and B
are two different images; ``X1`` and ``X2`` are two photometric views of the same geometric
augmentation of X; ``X2`` is also flipped and rotated by a multiple of 90 degrees, undone on the
feature map; ``M = lam*A1 + (1-lam)*B1``.

Choices where the paper and code leave things open (each also said where it is made):

- Patch pooling: the released code average-pools the embedding on a G x G grid; the paper
  (centre-sensitive averaging, METHODS.md 2.5) weights each patch by a normalised Gaussian W_c
  peaked at its centre. Default here: ``"centre"`` (the paper); ``"average"`` reproduces the code.
  sigma of W_c is **not given by the released code**: parameter, default patch size / 4.
- View-2 flip: the reference flips *both* image axes (a 180-degree rotation, redundant with
  rot90); we flip each axis independently with p = 0.5, so view 2 covers the whole dihedral group.
- Colour jitter -> MRI intensity jitter: brightness x U(0.6, 1.4), contrast x U(0.6, 1.4) about the
  mean, gamma U(0.7, 1.5), on the image rescaled to [0, 1] by its min and max, then mapped back
  (ColorJitter's saturation/hue and RandomGrayscale have no meaning for one channel).
- 3D rotation: +-180 degrees in the plane of the last two axes (the plane of the 2D code's
  rotation and of rot90) and +-15 degrees in the two other planes.
- Gradients of the instance criterion: the reference detaches the "key" side (``x.t().data``); we
  keep that by default (``detach_keys=True``); the loss value is the same either way.
- Terms against collapse: the code's total is ``L_PD + L_mix + 10 L_RD + 0.1 L_ent``; its
  ``loss_area`` (balance) is defined but unused, so :func:`area_balance_loss` has weight 0 by
  default. The code has no pixel-to-region term ("pixels pulled to their own region"): the
  region means are its only pixel-region coupling; :func:`pixel_region_loss` is an optional
  extra, weight 0 by default.
- Region terms use the 4B non-mixup images; centres are per batch, with gradients (no bank).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError

__all__ = [
    "Stage",
    "Pooling",
    "LDViews",
    "make_ld_batch",
    "apply_flip_rot90",
    "undo_flip_rot90",
    "unwarp_features",
    "random_intensity_remap",
    "average_patches",
    "overlap_patch_pairs",
    "assignment_consistency_loss",
    "dense_correspondence_loss",
    "centre_weighted_patches",
    "gaussian_pool_at",
    "gaussian_smooth_embedding",
    "patch_discrimination_loss",
    "mixup_loss",
    "region_embeddings",
    "cluster_centres",
    "region_discrimination_loss",
    "entropy_loss",
    "area_balance_loss",
    "pixel_region_loss",
    "l2_normalize",
    "LDLoss",
    "ld_training_step",
    "LDTask",
]

_EPS = 1e-10


class Stage(str, enum.Enum):
    """Training stage: ``"pd"`` (patch discrimination + mixup) or ``"ld"`` (+ regions, entropy)."""

    PD = "pd"
    LD = "ld"


class Pooling(str, enum.Enum):
    """Patch pooling: ``"centre"`` (Gaussian W_c, the paper) or ``"average"`` (the released code)."""

    CENTRE = "centre"
    AVERAGE = "average"


def _enum(cls: type[enum.Enum], value: Any, name: str) -> Any:
    try:
        return cls(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in cls)
        raise InputError(f"{name}: expected one of {allowed}, got {value!r}") from None


def l2_normalize(x: Tensor, dim: int = 1) -> Tensor:
    """``x / (||x||_2 + 1e-10)`` along ``dim`` (the reference's ``l2_normal``)."""
    return x / (x.norm(dim=dim, keepdim=True) + _EPS)


# ------------------------------------------------------------------------------ views and sampling


@dataclass
class LDViews:
    """A batch of LD views (see :func:`make_ld_batch`).

    Attributes:
        images: ``5B, C, *S``, groups ``[A1, B1, A2, B2, M]`` of ``batch_size`` images each.
        lam: ``B``, mixup weights of A in M.
        flips: ``2B, d`` bool, axes flipped in ``[A2, B2]`` (before the rotation).
        rot90_k: ``2B`` long, quarter turns of ``[A2, B2]`` in the plane of the last two axes.
        warp: ``2B, *S, d`` or None: the smooth displacement (grid_sample's normalised x-y-z
            units, before the flip/rot90) by which ``[A2, B2]`` were sampled; undone on the features.
        pair_map: ``2B, d, d+1`` or None: the affine map from view 1's voxel indices to view 2's
            (axis order, before the flip/rot90) when ``[A2, B2]`` are other crops than ``[A1, B1]``
            (``view_shift``, ``view_turn_deg``, ``view_zoom`` of :func:`make_ld_batch`): the anatomy
            at ``y`` in view 1 is at ``pair_map @ [y, 1]`` in view 2.
    """

    images: Tensor
    lam: Tensor
    flips: Tensor
    rot90_k: Tensor
    warp: Tensor | None = None
    pair_map: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.lam.shape[0])

    def as_dict(self) -> dict[str, Tensor]:
        """Plain dict of tensors (what the engine moves to the device)."""
        out = {"images": self.images, "lam": self.lam, "flips": self.flips, "rot90_k": self.rot90_k}
        if self.warp is not None:
            out["warp"] = self.warp
        if self.pair_map is not None:
            out["pair_map"] = self.pair_map
        return out

    @classmethod
    def from_any(cls, batch: LDViews | Mapping[str, Tensor]) -> LDViews:
        """An :class:`LDViews` from itself or from :meth:`as_dict`'s dict."""
        if isinstance(batch, LDViews):
            return batch
        if isinstance(batch, Mapping) and {"images", "lam", "flips", "rot90_k"} <= set(batch):
            return cls(batch["images"], batch["lam"], batch["flips"], batch["rot90_k"], batch.get("warp"), batch.get("pair_map"))
        raise InputError(
            "LD batch: expected LDViews or a dict with images, lam, flips, rot90_k, got "
            f"{type(batch).__name__}"
        )

    def rows(self, sl: slice) -> LDViews:
        """The views of pairs ``sl`` only (a rank's shard), keeping the 5-group layout."""
        b = self.batch_size
        idx = torch.arange(b)[sl]
        img = torch.cat([self.images[g * b + idx] for g in range(5)])
        fl = torch.cat([self.flips[g * b + idx] for g in range(2)])
        k = torch.cat([self.rot90_k[g * b + idx] for g in range(2)])
        warp = None if self.warp is None else torch.cat([self.warp[g * b + idx] for g in range(2)])
        pair_map = None if self.pair_map is None else torch.cat([self.pair_map[g * b + idx] for g in range(2)])
        return LDViews(img, self.lam[idx], fl, k, warp, pair_map)


def apply_flip_rot90(x: Tensor, flips: Tensor, k: Tensor) -> Tensor:
    """Per sample: flip the axes marked in ``flips`` (``N, d`` bool), then rotate by ``k`` quarter
    turns in the plane of the last two axes. ``x``: ``N, C, *S`` (``S`` of length d)."""
    _check_flip_rot(x, flips, k)
    out = []
    for n in range(x.shape[0]):
        y = x[n]
        axes = [1 + a for a in range(flips.shape[1]) if bool(flips[n, a])]
        if axes:
            y = torch.flip(y, dims=axes)
        kk = int(k[n]) % 4
        if kk:
            y = torch.rot90(y, kk, dims=(-2, -1))
        out.append(y)
    return torch.stack(out)


def undo_flip_rot90(feature: Tensor, flips: Tensor, k: Tensor) -> Tensor:
    """Inverse of :func:`apply_flip_rot90` on a feature map or patch grid ``N, C, *S``.

    Rotates back by ``-k`` quarter turns (last two axes), then flips the same axes, so that the
    grid of view 2 lines up with view 1 (METHODS.md 2.2). Works on full-resolution maps and on
    patch grids alike (a grid's cells map to cells under flips and quarter turns).
    """
    _check_flip_rot(feature, flips, k)
    out = []
    for n in range(feature.shape[0]):
        y = feature[n]
        kk = int(k[n]) % 4
        if kk:
            y = torch.rot90(y, -kk, dims=(-2, -1))
        axes = [1 + a for a in range(flips.shape[1]) if bool(flips[n, a])]
        if axes:
            y = torch.flip(y, dims=axes)
        out.append(y)
    return torch.stack(out)


def _check_flip_rot(x: Tensor, flips: Tensor, k: Tensor) -> None:
    d = x.ndim - 2
    if d < 2 or flips.shape != (x.shape[0], d) or k.shape != (x.shape[0],):
        raise InputError(
            f"flip/rot90: expected x N,C,*S (2 or 3 spatial axes), flips (N, d), k (N,); got "
            f"{tuple(x.shape)}, {tuple(flips.shape)}, {tuple(k.shape)}"
        )
    if x.shape[-1] != x.shape[-2] and bool((k % 2 == 1).any()):
        raise InputError(
            f"flip/rot90: an odd quarter turn needs equal last two sizes, got {tuple(x.shape[2:])}"
        )


def _uniform(gen: torch.Generator | None, n: int, lo: float, hi: float, *extra: int) -> Tensor:
    return lo + (hi - lo) * torch.rand((n, *extra), generator=gen, dtype=torch.float64)


def _plane_rotation(d: int, i: int, j: int, angle: Tensor) -> Tensor:
    """``N, d, d`` rotations by ``angle`` (radians, ``N``) in the plane of axes i, j."""
    r = torch.eye(d, dtype=torch.float64).repeat(angle.shape[0], 1, 1)
    c, s = torch.cos(angle), torch.sin(angle)
    r[:, i, i], r[:, j, j], r[:, i, j], r[:, j, i] = c, c, -s, s
    return r


def _random_rotation(gen: torch.Generator | None, n: int, d: int, max_deg: Sequence[float]) -> Tensor:
    """``N, d, d`` random rotations; 2D: one angle; 3D: planes (1,2), (0,2), (0,1) in that order."""
    planes = [(0, 1)] if d == 2 else [(1, 2), (0, 2), (0, 1)]
    if len(max_deg) != len(planes):
        raise InputError(f"rotation range: expected {len(planes)} value(s) for {d}D, got {tuple(max_deg)}")
    rot = torch.eye(d, dtype=torch.float64).repeat(n, 1, 1)
    for (i, j), m in zip(planes, max_deg):
        ang = _uniform(gen, n, -m, m) * math.pi / 180.0
        rot = _plane_rotation(d, i, j, ang) @ rot
    return rot


def _view_grids(
    shape: Sequence[int], shared: tuple[Tensor, Tensor], view_rot: Tensor
) -> Tensor:
    """affine_grid ``theta`` (``N, d, d+1``, x-y-z order) for: shared geometric map, then a view
    rotation. ``shared`` = (A, t) mapping view-free output coords to input coords (axis order,
    normalised); ``view_rot``: ``N, d, d`` rotation in centred voxel units."""
    d = len(shape)
    half = torch.tensor([s / 2.0 for s in shape], dtype=torch.float64)
    dg, dg_inv = torch.diag(half), torch.diag(1.0 / half)
    a_shared, t_shared = shared
    a = a_shared @ (dg_inv @ view_rot.transpose(1, 2) @ dg)
    perm = torch.eye(d, dtype=torch.float64).flip(0)  # axis order <-> grid_sample's x, y, z order
    theta = torch.cat([perm @ a @ perm, (perm @ t_shared.unsqueeze(-1))], dim=2)
    return theta


def _blur_each(x: Tensor, sigmas: Tensor) -> Tensor:
    """Each image of ``x`` (``N, C, *S``) blurred by its own Gaussian, ``sigmas`` ``N, d`` in voxels
    (:func:`AnatSSLLib.embedding.gaussian_filter`: cut at 3 sigma, edges replicated)."""
    from ..embedding import gaussian_filter

    return torch.stack([gaussian_filter(x[i], tuple(float(s) for s in sigmas[i])) for i in range(x.shape[0])])


def random_intensity_remap(u: Tensor, y: Tensor, apply: Tensor) -> Tensor:
    """Images ``u`` (``N, C, *S``, values in [0, 1]) through per-image piecewise-linear transfer
    functions: ``y`` (``N, K``) are the output values at ``K`` equally spaced input knots in [0, 1];
    images with ``apply[n]`` false are returned unchanged. Non-monotonic ``y`` change the contrast
    (dark and bright tissues may swap), as between MRI sequences."""
    n, k = y.shape
    pos = u.clamp(0.0, 1.0) * (k - 1)
    lo = pos.floor().clamp(max=k - 2).long()
    frac = pos - lo
    flat_lo = lo.reshape(n, -1)
    y = y.to(u.dtype)
    out = (torch.gather(y, 1, flat_lo) * (1 - frac.reshape(n, -1)) + torch.gather(y, 1, flat_lo + 1) * frac.reshape(n, -1))
    out = out.reshape(u.shape)
    return torch.where(apply.view((n,) + (1,) * (u.ndim - 1)), out, u)


def make_ld_batch(
    images: Tensor,
    generator: torch.Generator | None = None,
    *,
    rotate_deg: Sequence[float] | None = None,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    view_rotate_deg: float = 2.0,
    brightness: float = 0.4,
    contrast: float = 0.4,
    gamma: tuple[float, float] = (0.7, 1.5),
    mix_range: tuple[float, float] = (0.2, 0.8),
    flip_rot90: bool = True,
    shared_flip: bool = True,
    view_warp_vox: float = 0.0,
    view_warp_control: int = 4,
    view_shift: float = 0.0,
    view_turn_deg: float = 0.0,
    view_zoom: float = 0.0,
    view_blur: float = 0.0,
    view_noise: float = 0.0,
    view_remap: float = 0.0,
) -> LDViews:
    """LD's views of ``images`` (``2B, C, *S``: the first B are the A images, the last B the B
    images), METHODS.md 2.2.

    Per image, a shared geometric augmentation: a flip of each spatial axis (p 0.5; off with
    ``shared_flip=False``, for volumes in a canonical orientation), a rotation
    (2D: +-180 degrees; 3D default ``(180, 15, 15)`` degrees in the planes (1,2), (0,2), (0,1)),
    and a random-resized crop of area/volume fraction ``crop_scale`` and aspect ``crop_ratio``
    resized back to ``S``. Then two photometric views each: a rotation of +-``view_rotate_deg``
    and intensity jitter (brightness, contrast, gamma on the image min-max rescaled to [0, 1];
    our MRI replacement for ColorJitter). View 2 is also flipped (each axis, p 0.5) and turned by
    k quarter turns (k in 0..3; in the plane of the last two axes; only k in {0, 2} when those
    two sizes differ); :func:`undo_flip_rot90` undoes it on the features. Mixup
    ``M = lam*A1 + (1-lam)*B1``, ``lam ~ U(mix_range)``.

    ``view_warp_vox > 0`` (our extension, off by default; not in the paper): view 2 is also
    sampled through a smooth random displacement (normal control values of standard deviation
    ``view_warp_vox`` voxels on a ``view_warp_control``-per-axis grid, interpolated), which
    :class:`LDLoss` undoes on the features. The same anatomy under two different local
    deformations is then one positive pair, so the embedding learns to ignore the shape
    differences between subjects that patch discrimination alone treats as identity.

    ``view_shift > 0``, ``view_turn_deg > 0``, ``view_zoom > 0`` (our extension, off by default; not
    in the paper): view 2 is another crop of the same image: moved against view 1's by a random
    translation of up to ``view_shift`` times the crop size per axis, turned by up to
    ``view_turn_deg`` degrees in each plane (in place of ``view_rotate_deg``) and zoomed by a factor
    in ``1 +- view_zoom`` (outside the image is filled as above). The exact voxel map between the
    views is returned (``pair_map``) and :class:`LDLoss` pairs patches at the same anatomy. Why:
    with one crop shared by both views, as in the paper, a 3D network can solve patch
    discrimination from where a patch lies in the crop (its receptive field reaches the crop's
    borders). Measured on our CPU-trained encoders (``benchmarks/probe_shift_equivariance.py``):
    moving a 32^3 input by 6 voxels left the embedding of the same anatomy no closer than that of
    two random voxels (cosine -0.05; random weights 0.99). A shift alone did not change that;
    shift, turn, zoom and warp together raised it to 0.66, though not yet the consistency across
    subjects that the tools need.

    ``view_blur > 0``, ``view_noise > 0`` (our extension, off by default; not in the paper): each
    view is blurred by a Gaussian of standard deviation drawn in ``[0, view_blur]`` voxels per axis
    and gets additive Gaussian noise of standard deviation drawn in ``[0, view_noise]`` (of the
    image's range), independently per view: images of one anatomy at other resolutions and noise
    levels (subjects scanned at other voxel sizes) then count as the same patch.

    ``view_remap > 0`` (our extension, off by default; not in the paper): with that probability per
    image and view, the view's intensities go through a random piecewise-linear transfer function
    (:func:`random_intensity_remap`, 6 knots, output values uniform in [0, 1], so not monotonic),
    after the jitter and before blur and noise: the same anatomy under an arbitrary contrast is one
    positive pair, so the embedding cannot rely on which tissue is bright (the contrast-agnostic
    augmentation of SynthSeg and SynthMorph, Billot et al. 2023, Hoffmann et al. 2022).

    Each view is one ``grid_sample`` (bilinear) of the original image with the composed affine
    map; outside the image is filled with the image's minimum. Random numbers come from
    ``generator`` only (reproducible).

    Returns:
        :class:`LDViews` with ``images`` ``5B, C, *S`` = ``[A1, B1, A2, B2, M]``.

    Raises:
        InputError: not ``2B, C, *S`` with 2 or 3 spatial axes and an even, positive ``2B``.
    """
    if images.ndim not in (4, 5) or images.shape[0] < 2 or images.shape[0] % 2:
        raise InputError(
            "make_ld_batch images: expected 2B,C,H,W or 2B,C,D,H,W with an even number 2B >= 2 of "
            f"images (A half, then B half), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        images = images.float()
    gen = generator
    n, d = images.shape[0], images.ndim - 2
    shape = tuple(images.shape[2:])
    b = n // 2
    if rotate_deg is None:
        rotate_deg = (180.0,) if d == 2 else (180.0, 15.0, 15.0)

    # shared geometry: input <- flip <- rotate <- crop (affine map on normalised coordinates)
    half = torch.tensor([s / 2.0 for s in shape], dtype=torch.float64)
    dg, dg_inv = torch.diag(half), torch.diag(1.0 / half)
    flip = torch.where(torch.rand((n, d), generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    if not shared_flip:  # volumes in a canonical orientation: keep left/right and front/back apart
        flip = torch.ones_like(flip)
    rot = _random_rotation(gen, n, d, rotate_deg)
    scale = _uniform(gen, n, *crop_scale)
    log_r = _uniform(gen, n, math.log(crop_ratio[0]), math.log(crop_ratio[1]), d) / 2.0
    log_r = log_r - log_r.mean(dim=1, keepdim=True)
    frac = (scale.unsqueeze(1) ** (1.0 / d) * torch.exp(log_r)).clamp(max=1.0)  # side fractions
    centre = (2.0 * torch.rand((n, d), generator=gen, dtype=torch.float64) - 1.0) * (1.0 - frac)
    a_shared = torch.diag_embed(flip) @ dg_inv @ rot.transpose(1, 2) @ dg @ torch.diag_embed(frac)
    t_shared = (torch.diag_embed(flip) @ dg_inv @ rot.transpose(1, 2) @ dg @ centre.unsqueeze(-1)).squeeze(-1)

    flat = images.reshape(n, -1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = (hi - lo).clamp_min(1e-8)
    bshape = (n,) + (1,) * (d + 1)
    base = images - lo.view(bshape)

    warp = None
    if view_warp_vox > 0:
        control = torch.randn((n, d) + (int(view_warp_control),) * d, generator=gen) * float(view_warp_vox)
        mode = "bilinear" if d == 2 else "trilinear"
        dense = F.interpolate(control, size=shape, mode=mode, align_corners=True)  # n, d (axis order), *S voxels
        to_normalised = torch.tensor([2.0 / s for s in shape]).view(1, d, *([1] * d))
        warp = (dense * to_normalised).flip(1).movedim(1, -1).to(images.device, images.dtype)  # n, *S, d (x-y-z)

    other_crop = view_shift > 0 or view_turn_deg > 0 or view_zoom > 0
    sizes = torch.tensor(shape, dtype=torch.float64)
    if other_crop:  # drawn only when asked for, so that the paper's views keep their random stream
        shift = (2.0 * torch.rand((n, d), generator=gen, dtype=torch.float64) - 1.0) * float(view_shift) * sizes
        zoom = _uniform(gen, n, 1.0 - float(view_zoom), 1.0 + float(view_zoom))

    views, rotations = [], []
    for view in range(2):
        turn = view_turn_deg if (view == 1 and view_turn_deg > 0) else view_rotate_deg
        vrot = _random_rotation(gen, n, d, [turn] * (1 if d == 2 else 3))
        rotations.append(vrot)
        theta = _view_grids(shape, (a_shared, t_shared), vrot)
        if view == 1 and other_crop:  # sample at theta(z (x + t)), x and t in centred voxels
            t_xyz = (shift * 2.0 / sizes).flip(1)
            lin = theta[:, :, :d] * zoom.view(n, 1, 1)
            theta = torch.cat([lin, theta[:, :, d:] + lin @ t_xyz.unsqueeze(-1)], dim=2)
        theta = theta.to(images.device, images.dtype)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        if view == 1 and warp is not None:  # sample at theta(x + u(x))
            grid = grid + torch.einsum("n...j,nij->n...i", warp, theta[:, :, :d])
        v = F.grid_sample(base, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        u = (v / span.view(bshape)).clamp(0.0, 1.0)
        g = _uniform(gen, n, *gamma).to(images.dtype).view(bshape)
        c = _uniform(gen, n, 1 - contrast, 1 + contrast).to(images.dtype).view(bshape)
        br = _uniform(gen, n, 1 - brightness, 1 + brightness).to(images.dtype).view(bshape)
        u = u.clamp_min(1e-12) ** g
        mean = u.mean(dim=tuple(range(1, d + 2)), keepdim=True)
        u = ((u - mean) * c + mean).clamp(0.0, 1.0)
        u = (u * br).clamp(0.0, 1.0)
        if view_remap > 0:
            remap = torch.rand((n,), generator=gen) < float(view_remap)
            u = random_intensity_remap(u, torch.rand((n, 6), generator=gen).to(u.device), remap.to(u.device))
        if view_blur > 0:
            u = _blur_each(u, _uniform(gen, n, 0.0, float(view_blur), d))
        if view_noise > 0:
            std = _uniform(gen, n, 0.0, float(view_noise)).to(images.dtype).view(bshape)
            u = (u + std * torch.randn(u.shape, generator=gen).to(u.device, u.dtype)).clamp(0.0, 1.0)
        views.append(lo.view(bshape) + u * span.view(bshape))
    v1, v2 = views

    if flip_rot90:
        flips = torch.rand((n, d), generator=gen) < 0.5
        kmax = 4 if shape[-1] == shape[-2] else 2
        k = torch.randint(0, kmax, (n,), generator=gen) * (4 // kmax)
    else:
        flips = torch.zeros((n, d), dtype=torch.bool)
        k = torch.zeros((n,), dtype=torch.long)
    v2 = apply_flip_rot90(v2, flips, k)

    lam = _uniform(gen, b, *mix_range).to(images.dtype)
    mix = lam.view((b,) + (1,) * (d + 1)) * v1[:b] + (1 - lam.view((b,) + (1,) * (d + 1))) * v1[b:]
    out = torch.cat([v1[:b], v1[b:], v2[:b], v2[b:], mix])
    pair_map = None
    if other_crop:  # view 1 shows S(R1^T y), view 2 S(R2^T z (x + t)): x = R2 R1^T y / z - t (centred)
        lin = rotations[1] @ rotations[0].transpose(1, 2) / zoom.view(n, 1, 1)
        c0 = (sizes - 1.0) / 2.0
        offset = c0 - shift - (lin @ c0.view(1, d, 1)).squeeze(-1)
        pair_map = torch.cat([lin, offset.unsqueeze(-1)], dim=2).to(images.dtype)
    return LDViews(images=out, lam=lam, flips=flips, rot90_k=k.long(), warp=warp, pair_map=pair_map)


def unwarp_features(features: Tensor, warp: Tensor, iterations: int = 3, unit: bool = True) -> Tensor:
    """Features ``N, D, *S`` of images sampled at ``x + warp(x)``, brought back to ``x``.

    ``warp`` is ``N, *S, d`` in grid_sample's normalised x-y-z units. The inverse displacement
    solves ``q + warp(q) = x`` by a few fixed-point steps (``q <- x - warp(q)``), which converge for
    the smooth, few-voxel fields of :func:`make_ld_batch`. Unit norm per voxel kept (``unit``;
    off for maps that are not embeddings, e.g. cluster assignments).
    """
    n, d = features.shape[0], features.ndim - 2
    eye = torch.eye(d, d + 1, dtype=features.dtype, device=features.device).expand(n, d, d + 1)
    identity = F.affine_grid(eye, list(features.shape), align_corners=False)
    field = warp.movedim(-1, 1)  # N, d, *S
    q = identity - warp
    for _ in range(iterations):
        at_q = F.grid_sample(field, q, mode="bilinear", padding_mode="border", align_corners=False).movedim(1, -1)
        q = identity - at_q
    out = F.grid_sample(features, q, mode="bilinear", padding_mode="border", align_corners=False)
    return l2_normalize(out, dim=1) if unit else out


# ----------------------------------------------------------------------------------- patch pooling


def _sigmas(sigma: float | Sequence[float], d: int, name: str) -> list[float]:
    s = [float(sigma)] * d if isinstance(sigma, (int, float)) else [float(v) for v in sigma]
    if len(s) != d or min(s) <= 0:
        raise InputError(f"{name}: expected a positive sigma (voxels) or {d} of them, got {sigma!r}")
    return s


def _check_embedding(e: Tensor, name: str) -> int:
    if e.ndim not in (4, 5):
        raise InputError(f"{name}: expected an embedding B,D,H,W or B,D,D',H,W, got shape {tuple(e.shape)}")
    return e.ndim - 2


def _axis_weights(size: int, centres: Tensor, sigma: float, truncate: float, like: Tensor) -> Tensor:
    """Normalised 1D Gaussian weights ``*centres.shape, size`` (cut at ``truncate*sigma``)."""
    pos = torch.arange(size, dtype=like.dtype, device=like.device)
    off = pos - centres.to(like.dtype).unsqueeze(-1)
    w = torch.exp(-0.5 * (off / sigma) ** 2) * (off.abs() <= truncate * sigma + 1e-6)
    return w / w.sum(dim=-1, keepdim=True).clamp_min(_EPS)


def gaussian_pool_at(
    embedding: Tensor, centres: Tensor, sigma: float | Sequence[float], truncate: float = 4.0
) -> Tensor:
    """Centre-sensitive average ``s(x) = normalize(sum_p W_c(p - x) e(p))`` at points ``x``.

    ``W_c`` is a Gaussian of std ``sigma`` (voxels; one value or one per axis), cut at
    ``truncate * sigma`` and normalised to sum 1 over the voxels inside the image (METHODS.md 2.5
    (1)-(2)). Separable, so it costs ``O(sum of sizes)`` per point.

    Args:
        embedding: ``B, D, *S``.
        centres: ``N, d`` (same points in every image) or ``B, N, d``; voxel coordinates in the
            tensor's axis order (for an :class:`~AnatSSLLib.image.Image` array that is k, j, i),
            fractional allowed.
        sigma: std of W_c in voxels. Not given by the released code.

    Returns:
        ``B, N, D``, unit L2 norm.
    """
    d = _check_embedding(embedding, "gaussian_pool_at embedding")
    sig = _sigmas(sigma, d, "gaussian_pool_at sigma")
    b = embedding.shape[0]
    if centres.ndim == 2:
        centres = centres.unsqueeze(0).expand(b, -1, -1)
    if centres.ndim != 3 or centres.shape[0] != b or centres.shape[2] != d:
        raise InputError(f"gaussian_pool_at centres: expected N,{d} or {b},N,{d}, got {tuple(centres.shape)}")
    centres = centres.to(embedding.dtype)
    centres = centres.to(embedding.device)
    weights = [
        _axis_weights(embedding.shape[2 + a], centres[:, :, a], sig[a], truncate, embedding) for a in range(d)
    ]  # each B, N, S_a
    # each point only reads its window (|p - x| <= truncate*sigma): memory O(window), not O(image*N)
    radius = [truncate * sg for sg in sig]
    out = embedding.new_zeros((b, centres.shape[1], embedding.shape[1]))
    for i in range(b):
        for n in range(centres.shape[1]):
            win, ws = [], []
            for a in range(d):
                c = float(centres[i, n, a])
                lo = max(0, math.ceil(c - radius[a] - 1e-6))
                hi = min(embedding.shape[2 + a], math.floor(c + radius[a] + 1e-6) + 1)
                win.append(slice(lo, max(lo, hi)))
                ws.append(weights[a][i, n, lo : max(lo, hi)])
            patch = embedding[(i, slice(None), *win)]
            if d == 2:
                out[i, n] = torch.einsum("chw,h,w->c", patch, ws[0], ws[1])
            else:
                out[i, n] = torch.einsum("cxyz,x,y,z->c", patch, ws[0], ws[1], ws[2])
    return l2_normalize(out, dim=2)


def _check_grid(e: Tensor, grid: int, name: str) -> int:
    d = _check_embedding(e, name)
    if int(grid) < 1 or any(s % int(grid) for s in e.shape[2:]):
        raise InputError(f"{name}: grid {grid!r} must be positive and divide every size {tuple(e.shape[2:])}")
    return d


def centre_weighted_patches(embedding: Tensor, grid: int, sigma: float | Sequence[float] | None = None) -> Tensor:
    """Patch vectors by centre-sensitive pooling W_c on a ``grid^d`` grid, then L2 (METHODS.md 2.5 (1)).

    Patch ``g`` covers ``S/grid`` voxels per axis; its vector is :func:`gaussian_pool_at` at the
    patch centre ``(g + 0.5) * S/grid - 0.5``. ``sigma`` (voxels) defaults to patch size / 4 per
    axis: **not given by the released code** (the code average-pools, see
    :func:`average_patches`).

    Returns:
        ``B, grid^d, D`` (row-major over the grid), unit L2 norm.
    """
    d = _check_grid(embedding, grid, "centre_weighted_patches embedding")
    shape = tuple(embedding.shape[2:])
    sig = _sigmas([s / grid / 4.0 for s in shape] if sigma is None else sigma, d, "centre_weighted_patches sigma")
    # same weights as gaussian_pool_at at the grid centres, contracted one axis at a time
    w = [
        _axis_weights(shape[a], ((torch.arange(grid) + 0.5) * (shape[a] / grid) - 0.5).to(embedding.device), sig[a], 4.0, embedding)
        for a in range(d)
    ]  # each G, S_a
    pooled = embedding @ w[-1].t()  # the contiguous last axis first (a plain matmul): B, C, ..., G
    if d == 2:
        pooled = torch.einsum("bcxk,ix->bcik", pooled, w[0])
    else:
        pooled = torch.einsum("bcxjk,ix->bcijk", torch.einsum("bcxyk,jy->bcxjk", pooled, w[1]), w[0])
    return l2_normalize(pooled.flatten(2).transpose(1, 2), dim=2)


def average_patches(embedding: Tensor, grid: int) -> Tensor:
    """Uniform average over each cell of a ``grid^d`` grid, then L2 (the released code's pooling).

    Returns:
        ``B, grid^d, D`` (row-major over the grid), unit L2 norm.
    """
    d = _check_grid(embedding, grid, "average_patches embedding")
    pool = F.adaptive_avg_pool2d if d == 2 else F.adaptive_avg_pool3d
    p = pool(embedding, int(grid))
    return l2_normalize(p.flatten(2).transpose(1, 2), dim=2)


def overlap_patch_pairs(
    e1: Tensor, e2: Tensor, pair_map: Tensor, grid: int, sigma: float | Sequence[float] | None = None, margin: float = 1.0,
    unit: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Centre-weighted patch vectors of two views at the same anatomy (view 2 another crop of view 1).

    ``pair_map`` takes view 1's voxel index ``y`` to view 2's, ``x = M y + o``. Where the centre of
    view 1 lands gives the translation ``t = c0 - x(c0)``; the overlap of the two crops,
    ``[max(0, t), S + min(0, t))`` per axis in view 1's voxels, is cut into ``grid^d`` cells, and
    cell ``g``'s vector is the W_c average at its centre ``c_g`` in ``e1`` and at ``M c_g + o`` in
    ``e2`` (:func:`gaussian_pool_at`'s weights, for whole batches of small crops at once). A pair is
    *valid* when the mapped centre lies at least ``margin`` voxels inside view 2 (with a turn or a
    zoom some corners of the box fall outside). ``sigma`` defaults to the unshifted patch size / 4,
    as in :func:`centre_weighted_patches`, to which this reduces for the identity map. With
    ``unit=False`` the weighted averages are returned as they are (for cluster assignments, whose
    averages stay distributions over the K clusters).

    Args:
        e1, e2: ``B, D, *S``. pair_map: ``B, d, d+1`` (axis order).

    Returns:
        ``(p1, p2, valid)``: ``B, grid^d, D`` each (row-major over the grid, unit L2 norm) and a
        ``B, grid^d`` bool mask.
    """
    d = _check_grid(e1, grid, "overlap_patch_pairs embedding")
    shape = tuple(e1.shape[2:])
    if e2.shape != e1.shape or pair_map.shape != (e1.shape[0], d, d + 1):
        raise InputError(
            f"overlap_patch_pairs: e2 {tuple(e2.shape)} and pair_map {tuple(pair_map.shape)} do not match e1 {tuple(e1.shape)}"
        )
    sig = _sigmas([s / grid / 4.0 for s in shape] if sigma is None else sigma, d, "overlap_patch_pairs sigma")
    m = pair_map.to(e1.device, e1.dtype)
    size = torch.tensor(shape, dtype=e1.dtype, device=e1.device)
    c0 = (size - 1.0) / 2.0
    t = c0 - (m[:, :, :d] @ c0 + m[:, :, d])
    lo = t.clamp_min(0.0)
    length = size - t.abs()
    if bool((length <= 0).any()):
        raise InputError("overlap_patch_pairs: the views do not overlap")
    cells = torch.arange(grid, dtype=e1.dtype, device=e1.device) + 0.5
    axes = lo.unsqueeze(1) + cells.view(1, grid, 1) * (length / grid).unsqueeze(1) - 0.5  # B, G, d (per axis)
    mesh = torch.meshgrid(*[torch.arange(grid, device=e1.device)] * d, indexing="ij")
    centres = torch.stack([axes[:, mesh[a].reshape(-1), a] for a in range(d)], dim=-1)  # B, G^d, d
    mapped = centres @ m[:, :, :d].transpose(1, 2) + m[:, :, d].unsqueeze(1)
    valid = ((mapped >= margin - 0.5) & (mapped <= size - 0.5 - margin)).all(dim=-1)

    def pool(e: Tensor, c: Tensor) -> Tensor:
        w = [_axis_weights(shape[a], c[:, :, a], sig[a], 4.0, e) for a in range(d)]  # each B, G^d, S_a
        if d == 2:
            out = torch.einsum("bcxy,bny->bncx", e, w[1])
            out = torch.einsum("bncx,bnx->bnc", out, w[0])
        else:
            out = torch.einsum("bcxyz,bnz->bncxy", e, w[2])
            out = torch.einsum("bncxy,bny->bncx", out, w[1])
            out = torch.einsum("bncx,bnx->bnc", out, w[0])
        return l2_normalize(out, dim=2) if unit else out

    return pool(e1, centres), pool(e2, mapped), valid


def gaussian_smooth_embedding(embedding: Tensor, sigma: float | Sequence[float], truncate: float = 4.0) -> Tensor:
    """Query map ``v(x) = normalize((W_c * e)(x))`` for every voxel x (METHODS.md 2.5 (3)).

    Depthwise separable Gaussian convolution (std ``sigma`` voxels, cut at ``truncate*sigma``),
    normalised by the kernel mass inside the image so that a constant field is returned unchanged
    (also at the borders), then per-voxel L2. At integer voxel positions it equals
    :func:`gaussian_pool_at` with the same sigma. sigma is not given by the released code.

    Args:
        embedding: ``B, D, *S`` (2 or 3 spatial axes).

    Returns:
        ``B, D, *S``, unit L2 norm per voxel.
    """
    d = _check_embedding(embedding, "gaussian_smooth_embedding embedding")
    sig = _sigmas(sigma, d, "gaussian_smooth_embedding sigma")
    conv = F.conv2d if d == 2 else F.conv3d
    c = embedding.shape[1]
    num = embedding
    den = torch.ones((1, 1, *embedding.shape[2:]), dtype=embedding.dtype, device=embedding.device)
    for a in range(d):
        r = int(math.floor(truncate * sig[a] + 1e-6))
        x = torch.arange(-r, r + 1, dtype=embedding.dtype, device=embedding.device)
        k1 = torch.exp(-0.5 * (x / sig[a]) ** 2)
        kshape = [1] * d
        kshape[a] = 2 * r + 1
        pad = [0] * d
        pad[a] = r
        k = k1.view(1, 1, *kshape)
        num = conv(num, k.expand(c, 1, *kshape), padding=tuple(pad), groups=c)
        den = conv(den, k, padding=tuple(pad))
    return l2_normalize(num / den.clamp_min(_EPS), dim=1)


# ------------------------------------------------------------------------------------- loss terms


def patch_discrimination_loss(
    f: Tensor, pair_index: Tensor, tau: float = 0.1, detach_keys: bool = True, groups: Tensor | None = None
) -> Tensor:
    """Invariant-and-spreading instance criterion (Ye et al., CVPR 2019), LD's L_PD (METHODS.md 2.2).

    With unit vectors ``f_i`` (n of them) and each ``i`` paired with ``pair(i)``::

        P(k|i) = exp(f_i.f_k/tau) / sum_{l != i} exp(f_i.f_l/tau)
        L_PD   = -(1/n) sum_i [ log P(pair(i)|i) + sum_{k not in {i, pair(i)}} log(1 - P(k|i)) ]

    (the paper's patch-discrimination equation; the reference's ``BatchCriterion(negM=1, T=0.1)``,
    which pairs the first half of the rows with the second half).

    Args:
        f: ``n, D``, unit rows.
        pair_index: ``n`` long, ``pair_index[i]`` = the positive of row i (not i itself).
        tau: temperature (paper 0.1).
        detach_keys: stop gradients through the "key" side ``f_k`` as the reference does
            (``x.t().data``); the value is the same either way.
        groups: ``n`` ints or None. When given, row i is only compared with the rows of its own
            group (the sums over k and l run over ``groups[k] == groups[i]``): with one group per
            image, patches of *other* images are no longer negatives (our option, not the paper's;
            see :class:`LDLoss` ``negatives``). ``pair(i)`` must be in i's group.

    Returns:
        scalar tensor.
    """
    if f.ndim != 2 or pair_index.shape != (f.shape[0],) or f.shape[0] < 3:
        raise InputError(
            f"patch_discrimination_loss: expected f (n, D) with n >= 3 and pair_index (n,), got "
            f"{tuple(f.shape)} and {tuple(pair_index.shape)}"
        )
    n = f.shape[0]
    idx = torch.arange(n, device=f.device)
    pair_index = pair_index.to(device=f.device, dtype=torch.long)
    if bool(((pair_index < 0) | (pair_index >= n) | (pair_index == idx)).any()):
        raise InputError("patch_discrimination_loss: pair_index must be in [0, n) and differ from the row index")
    keys = f.detach() if detach_keys else f
    logits = (f @ keys.t()) / tau
    excluded = torch.eye(n, dtype=torch.bool, device=f.device)
    if groups is not None:
        groups = groups.to(f.device)
        if groups.shape != (n,) or bool((groups[pair_index] != groups).any()):
            raise InputError("patch_discrimination_loss: groups must be n labels with every pair inside one group")
        excluded = excluded | (groups.unsqueeze(0) != groups.unsqueeze(1))
    logits = logits.masked_fill(excluded, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = log_p[idx, pair_index]
    p = log_p.exp().clamp(max=1.0 - 1e-7)
    neg_mask = ~excluded
    neg_mask[idx, pair_index] = False
    neg = torch.where(neg_mask, torch.log1p(-p), torch.zeros_like(p)).sum(dim=1)
    return -(pos + neg).mean()


def _half_pairs(n: int, device: torch.device | None = None) -> Tensor:
    return (torch.arange(n, device=device) + n // 2) % n


def mixup_loss(f_mix: Tensor, f_a: Tensor, f_b: Tensor, lam: Tensor | float, tau: float = 0.1) -> Tensor:
    """Hypersphere mixup term L_mix (METHODS.md 2.2; reference ``compute_patch_loss``).

    Target ``t_i = normalize(lam_i f_a,i + (1 - lam_i) f_b,i)``, detached; then
    :func:`patch_discrimination_loss` on the rows ``[f_mix; t]`` with mixed patch i paired with
    target i.

    Args:
        f_mix, f_a, f_b: ``n, D`` unit patch vectors of M, A1 and B1 at the same grid cells.
        lam: scalar or ``n`` weights of A (per patch; repeat an image's lam over its patches).

    Returns:
        scalar tensor.
    """
    if f_mix.shape != f_a.shape or f_mix.shape != f_b.shape or f_mix.ndim != 2:
        raise InputError(
            f"mixup_loss: f_mix, f_a, f_b must all be (n, D), got {tuple(f_mix.shape)}, "
            f"{tuple(f_a.shape)}, {tuple(f_b.shape)}"
        )
    lam_t = torch.as_tensor(lam, dtype=f_mix.dtype, device=f_mix.device)
    lam_t = lam_t.view(-1, 1) if lam_t.ndim else lam_t
    target = l2_normalize(lam_t * f_a + (1 - lam_t) * f_b, dim=1).detach()
    rows = torch.cat([f_mix, target])
    return patch_discrimination_loss(rows, _half_pairs(rows.shape[0], f_mix.device), tau)


def region_embeddings(embedding: Tensor, assignment: Tensor) -> Tensor:
    """Region embeddings ``r_{n,k} = normalize(mean_p a_k(p) e_n(p))`` (METHODS.md 2.3).

    Args:
        embedding: ``B, D, *S`` per-voxel embedding.
        assignment: ``B, K, *S`` soft assignment.

    Returns:
        ``B, K, D``, unit rows.
    """
    if embedding.shape[0] != assignment.shape[0] or embedding.shape[2:] != assignment.shape[2:]:
        raise InputError(
            f"region_embeddings: embedding B,D,*S and assignment B,K,*S must share B and S, got "
            f"{tuple(embedding.shape)} and {tuple(assignment.shape)}"
        )
    e = embedding.flatten(2)
    a = assignment.flatten(2)
    r = torch.einsum("bdp,bkp->bkd", e, a) / e.shape[2]
    return l2_normalize(r, dim=2)


def cluster_centres(r: Tensor) -> Tensor:
    """Cluster centres ``c_k = normalize(mean_n r_{n,k})`` of one batch, with gradients, no
    memory bank or EMA (as the reference). ``r``: ``N, K, D`` -> ``K, D`` unit rows."""
    if r.ndim != 3:
        raise InputError(f"cluster_centres: expected r (N, K, D), got {tuple(r.shape)}")
    return l2_normalize(r.mean(dim=0), dim=1)


def region_discrimination_loss(r: Tensor, c: Tensor, tau_r: float = 0.2) -> Tensor:
    """Region discrimination L_RD (METHODS.md 2.3; reference ``compute_clustering_loss``)::

        L_RD = -(1/(N K)) sum_n sum_k log[ exp(r_{n,k}.c_k/tau_r) / sum_j exp(r_{n,k}.c_j/tau_r) ]

    Region k of every image is pulled to centre k and pushed from the other centres, so one
    structure shares a cluster across images and views.

    Args:
        r: ``N, K, D`` unit region embeddings; c: ``K, D`` unit centres; tau_r: 0.2 in the paper.
    """
    if r.ndim != 3 or c.ndim != 2 or r.shape[1:] != c.shape:
        raise InputError(f"region_discrimination_loss: expected r (N,K,D) and c (K,D), got {tuple(r.shape)}, {tuple(c.shape)}")
    logits = torch.einsum("nkd,jd->nkj", r, c) / tau_r
    log_p = logits - torch.logsumexp(logits, dim=2, keepdim=True)
    return -torch.diagonal(log_p, dim1=1, dim2=2).mean()


def entropy_loss(assignment: Tensor) -> Tensor:
    """Confidence term L_ent = mean over images, clusters and voxels of the binary entropy in bits::

        L_ent = mean[ -a log2 a - (1 - a) log2(1 - a) ]

    (METHODS.md 2.3; reference ``loss_entropy``), in at least float32, with the reference's 1e-30
    inside the logs: the value is the same to 1e-29, and the gradient stays finite where a voxel's
    assignment is exactly one-hot. (``xlogy``, exact at 0, has a 0/0 gradient there: in float32 a
    confident voxel reaches ``a = 1`` exactly, and one such voxel had turned every weight NaN in
    two of our runs.) 0 for one-hot assignments, 1 for a = 0.5.
    """
    a = assignment.to(torch.promote_types(assignment.dtype, torch.float32))
    tiny = 1e-30
    return -(a * torch.log(a + tiny) + (1 - a) * torch.log(1 - a + tiny)).mean() / math.log(2.0)


def area_balance_loss(assignment: Tensor, target: float | None = None) -> Tensor:
    """Balance term ``mean_{n,k} (mean_p a_k(p) - target)^2``, target default 1/K.

    The reference defines it (``loss_area``, target 1/16 with K = 16, squared) but **never uses
    it**; :class:`LDLoss` therefore weights it 0 by default (faithful), optional otherwise.
    """
    k = assignment.shape[1]
    t = 1.0 / k if target is None else float(target)
    area = assignment.flatten(2).mean(dim=2)
    return ((area - t) ** 2).mean()


def pixel_region_loss(embedding: Tensor, assignment: Tensor, r: Tensor, tau_r: float = 0.2) -> Tensor:
    """Optional pixel-to-region term (not in the released code; weight 0 by default)::

        L_pix = -mean_{n,p} sum_k a_{n,k}(p) log softmax_k( e_n(p).r_{n,k} / tau_r )

    Pulls each voxel to its own regions and pushes it from the image's other regions (the
    issue's wording). The released code has no such term: the assignment-weighted means in
    :func:`region_embeddings` are its only pixel-region coupling; its shape-guided inference reads
    ``softmax_k(e(p).r_k / 0.2)``, the distribution this term matches to the assignment.

    Args:
        embedding: ``N, D, *S``; assignment: ``N, K, *S``; r: ``N, K, D`` (same images).
    """
    e = embedding.flatten(2)
    a = assignment.flatten(2)
    if r.shape != (e.shape[0], a.shape[1], e.shape[1]):
        raise InputError(
            f"pixel_region_loss: r must be (N, K, D) = {(e.shape[0], a.shape[1], e.shape[1])}, got {tuple(r.shape)}"
        )
    log_p = torch.log_softmax(torch.einsum("ndp,nkd->nkp", e, r) / tau_r, dim=1)
    return -(a * log_p).sum(dim=1).mean()


# --------------------------------------------------------------------------------- combined loss


def assignment_consistency_loss(q1: Tensor, q2: Tensor) -> Tensor:
    """Symmetric cross-entropy of the cluster assignments of the same anatomy in two views (ours).

    ``L_cons = -1/(2n) sum_i sum_k [ q1_ik log q2_ik + q2_ik log q1_ik ]`` over ``n`` paired cells,
    ``q`` the W_c-averaged assignments (distributions over K). Not in the paper: its region terms
    are computed on each crop in its own frame, which clusters by position in the crop also satisfy;
    this term asks a place to fall in the same cluster wherever it lies in the crop. It is minimal
    (0) when both are the same one-hot vector.

    Args:
        q1, q2: ``n, K``, rows summing to 1.
    """
    if q1.shape != q2.shape or q1.ndim != 2:
        raise InputError(f"assignment_consistency_loss: expected two n,K tensors, got {tuple(q1.shape)} and {tuple(q2.shape)}")
    lq1, lq2 = q1.clamp_min(_EPS).log(), q2.clamp_min(_EPS).log()
    return -0.5 * ((q1 * lq2).sum(1) + (q2 * lq1).sum(1)).mean()


def dense_correspondence_loss(
    e1: Tensor, e2: Tensor, pair_map: Tensor | None = None, stride: int = 4, tau: float = 0.1, exclusion: float = 3.0
) -> Tensor:
    """Voxel-level InfoNCE between two views of the same anatomy (ours; not in the paper).

    View 1 is read on a regular lattice of every ``stride``-th voxel (``y_i``); view 2 at the same
    anatomy, ``x_i = M y_i + o`` (``pair_map``; the identity when None), by trilinear interpolation.
    For each image, over the lattice points ``i`` whose ``x_i`` lies inside view 2::

        L = -1/(2n) sum_i [ log softmax_j(f1_i . f2_j / tau)_i + log softmax_j(f2_i . f1_j / tau)_i ]

    where ``j`` runs over ``i`` itself and the points at least ``exclusion`` voxels from ``y_i``
    (closer ones are the same place at this resolution, and neither pulled nor pushed). Why: LD's
    patch terms compare 16 mm cells, so nothing asks a single voxel's embedding to name its place;
    with the two contrasts of one subject as the two views (paired contrasts), this term asks a
    T1 voxel and the T2 voxel at the same place to agree, and to differ from the other places of
    the crop, which is what the landmark and segmentation tools read across contrasts.

    Args:
        e1, e2: ``B, D, *S`` unit embeddings of view 1 and view 2 (view 2 with its flip/rot90 and
            warp undone). pair_map: ``B, d, d+1`` view 1 voxel index -> view 2 (axis order) or None.
        stride: lattice step in voxels. tau: temperature. exclusion: radius in voxels.

    Returns:
        scalar tensor (0 when no image has two valid points).
    """
    d = _check_embedding(e1, "dense_correspondence_loss e1")
    if e1.shape != e2.shape:
        raise InputError(f"dense_correspondence_loss: expected two equal B,D,*S embeddings, got {tuple(e1.shape)}, {tuple(e2.shape)}")
    shape = tuple(e1.shape[2:])
    axes = [torch.arange(stride // 2, s, stride, dtype=e1.dtype, device=e1.device) for s in shape]
    y = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, d)  # n, d (axis order)
    b = e1.shape[0]
    if pair_map is None:
        x = y.unsqueeze(0).expand(b, -1, -1)
    else:
        m = pair_map.to(e1.device, e1.dtype)
        x = y @ m[:, :, :d].transpose(1, 2) + m[:, :, d].unsqueeze(1)  # B, n, d
    size = torch.tensor(shape, dtype=e1.dtype, device=e1.device)
    valid = ((x >= 0.0) & (x <= size - 1.0)).all(dim=-1)  # B, n
    f1 = e1[(slice(None), slice(None)) + tuple(y[:, a].long() for a in range(d))]  # B, D, n
    grid = ((2.0 * x + 1.0) / size - 1.0).flip(-1).view((b, -1) + (1,) * (d - 1) + (d,))
    f2 = F.grid_sample(e2, grid, mode="bilinear", padding_mode="border", align_corners=False).reshape(b, e1.shape[1], -1)
    f2 = l2_normalize(f2, dim=1)
    near = torch.cdist(y, y) < float(exclusion)
    near.fill_diagonal_(False)
    losses = []
    for i in range(b):
        keep = valid[i]
        if int(keep.sum()) < 2:
            continue
        a, c = f1[i][:, keep].t(), f2[i][:, keep].t()
        logits = (a @ c.t()) / tau
        logits = logits.masked_fill(near[keep][:, keep], float("-inf"))
        target = torch.arange(a.shape[0], device=a.device)
        losses.append(0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)))
    if not losses:
        return e1.sum() * 0.0
    return torch.stack(losses).mean()


class LDLoss(nn.Module):
    """LD's training loss on one batch of views (METHODS.md 2.2-2.3).

    - stage ``"pd"``: ``w_pd L_PD + w_mix L_mix``
    - stage ``"ld"``: ``w_pd L_PD + w_mix L_mix + w_rd L_RD + w_ent L_ent (+ w_area L_area + w_pix L_pix)``

    with defaults 1, 1, 10, 0.1 (the reference) and 0, 0 for the two optional terms. L_PD is on the
    patches of ``[A1, B1, A2, B2]`` (view 2 un-flipped/un-rotated, A1/B1 cell g paired with A2/B2
    cell g; views from another crop: the cells of the two crops' overlap, see
    :func:`overlap_patch_pairs`); L_mix on ``M`` against the detached normalised mix of A1's and B1's patches;
    region terms on the ``4B`` non-mixup images.

    Args:
        stage: ``"pd"`` or ``"ld"`` (default of :meth:`forward`).
        grid: patches per axis (paper 8 at 448 px; CPU scale-down 4).
        tau: temperature of the instance criterion (0.1). tau_r: of region discrimination (0.2).
        pooling: ``"centre"`` (Gaussian W_c, paper; default) or ``"average"`` (released code).
        sigma: W_c std in voxels; None = patch size / 4 (not given by the released code).
        detach_keys: see :func:`patch_discrimination_loss`.
        negatives: ``"batch"`` (the paper: every other patch of the batch is a negative) or
            ``"image"`` (our option: only the other patches of the same image, so that the same
            anatomy in another subject of the batch is never pushed away).
        w_cons: weight of :func:`assignment_consistency_loss` in stage "ld" for views from another
            crop (our option; default 0, as the paper).
        w_dense: weight of :func:`dense_correspondence_loss` between view 1 and view 2 of the
            ``2B`` images, in both stages (our option; default 0, as the paper).

    Raises:
        InputError: unknown stage, pooling or negatives, grid < 1.
    """

    def __init__(
        self,
        stage: Stage | str = Stage.PD,
        grid: int = 8,
        tau: float = 0.1,
        tau_r: float = 0.2,
        w_pd: float = 1.0,
        w_mix: float = 1.0,
        w_rd: float = 10.0,
        w_ent: float = 0.1,
        w_area: float = 0.0,
        w_pix: float = 0.0,
        pooling: Pooling | str = Pooling.CENTRE,
        sigma: float | Sequence[float] | None = None,
        detach_keys: bool = True,
        negatives: str = "batch",
        w_cons: float = 0.0,
        w_dense: float = 0.0,
    ) -> None:
        super().__init__()
        self.stage = _enum(Stage, stage, "LDLoss stage")
        if negatives not in ("batch", "image"):
            raise InputError(f"LDLoss negatives: expected 'batch' or 'image', got {negatives!r}")
        self.negatives = negatives
        self.pooling = _enum(Pooling, pooling, "LDLoss pooling")
        if int(grid) < 1:
            raise InputError(f"LDLoss grid: expected a positive integer, got {grid!r}")
        self.grid, self.tau, self.tau_r, self.sigma = int(grid), float(tau), float(tau_r), sigma
        self.w = {"pd": w_pd, "mix": w_mix, "rd": w_rd, "ent": w_ent, "area": w_area, "pix": w_pix, "cons": w_cons, "dense": w_dense}
        self.detach_keys = bool(detach_keys)

    def patches(self, embedding: Tensor) -> Tensor:
        """``B, D, *S`` -> ``B, grid^d, D`` with this loss's pooling."""
        if self.pooling is Pooling.AVERAGE:
            return average_patches(embedding, self.grid)
        return centre_weighted_patches(embedding, self.grid, self.sigma)

    def forward(
        self, embedding: Tensor, assignment: Tensor, views: LDViews | Mapping[str, Tensor], stage: Stage | str | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of one batch.

        Args:
            embedding: ``5B, D, *S`` (order ``[A1, B1, A2, B2, M]``), unit per voxel.
            assignment: ``5B, K, *S`` (ignored in stage "pd").
            views: the :class:`LDViews` the images came from (lam, flips, rot90_k).
            stage: overrides ``self.stage``.

        Returns:
            ``(total, terms)``: scalar tensor, and the named terms (tensors) ``pd``, ``mix``
            (+ ``rd``, ``ent``, ``area``, ``pix`` in stage "ld").
        """
        views = LDViews.from_any(views)
        # losses in at least float32, also under CUDA autocast
        embedding = embedding.to(torch.promote_types(embedding.dtype, torch.float32))
        if assignment is not None:
            assignment = assignment.to(torch.promote_types(assignment.dtype, torch.float32))
        st = self.stage if stage is None else _enum(Stage, stage, "LDLoss stage")
        b = views.batch_size
        if embedding.shape[0] != 5 * b:
            raise InputError(f"LDLoss: expected 5B = {5 * b} embeddings [A1,B1,A2,B2,M], got shape {tuple(embedding.shape)}")
        # undo view 2's flip/rot90 (and its warp, if any) on the full-resolution features, then
        # pool: the patch cells of both views then cover the same anatomy
        e2 = _view2_unmoved(embedding[2 * b : 4 * b], views, unit=True)
        image_of_cell = torch.arange(2 * b, device=embedding.device).unsqueeze(1)  # which image a cell is in
        if views.pair_map is None:
            p = self.patches(torch.cat([embedding[: 2 * b], e2, embedding[4 * b :]]))  # 5B, G^d, D
            v1, v2, p_mix = p[: 2 * b], p[2 * b : 4 * b], p[4 * b :]
            image_of_cell = image_of_cell.expand(-1, p.shape[1]).reshape(-1)
        else:  # view 2 is another crop: pair the cells of the two crops' overlap
            if self.pooling is Pooling.AVERAGE:
                raise InputError("LDLoss: views from another crop need centre-weighted pooling (pooling='centre')")
            v1, v2, valid = overlap_patch_pairs(embedding[: 2 * b], e2, views.pair_map, self.grid, self.sigma)
            p = self.patches(torch.cat([embedding[: 2 * b], embedding[4 * b :]]))  # grid cells of A1, B1, M
            image_of_cell = image_of_cell.expand(-1, p.shape[1])[valid]
            v1, v2, p_mix = v1[valid], v2[valid], p[2 * b :]
        g, dim = p.shape[1], p.shape[2]
        f = torch.cat([v1.reshape(-1, dim), v2.reshape(-1, dim)])
        groups = torch.cat([image_of_cell, image_of_cell]) if self.negatives == "image" else None
        terms: dict[str, Tensor] = {}
        terms["pd"] = patch_discrimination_loss(f, _half_pairs(f.shape[0], f.device), self.tau, self.detach_keys, groups)
        lam = views.lam.to(p.device, p.dtype).repeat_interleave(g)
        # mixup against view 1's own grid cells (the first 2B rows of p in both branches)
        terms["mix"] = mixup_loss(p_mix.reshape(-1, dim), p[:b].reshape(-1, dim), p[b : 2 * b].reshape(-1, dim), lam, self.tau)
        total = self.w["pd"] * terms["pd"] + self.w["mix"] * terms["mix"]
        if self.w["dense"]:
            terms["dense"] = dense_correspondence_loss(embedding[: 2 * b], e2, views.pair_map, tau=self.tau)
            total = total + self.w["dense"] * terms["dense"]
        if st is Stage.LD:
            if assignment.shape[0] != 5 * b or assignment.shape[2:] != embedding.shape[2:]:
                raise InputError(f"LDLoss: assignment must be 5B,K,*S like the embedding, got {tuple(assignment.shape)}")
            e4, a4 = embedding[: 4 * b], assignment[: 4 * b]
            r = region_embeddings(e4, a4)
            terms["rd"] = region_discrimination_loss(r, cluster_centres(r), self.tau_r)
            terms["ent"] = entropy_loss(a4)
            terms["area"] = area_balance_loss(a4)
            total = total + self.w["rd"] * terms["rd"] + self.w["ent"] * terms["ent"] + self.w["area"] * terms["area"]
            if self.w["pix"]:
                terms["pix"] = pixel_region_loss(e4, a4, r, self.tau_r)
                total = total + self.w["pix"] * terms["pix"]
            if self.w["cons"] and views.pair_map is not None:
                a2 = _view2_unmoved(assignment[2 * b : 4 * b], views, unit=False)
                q1, q2, valid = overlap_patch_pairs(assignment[: 2 * b], a2, views.pair_map, self.grid, self.sigma, unit=False)
                terms["cons"] = assignment_consistency_loss(q1[valid], q2[valid])
                total = total + self.w["cons"] * terms["cons"]
        return total, terms


def _view2_unmoved(maps: Tensor, views: LDViews, unit: bool) -> Tensor:
    """Maps ``2B, C, *S`` of ``[A2, B2]`` with view 2's flip/rot90 and warp undone (unit norm per
    voxel kept after the unwarp when ``unit``, e.g. embeddings; not for cluster assignments)."""
    out = undo_flip_rot90(maps, views.flips.to(maps.device), views.rot90_k.to(maps.device))
    if views.warp is not None:
        out = unwarp_features(out, views.warp.to(maps.device, maps.dtype), unit=unit)
    return out


def ld_training_step(
    model: nn.Module, batch_images: LDViews | Mapping[str, Tensor], loss_fn: LDLoss, stage: Stage | str | None = None
) -> tuple[Tensor, dict[str, float]]:
    """One forward of the ``5B`` batch ``[A1, B1, A2, B2, M]`` through ``model`` and the LD loss.

    ``model(x)`` must return an :class:`~AnatSSLLib.networks.LDOutput` (or a pair
    ``(embedding, assignment)``); it may be DDP-wrapped. No backward, no optimiser step.

    Returns:
        ``(loss, logs)``: the scalar loss and floats ``loss``, ``pd``, ``mix`` (+ ``rd``, ``ent``,
        ``area`` in stage "ld").
    """
    views = LDViews.from_any(batch_images)
    embedding, assignment = model(views.images)
    total, terms = loss_fn(embedding, assignment, views, stage)
    logs = {"loss": float(total.detach())}
    logs.update({k: float(v.detach()) for k, v in terms.items()})
    return total, logs


# ------------------------------------------------------------------------------------------- task


def _split_contrast_views(views: LDViews) -> LDViews:
    """From views of 2-channel images (two co-registered contrasts), keep channel 0 for
    ``[A1, B1, M]`` and channel 1 for ``[A2, B2]`` (one channel each)."""
    if views.images.shape[1] != 2:
        raise InputError(f"paired contrasts: expected 2-channel crops, got {views.images.shape[1]} channels")
    b = views.batch_size
    first = views.images[:, :1]
    second = views.images[:, 1:]
    images = torch.cat([first[: 2 * b], second[2 * b : 4 * b], first[4 * b :]])
    return LDViews(images, views.lam, views.flips, views.rot90_k, views.warp, views.pair_map)


class LDTask:
    """LD as a task for :func:`AnatSSLLib.engine.train`.

    One *sample* is a pair of images (A, B), i.e. five views. ``make_batch`` draws ``2*batch_size``
    crops from ``sampler`` (``sampler(generator, n) -> n, C, *S`` tensor, sizes divisible by 16 and
    by ``grid``), builds the views with :func:`make_ld_batch` from the same generator (so the batch
    of a step is reproducible) and returns this rank's pairs as a dict of tensors. ``loss`` runs
    :func:`ld_training_step`. Stage "pd" trains only the embedding path; the cluster head is
    untouched (no gradient), so switching a trained "pd" model to stage "ld" starts it fresh, as
    the reference does (METHODS.md 2.3). Paper schedule: 20 epochs "pd", then 80 "ld", Adam 1e-3,
    LR halved every 10 epochs; CPU scale-down: a few hundred "pd" then ~1-2k "ld" steps.

    Args:
        spatial_dims: 2 or 3. stage: "pd" or "ld". grid: patches per axis (default 4, the CPU
            scale-down; the paper used 8 at 448 px).
        tau, tau_r, w_*, pooling, sigma: see :class:`LDLoss`.
        num_clusters: K (paper 16; scale-down 8). embedding_dim: D (32). in_channels, features:
            see :class:`~AnatSSLLib.networks.LDNet`.
        sampler: the crop source for :meth:`make_batch` (optional if you only call ``loss``).
        paired_contrasts: the sampler returns two co-registered contrasts per crop (``C = 2``);
            view 1 (A1, B1 and the mixup) is made from the first, view 2 (A2, B2) from the second.
            Our extension for multi-contrast MRI, not in the paper (whose data are one modality):
            another contrast of the same anatomy is a stronger photometric augmentation than
            intensity jitter, meant to make the T1 and T2 embeddings of one place agree (at our
            CPU budget they still do not: benchmarks/README.md, "Two attempts at a
            contrast-invariant embedding").
        augment: extra keyword arguments for :func:`make_ld_batch`.
        manifest: extra manifest fields (``spacing``, ``intensity``, ``data_fingerprint``, ...).
        init_state: weights to start from (stage "ld" starts from the trained stage "pd" network,
            whose cluster head never received a gradient, so it starts fresh).
        negatives: patch-discrimination negatives, ``"batch"`` (paper) or ``"image"``; see :class:`LDLoss`.
        w_cons: weight of the cross-view assignment consistency (ours; 0 = off); see :class:`LDLoss`.
        w_dense: weight of the voxel-level cross-view term (ours; 0 = off); see :class:`LDLoss`.
        padding_mode: the network's convolution padding, ``"zeros"`` (paper) or ``"reflect"``/
            ``"replicate"`` (ours); see :class:`~AnatSSLLib.networks.LDNet`.
    """

    method = "ld"

    def __init__(
        self,
        spatial_dims: int,
        stage: Stage | str = Stage.PD,
        grid: int = 4,
        tau: float = 0.1,
        tau_r: float = 0.2,
        num_clusters: int = 16,
        embedding_dim: int = 32,
        in_channels: int = 1,
        features: Sequence[int] | None = None,
        w_rd: float = 10.0,
        w_ent: float = 0.1,
        w_area: float = 0.0,
        w_pix: float = 0.0,
        pooling: Pooling | str = Pooling.CENTRE,
        sigma: float | Sequence[float] | None = None,
        sampler: Callable[[torch.Generator, int], Tensor] | None = None,
        augment: Mapping[str, Any] | None = None,
        manifest: Mapping[str, Any] | None = None,
        paired_contrasts: bool = False,
        init_state: Mapping[str, Tensor] | None = None,
        negatives: str = "batch",
        w_cons: float = 0.0,
        padding_mode: str = "zeros",
        w_dense: float = 0.0,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise InputError(f"LDTask spatial_dims: expected 2 or 3, got {spatial_dims!r}")
        self.paired_contrasts = bool(paired_contrasts)
        self.init_state = init_state
        self.spatial_dims = int(spatial_dims)
        self.stage = _enum(Stage, stage, "LDTask stage")
        self.model_params: dict[str, Any] = {
            "in_channels": int(in_channels),
            "embedding_dim": int(embedding_dim),
            "num_clusters": int(num_clusters),
        }
        if features is not None:
            self.model_params["features"] = [int(f) for f in features]
        if padding_mode != "zeros":  # older manifests have no such field: it means zeros
            self.model_params["padding_mode"] = str(padding_mode)
        self.loss_fn = LDLoss(
            stage=self.stage, grid=grid, tau=tau, tau_r=tau_r, w_rd=w_rd, w_ent=w_ent,
            w_area=w_area, w_pix=w_pix, pooling=pooling, sigma=sigma, negatives=negatives,
            w_cons=w_cons, w_dense=w_dense,
        )
        self.sampler = sampler
        self.augment = dict(augment or {})
        self.manifest = dict(manifest or {})
        self._generator: torch.Generator | None = None

    @property
    def architecture(self) -> str:
        """Registry name of the network (``"ld_unet2d"`` or ``"ld_unet3d"``)."""
        return f"ld_unet{self.spatial_dims}d"

    def build_model(self) -> nn.Module:
        """A fresh :class:`~AnatSSLLib.networks.LDNet` built through the registry."""
        from ..networks import build_network

        model = build_network(self.architecture, self.model_params)
        if self.init_state is not None:
            model.load_state_dict(self.init_state)
        return model

    def make_views(self, images: Tensor, generator: torch.Generator | None = None) -> LDViews:
        """:func:`make_ld_batch` with this task's augmentation settings."""
        return make_ld_batch(images, generator, **self.augment)

    def make_batch(
        self, step: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1, batch_size: int = 2
    ) -> dict[str, Tensor]:
        """Views of ``batch_size`` global pairs drawn from ``sampler``; this rank's pairs as a dict."""
        if self.sampler is None:
            raise InputError("LDTask.make_batch: no sampler given (LDTask(..., sampler=fn(generator, n)))")
        from ..engine import batch_shard

        images = self.sampler(generator, 2 * int(batch_size))
        views = self.make_views(images, generator)
        if self.paired_contrasts:
            views = _split_contrast_views(views)
        return views.rows(batch_shard(int(batch_size), rank, world_size)).as_dict()

    def loss(self, model: nn.Module, batch: LDViews | Mapping[str, Tensor] | Tensor) -> tuple[Tensor, dict[str, float]]:
        """Scalar loss (mean over the batch) and float logs of one batch.

        ``batch``: :class:`LDViews`, its dict, or raw images ``2B, C, *S`` (views then drawn from
        a task-owned generator, seeded 0: reproducible, but not tied to the engine's step).
        """
        if isinstance(batch, Tensor):
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(0)
            batch = self.make_views(batch.cpu(), self._generator)
            batch = LDViews(**{k: v.to(next(model.parameters()).device) for k, v in batch.as_dict().items()})
        return ld_training_step(model, batch, self.loss_fn, self.stage)

    def manifest_fields(self) -> dict[str, Any]:
        """Cache-manifest fields: method, architecture (+ params), embedding_dim, spatial_dims and
        whatever was given as ``manifest`` (spacing, intensity, data_fingerprint, ...)."""
        fields: dict[str, Any] = {
            "method": self.method,
            "architecture": self.architecture,
            "architecture_params": dict(self.model_params),
            "embedding_dim": self.model_params["embedding_dim"],
            "spatial_dims": self.spatial_dims,
            "spacing": None,
            "intensity": {},
            "data_fingerprint": "",
        }
        fields.update(self.manifest)
        fields.setdefault("description", f"LD stage {self.stage.value}, grid {self.loss_fn.grid}, {self.loss_fn.pooling.value} pooling")
        return fields
