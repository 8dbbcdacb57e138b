"""One-shot landmark localisation by centre-sensitive embedding matching (LD, Chen et al. TPAMI 2023).

A landmark clicked on a reference volume is found in target volumes by comparing dense
embeddings (LD §2.5 in ``shared/METHODS.md``):

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
  (:class:`~AnatSSLLib.tools.correspondence.EmbeddingCorrespondence`: a foreground-aligned affine
  refined by windowed centre-weighted matching of a grid of points, RANSAC, and a smooth
  displacement field) carries every point; the confidence is the centre-weighted cosine
  similarity at the answer (finest kernel). A single global argmax is fragile where anatomy
  repeats (measured: tens of mm off across subjects with a CPU-trained LD encoder), while the
  field pools hundreds of matches. The correspondence is kept per (reference, target) pair, so
  adding a point later costs milliseconds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ..embedding import EmbeddedVolume, EmbeddingStore
from ..errors import InputError
from ..image import Image
from ..peaks import subvoxel_peak
from ..points import PointSet

__all__ = ["EncoderLandmarks", "LandmarkLocator", "locate_landmarks"]


def _sample_trilinear(features, index_kji: np.ndarray):
    """Features ``(D, *S)`` at continuous ``[k, j, i]`` positions ``(N, nd)`` -> ``(N, D)``."""
    import torch

    nd = features.ndim - 1
    shape = np.asarray(features.shape[1:], dtype=float)
    idx = np.clip(index_kji, 0, shape - 1)
    base = np.floor(idx).astype(int)
    base = np.minimum(base, np.maximum(shape.astype(int) - 2, 0))
    frac = idx - base
    out = 0
    for corner in np.ndindex(*(2,) * nd):
        c = np.asarray(corner)
        pos = np.minimum(base + c, shape.astype(int) - 1)
        w = np.prod(np.where(c == 1, frac, 1 - frac), axis=1)
        vals = features[(slice(None),) + tuple(torch.as_tensor(pos[:, a]) for a in range(nd))]  # D, N
        out = out + vals * torch.as_tensor(w, dtype=features.dtype)
    return torch.nn.functional.normalize(out.T, dim=1)


@dataclasses.dataclass
class LandmarkLocator:
    """Locates labelled reference points in target volumes with one encoder.

    Args:
        store: the embedding store (keeps every volume's embedding for the session).
        sigmas_mm: Gaussian kernel widths, coarse to fine (mm).
        search_radius_mm: how far from the previous scale's peak a finer scale may move.
        strategy: ``"correspondence"`` (default) or ``"argmax"`` (LD as published), see the module docstring.
        initial_alignment: with ``"correspondence"``, where the dense matching starts:
            ``"embedding"`` (the global affine from embedding matches) or ``"registration"`` (a
            SimpleITK Mattes mutual-information affine registration, then the embedding's local
            levels: for targets of another contrast, where the embedding's global matches are weak).
        match_contrast: with ``"correspondence"``, map each target's intensities into the
            reference's contrast before matching (:mod:`AnatSSLLib.contrast`: the transfer function
            ``E[reference | target]`` read off the two volumes under a SimpleITK affine registration,
            :meth:`~AnatSSLLib.tools.correspondence.EmbeddingCorrespondence.registered_affine`),
            so that a T1 reference is matched to a pseudo-T1 copy of a T2 target. For targets of
            another contrast than the reference (our addition; measured in ``benchmarks/README.md``).
        contrast_passes: with ``match_contrast``, how many times the transfer function is fitted:
            the first under the affine, each further one through the previous dense correspondence
            (then the target is matched again).
    """

    store: EmbeddingStore
    sigmas_mm: Sequence[float] = (8.0, 4.0, 2.0)
    search_radius_mm: float = 12.0
    strategy: str = "correspondence"
    initial_alignment: str = "embedding"
    match_contrast: bool = False
    contrast_passes: int = 1
    _maps: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.strategy not in ("correspondence", "argmax"):
            raise InputError(f"landmark strategy must be 'correspondence' or 'argmax', got {self.strategy!r}")
        if self.initial_alignment not in ("embedding", "registration"):
            raise InputError(
                f"landmark initial alignment must be 'embedding' or 'registration', got {self.initial_alignment!r}"
            )
        if int(self.contrast_passes) < 1:
            raise InputError(f"contrast_passes must be at least 1, got {self.contrast_passes!r}")

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
        for n, target in enumerate(targets):
            if self.strategy == "correspondence":
                positions, conf = self._carry(reference, ref, points.positions, target)
            else:
                positions, conf = self._match(ref, points.positions, self.store.get(target))
            results.append(
                PointSet(
                    labels=list(points.labels),
                    positions=positions,
                    descriptions=[f"confidence={c:.3f}" for c in conf],
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
        """Points through the cached dense correspondence reference -> target, with confidences."""
        from ..embedding import volume_key

        key = (volume_key(reference), volume_key(target), self.initial_alignment, self.match_contrast, int(self.contrast_passes))
        if key not in self._maps:
            self._maps[key] = self._correspondence(reference, target)
            while len(self._maps) > 4 * self.store.max_volumes:
                self._maps.pop(next(iter(self._maps)))
        corr, matched = self._maps[key]
        positions = corr.transform_points(ref_lps)
        sigma = min(self.sigmas_mm)
        tgt = self.store.get(matched)
        support = _sample_trilinear(ref.smoothed_features(sigma), ref.grid.physical_to_index(ref_lps)[:, ::-1])
        found = _sample_trilinear(tgt.smoothed_features(sigma), tgt.grid.physical_to_index(positions)[:, ::-1])
        return positions, (support * found).sum(dim=1).numpy()

    def _correspondence(self, reference: Image, target: Image):
        """The dense map reference -> target, and the volume it was matched on (``target``, or its
        copy in the reference's contrast with ``match_contrast``)."""
        from .correspondence import EmbeddingCorrespondence

        corr, _, matched = EmbeddingCorrespondence(self.store).match_across_contrasts(
            reference, target, initial_alignment=self.initial_alignment,
            remapped="moving" if self.match_contrast else None, passes=self.contrast_passes,
        )  # fmt: skip
        return corr, matched

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
            support = _sample_trilinear(ref.smoothed_features(sigma), ref_kji)  # N, D
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
        if options.get("initial_alignment") == "registration":
            self.name += "+registration"
        if options.get("match_contrast"):
            self.name += "+contrast"
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
    """Add the encoder methods (``"encoder"``, ``"random-encoder"``, ``"encoder+registration"``,
    ``"encoder-raw"``) to :data:`AnatSSLLib.bench.LANDMARK_METHODS`."""
    try:
        from .. import bench
    except Exception:  # the benchmark module is optional for the tool
        return
    bench.LANDMARK_METHODS.setdefault("encoder", lambda encoder=None, **o: EncoderLandmarks(encoder, **o))
    bench.LANDMARK_METHODS.setdefault(
        "random-encoder", lambda encoder=None, **o: EncoderLandmarks(encoder, random_weights=True, **o)
    )
    bench.LANDMARK_METHODS.setdefault(
        "encoder+registration",
        lambda encoder=None, **o: EncoderLandmarks(encoder, initial_alignment="registration", **o),
    )
    bench.LANDMARK_METHODS.setdefault(
        "encoder+registration+contrast",
        lambda encoder=None, **o: EncoderLandmarks(encoder, initial_alignment="registration", match_contrast=True, **o),
    )
    bench.LANDMARK_METHODS.setdefault(
        "random-encoder+registration+contrast",
        lambda encoder=None, **o: EncoderLandmarks(encoder, random_weights=True, initial_alignment="registration",
                                                   match_contrast=True, **o),
    )
    # the ablation: the raw embedding, as before per-volume whitening
    bench.LANDMARK_METHODS.setdefault("encoder-raw", lambda encoder=None, **o: EncoderLandmarks(encoder, whiten=False, **o))


_register_benchmark_methods()
