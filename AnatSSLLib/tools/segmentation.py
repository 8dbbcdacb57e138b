"""Shape-guided cross-modality segmentation: labels of a reference volume carried to another contrast.

From one (or a few) labelled reference volumes of one contrast (say T1 with an atlas label map),
segment volumes of another contrast (T2, PD, CT); the label map comes out on the **target's own
grid and geometry**. LD's shape-guided model (Chen et al., TPAMI 2023, section 3.5)
adapted to a labelled reference:

- **Shape prior.** The reference label shapes (one-hot, lightly smoothed by ``prior_sigma_mm``)
  are carried into the target through a dense embedding correspondence
  (:class:`~AnatSSLLib.tools.correspondence.EmbeddingCorrespondence`: global affine from
  cycle-consistent coarse matches, then windowed local matching and a smooth field, SAM-style).
  This gives ``prior_k(x)`` on every target voxel.
- **Likelihood** (LD's inference, "prediction 2"): ``p(k | x) = softmax_k(e(x)·r_k / τ)`` with
  region embeddings ``r_k = normalize(Σ_p a_k(p) e(p))`` (LD's region embedding). ``r_k`` is first computed on
  the reference (assignment = its one-hot labels), then re-estimated on the target from the
  current posterior, ``em_iterations`` times (LD uses the image's own region embeddings).
- **Posterior** ``∝ prior^α · likelihood^β``; the label is its argmax. With several references
  the per-reference posteriors are averaged (a soft per-voxel vote).

``likelihood_weight`` (β) defaults to 0 (shape prior only): with the CPU encoders measured so far
the likelihood term did not help; it is kept as a parameter for stronger encoders.

Our additions to LD's inference, on by default: the local embedding levels start from a
SimpleITK Mattes-MI affine registration seeded by the embedding affine
(``initial_alignment="registration"``), and a target of another contrast than the reference is
found out and first mapped into the reference's contrast (``contrast="auto"``,
:mod:`AnatSSLLib.contrast`), so that the reference is matched to a pseudo-reference-contrast copy
of it. Figures: ``benchmarks/README.md``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ..embedding import EmbeddingStore
from ..errors import InputError
from ..image import Image, check_volume
from .correspondence import Correspondence, EmbeddingCorrespondence, _gaussian_volume, sample_field

__all__ = ["CrossModalitySegmenter", "appearance_em", "EmbeddingSegmentation", "SUPPORTED_METHODS", "check_reference_labels", "segment_volumes"]

#: Pretraining methods whose encoders give dense per-voxel embeddings the tool can use.
SUPPORTED_METHODS = ("ld", "alice")


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def check_reference_labels(labels: Image, reference: Image) -> np.ndarray:
    """The integer label array of ``labels`` after the checks a reference label map must pass."""
    if labels.ndim != reference.ndim:
        raise InputError(
            f"{labels.name}: expected a {reference.ndim}D label map like its reference {reference.name}, "
            f"got a {labels.ndim}D image of shape {labels.array.shape}"
        )
    if not labels.same_geometry(reference):
        raise InputError(
            f"{labels.name}: the label map does not lie on the grid of its reference image {reference.name} "
            f"(labels: size {labels.size}, spacing {tuple(round(s, 4) for s in labels.spacing)}, origin "
            f"{tuple(round(o, 3) for o in labels.origin)}; image: size {reference.size}, spacing "
            f"{tuple(round(s, 4) for s in reference.spacing)}, origin {tuple(round(o, 3) for o in reference.origin)}); "
            f"resample the labels onto the image grid (nearest neighbour) or pick the matching image"
        )
    arr = np.asarray(labels.array)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
            raise InputError(f"{labels.name}: expected integer label values, got non-integer values of type {arr.dtype}")
        arr = np.round(arr).astype(np.int64)
    if arr.min() < 0:
        raise InputError(f"{labels.name}: expected non-negative label ids, got a minimum of {arr.min()}")
    if not np.any(arr != 0):
        raise InputError(f"{labels.name}: the label map is empty (every voxel is 0); expected at least one labelled structure")
    return arr


def _voxel_lps(image: Image) -> np.ndarray:
    """LPS mm of every voxel of ``image``, ``(N, nd)`` in ``array.ravel()`` order."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in image.array.shape], indexing="ij")
    kji = np.stack([g.ravel() for g in grids], axis=1)
    return image.index_to_physical(kji[:, ::-1])


