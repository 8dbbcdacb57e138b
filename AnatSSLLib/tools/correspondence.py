"""Dense correspondence between two volumes from their embeddings: global affine, then local matching.

SAM's matching order (Yan et al., IEEE TMI 2022: a global term that rejects distant look-alikes, a
local term that pins the voxel) applied to a whole volume, with LD's centre-weighted embeddings
(§2.5) as the descriptors:

1. **Global affine.** About ``global_points`` points spread over the fixed volume's anatomy are
   searched at a coarse kernel, first within a wide radius (40 mm) of the alignment of the two
   foregrounds (centroids and volumes), then within a smaller one around the first estimate;
   after each search a 12-parameter affine is fitted by RANSAC followed by least squares on the
   inliers. (A whole-volume search with a cycle-consistency check is available,
   ``radius_mm = inf``; with the small CPU encoders measured so far it found fewer consistent
   matches than the windowed search, 5-10 of ~100 against 30-90 of ~100-200.)
2. **Dense local matching.** A regular grid of fixed points (every ``grid_spacing_mm`` over the
   anatomy) is searched, per level, only within ``radius_mm`` of the position the current
   transform predicts, at a finer kernel; every window is gathered at once (a batched gather and
   one ``einsum`` per chunk), so a 2 mm head takes seconds on a CPU.
3. **Smooth field.** The residual displacements of the confident matches (those not at the window
   border, above the level's confidence quantile) are spread by normalised Gaussian convolution
   (``field_sigma_mm``); matches far from the smoothed field are dropped and the field refitted.
   The next level starts from the new transform.

Direction (ITK's convention, the one :mod:`AnatSSLLib.baselines.registration` uses): the result
maps **fixed points to moving points** (LPS mm). To carry labels of a reference into a target's
grid, pass the target as ``fixed`` and the reference as ``moving``; to carry landmarks of a
reference into a target, pass the reference as ``fixed``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..embedding import EmbeddedVolume, EmbeddingStore
from ..errors import InputError
from ..geometry import affine_from_sitk, fit_affine_ransac, foreground_mask, sample_field
from ..geometry import homogeneous as _homogeneous
from ..image import Image

__all__ = ["ContrastMatch", "Correspondence", "EmbeddingCorrespondence", "affine_from_sitk", "fit_affine_ransac", "foreground_mask"]


# ---- small helpers -------------------------------------------------------------------------------
def _kji_to_lps(grid: Image, kji: np.ndarray) -> np.ndarray:
    return grid.index_to_physical(np.asarray(kji, float)[:, ::-1])


def _lps_to_kji(grid: Image, lps: np.ndarray) -> np.ndarray:
    return grid.physical_to_index(np.asarray(lps, float))[:, ::-1]


def _spread_points(mask: np.ndarray, n: int) -> np.ndarray:
    """About ``n`` voxel indices ``(N, nd)`` ``[k, j, i]`` of ``mask`` on a regular sub-grid."""
    count = int(mask.sum())
    if count == 0:
        return np.zeros((0, mask.ndim), dtype=int)
    step = max(1, int(round((count / max(n, 1)) ** (1.0 / mask.ndim))))
    offset = tuple(step // 2 for _ in range(mask.ndim))
    sub = mask[tuple(slice(o, None, step) for o in offset)]
    pts = np.argwhere(sub) * step + np.asarray(offset)
    return pts


def _gaussian_volume(x, sigma_vox: Sequence[float]):
    """Separable Gaussian (normalised kernel, cut at 3 sigma, zero padding) over the spatial axes of
    ``(C, *S)``: :func:`AnatSSLLib.embedding.gaussian_filter`, whose matrix products run several
    times faster on a CPU than a grouped ``conv3d`` with a long kernel."""
    from ..embedding import gaussian_filter

    return gaussian_filter(x, tuple(float(s) for s in sigma_vox), padding="zeros")


# A multiply-add in a matrix product costs about 1/100 of a gathered one (measured on one CPU
# thread), so similarities to a whole lattice pay once a window holds more than 1/50 of it.
_DENSE_WINDOW_FRACTION = 0.02


#: a rival peak lies further than this many window steps from the best one on some axis
_RIVAL_STEPS = 2


def _window_peaks(sims, wshape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of ``n`` windows of similarities ``(n, prod(wshape))`` (outside the volume -2): the
    sub-voxel peak in window steps ``(n, nd)`` (a parabola through the neighbours on each axis),
    its value, whether it lies on the window's border (then the window may have missed it), and
    its margin over the best value away from it (further than ``_RIVAL_STEPS`` on some axis).

    The margin measures ambiguity: a window with a rival almost as good as its peak can jump to
    the rival on the faintest change of the image, so its match should count for little."""
    nd = len(wshape)
    val, arg = sims.max(dim=1)
    sim_np = sims.numpy().reshape(len(sims), *wshape)
    loc = np.stack(np.unravel_index(arg.numpy(), wshape), axis=1)  # n, nd
    sub = loc.astype(float)
    rows = np.arange(len(sims))
    border = np.zeros(len(sims), bool)
    vb = sim_np[(rows,) + tuple(loc.T)]
    for ax in range(nd):
        inner = (loc[:, ax] > 0) & (loc[:, ax] < wshape[ax] - 1)
        lo = loc.copy()
        hi = loc.copy()
        lo[:, ax] = np.clip(lo[:, ax] - 1, 0, wshape[ax] - 1)
        hi[:, ax] = np.clip(hi[:, ax] + 1, 0, wshape[ax] - 1)
        va = sim_np[(rows,) + tuple(lo.T)]
        vc = sim_np[(rows,) + tuple(hi.T)]
        den = va - 2 * vb + vc
        ok = inner & (den < 0) & (va > -1.5) & (vc > -1.5)
        delta = np.where(ok, 0.5 * (va - vc) / np.where(ok, den, -1.0), 0.0)
        sub[:, ax] += np.clip(delta, -0.5, 0.5)
        border |= ~inner
    import torch

    far = torch.zeros(sims.shape, dtype=torch.bool)
    for ax, offsets in enumerate(np.unravel_index(np.arange(sims.shape[1]), wshape)):
        far |= (torch.as_tensor(offsets)[None] - torch.as_tensor(loc[:, ax])[:, None]).abs() > _RIVAL_STEPS
    rival = sims.masked_fill(~far, -2.0).amax(dim=1).numpy()
    value = val.numpy()
    return sub, value, border, value - rival


