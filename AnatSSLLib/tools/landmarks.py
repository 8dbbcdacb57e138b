"""One-shot landmark localisation by centre-sensitive embedding matching (LD, Chen et al. TPAMI 2023).

A landmark clicked on a reference volume is found in target volumes by comparing dense
embeddings (LD, Chen et al. TPAMI 2023, section 3.4):

1. Both volumes are embedded once (:class:`~AnatSSLLib.embedding.EmbeddingStore`).
2. The embeddings are averaged by a Gaussian kernel W_c peaked at each voxel and re-normalised
   (the *centre-sensitive* embedding ``v̇ = normalize(W_c * e)``); the support vector of landmark
   t is the same average at the reference point, read by trilinear interpolation.
3. The similarity map ``M(x) = <v̇(x), ṡ_t>`` is maximised over the target; the peak value is the
   confidence.

Two strategies:

- ``"argmax"`` (LD as published): the first (widest) kernel searches the whole target; each
  following, narrower kernel searches within ``search_radius_mm`` of the previous peak. The peak
  is refined to sub-voxel precision by a parabola through the neighbours on each axis. The
  kernel widths and the number of scales are *not given by the released code*: they are
  parameters here (default ``sigmas_mm=(8.0, 4.0, 2.0)``).
- ``"correspondence"`` (default; global then local, our addition in the spirit of SAM's
  coarse-to-fine matching): a dense embedding correspondence between reference and target
  (:class:`~AnatSSLLib.tools.correspondence.EmbeddingCorrespondence`: the embedding's global
  affine, refined by windowed centre-weighted matching of a grid of points and a smooth
  displacement field) carries every point; the confidence is the centre-weighted cosine
  similarity at the answer (finest kernel). A single global argmax is fragile where anatomy
  repeats, while the field pools hundreds of matches. The correspondence is kept per
  (reference, target) pair, so adding a point later costs milliseconds.

Targets of another contrast than the reference (a T1 reference, T2, PD or FLAIR targets) are
found out per target and mapped into the reference's contrast before matching
(``contrast="auto"``, :meth:`~AnatSSLLib.tools.correspondence.EmbeddingCorrespondence.match_across_contrasts`);
the decision is kept with each result.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ..embedding import EmbeddedVolume, EmbeddingStore
from ..errors import InputError
from ..geometry import sample_unit_vectors
from ..image import Image
from ..peaks import subvoxel_peak
from ..points import PointSet

__all__ = ["EncoderLandmarks", "LandmarkLocator", "locate_landmarks"]


@dataclasses.dataclass
class LandmarkLocator:
    """Locates labelled reference points in target volumes with one encoder.

    Args:
        store: the embedding store (keeps every volume's embedding for the session).
        sigmas_mm: Gaussian kernel widths, coarse to fine (mm).
        search_radius_mm: how far from the previous scale's peak a finer scale may move.
        strategy: ``"correspondence"`` (default) or ``"argmax"`` (LD as published), see the module docstring.
        contrast: with ``"correspondence"``, how a target's contrast is handled: ``"auto"``
            (default: decided per target from the two volumes' intensities under the embedding's
            global affine; another contrast is mapped into the reference's before matching, see
            :mod:`AnatSSLLib.contrast`), ``"same"`` (never mapped) or ``"match"`` (always mapped).
        initial_alignment: with ``"correspondence"``, where the dense matching of a target in the
            reference's contrast starts: ``"embedding"`` (the embedding's global affine, the
            default) or ``"registration"`` (a SimpleITK Mattes mutual-information affine). A
            mapped target always starts from the registration.
        contrast_passes: for a mapped target, how many times the transfer function is fitted:
            the first under the affine, each further one through the previous dense correspondence
            (then the target is matched again).

    Attributes:
        last_decisions: the :class:`~AnatSSLLib.contrast.ContrastDecision` of each target of the
            last :meth:`locate` call (None with ``"argmax"``).
    """

    store: EmbeddingStore
    sigmas_mm: Sequence[float] = (8.0, 4.0, 2.0)
    search_radius_mm: float = 12.0
    strategy: str = "correspondence"
    contrast: str = "auto"
    initial_alignment: str = "embedding"
    contrast_passes: int = 1
    _maps: dict = dataclasses.field(default_factory=dict, repr=False)
    last_decisions: list = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.strategy not in ("correspondence", "argmax"):
            raise InputError(f"landmark strategy must be 'correspondence' or 'argmax', got {self.strategy!r}")
        if self.initial_alignment not in ("embedding", "registration"):
            raise InputError(
                f"landmark initial alignment must be 'embedding' or 'registration', got {self.initial_alignment!r}"
            )
        if int(self.contrast_passes) < 1:
            raise InputError(f"contrast_passes must be at least 1, got {self.contrast_passes!r}")
        from ..contrast import check_contrast_choice

        check_contrast_choice(self.contrast)

    @classmethod
    def for_encoder(cls, encoder, **options) -> "LandmarkLocator":
        """The locator with the tool's defaults on ``encoder`` (a :class:`~AnatSSLLib.encoders.LoadedEncoder`,
        a cache id or name, or None for the bundled default), matching whitened embeddings."""
        from ..encoders import encoder_for_tool

        enc = encoder_for_tool(encoder, "the landmark tool")
        return cls(EmbeddingStore(enc, whiten=True), **options)

    def locate(
        self,
        reference: Image,
        points: PointSet,
        targets: Sequence[Image],
        progress: Callable[[float], None] | None = None,
    ) -> list[PointSet]:
        """Find ``points`` (LPS mm on ``reference``) in each target; one PointSet per target.

        Each returned point carries a confidence: the cosine similarity at the peak of the
        finest scale (in ``[-1, 1]``, higher is surer).

        Raises:
            InputError: no points, a point outside the reference, or a volume of the wrong dimension.
        """
        if len(points) == 0:
            raise InputError("no reference points to locate: place at least one landmark on the reference")
        inside = reference.contains(points.positions)
        if not np.all(inside):
            bad = [lab for lab, ok in zip(points.labels, inside) if not ok]
            raise InputError(f"reference points outside the reference image {reference.name}: {bad}")
        ref = self.store.get(reference)
        results = []
        self.last_decisions = []
        for n, target in enumerate(targets):
            decision = None
            if self.strategy == "correspondence":
                positions, conf, decision = self._carry(reference, ref, points.positions, target)
            else:
                positions, conf = self._match(ref, points.positions, self.store.get(target))
            self.last_decisions.append(decision)
            results.append(
                PointSet(
                    labels=list(points.labels),
                    positions=positions,
                    descriptions=None if decision is None else [decision.describe()] * len(points),
                    confidence=conf,
                )
            )
            if progress is not None:
                progress((n + 1) / len(targets))
        return results

    def prepare(self, reference: Image) -> None:
        """Embed ``reference`` and compute the centre-weighted maps every target's matching reads
        from it, so that the first target costs no more than the others."""
        from .correspondence import EmbeddingCorrespondence

        ref = self.store.get(reference)
        sigmas = set(self.sigmas_mm)
        if self.strategy == "correspondence":
            sigmas |= set(EmbeddingCorrespondence(self.store).sigmas_mm)
        for sigma in sorted(sigmas):
            ref.smoothed_features(sigma)

    def _carry(self, reference: Image, ref: EmbeddedVolume, ref_lps: np.ndarray, target: Image):
        """Points through the cached dense correspondence reference -> target, their confidences,
        and the target's contrast decision."""
        from ..embedding import volume_key
        from .correspondence import EmbeddingCorrespondence

        key = (volume_key(reference), volume_key(target), self.contrast, self.initial_alignment, int(self.contrast_passes))
        if key not in self._maps:
            self._maps[key] = EmbeddingCorrespondence(self.store).match_across_contrasts(
                reference, target, target="moving", contrast=self.contrast,
                initial_alignment=self.initial_alignment, passes=self.contrast_passes,
            )  # fmt: skip
            while len(self._maps) > 4 * self.store.max_volumes:
                self._maps.pop(next(iter(self._maps)))
        match = self._maps[key]
        positions = match.correspondence.transform_points(ref_lps)
        sigma = min(self.sigmas_mm)
        tgt = self.store.get(match.moving)
        support = sample_unit_vectors(ref.smoothed_features(sigma), ref.grid.physical_to_index(ref_lps)[:, ::-1])
        found = sample_unit_vectors(tgt.smoothed_features(sigma), tgt.grid.physical_to_index(positions)[:, ::-1])
        return positions, (support * found).sum(dim=1).numpy(), match.decision

    def carry(self, reference: Image, point_lps: np.ndarray, target: Image) -> tuple[np.ndarray, float]:
        """One point of ``reference`` (LPS mm) found in ``target`` by :meth:`locate` (with the default
        strategy, the cached dense correspondence: the first call for a (reference, target) pair
        computes it, later calls cost milliseconds). Returns the LPS position and its confidence."""
        query = PointSet(labels=["query"], positions=np.asarray(point_lps, float).reshape(1, -1))
        (found,) = self.locate(reference, query, [target])
        return found.positions[0], float(found.confidence[0])

    def _match(self, ref: EmbeddedVolume, ref_lps: np.ndarray, tgt: EmbeddedVolume) -> tuple[np.ndarray, np.ndarray]:
        import torch

        nd = tgt.grid.ndim
        ref_kji = ref.grid.physical_to_index(ref_lps)[:, ::-1]
        spacing_kji = np.asarray(tgt.grid.spacing[::-1])
        shape = np.asarray(tgt.features.shape[1:])
        peaks = None  # (N, nd) in target [k, j, i]; the first (widest) scale searches the whole target
        conf = np.zeros(len(ref_lps))
        for sigma in self.sigmas_mm:
            support = sample_unit_vectors(ref.smoothed_features(sigma), ref_kji)  # N, D
            feats = tgt.smoothed_features(sigma)  # D, *S
            flat = feats.reshape(feats.shape[0], -1)
            new_peaks = np.zeros((len(ref_lps), nd))
            if peaks is None:
                for start in range(0, len(support), 16):  # bounded memory: 16 maps at a time
                    sims = (support[start : start + 16] @ flat).reshape(-1, *shape)
                    for r, sim in enumerate(sims.numpy()):
                        p = np.unravel_index(int(np.argmax(sim)), sim.shape)
                        new_peaks[start + r] = subvoxel_peak(sim, p)
                        conf[start + r] = float(sim[p])
            else:
                radius = np.ceil(self.search_radius_mm / spacing_kji).astype(int)
                for r in range(len(support)):
                    centre = np.round(peaks[r]).astype(int)
                    lo = np.clip(centre - radius, 0, shape - 1)
                    hi = np.clip(centre + radius + 1, 1, shape)
                    window = feats[(slice(None),) + tuple(slice(a, b) for a, b in zip(lo, hi))]
                    sim = torch.einsum("d,d...->...", support[r], window).numpy()
                    p = np.unravel_index(int(np.argmax(sim)), sim.shape)
                    new_peaks[r] = subvoxel_peak(sim, p) + lo
                    conf[r] = float(sim[p])
            peaks = new_peaks
        lps = tgt.grid.index_to_physical(peaks[:, ::-1])
        return lps, conf