@dataclasses.dataclass
class CrossModalitySegmenter:
    """Segments target volumes from labelled reference volumes of another contrast (see the module docstring).

    Args:
        store: the embedding store of a 3D dense encoder (LD or Alice).
        correspondence: the dense matcher (default: :class:`EmbeddingCorrespondence` on ``store``).
        prior_sigma_mm: smoothing of the reference one-hot labels before warping (mm; 0: none).
        prior_weight: α, the exponent of the shape prior.
        likelihood_weight: β, the exponent of the appearance likelihood (0: prior only).
        likelihood: ``"region"`` (LD's prediction 2: cosine to the target's region embeddings, a
            softmax at ``temperature``) or ``"gaussian"`` (one Gaussian per class over the
            ``appearance`` features of the target, :func:`appearance_em`).
        appearance: with ``"gaussian"``, the features: ``"intensity"`` (the target's normalised
            intensity on its own grid) and/or ``"embedding"`` (the first ``embedding_components``
            principal components of its embedding).
        embedding_components: how many principal components of the embedding ``"embedding"`` takes.
        temperature: τ of the region likelihood's softmax (LD uses 0.2).
        em_iterations: re-estimations of the target's class models from the posterior.
        contrast: how the target's contrast is handled: ``"auto"`` (default: decided from the two
            volumes' intensities under the embedding affine; another contrast is mapped into the
            reference's before the dense matching, see :mod:`AnatSSLLib.contrast`; the appearance
            model still reads the target as it is), ``"same"`` or ``"match"``.
        contrast_passes: for a mapped target, how many times the transfer function is fitted:
            the first under the affine, each further one through the previous dense correspondence
            (then the target is matched again).
        initial_alignment: for a target in the reference's contrast, where the local embedding
            levels start: ``"registration"`` (default: a SimpleITK Mattes-MI affine seeded by the
            embedding's global affine) or ``"embedding"`` (that global affine alone). A mapped
            target always starts from the registration.

    Attributes:
        last_decisions: the :class:`~AnatSSLLib.contrast.ContrastDecision` of each reference of the
            last :meth:`segment` call.
    """

    store: EmbeddingStore
    correspondence: EmbeddingCorrespondence | None = None
    prior_sigma_mm: float = 1.0
    prior_weight: float = 1.0
    likelihood_weight: float = 0.0
    likelihood: str = "region"
    appearance: Sequence[str] = ("intensity",)
    embedding_components: int = 8
    temperature: float = 0.2
    em_iterations: int = 2
    initial_alignment: str = "registration"
    contrast: str = "auto"
    contrast_passes: int = 1

    def __post_init__(self) -> None:
        enc = self.store.encoder
        if enc.spatial_dims != 3:
            raise InputError(
                f"encoder {enc.encoder_id} is {enc.spatial_dims}D; cross-modality segmentation needs a 3D encoder"
            )
        if enc.method not in SUPPORTED_METHODS:
            raise InputError(
                f"encoder {enc.encoder_id} was trained with {enc.method!r}; cross-modality segmentation needs a "
                f"dense-embedding encoder of method {' or '.join(SUPPORTED_METHODS)}"
            )
        if self.initial_alignment not in ("embedding", "registration"):
            raise InputError(f"initial_alignment must be 'embedding' or 'registration', got {self.initial_alignment!r}")
        if int(self.contrast_passes) < 1:
            raise InputError(f"contrast_passes must be at least 1, got {self.contrast_passes!r}")
        from ..contrast import check_contrast_choice

        check_contrast_choice(self.contrast)
        if self.likelihood not in ("region", "gaussian"):
            raise InputError(f"likelihood must be 'region' or 'gaussian', got {self.likelihood!r}")
        self.appearance = tuple(self.appearance)
        unknown = [a for a in self.appearance if a not in ("intensity", "embedding")]
        if unknown or not self.appearance:
            raise InputError(f"appearance must name 'intensity' and/or 'embedding', got {list(self.appearance)}")
        if self.correspondence is None:
            self.correspondence = EmbeddingCorrespondence(self.store)
        self.last_correspondences: list[Correspondence] = []
        self.last_decisions: list = []
        self._priors: dict[tuple, object] = {}  # smoothed one-hot of each reference, reused across targets

    # -- public ---------------------------------------------------------------------------------
    def segment(
        self,
        reference: Image | Sequence[Image],
        reference_labels: Image | Sequence[Image],
        target: Image,
        labels: Sequence[int] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> Image:
        """Label map of ``target`` on its own grid (uint8, or uint16 above 255) from the reference(s).

        Args:
            reference: one labelled volume, or several (their votes are averaged per voxel).
            reference_labels: the label map of each reference, on that reference's grid.
            target: the volume to segment (any contrast, grid and orientation).
            labels: the label ids to transfer (default: every non-zero id of the references);
                other ids become background (0).
            progress: called with the fraction done.

        Raises:
            InputError: labels not on their reference's grid, empty labels, a volume of the wrong
                dimension, or a different number of references and label maps.
        """
        refs = _as_list(reference)
        labs = _as_list(reference_labels)
        if len(refs) != len(labs) or not refs:
            raise InputError(
                f"expected one label map per reference volume, got {len(refs)} references and {len(labs)} label maps"
            )
        arrays = []
        for ref, lab in zip(refs, labs):
            check_volume(ref, ndim=3, name=ref.name)
            arrays.append(check_reference_labels(lab, ref))
        check_volume(target, ndim=3, name=target.name)
        present = sorted({int(v) for a in arrays for v in np.unique(a) if v != 0})
        if labels is not None:
            wanted = sorted({int(v) for v in labels if int(v) != 0})
            missing = [v for v in wanted if v not in present]
            if missing or not wanted:
                raise InputError(
                    f"labels {missing or list(labels)} are not in the reference label maps (they hold {present})"
                )
            present = wanted
        classes = np.array([0] + present)
        self.last_correspondences = []
        self.last_decisions = []
        fused = None
        for n, (ref, arr) in enumerate(zip(refs, arrays)):
            post = self._posterior(ref, arr, classes, target)
            fused = post if fused is None else fused + post
            if progress is not None:
                progress((n + 1) / len(refs))
        winner = fused.argmax(dim=1).numpy()
        dtype = np.uint8 if classes.max() <= 255 else np.uint16
        out = classes[winner].astype(dtype).reshape(target.array.shape)
        return target.with_array(out, name=f"{labs[0].name} on {target.name}")

    # -- internals ------------------------------------------------------------------------------
    def _one_hot(self, arr: np.ndarray, classes: np.ndarray, spacing_kji: Sequence[float]):
        import torch

        lut = np.zeros(int(max(arr.max(), classes.max())) + 1, dtype=np.int64)
        lut[classes] = np.arange(len(classes))
        idx = torch.as_tensor(lut[arr])
        onehot = torch.nn.functional.one_hot(idx, len(classes)).movedim(-1, 0).float()  # K, *S
        if self.prior_sigma_mm > 0:
            onehot = _gaussian_volume(onehot, [self.prior_sigma_mm / s for s in spacing_kji])
            onehot = onehot / onehot.sum(0, keepdim=True).clamp_min(1e-6)
        return onehot

    def _posterior(self, ref: Image, ref_arr: np.ndarray, classes: np.ndarray, target: Image):
        """``(N, K)`` posterior over ``classes`` for every target voxel (``array.ravel()`` order)."""
        import torch

        match = self.correspondence.match_across_contrasts(  # target -> reference
            target, ref, target="fixed", contrast=self.contrast,
            initial_alignment=self.initial_alignment, passes=self.contrast_passes,
        )  # fmt: skip
        corr = match.correspondence
        self.last_correspondences.append(corr)
        self.last_decisions.append(match.decision)
        from ..embedding import volume_key

        key = (volume_key(ref), hash(ref_arr.tobytes()), tuple(int(c) for c in classes))
        if key not in self._priors:
            self._priors = {key: self._one_hot(ref_arr, classes, ref.spacing[::-1])}  # keep the latest only
        onehot = self._priors[key]
        tgt_lps = _voxel_lps(target)
        ref_lps = corr.transform_points(tgt_lps)
        ref_kji = ref.physical_to_index(ref_lps)[:, ::-1]
        prior = sample_field(onehot, ref_kji)  # N, K
        outside = ~ref.contains(ref_lps)
        if outside.any():  # beyond the reference: background
            prior[torch.as_tensor(outside)] = 0.0
            prior[torch.as_tensor(outside), 0] = 1.0
        prior = prior.clamp_min(0)
        prior = prior / prior.sum(1, keepdim=True).clamp_min(1e-6)
        if self.likelihood_weight <= 0:
            return prior
        return self._with_likelihood(ref, ref_arr, classes, target, prior)

    def _with_likelihood(self, ref: Image, ref_arr: np.ndarray, classes: np.ndarray, target: Image, prior):
        """Prior × appearance likelihood on the target, the target's class models re-estimated (EM)."""
        if self.likelihood == "gaussian":
            return appearance_em(prior, self._appearance(target), weight=self.likelihood_weight,
                                 prior_weight=self.prior_weight, iterations=self.em_iterations)
        return self._region_likelihood(ref, ref_arr, classes, target, prior)

    def _appearance(self, target: Image):
        """``(N, F)`` appearance features of every target voxel (``array.ravel()`` order), each
        standardised over the target's anatomy: its normalised intensity on its own grid and/or the
        first principal components of its (whitened) embedding."""
        import torch

        from ..encoders import normalise_intensity

        intensity = torch.as_tensor(normalise_intensity(target.array).reshape(-1, 1))
        anatomy = intensity[:, 0] > 0.1
        if int(anatomy.sum()) < 10:
            anatomy = torch.ones_like(anatomy)
        parts = []
        if "intensity" in self.appearance:
            parts.append(intensity)
        if "embedding" in self.appearance:
            te = self.store.get(target)
            kji = te.grid.physical_to_index(_voxel_lps(target))[:, ::-1]
            emb = sample_field(te.features, kji)  # N, D
            mean = emb[anatomy].mean(0)
            q = min(self.embedding_components, emb.shape[1])
            _, _, v = torch.pca_lowrank(emb[anatomy] - mean, q=q, center=False)
            parts.append((emb - mean) @ v[:, :q])
        feats = torch.cat(parts, dim=1).float()
        mean, std = feats[anatomy].mean(0), feats[anatomy].std(0).clamp_min(1e-6)
        return (feats - mean) / std

    def _region_likelihood(self, ref: Image, ref_arr: np.ndarray, classes: np.ndarray, target: Image, prior):
        """LD's "prediction 2": ``softmax_k(e(x)·r_k / τ)`` with region embeddings re-estimated on the target."""
        import torch
        import torch.nn.functional as F

        from ..image import resample_to

        re = self.store.get(ref)
        te = self.store.get(target)
        # reference region embeddings r_k: one-hot labels (on the encoder grid) as the assignment
        lab_img = Image(ref_arr.astype(np.int32), ref.spacing, ref.origin, ref.direction, "labels")
        on_grid = resample_to(lab_img, re.grid, interpolator="nearest").array
        ref_onehot = self._one_hot(on_grid.astype(np.int64), classes, re.grid.spacing[::-1]).reshape(len(classes), -1)
        feats_ref = re.features.reshape(re.features.shape[0], -1)  # D, V
        r = F.normalize(ref_onehot @ feats_ref.T, dim=1)  # K, D
        # target embeddings at every target voxel
        kji = te.grid.physical_to_index(_voxel_lps(target))[:, ::-1]
        e = F.normalize(sample_field(te.features, kji), dim=1)  # N, D
        log_prior = self.prior_weight * torch.log(prior + 1e-4)
        post = prior
        for it in range(max(1, self.em_iterations + 1)):
            if it > 0:
                r = F.normalize(post.T @ e, dim=1)
            loglik = torch.log_softmax(e @ r.T / self.temperature, dim=1)
            post = torch.softmax(log_prior + self.likelihood_weight * loglik, dim=1)
        return post


def appearance_em(prior, features, weight: float = 1.0, prior_weight: float = 1.0, iterations: int = 6,
                  min_variance: float = 1e-3):
    """Posterior over K classes from a spatial prior and one Gaussian appearance model per class, by EM.

    The atlas-guided EM of classical brain segmentation (Van Leemput et al., IEEE TMI 1999;
    Ashburner and Friston, NeuroImage 2005), with the warped reference labels as the atlas::

        q_k(x) ∝ prior_k(x)^α · [ Π_f N(f(x); μ_kf, σ²_kf) ]^β        (E-step)
        μ_kf = Σ_x q_k(x) f(x) / Σ_x q_k(x),  σ²_kf = Σ_x q_k(x) (f(x) − μ_kf)² / Σ_x q_k(x)   (M-step)

    starting from ``q = prior``. The class models are the *target's own* (another contrast than the
    reference is no obstacle): the reference gives the shapes, the target how each class looks.

    Args:
        prior: ``(N, K)`` non-negative, rows summing to 1.
        features: ``(N, F)`` appearance of each voxel (standardised features: ``min_variance`` is in
            their units).
        weight: β, the likelihood's exponent (0 returns the prior). prior_weight: α.
        iterations: E-steps after the first M-step.
        min_variance: floor of every σ².

    Returns:
        ``(N, K)`` posterior, rows summing to 1.
    """
    import torch

    prior = torch.as_tensor(prior, dtype=torch.float32)
    feats = torch.as_tensor(features, dtype=torch.float32)
    if prior.ndim != 2 or feats.ndim != 2 or prior.shape[0] != feats.shape[0]:
        raise InputError(f"appearance_em: expected prior (N, K) and features (N, F), got {tuple(prior.shape)} and {tuple(feats.shape)}")
    if weight <= 0:
        return prior
    log_prior = prior_weight * torch.log(prior + 1e-6)
    post = prior
    for _ in range(max(1, int(iterations))):
        mass = post.sum(0).clamp_min(1e-6)[:, None]  # K, 1
        mu = post.T @ feats / mass  # K, F
        var = (post.T @ feats.square() / mass - mu.square()).clamp_min(min_variance)
        # log N summed over features, as -(f²/σ² - 2fμ/σ² + μ²/σ²)/2 - log σ: three (N, F) @ (F, K) products
        inv = 1.0 / var
        loglik = -0.5 * (feats.square() @ inv.T - 2.0 * feats @ (mu * inv).T + (mu.square() * inv).sum(1)) \
            - 0.5 * torch.log(var).sum(1)
        post = torch.softmax(log_prior + weight * loglik, dim=1)
    return post


# ---- benchmark protocol ---------------------------------------------------------------------------
class EmbeddingSegmentation:
    """:class:`CrossModalitySegmenter` behind the benchmark's ``SegmentationMethod`` protocol.

    Args:
        encoder: a cache id / name, or a :class:`~AnatSSLLib.encoders.LoadedEncoder`.
        device: torch device when ``encoder`` is an id.
        whiten: match each volume's whitened embedding (:func:`~AnatSSLLib.embedding.whiten_features`).
        **options: :class:`CrossModalitySegmenter` fields (``likelihood_weight``, ...).
    """

    name = "embedding"
    description = "embedding correspondence (global affine + local matching), warped label shapes"

    def __init__(self, encoder=None, device: str = "auto", whiten: bool = True, **options) -> None:
        from ..encoders import encoder_for_tool

        enc = encoder_for_tool(encoder, "cross-modality segmentation", device=device)
        self.segmenter = CrossModalitySegmenter(EmbeddingStore(enc, whiten=whiten), **options)
        self._reference: Image | None = None
        self._labels: Image | None = None

    def prepare(self, reference: Image, reference_labels: Image) -> None:
        """Check and remember the reference and its labels; embed the reference once."""
        check_reference_labels(reference_labels, reference)
        self._reference, self._labels = reference, reference_labels
        self.segmenter.store.get(reference)

    def segment(self, target: Image) -> Image:
        """Reference labels transferred onto ``target``'s grid."""
        if self._reference is None or self._labels is None:
            raise InputError(f"{self.name}: call prepare(reference, labels) before segment(target)")
        return self.segmenter.segment(self._reference, self._labels, target)


def segment_volumes(
    encoder,
    reference: Image | Sequence[Image],
    reference_labels: Image | Sequence[Image],
    targets: Sequence[Image],
    *,
    labels: Sequence[int] | None = None,
    store: EmbeddingStore | None = None,
    **options,
) -> list[Image]:
    """Convenience wrapper: one label map per target (each on its target's grid) with ``encoder``
    (without ``store``, a store of whitened embeddings is made)."""
    store = store if store is not None else EmbeddingStore(encoder, whiten=True)
    seg = CrossModalitySegmenter(store, **options)
    return [seg.segment(reference, reference_labels, t, labels=labels) for t in targets]


def _register_benchmark_method() -> None:
    """Add ``"embedding"`` to :data:`AnatSSLLib.bench.SEGMENTATION_METHODS` (done on import)."""
    try:
        from .. import bench
    except Exception:  # the benchmark module is optional for the tool
        return
    bench.SEGMENTATION_METHODS.setdefault("embedding", lambda encoder=None, **options: EmbeddingSegmentation(encoder, **options))


_register_benchmark_method()
