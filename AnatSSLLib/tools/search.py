"""Embedding similarity search: index many volumes, then ask "where else does this look like this?".

Region entries are the centre-weighted embedding (the landmark tool's, with ``sigma_mm``) at a
regular grid of physical points, ``grid_mm`` apart, on the anatomy of each volume (voxels above
the ``foreground`` level of the normalised intensities). Each volume also gets a volume-level
entry (the normalised mean of its region vectors). Queries:

- by a physical point (LPS mm) in a query volume: its centre-weighted embedding there;
- by a label mask on the query volume: the normalised mean embedding over the mask;
- by a whole volume: its volume-level vector.

**What makes a point unique: its canonical position.** One 4 mm-smoothed vector is not unique over
a brain (left and right, repeated cortex): ranking by it alone, the best entry of each volume was
within 4 mm of the right place a quarter of the time (``benchmarks/README.md``). So each entry
also carries its *canonical position*, where its place lies in the frame of the index's
reference volume (the first volume indexed), read through the dense embedding correspondence of
its volume to the reference (:class:`~AnatSSLLib.tools.correspondence.EmbeddingCorrespondence`:
global affine, then local matching, then a smooth field; computed once per volume, when it is
indexed). A point query is carried into the same frame by the query volume's correspondence to
the reference (once per query volume, then milliseconds per point), and the index ranks the
entries near that position by ``cosine similarity - |c - c_q|^2 / (2 position_sigma_mm^2)``
(:meth:`~AnatSSLLib.index.EmbeddingIndex.search_canonical`): the global term says which of the
look-alikes it is, the local term which place of the neighbourhood, as in SAM's global + local
matching (Yan et al., IEEE TMI 2022), here paid once per volume instead of once per volume pair.
A local step then places each answer between the entries (a quadratic fitted to the scores of its
lattice neighbours in its own volume; microseconds, no volume read). ``canonical="affine"`` keeps
only the correspondence's affine part, ``"none"`` the vector alone (the index of before); the
ablation is in ``benchmarks/README.md``.

A point query can also be *refined* with the landmark tool: in each returned volume the answer
becomes the landmark tool's, the query point carried through the dense embedding correspondence
between the query volume and that volume (:meth:`LandmarkLocator.carry`; computed once per volume
pair, then milliseconds; seconds per new volume, so for tens of volumes, not thousands).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..embedding import EmbeddedVolume, EmbeddingStore, volume_key
from ..errors import InputError
from ..image import Image, read_image
from ..index import EmbeddingIndex, IndexedVolume, SearchHit
from ..geometry import sample_unit_vectors as _sample_trilinear
from .landmarks import LandmarkLocator

__all__ = ["EmbeddingSearch", "region_entries", "CANONICAL_MODES"]

#: How entries get their canonical position: the dense correspondence to the reference, only its
#: affine part, or none (rank by the vector alone).
CANONICAL_MODES = ("dense", "affine", "none")


def region_entries(embedded: EmbeddedVolume, *, grid_mm: float, sigma_mm: float, foreground: float = 0.1):
    """Vectors ``(N, D)`` and LPS positions ``(N, 3)`` on a ``grid_mm`` lattice over the anatomy."""
    grid = embedded.grid
    step = np.maximum(1, np.round(grid_mm / np.asarray(grid.spacing[::-1])).astype(int))  # [k, j, i]
    feats = embedded.smoothed_features(sigma_mm)
    sl = tuple(slice(s // 2, None, s) for s in step)
    normalised = embedded.intensity
    mask = normalised[sl] > foreground
    kji = np.argwhere(mask) * step + step // 2
    if len(kji) == 0:
        raise InputError(f"{grid.name}: no anatomy above the foreground level to index (is the volume empty?)")
    vectors = feats[(slice(None),) + tuple(kji[:, a] for a in range(kji.shape[1]))].T.numpy()
    positions = grid.index_to_physical(kji[:, ::-1].astype(float))
    return vectors.astype(np.float32), positions


class EmbeddingSearch:
    """Builds and queries an :class:`~AnatSSLLib.index.EmbeddingIndex` with one encoder.

    The settings are written into a new index (:meth:`new_index`); a query reads them from the
    index it searches, so any ``EmbeddingSearch`` of the same encoder queries any index the way it
    was built.

    Args:
        store: embeddings of the volumes (shared with the landmark tool).
        grid_mm: distance between region entries.
        sigma_mm: width of the centre-weighted average that makes a region vector.
        canonical: ``"dense"`` (default), ``"affine"`` or ``"none"``: see the module docstring.
        position_sigma_mm: width of the Gaussian position term of the ranking.
        radius_mm: only entries whose canonical position lies this close to the query's are ranked.
        local_step: place each answer between the entries (the quadratic fit), by default.
    """

    def __init__(
        self,
        store: EmbeddingStore,
        *,
        grid_mm: float = 4.0,
        sigma_mm: float = 4.0,
        canonical: str = "dense",
        position_sigma_mm: float = 6.0,
        radius_mm: float = 8.0,
        local_step: bool = True,
    ) -> None:
        if canonical not in CANONICAL_MODES:
            raise InputError(f"canonical must be one of {', '.join(CANONICAL_MODES)}, got {canonical!r}")
        if position_sigma_mm <= 0 or radius_mm <= 0:
            raise InputError(f"position_sigma_mm and radius_mm must be positive, got {position_sigma_mm}, {radius_mm}")
        self.store = store
        self.grid_mm = float(grid_mm)
        self.sigma_mm = float(sigma_mm)
        self.canonical = canonical
        self.position_sigma_mm = float(position_sigma_mm)
        self.radius_mm = float(radius_mm)
        self.local_step = bool(local_step)
        self._maps: dict = {}  # (volume key, reference key, mode) -> points -> canonical positions
        self._reference_keys: dict = {}

    @property
    def encoder_id(self) -> str:
        return self.store.encoder.encoder_id

    @property
    def settings(self) -> dict:
        return {"grid_mm": self.grid_mm, "sigma_mm": self.sigma_mm, "canonical": self.canonical,
                "position_sigma_mm": self.position_sigma_mm, "radius_mm": self.radius_mm, "local_step": self.local_step}

    def new_index(self, **kwargs) -> EmbeddingIndex:
        dim = int(self.store.encoder.manifest.embedding_dim)
        return EmbeddingIndex(self.encoder_id, dim, settings=self.settings, **kwargs)

    def check_index(self, index: EmbeddingIndex) -> None:
        if index.encoder_id != self.encoder_id:
            raise InputError(
                f"the index was built with encoder {index.encoder_id}, not {self.encoder_id}: "
                "query it with the same encoder or build a new index"
            )

    @staticmethod
    def _setting(index: EmbeddingIndex, name: str, default):
        return index.settings.get(name, default)

    def _mode(self, index: EmbeddingIndex) -> str:
        """The index's canonical mode (``"none"`` for an index built before canonical positions)."""
        return self._setting(index, "canonical", "none") if index.has_canonical or not len(index) else "none"

    def add(
        self,
        index: EmbeddingIndex,
        volumes: Sequence[Image | str | Path],
        names: Sequence[str] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        """Embed ``volumes`` (images or paths) and add their entries to ``index``.

        With canonical positions (the index's ``canonical`` setting), the first volume of an empty
        index becomes its reference; every other volume is matched to it once (seconds).
        """
        self.check_index(index)
        grid_mm = float(self._setting(index, "grid_mm", self.grid_mm))
        sigma_mm = float(self._setting(index, "sigma_mm", self.sigma_mm))
        mode = self._setting(index, "canonical", "none")
        if mode != "none" and len(index) and not index.has_canonical:
            mode = "none"  # an index of before: its entries have no canonical position
        for n, vol in enumerate(volumes):
            image = vol if isinstance(vol, Image) else read_image(vol)
            path = "" if isinstance(vol, Image) else str(Path(vol).resolve())
            name = names[n] if names is not None else _volume_name(vol, image)
            key = volume_key(image)
            embedded = self.store.get(image, key=key)
            vectors, positions = region_entries(embedded, grid_mm=grid_mm, sigma_mm=sigma_mm)
            canonical = None
            if mode != "none":
                if index.reference is None:
                    index.set_reference(image, name)
                canonical = self.canonical_positions(index, image, positions, key=key)
            index.add_volume(IndexedVolume(name, path, key, len(vectors)), vectors, positions, canonical)
            if progress is not None:
                progress((n + 1) / len(volumes))

    # ---- the canonical frame ---------------------------------------------------------------
    def canonical_positions(self, index: EmbeddingIndex, image: Image, points_lps, key: str | None = None) -> np.ndarray:
        """``points_lps`` ``(N, 3)`` of ``image`` carried into the index's reference frame (LPS mm).

        The correspondence ``image -> reference`` is computed on first use (seconds: both volumes
        are embedded, then matched) and kept for the session.
        """
        if index.reference is None:
            raise InputError("this index has no reference volume: it ranks by the vector alone")
        mode = self._setting(index, "canonical", "dense")
        key = key or volume_key(image)
        ref_id = id(index.reference)
        if ref_id not in self._reference_keys:
            self._reference_keys = {ref_id: volume_key(index.reference)}  # hashing a volume: once per reference
        ref_key = self._reference_keys[ref_id]
        points = np.asarray(points_lps, float).reshape(-1, 3)
        if key == ref_key:
            return points.copy()
        map_key = (key, ref_key, mode)
        if map_key not in self._maps:
            from .correspondence import EmbeddingCorrespondence

            corr = EmbeddingCorrespondence(self.store).match(image, index.reference)  # image points -> reference points
            self._maps[map_key] = corr.transform_points if mode == "dense" else corr.affine_points
            while len(self._maps) > 4 * self.store.max_volumes:
                self._maps.pop(next(iter(self._maps)))
        return self._maps[map_key](points)

    # ---- queries ------------------------------------------------------------------------------
    def point_vectors(self, image: Image, points_lps, key: str | None = None, sigma_mm: float | None = None) -> np.ndarray:
        """The region vectors ``(N, D)`` at ``points_lps`` ``(N, 3)`` of ``image``."""
        points = np.asarray(points_lps, dtype=float).reshape(-1, 3)
        inside = image.contains(points)
        if not np.all(inside):
            bad = points[~inside][0]
            raise InputError(f"query point {bad.round(2).tolist()} (LPS mm) lies outside {image.name}")
        embedded = self.store.get(image, key=key)
        kji = embedded.grid.physical_to_index(points)[:, ::-1]
        return _sample_trilinear(embedded.smoothed_features(sigma_mm or self.sigma_mm), kji).numpy()

    def point_vector(self, image: Image, point_lps: Sequence[float], key: str | None = None) -> np.ndarray:
        return self.point_vectors(image, point_lps, key)[0]

    def mask_vector(self, image: Image, mask: Image, key: str | None = None) -> np.ndarray:
        if not mask.same_geometry(image):
            raise InputError(f"mask {mask.name} does not share the grid of {image.name}")
        lab = mask.array > 0
        if not lab.any():
            raise InputError(f"mask {mask.name} is empty")
        embedded = self.store.get(image, key=key)
        idx = np.argwhere(lab)[:, ::-1].astype(float)
        kji = embedded.grid.physical_to_index(image.index_to_physical(idx))[:, ::-1]
        vec = _sample_trilinear(embedded.smoothed_features(self.sigma_mm), kji).numpy().mean(axis=0)
        return vec / max(np.linalg.norm(vec), 1e-12)

    def volume_vector(self, image: Image, key: str | None = None) -> np.ndarray:
        vectors, _ = region_entries(self.store.get(image, key=key), grid_mm=self.grid_mm, sigma_mm=self.sigma_mm)
        vec = vectors.mean(axis=0)
        return vec / max(np.linalg.norm(vec), 1e-12)

    def search_point(
        self,
        index: EmbeddingIndex,
        image: Image,
        point_lps: Sequence[float],
        *,
        k: int = 10,
        one_per_volume: bool = True,
        exclude_self: bool = True,
        refine: bool = False,
        locator: LandmarkLocator | None = None,
        local_step: bool | None = None,
    ) -> list[SearchHit]:
        """Places in the indexed volumes most similar to ``point_lps`` of ``image``.

        On an index with canonical positions the entries are ranked by similarity and canonical
        position, and each answer placed between the entries by the local step (``local_step``:
        the index's setting by default); otherwise by similarity alone. With ``refine`` each hit's
        position becomes the landmark tool's answer in its own volume (read from the path stored in
        the index; :meth:`LandmarkLocator.carry`), and its score the landmark confidence.
        """
        return self.search_points(index, image, [point_lps], k=k, one_per_volume=one_per_volume, exclude_self=exclude_self,
                                  refine=refine, locator=locator, local_step=local_step)[0]

    def search_points(
        self,
        index: EmbeddingIndex,
        image: Image,
        points_lps,
        *,
        k: int = 10,
        one_per_volume: bool = True,
        exclude_self: bool = True,
        refine: bool = False,
        locator: LandmarkLocator | None = None,
        local_step: bool | None = None,
    ) -> list[list[SearchHit]]:
        """:meth:`search_point` for many points ``(N, 3)`` of one query volume: the volume is
        embedded and carried into the reference frame once. Returns one hit list per point."""
        self.check_index(index)
        key = volume_key(image)  # once per query: for the store and for the self-exclusion
        points = np.asarray(points_lps, dtype=float).reshape(-1, 3)
        vectors = self.point_vectors(image, points, key, float(self._setting(index, "sigma_mm", self.sigma_mm)))
        exclude = self._same_volume(index, image, key) if exclude_self else ()
        out = []
        if self._mode(index) != "none":
            canonical = self.canonical_positions(index, image, points, key=key)
            step = bool(self._setting(index, "local_step", True)) if local_step is None else bool(local_step)
            for vec, can in zip(vectors, canonical):
                out.append(index.search_canonical(
                    vec, can, k=k, one_per_volume=one_per_volume, exclude_volumes=exclude,
                    position_sigma_mm=float(self._setting(index, "position_sigma_mm", self.position_sigma_mm)),
                    radius_mm=float(self._setting(index, "radius_mm", self.radius_mm)), local_step=step,
                ))
        else:
            for vec in vectors:
                out.append(index.search(vec, k=k, one_per_volume=one_per_volume, exclude_volumes=exclude))
        if refine:
            locator = locator or LandmarkLocator(self.store)
            for point, hits in zip(points, out):
                for hit in hits:
                    if not hit.path:
                        raise InputError(f"cannot refine in {hit.volume}: the index holds no file path for it")
                    hit.position, hit.score = locator.carry(image, point, read_image(hit.path))
        return out

    def search_mask(self, index: EmbeddingIndex, image: Image, mask: Image, *, k: int = 10,
                    one_per_volume: bool = True, exclude_self: bool = True) -> list[SearchHit]:
        """Places most similar to the region ``mask > 0`` of ``image`` (by the vector alone)."""
        self.check_index(index)
        key = volume_key(image)
        return index.search(self.mask_vector(image, mask, key), k=k, one_per_volume=one_per_volume,
                            exclude_volumes=self._same_volume(index, image, key) if exclude_self else ())

    def search_volume(self, index: EmbeddingIndex, image: Image, *, k: int = 10, exclude_self: bool = True) -> list[SearchHit]:
        """Indexed volumes ranked by similarity to the whole of ``image``."""
        self.check_index(index)
        key = volume_key(image)
        return index.search_volumes(self.volume_vector(image, key), k=k,
                                    exclude_volumes=self._same_volume(index, image, key) if exclude_self else ())

    @staticmethod
    def _same_volume(index: EmbeddingIndex, image: Image, key: str | None = None) -> list[str]:
        key = key or volume_key(image)
        return [v.name for v in index.volumes if v.key == key]


def _volume_name(source, image: Image) -> str:
    if isinstance(source, Image):
        return image.name
    p = Path(source)
    stem = p.name.split(".")[0]
    return f"{p.parent.name}/{stem}" if p.parent.name else stem


class EncoderSearch:
    """The search tool behind the benchmark's ``SearchMethod`` protocol.

    ``query`` ranks region entries over all indexed volumes; ``best_in_each`` gives the single best
    place in every indexed volume (the "top answer for that subject" of the search benchmark).

    Args:
        encoder: a cache id / name, or a :class:`~AnatSSLLib.encoders.LoadedEncoder`.
        random_weights: the encoder's architecture with random weights (the baseline).
        refine: place each hit with the landmark tool (dense correspondence) in its volume.
        **options: :class:`EmbeddingSearch` options (``grid_mm``, ``sigma_mm``).
    """

    def __init__(self, encoder=None, random_weights: bool = False, refine: bool = False, device: str = "auto", **options) -> None:
        from ..encoders import encoder_for_tool

        enc = encoder_for_tool(encoder, "the search benchmark", device=device, random_weights=random_weights)
        self.name = ("random-encoder" if random_weights else "encoder") + ("+refine" if refine else "")
        self.refine = refine
        self.search = EmbeddingSearch(EmbeddingStore(enc, max_volumes=64, whiten=False), **options)
        self._index: EmbeddingIndex | None = None
        self._images: dict[str, Image] = {}
        self._refiner: LandmarkLocator | None = None

    def index(self, volumes: Sequence[tuple[str, Image]]) -> None:
        self._index = self.search.new_index()
        self._images = dict(volumes)
        self.search.add(self._index, [img for _, img in volumes], names=[n for n, _ in volumes])
        if self._index.has_canonical:  # the spatial table and the query's map: index time, not query time
            self._index._cell_table()
        else:
            self._index.search_vectors(np.zeros(self._index.dim, np.float32), 1)  # build FAISS now

    def _hits(self, image: Image, point, k: int, one_per_volume: bool) -> list[tuple[str, np.ndarray, float]]:
        if self._index is None:
            raise InputError(f"{self.name}: call index(volumes) before querying")
        hits = self.search.search_point(self._index, image, point, k=k, one_per_volume=one_per_volume)
        out = []
        for hit in hits:
            position, score = hit.position, hit.score
            if self.refine:
                position, score = self._locator().carry(image, point, self._images[hit.volume])
            out.append((hit.volume, np.asarray(position, dtype=float), float(score)))
        return out

    def _locator(self) -> LandmarkLocator:
        if self._refiner is None:
            self._refiner = LandmarkLocator(self.search.store)
        return self._refiner

    def query(self, image: Image, point, k: int) -> list[tuple[str, np.ndarray, float]]:
        return self._hits(image, point, k, one_per_volume=False)

    def best_in_each(self, image: Image, point) -> list[tuple[str, np.ndarray, float]]:
        return self._hits(image, point, len(self._images), one_per_volume=True)


def _register_benchmark_methods() -> None:
    """Add ``"encoder"``, ``"encoder+refine"`` and ``"random-encoder"`` to :data:`AnatSSLLib.bench.SEARCH_METHODS`."""
    try:
        from .. import bench
    except Exception:  # the benchmark module is optional for the tool
        return
    bench.SEARCH_METHODS.setdefault("encoder", lambda encoder=None, **o: EncoderSearch(encoder, **o))
    bench.SEARCH_METHODS.setdefault("encoder+refine", lambda encoder=None, **o: EncoderSearch(encoder, refine=True, **o))
    bench.SEARCH_METHODS.setdefault("random-encoder", lambda encoder=None, **o: EncoderSearch(encoder, random_weights=True, **o))


_register_benchmark_methods()
