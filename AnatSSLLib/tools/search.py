"""Embedding similarity search: index many volumes, then ask "where else does this look like this?".

Region entries are the centre-weighted embedding (the landmark tool's, with ``sigma_mm``) at a
regular grid of physical points, ``grid_mm`` apart, on the anatomy of each volume (voxels above
the ``foreground`` level of the normalised intensities). Each volume also gets a volume-level
entry (the normalised mean of its region vectors). Queries:

- by a physical point (LPS mm) in a query volume: its centre-weighted embedding there;
- by a label mask on the query volume: the normalised mean embedding over the mask;
- by a whole volume: its volume-level vector.

A point query can be *refined* with the landmark tool: in each returned volume the answer becomes
the landmark tool's, the query point carried through the dense embedding correspondence between
the query volume and that volume (:meth:`LandmarkLocator.carry`; computed once per volume pair,
then milliseconds). The index ranks the volumes and regions; the refinement places the point.
Without it, a point query answers with the nearest region entry of each volume, which needs an
embedding that is unique over the whole brain (measured: it is not yet, see ``benchmarks/README.md``).
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

__all__ = ["EmbeddingSearch", "region_entries"]


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

    Args:
        store: embeddings of the volumes (shared with the landmark tool).
        grid_mm: distance between region entries.
        sigma_mm: width of the centre-weighted average that makes a region vector.
    """

    def __init__(self, store: EmbeddingStore, *, grid_mm: float = 4.0, sigma_mm: float = 4.0) -> None:
        self.store = store
        self.grid_mm = float(grid_mm)
        self.sigma_mm = float(sigma_mm)

    @property
    def encoder_id(self) -> str:
        return self.store.encoder.encoder_id

    def new_index(self, **kwargs) -> EmbeddingIndex:
        dim = int(self.store.encoder.manifest.embedding_dim)
        settings = {"grid_mm": self.grid_mm, "sigma_mm": self.sigma_mm}
        return EmbeddingIndex(self.encoder_id, dim, settings=settings, **kwargs)

    def check_index(self, index: EmbeddingIndex) -> None:
        if index.encoder_id != self.encoder_id:
            raise InputError(
                f"the index was built with encoder {index.encoder_id}, not {self.encoder_id}: "
                "query it with the same encoder or build a new index"
            )

    def add(
        self,
        index: EmbeddingIndex,
        volumes: Sequence[Image | str | Path],
        names: Sequence[str] | None = None,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        """Embed ``volumes`` (images or paths) and add their entries to ``index``."""
        self.check_index(index)
        for n, vol in enumerate(volumes):
            image = vol if isinstance(vol, Image) else read_image(vol)
            path = "" if isinstance(vol, Image) else str(Path(vol).resolve())
            name = names[n] if names is not None else _volume_name(vol, image)
            embedded = self.store.get(image)
            vectors, positions = region_entries(embedded, grid_mm=self.grid_mm, sigma_mm=self.sigma_mm)
            index.add_volume(IndexedVolume(name, path, volume_key(image), len(vectors)), vectors, positions)
            if progress is not None:
                progress((n + 1) / len(volumes))

    # ---- queries ------------------------------------------------------------------------------
    def point_vector(self, image: Image, point_lps: Sequence[float], key: str | None = None) -> np.ndarray:
        point = np.asarray(point_lps, dtype=float).reshape(1, -1)
        if not image.contains(point)[0]:
            raise InputError(f"query point {point[0].round(2).tolist()} (LPS mm) lies outside {image.name}")
        embedded = self.store.get(image, key=key)
        kji = embedded.grid.physical_to_index(point)[:, ::-1]
        return _sample_trilinear(embedded.smoothed_features(self.sigma_mm), kji)[0].numpy()

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
    ) -> list[SearchHit]:
        """Places in the indexed volumes most similar to ``point_lps`` of ``image``.

        With ``refine`` each hit's position becomes the landmark tool's answer in its own volume
        (read from the path stored in the index; :meth:`LandmarkLocator.carry`), and its score the
        landmark confidence.
        """
        self.check_index(index)
        key = volume_key(image)  # once per query: for the store and for the self-exclusion
        hits = index.search(
            self.point_vector(image, point_lps, key), k=k, one_per_volume=one_per_volume,
            exclude_volumes=self._same_volume(index, image, key) if exclude_self else (),
        )
        if refine:
            locator = locator or LandmarkLocator(self.store)
            for hit in hits:
                if not hit.path:
                    raise InputError(f"cannot refine in {hit.volume}: the index holds no file path for it")
                target = read_image(hit.path)
                hit.position, hit.score = locator.carry(image, point_lps, target)
        return hits

    def search_mask(self, index: EmbeddingIndex, image: Image, mask: Image, *, k: int = 10,
                    one_per_volume: bool = True, exclude_self: bool = True) -> list[SearchHit]:
        """Places most similar to the region ``mask > 0`` of ``image``."""
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
        self._index.search_vectors(np.zeros(self._index.dim, np.float32), 1)  # build FAISS now: index time, not query time

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