# ---- result ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Correspondence:
    """A dense map from fixed to moving physical space (LPS mm), with the matches it came from.

    ``T(x) = A(x) + u(x)``: ``affine`` is the homogeneous ``A`` (fixed -> moving), ``displacement``
    the smooth residual ``u`` as a ``(nd, *S)`` tensor (mm, LPS components) on ``field_grid`` (the
    fixed volume's encoder grid); outside that grid ``u`` takes its border value.

    Attributes:
        fixed_points / moving_points: ``(N, nd)`` LPS mm of the dense matches kept for the field.
        confidence: ``(N,)`` cosine similarity at each match's peak.
        global_matches: how many cycle-consistent coarse matches the affine was fitted to.
        affine_inliers: how many of them the affine kept.
    """

    affine: np.ndarray
    displacement: object
    field_grid: Image
    fixed_points: np.ndarray
    moving_points: np.ndarray
    confidence: np.ndarray
    global_matches: int = 0
    affine_inliers: int = 0

    @property
    def ndim(self) -> int:
        return self.affine.shape[0] - 1

    def affine_points(self, lps: np.ndarray) -> np.ndarray:
        """``A(x)`` for fixed points ``(N, nd)`` LPS mm."""
        return _homogeneous(np.asarray(lps, float).reshape(-1, self.ndim)) @ self.affine[: self.ndim].T

    def transform_points(self, lps: np.ndarray) -> np.ndarray:
        """``T(x) = A(x) + u(x)`` for fixed points ``(N, nd)`` LPS mm -> moving points (LPS mm)."""
        lps = np.asarray(lps, float).reshape(-1, self.ndim)
        u = sample_field(self.displacement, _lps_to_kji(self.field_grid, lps)).numpy()
        return self.affine_points(lps) + u

    def to_sitk(self):
        """The map as a ``SimpleITK`` transform (fixed -> moving, LPS mm): ``Composite([A, D])``.

        ``D`` is a displacement field ``v = L⁻¹ u`` on the field grid (``L`` the linear part of
        ``A``), so ``A(x + v(x)) = A(x) + u(x)``; outside the field grid ``v = 0`` (pure affine).
        """
        import SimpleITK as sitk

        nd = self.ndim
        lin = self.affine[:nd, :nd]
        aff = sitk.AffineTransform(nd)
        aff.SetMatrix(tuple(lin.ravel()))
        aff.SetTranslation(tuple(self.affine[:nd, nd]))
        u = self.displacement.numpy()  # nd, *S
        v = np.tensordot(np.linalg.inv(lin), u, axes=(1, 0))  # nd, *S
        vec = np.moveaxis(v, 0, -1).astype(np.float64)
        disp = sitk.GetImageFromArray(vec, isVector=True)
        disp.SetSpacing(self.field_grid.spacing)
        disp.SetOrigin(self.field_grid.origin)
        disp.SetDirection(tuple(self.field_grid.direction.ravel()))
        field = sitk.DisplacementFieldTransform(disp)
        return sitk.CompositeTransform([aff, field])