def locate_landmarks(
    encoder,
    reference: Image,
    points: PointSet,
    targets: Sequence[Image],
    *,
    sigmas_mm: Sequence[float] = (8.0, 4.0, 2.0),
    search_radius_mm: float = 12.0,
    store: EmbeddingStore | None = None,
) -> list[PointSet]:
    """Convenience wrapper: locate ``points`` of ``reference`` in every target with ``encoder``.

    ``encoder`` is a :class:`~AnatSSLLib.encoders.LoadedEncoder`; pass ``store`` to keep
    embeddings between calls (without one, a store of whitened embeddings is made).
    """
    store = store if store is not None else EmbeddingStore(encoder, whiten=True)
    return LandmarkLocator(store, sigmas_mm, search_radius_mm).locate(reference, points, targets)


class EncoderLandmarks:
    """The landmark tool behind the benchmark's ``LandmarkMethod`` protocol.

    Args:
        encoder: a cache id / name, or a :class:`~AnatSSLLib.encoders.LoadedEncoder`.
        random_weights: use the encoder's architecture with random weights (baseline (d)).
        whiten: match each volume's whitened embedding (:func:`~AnatSSLLib.embedding.whiten_features`).
        **options: :class:`LandmarkLocator` fields (``sigmas_mm``, ``search_radius_mm``).
    """

    def __init__(
        self, encoder=None, random_weights: bool = False, device: str = "auto", whiten: bool = True, **options
    ) -> None:
        from ..encoders import encoder_for_tool

        enc = encoder_for_tool(encoder, "the landmark tool", device=device, random_weights=random_weights)
        self.name = "random-encoder" if random_weights else "encoder"
        if options.get("contrast", "auto") != "auto":
            self.name += f"+{options['contrast']}"
        if options.get("initial_alignment") == "registration":
            self.name += "+registration"
        if not whiten:
            self.name += "-raw"
        self.locator = LandmarkLocator(EmbeddingStore(enc, whiten=whiten), **options)
        self._reference: Image | None = None
        self._points: PointSet | None = None

    def prepare(self, reference: Image, ref_points: PointSet) -> None:
        """Remember the reference and its points; embed the reference once (with its smoothed maps)."""
        self._reference, self._points = reference, ref_points
        self.locator.prepare(reference)

    def locate(self, target: Image) -> PointSet:
        if self._reference is None or self._points is None:
            raise InputError(f"{self.name}: call prepare(reference, points) before locate(target)")
        return self.locator.locate(self._reference, self._points, [target])[0]


def _register_benchmark_methods() -> None:
    """Add the encoder methods to :data:`AnatSSLLib.bench.LANDMARK_METHODS`: ``"encoder"`` (the
    tool's defaults), ``"random-encoder"`` (the same with random weights), the contrast ablations
    ``"encoder+same"`` / ``"encoder+match"`` and ``"encoder-raw"`` (no whitening)."""
    try:
        from .. import bench
    except Exception:  # the benchmark module is optional for the tool
        return
    methods = {
        "encoder": {},
        "random-encoder": {"random_weights": True},
        "encoder+same": {"contrast": "same"},
        "encoder+match": {"contrast": "match"},
        "random-encoder+match": {"random_weights": True, "contrast": "match"},
        "encoder-raw": {"whiten": False},
    }
    for name, fixed in methods.items():
        bench.LANDMARK_METHODS.setdefault(name, lambda encoder=None, _fixed=fixed, **o: EncoderLandmarks(encoder, **_fixed, **o))


_register_benchmark_methods()