@dataclasses.dataclass
class ContrastMatch:
    """What :meth:`EmbeddingCorrespondence.match_across_contrasts` found for one pair.

    Attributes:
        correspondence: the dense map fixed -> moving.
        fixed / moving: the volumes it was matched on (the target possibly in the reference's contrast).
        decision: how the target's contrast was handled (:class:`AnatSSLLib.contrast.ContrastDecision`).
    """

    correspondence: Correspondence
    fixed: Image
    moving: Image
    decision: object


# ---- the matcher ----------------------------------------------------------------------------------
@dataclasses.dataclass
class EmbeddingCorrespondence:
    """Dense fixed -> moving correspondence from an encoder's embeddings (see the module docstring).

    Args:
        store: the embedding store (volumes are embedded once per session).
        global_levels: ``(sigma_mm, radius_mm, step_mm)`` of each affine-fitting level, searched
            around the previous estimate (the first around the foreground alignment);
            ``radius_mm = inf`` searches the whole moving volume with a cycle-consistency check.
        global_points: about how many fixed points the affine is fitted from.
        cycle_tol_mm: a whole-volume match is kept when its back-match lands this close to its start.
        ransac_threshold_mm: RANSAC inlier distance.
        grid_spacing_mm: spacing of the dense fixed grid.
        levels: ``(sigma_mm, radius_mm[, step_mm])`` per local level, coarse to fine: kernel, search
            radius around the current prediction, and spacing of the searched positions (0: every
            voxel; a step of ``s`` voxels searches a map computed on every ``s``-th voxel only, so
            the coarse levels cost a fraction of a full-resolution map). The global levels read
            ``step_mm`` the same way: both search a 4 mm lattice of a 2 mm volume (measured with the
            default encoder, template T1 -> 4 subjects: 1.46 against 1.45 mm with the second at
            every voxel; a 32-channel map of 103 x 106 x 107 voxels smooths in 0.17 s on the
            lattice against 0.72 s at every voxel, one thread).
        field_sigma_mm: Gaussian width of the normalised convolution, one per level (or one for all).
        keep_quantile: the least confident fraction of each level's matches is dropped (by a ramp).
        margin_scale: a dense match counts fully in the field when its peak beats the best value
            elsewhere in its window by this much (cosine); nearer ties count proportionally less.
        outlier_mm: a match further than this from the smoothed field is dropped before refitting.
        chunk: points per batched gather (bounds memory: ``chunk * window * D`` floats).
    """

    store: EmbeddingStore
    global_levels: Sequence[tuple[float, float, float]] = ((8.0, 40.0, 4.0), (8.0, 16.0, 4.0))
    global_points: int = 300
    cycle_tol_mm: float = 12.0
    ransac_threshold_mm: float = 8.0
    grid_spacing_mm: float = 6.0
    levels: Sequence[tuple[float, ...]] = ((4.0, 12.0, 4.0), (2.0, 6.0, 0.0))
    field_sigma_mm: float | Sequence[float] = (8.0, 5.0)
    keep_quantile: float = 0.1
    margin_scale: float = 0.05
    outlier_mm: float = 8.0
    chunk: int = 256

    # -- public ---------------------------------------------------------------------------------
    @property
    def sigmas_mm(self) -> tuple[float, ...]:
        """Every centre-weighting width the matching reads (mm), on both volumes."""
        return tuple(sorted({float(g[0]) for g in self.global_levels} | {float(lv[0]) for lv in self.levels}))

    def match(
        self,
        fixed: Image,
        moving: Image,
        fixed_mask: Image | np.ndarray | None = None,
        initial_affine: np.ndarray | None = None,
    ) -> Correspondence:
        """Dense correspondence mapping ``fixed`` points to ``moving`` points (LPS mm).

        Args:
            fixed: the volume whose grid the map is defined on (e.g. the target of a segmentation).
            moving: the other volume (e.g. the labelled reference).
            fixed_mask: where to place match points: an image in ``fixed``'s physical space (any
                grid; non-zero = anatomy) or a boolean array on the fixed encoder grid; by default
                the fixed volume's foreground.
            initial_affine: a homogeneous fixed -> moving affine (LPS mm) to start the local
                levels from (e.g. an intensity registration's); the embedding affine is then skipped.

        Raises:
            InputError: a volume of the wrong dimension, or an empty mask.
        """
        nd = self._check_dims(fixed, moving)
        fe = self.store.get(fixed)
        me = self.store.get(moving)
        mask = self._mask(fe, fixed_mask)
        if initial_affine is not None:
            affine = np.asarray(initial_affine, float)
            if affine.shape != (nd + 1, nd + 1):
                raise InputError(f"initial_affine: expected a {nd + 1}x{nd + 1} homogeneous matrix, got shape {affine.shape}")
            return self.local(fe, me, mask, affine)
        affine, n_global, n_inl = self.global_affine(fe, me, mask)
        return self.local(fe, me, mask, affine, n_global, n_inl)

    def match_across_contrasts(
        self,
        fixed: Image,
        moving: Image,
        *,
        target: str = "moving",
        contrast: str = "auto",
        initial_alignment: str = "embedding",
        passes: int = 1,
    ) -> "ContrastMatch":
        """:meth:`match` for a reference and a target that may differ in contrast, as the landmark
        and segmentation tools run it.

        The embedding's global affine of the two volumes comes first. With ``contrast="auto"`` the
        two volumes' intensities are compared under it (:func:`AnatSSLLib.contrast.intensity_correlation`):
        a target that correlates with the reference (the same contrast) is matched as it is, any
        other is first mapped into the reference's contrast (:func:`AnatSSLLib.contrast.fit_intensity_transfer`,
        read through :meth:`registered_affine`) and matched in its place, from that affine.

        Args:
            target: which volume is the target (``"fixed"`` or ``"moving"``); the other is the reference.
            contrast: ``"auto"`` (decide from the intensities), ``"same"`` (never map) or ``"match"`` (always map).
            initial_alignment: for a target matched as it is, where the local levels start:
                ``"embedding"`` (the global affine) or ``"registration"`` (:meth:`registered_affine`).
            passes: for a mapped target, how many times the transfer is fitted: the first through
                the affine, each further one through the previous correspondence (then matched again).

        Raises:
            InputError: a CT and an MR volume (:func:`AnatSSLLib.contrast.check_contrast_pair`),
                volumes of the wrong dimension, or volumes whose anatomy does not overlap.
        """
        from ..contrast import check_contrast_choice, check_contrast_pair, decide_contrast, fit_intensity_transfer, intensity_correlation

        if target not in ("fixed", "moving"):
            raise InputError(f"target must be 'fixed' or 'moving', got {target!r}")
        if initial_alignment not in ("embedding", "registration"):
            raise InputError(f"initial_alignment must be 'embedding' or 'registration', got {initial_alignment!r}")
        check_contrast_choice(contrast)
        reference_image, target_image = (moving, fixed) if target == "fixed" else (fixed, moving)
        check_contrast_pair(reference_image, target_image, contrast)
        self._check_dims(fixed, moving)
        fe, me = self.store.get(fixed), self.store.get(moving)
        mask = self._mask(fe, None)
        global_affine, n_global, n_inl = self.global_affine(fe, me, mask)
        correlation = None
        if contrast == "auto":  # over the reference's tissue, read in the target
            if target == "moving":
                correlation = intensity_correlation(fe.intensity, fe.grid, me.intensity, me.grid, global_affine)
            else:
                correlation = intensity_correlation(me.intensity, me.grid, fe.intensity, fe.grid, np.linalg.inv(global_affine))
        decision = decide_contrast(correlation, contrast)
        if decision.mode == "same":
            if initial_alignment == "registration":
                corr = self.local(fe, me, mask, self.registered_affine(fixed, moving, seed=global_affine), n_global, n_inl)
            else:
                corr = self.local(fe, me, mask, global_affine, n_global, n_inl)
            return ContrastMatch(corr, fixed, moving, decision)
        affine = self.registered_affine(fixed, moving, seed=global_affine)
        through = affine  # the first transfer is read through the registration affine
        for _ in range(int(passes)):
            if target == "moving":  # the fixed -> moving map samples the fixed volume and reads the moving one
                matched_fixed, matched_moving = fixed, fit_intensity_transfer(moving, fixed, through).apply(moving)
            else:
                matched_fixed = fit_intensity_transfer(fixed, moving, source_to_reference=through).apply(fixed)
                matched_moving = moving
            corr = self.match(matched_fixed, matched_moving, initial_affine=affine)
            through = corr.transform_points
        return ContrastMatch(corr, matched_fixed, matched_moving, decision)

    def registered_affine(self, fixed: Image, moving: Image, seed: np.ndarray | None = None) -> np.ndarray:
        """Fixed -> moving affine (homogeneous, LPS mm) from a SimpleITK Mattes mutual-information
        registration (:func:`AnatSSLLib.baselines.registration.register`) started from ``seed``
        (default: this matcher's global affine of the two embeddings) instead of the alignment of
        intensity moments.

        Mutual information works across contrasts, the embedding's RANSAC-fitted matches are
        robust to fields of view that differ; the start is kept when the registration ends at a
        worse mutual information (a thick-slice, 6 mm, T2 subject: registration from the moments
        ended 34.7 mm off at the landmarks, the embedding's start was kept at 4.4 mm). The metric
        runs on one thread, so the answer does not depend on the machine's thread count.
        """
        from ..baselines.registration import RegistrationSettings, register

        if seed is None:
            fe, me = self.store.get(fixed), self.store.get(moving)
            seed = self.global_affine(fe, me, self._mask(fe, None))[0]
        # the pyramid stops at shrink 2 (4 mm at 2 mm voxels): the embedding's local levels refine
        # from there, and the full-resolution level only cost time
        coarse = RegistrationSettings(affine_shrink=(4, 2), affine_sigmas_mm=(4.0, 2.0), threads=1)
        return affine_from_sitk(register(fixed, moving, "affine", settings=coarse, initial=seed))

    def global_affine(self, fe: EmbeddedVolume, me: EmbeddedVolume, mask: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Affine fixed -> moving (homogeneous, LPS mm) from robustly fitted coarse matches.

        Starts from the alignment of the two foregrounds (centroids, isotropic scale from their
        volumes); each ``global_levels`` entry ``(sigma_mm, radius_mm, step_mm)`` then searches
        about ``global_points`` fixed points within ``radius_mm`` of the current prediction
        (``radius_mm = inf``: the whole moving volume, kept only when cycle-consistent within
        ``cycle_tol_mm``) and refits the affine by RANSAC. Returns the affine, the number of
        matches of the last level and the number of its inliers.
        """
        nd = fe.grid.ndim
        pts = _spread_points(mask, self.global_points)
        if len(pts) < 8:
            pts = np.argwhere(np.ones(mask.shape, bool))
            pts = pts[np.linspace(0, len(pts) - 1, min(len(pts), self.global_points)).astype(int)]
        src = _kji_to_lps(fe.grid, pts)
        affine = self._moments(fe, me, mask)
        n_match = n_inl = 0
        for sigma, radius, step in self.global_levels:
            support = fe.smoothed_features(sigma)[(slice(None),) + tuple(pts.T)].T
            if np.isfinite(radius):
                pred = _homogeneous(src) @ affine[:nd].T
                dst, conf, border, _ = self._local_search(support, me, sigma, pred, radius, step)
                keep = ~border
            else:
                mf = me.smoothed_features(sigma)
                fwd, conf = self._global_search(support, mf)
                back, _ = self._global_search(mf[(slice(None),) + tuple(fwd.T)].T, fe.smoothed_features(sigma))
                err = np.linalg.norm((back - pts) * np.asarray(fe.grid.spacing[::-1]), axis=1)
                keep = err <= self.cycle_tol_mm
                dst = _kji_to_lps(me.grid, fwd)
            if keep.sum() < nd + 2:
                continue
            aff, inl = fit_affine_ransac(src[keep], dst[keep], threshold_mm=self.ransac_threshold_mm,
                                         weights=np.clip(conf[keep], 1e-3, None))
            if inl.sum() < max(nd + 2, 0.1 * keep.sum()):
                continue  # no consensus: keep the previous estimate
            affine, n_match, n_inl = aff, int(keep.sum()), int(inl.sum())
        return affine, n_match, n_inl

    @staticmethod
    def _moments(fe: EmbeddedVolume, me: EmbeddedVolume, mask: np.ndarray) -> np.ndarray:
        """Fixed -> moving similarity aligning the foreground centroids, scaled by the foreground volumes."""
        nd = fe.grid.ndim
        mmask = foreground_mask(me.intensity)
        cf = _kji_to_lps(fe.grid, np.argwhere(mask).mean(0, keepdims=True))[0]
        cm = _kji_to_lps(me.grid, np.argwhere(mmask).mean(0, keepdims=True))[0]
        vf = mask.sum() * np.prod(fe.grid.spacing)
        vm = mmask.sum() * np.prod(me.grid.spacing)
        scale = float(np.clip((vm / max(vf, 1e-6)) ** (1.0 / nd), 0.8, 1.25))
        out = np.eye(nd + 1)
        out[:nd, :nd] *= scale
        out[:nd, nd] = cm - scale * cf
        return out

    def local(
        self,
        fe: EmbeddedVolume,
        me: EmbeddedVolume,
        mask: np.ndarray,
        affine: np.ndarray,
        n_global: int = 0,
        n_inliers: int = 0,
    ) -> Correspondence:
        """Refine ``affine`` (fixed -> moving) by windowed dense matching and a smooth residual field."""
        import torch

        nd = fe.grid.ndim
        step = np.maximum(1, np.round(self.grid_spacing_mm / np.asarray(fe.grid.spacing[::-1])).astype(int))
        offset = step // 2
        sub = mask[tuple(slice(o, None, s) for o, s in zip(offset, step))]
        pts = np.argwhere(sub) * step + offset
        fixed_lps = _kji_to_lps(fe.grid, pts)
        sigmas = self.field_sigma_mm if isinstance(self.field_sigma_mm, Sequence) else [self.field_sigma_mm]
        corr = Correspondence(
            affine=affine,
            displacement=torch.zeros((nd, *fe.features.shape[1:]), dtype=torch.float32),
            field_grid=fe.grid,
            fixed_points=np.zeros((0, nd)),
            moving_points=np.zeros((0, nd)),
            confidence=np.zeros(0),
            global_matches=n_global,
            affine_inliers=n_inliers,
        )
        if len(pts) == 0:
            return corr
        for level, spec in enumerate(self.levels):
            sigma, radius = float(spec[0]), float(spec[1])
            step_mm = float(spec[2]) if len(spec) > 2 else 0.0
            predicted = corr.transform_points(fixed_lps)
            support = fe.smoothed_features(sigma)[(slice(None),) + tuple(pts.T)].T
            found, conf, border, margin = self._local_search(support, me, sigma, predicted, radius, step_mm)
            weight = self._match_weights(conf, border, margin)
            good = weight > 0
            field_sigma = float(sigmas[min(level, len(sigmas) - 1)])
            u, kept = self._fit_field(fe.grid, pts[good], found[good] - corr.affine_points(fixed_lps[good]),
                                      weight[good], field_sigma)
            sel = np.flatnonzero(good)[kept]
            corr = dataclasses.replace(
                corr, displacement=u, fixed_points=fixed_lps[sel], moving_points=found[sel], confidence=conf[sel]
            )
        return corr

    # -- internals ------------------------------------------------------------------------------
    def _match_weights(self, conf: np.ndarray, border: np.ndarray, margin: np.ndarray) -> np.ndarray:
        """Weight of each dense match in the field: its confidence, times how clearly it beats its
        window's rival (full from ``margin_scale`` on), times a ramp that drops the least confident
        ``keep_quantile`` (from half to one and a half times that quantile). Every factor moves
        smoothly with the similarities, so noise far below a scanner's cannot switch a match in or out."""
        weight = np.where(border, 0.0, np.clip(conf, 0.05, None) * np.clip(margin / self.margin_scale, 0.0, 1.0))
        inner = ~border
        if inner.sum() > 0 and self.keep_quantile > 0:
            lo, hi = np.quantile(conf[inner], [0.5 * self.keep_quantile, min(1.0, 1.5 * self.keep_quantile)])
            weight = weight * np.clip((conf - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        return weight

    def _check_dims(self, fixed: Image, moving: Image) -> int:
        nd = self.store.encoder.spatial_dims
        for image, role in ((fixed, "fixed"), (moving, "moving")):
            if image.ndim != nd:
                raise InputError(
                    f"{image.name} ({role}): expected a {nd}D image for encoder {self.store.encoder.encoder_id}, "
                    f"got a {image.ndim}D image of shape {image.array.shape}"
                )
        return nd

    def _mask(self, fe: EmbeddedVolume, fixed_mask) -> np.ndarray:
        if fixed_mask is None:
            return foreground_mask(fe.intensity)
        if isinstance(fixed_mask, Image):
            from ..image import resample_to

            on_grid = fixed_mask if fixed_mask.same_geometry(fe.grid) else resample_to(fixed_mask, fe.grid, interpolator="nearest")
            mask = np.asarray(on_grid.array) != 0
        else:
            mask = np.asarray(fixed_mask, bool)
            if mask.shape != tuple(fe.features.shape[1:]):
                raise InputError(f"fixed_mask: expected shape {tuple(fe.features.shape[1:])} (the encoder grid), got {mask.shape}")
        if not mask.any():
            raise InputError("fixed_mask: the mask is empty; expected some anatomy to match")
        return mask

    def _global_search(self, support, feats) -> tuple[np.ndarray, np.ndarray]:
        """Argmax of ``support (N, D) @ feats (D, *S)`` over the whole volume -> ``[k, j, i]`` (N, nd) and peaks."""
        import torch

        shape = feats.shape[1:]
        flat = feats.reshape(feats.shape[0], -1)
        support = torch.nn.functional.normalize(support.float(), dim=1)
        peaks = np.zeros((len(support), len(shape)), dtype=int)
        conf = np.zeros(len(support))
        for start in range(0, len(support), 32):
            sims = support[start : start + 32] @ flat
            val, arg = sims.max(dim=1)
            peaks[start : start + len(val)] = np.stack(np.unravel_index(arg.numpy(), shape), axis=1)
            conf[start : start + len(val)] = val.numpy()
        return peaks, conf

    def _local_search(self, support, me: EmbeddedVolume, sigma_mm: float, predicted_lps: np.ndarray, radius_mm: float, step_mm: float = 0.0):
        """Windowed argmax around predicted moving positions; returns LPS peaks, confidence, at-border flags, margins over the rival (:func:`_window_peaks`).

        The window holds every ``step_mm`` (at least every voxel) within ``radius_mm`` of the centre.
        With a step of ``s`` voxels the search runs on the map computed on every ``s``-th voxel only
        (:meth:`EmbeddedVolume.smoothed_features` with a lattice step: ``s^3`` times less to
        smooth and read), the window centred on the lattice voxel nearest the prediction. Where
        each window covers a large part of that lattice (the wide coarse level), the similarities
        to the whole lattice are one matrix product and the windows are read from it; otherwise
        each window's features are gathered. Both give the same answer.
        """
        import torch

        nd = me.grid.ndim
        spacing = np.asarray(me.grid.spacing[::-1])
        stride = tuple(int(v) for v in np.maximum(1, np.floor(step_mm / spacing + 1e-6).astype(int)))
        feats, grid = me.smoothed_features(sigma_mm, stride), me.lattice(stride)
        shape = np.asarray(feats.shape[1:])
        rad = np.maximum(1, np.ceil(radius_mm / np.asarray(grid.spacing[::-1])).astype(int))  # in lattice steps
        wshape = tuple(int(2 * r + 1) for r in rad)
        support = torch.nn.functional.normalize(support.float(), dim=1)
        centres = np.clip(np.round(_lps_to_kji(grid, predicted_lps)).astype(int), 0, shape - 1)
        n = len(centres)
        n_offsets = int(np.prod(wshape))
        dense = n_offsets > _DENSE_WINDOW_FRACTION * int(np.prod(shape))
        if dense:
            table = feats.reshape(feats.shape[0], -1)  # D, L
            chunk = max(1, min(self.chunk, 2**25 // table.shape[1]))  # bounds the chunk x L similarities
        else:
            # one row of D values per voxel: a window's gather then reads contiguous rows,
            # several times faster than gathering each of the D channel planes
            table = feats.reshape(feats.shape[0], -1).T.contiguous()  # L, D
            # a few MB of gathered rows at a time: large windows in big chunks spend their time
            # allocating and faulting in fresh memory
            chunk = max(1, min(self.chunk, 2**22 // (n_offsets * table.shape[1])))
        strides = torch.as_tensor([int(np.prod(shape[a + 1 :])) for a in range(nd)])
        upper = torch.as_tensor(shape - 1)
        peaks = np.zeros((n, nd))
        conf = np.zeros(n)
        border = np.zeros(n, bool)
        margin = np.zeros(n)
        # window positions axis by axis, (n, w_a) each, broadcast to the (n, *wshape) window: a
        # window's flat index and its outside-the-volume flags cost O(n * sum w_a), not O(n * O * nd)
        axis_offsets = [torch.arange(-int(r), int(r) + 1) for r in rad]
        for start in range(0, n, chunk):
            which = slice(start, start + chunk)
            c = torch.as_tensor(centres[which])
            m = len(c)
            idx = torch.zeros((m, *wshape), dtype=torch.int64)
            outside = torch.zeros((m, *wshape), dtype=torch.bool)
            for a in range(nd):
                view = (m,) + tuple(w if b == a else 1 for b, w in enumerate(wshape))
                pos = c[:, a, None] + axis_offsets[a][None]  # m, w_a
                outside |= ((pos < 0) | (pos > int(upper[a]))).reshape(view)
                idx += (pos.clamp(0, int(upper[a])) * int(strides[a])).reshape(view)
            idx, outside = idx.reshape(m, -1), outside.reshape(m, -1)  # m, O
            if dense:
                sims = torch.gather(support[which] @ table, 1, idx)  # n, O
            else:
                # index_select reads whole rows: about 8x faster than table[idx]'s advanced indexing;
                # (n, 1, D) @ (n, D, O) runs about 7x faster than (n, O, D) @ (n, D, 1)
                rows = table.index_select(0, idx.reshape(-1)).reshape(m, -1, table.shape[1])
                sims = torch.bmm(support[which, None, :], rows.transpose(1, 2))[:, 0]  # n, O
            sims[outside] = -2.0
            peaks[which], conf[which], border[which], margin[which] = _window_peaks(sims, wshape)
        peaks = centres + (peaks - rad)
        return _kji_to_lps(grid, peaks), conf, border, margin

    def _fit_field(self, grid: Image, pts: np.ndarray, disp: np.ndarray, weights: np.ndarray, sigma_mm: float):
        """Normalised Gaussian convolution of sparse displacements ``(N, nd)`` at voxels ``pts``
        (weighted by ``weights``) -> ``(nd, *S)``, and the mask of matches kept.

        Twice: the second pass down-weights matches far from the first field, fully from
        ``outlier_mm``, to zero at twice that (a ramp, not a cut, for the same reason as
        :meth:`_match_weights`)."""
        import torch

        nd = grid.ndim
        shape = grid.array.shape
        sigma_vox = [sigma_mm / s for s in grid.spacing[::-1]]
        kept = np.ones(len(pts), bool)
        u = torch.zeros((nd, *shape), dtype=torch.float32)
        if len(pts) == 0:
            return u, kept
        w = np.asarray(weights, float)
        flat = torch.as_tensor(np.ravel_multi_index(tuple(pts.T), shape))
        for it in range(2):
            num = torch.zeros((nd + 1, *shape), dtype=torch.float32)
            vals = np.concatenate([disp * w[:, None], w[:, None]], axis=1)
            num.reshape(nd + 1, -1).index_add_(1, flat, torch.as_tensor(vals.T, dtype=torch.float32))
            sm = _gaussian_volume(num, sigma_vox)
            den = sm[nd : nd + 1]
            # a weak pull towards zero residual (the affine) where matches are sparse
            floor = 0.05 * float(den.max())
            u = sm[:nd] / torch.clamp(den, min=1e-12) * (den / (den + floor))
            if it == 1:
                break
            res = np.linalg.norm(disp - sample_field(u, pts.astype(float)).numpy(), axis=1)
            robust = np.clip(2.0 - res / self.outlier_mm, 0.0, 1.0)
            if (robust > 0).sum() < max(nd + 2, 0.3 * len(pts)):
                break
            w = w * robust
            kept = robust > 0
        return u, kept
