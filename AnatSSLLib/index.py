"""An on-disk index of embedding vectors with their volume and physical position.

:class:`EmbeddingIndex` stores, for one encoder, two kinds of entries:

- *region* entries: one unit vector per sampled place of a volume, with its LPS position (mm);
- *volume* entries: one unit vector per volume (the normalised mean of its region vectors).

A region entry may also carry its **canonical position**: where its place lies in one shared
frame, that of the index's *reference volume* (the tool maps every volume into it with a dense
embedding correspondence, :mod:`AnatSSLLib.tools.search`). Then a point query ranks by
:meth:`EmbeddingIndex.search_canonical`: the cosine similarity of the vectors minus a Gaussian
position penalty ``|c - c_q|^2 / (2 sigma^2)`` over the entries within ``radius_mm`` of the
query's canonical position ``c_q`` (found through a spatial table of the canonical positions:
only those entries are read), and a *local step* places each answer off the entry lattice (a
quadratic fitted to the scores of the answer's lattice neighbours in its own volume). The vector
says what the place looks like, the canonical position which of the look-alikes over a brain
(left or right, which gyrus) it is: the pairing of a local and a global descriptor that SAM
matches with (Yan et al., IEEE TMI 2022).

FAISS does the unconstrained nearest-neighbour work on inner products (cosine similarity, the
vectors being unit norm): an exact ``IndexFlatIP`` while the index is small, an ``IndexHNSWFlat``
past ``approximate_threshold`` entries (overridable with ``kind``). It is built on first use only:
an index queried by canonical position never builds it.

On disk a folder holds ``CURRENT`` (the name of the live generation) and one folder per
generation with ``index.json`` (encoder id, dimension, volumes, a digest of every file), one
``.npy`` file per array (float16 vectors and canonical positions, float32 positions, volume
numbers, the spatial table; memory-mapped on open, so a large index costs the memory its queries
touch, not its size), ``reference.npz`` (the reference volume) and, for HNSW, the FAISS file. A
build, add or remove writes a new generation and then replaces ``CURRENT`` atomically, so an
interrupted write leaves the previous index intact. Nothing is unpickled: arrays are read with
``allow_pickle=False``. Version 1 indexes (``regions.npz``) still open.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .errors import InputError

__all__ = ["EmbeddingIndex", "IndexedVolume", "SearchHit"]

FORMAT = "anatssl-embedding-index"
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
# files above this size get a sampled digest (size + 64 blocks of 1 MiB + the last block) instead
# of a full sha256: hashing gigabytes at every open would cost seconds per open
_FULL_DIGEST_BYTES = 256 << 20
# the per-entry arrays, their dtype in memory and on disk, and their width
_ARRAYS = {"vectors": np.float16, "positions": np.float32, "volume_of": np.int32, "canonical": np.float16}


@dataclasses.dataclass
class IndexedVolume:
    """A volume in the index: a stable name, where it was read from, and its content key."""

    name: str
    path: str
    key: str
    n_regions: int


@dataclasses.dataclass
class SearchHit:
    """One answer: a volume, a position in it (LPS mm; ``None`` for a volume-level hit) and a score.

    For a canonical (position-aware) query, ``score`` is the ranking score (cosine similarity
    minus the position penalty), ``similarity`` the cosine similarity of the answer's entry and
    ``canonical_distance_mm`` how far the entry's canonical position lies from the query's;
    ``entry_position`` is the answer's lattice entry before the local step.
    """

    volume: str
    position: np.ndarray | None
    score: float
    path: str = ""
    similarity: float | None = None
    canonical_distance_mm: float | None = None
    entry_position: np.ndarray | None = None


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise InputError("the search index needs FAISS: pip install faiss-cpu") from exc
    return faiss


class EmbeddingIndex:
    """Region and volume embeddings of many volumes for one encoder.

    Use :meth:`create` for a new index and :meth:`open` for an existing one; change it with
    :meth:`add_volume` / :meth:`remove_volume` and persist with :meth:`save`.

    Args:
        kind: ``"auto"`` (exact below ``approximate_threshold`` entries, HNSW above), ``"exact"``
            or ``"hnsw"``.
        cell_mm: cell size of the spatial table over canonical positions.
        max_pending_mb: volumes added since the last save are kept in memory up to this size,
            then written to a temporary folder and memory-mapped (so that building an index of
            thousands of volumes needs bounded memory).
    """

    def __init__(
        self,
        encoder_id: str,
        dim: int,
        *,
        kind: str = "auto",
        approximate_threshold: int = 200_000,
        hnsw_m: int = 32,
        ef_search: int = 96,
        settings: dict | None = None,
        cell_mm: float = 4.0,
        max_pending_mb: float = 512.0,
    ) -> None:
        if kind not in ("auto", "exact", "hnsw"):
            raise InputError(f"index kind must be 'auto', 'exact' or 'hnsw', got {kind!r}")
        self.encoder_id = encoder_id
        self.dim = int(dim)
        self.kind = kind
        self.approximate_threshold = int(approximate_threshold)
        self.hnsw_m = int(hnsw_m)
        self.ef_search = int(ef_search)
        self.settings = dict(settings or {})
        self.cell_mm = float(cell_mm)
        self.max_pending_mb = float(max_pending_mb)
        self.volumes: list[IndexedVolume] = []
        self.reference = None  # the Image whose frame the canonical positions are in
        self.reference_name = ""
        self._stored = {
            "vectors": np.zeros((0, self.dim), dtype=np.float16),
            "positions": np.zeros((0, 3), dtype=np.float32),
            "volume_of": np.zeros((0,), dtype=np.int32),
        }
        # Volumes added since the arrays were last joined: joining once per read instead of once
        # per add keeps building an index of thousands of volumes linear in its size.
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_bytes = 0
        self._spill_dir: str | None = None
        self._volume_vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._faiss_index = None
        self._cells = None  # spatial table over canonical positions: (origin, shape, order, start)

    def __del__(self) -> None:
        spill = getattr(self, "_spill_dir", None)
        if spill:
            shutil.rmtree(spill, ignore_errors=True)

    def _joined(self, key: str) -> np.ndarray:
        if self._pending:
            for name in self._stored:
                self._stored[name] = np.concatenate([self._stored[name]] + [block[name] for block in self._pending])
            self._pending = []
            self._pending_bytes = 0
        return self._stored[key]

    _vectors = property(lambda self: self._joined("vectors"), lambda self, v: self._stored.__setitem__("vectors", v))
    _positions = property(lambda self: self._joined("positions"), lambda self, v: self._stored.__setitem__("positions", v))
    _volume_of = property(lambda self: self._joined("volume_of"), lambda self, v: self._stored.__setitem__("volume_of", v))
    _canonical = property(lambda self: self._joined("canonical"), lambda self, v: self._stored.__setitem__("canonical", v))

    # ---- contents ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._stored["vectors"].shape[0]) + sum(len(block["vectors"]) for block in self._pending)

    @property
    def effective_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        return "hnsw" if len(self) > self.approximate_threshold else "exact"

    @property
    def has_canonical(self) -> bool:
        """Whether the region entries carry canonical positions (then point queries rank with them)."""
        return "canonical" in self._stored

    def volume_names(self) -> list[str]:
        return [v.name for v in self.volumes]

    def set_reference(self, image, name: str = "") -> None:
        """Make ``image`` the reference volume: canonical positions are in its physical frame (LPS mm).

        Only an empty index may get one (every entry's canonical position depends on it).
        """
        if len(self) and self.reference is not None:
            raise InputError("the index already has a reference volume; its canonical positions depend on it")
        self.reference = image
        self.reference_name = name or getattr(image, "name", "")
        if "canonical" not in self._stored:
            self._stored["canonical"] = np.zeros((0, 3), dtype=np.float16)

    def add_volume(self, volume: IndexedVolume, vectors: np.ndarray, positions: np.ndarray,
                   canonical: np.ndarray | None = None) -> None:
        """Add one volume's region vectors ``(N, dim)`` at LPS ``positions`` ``(N, 3)``, with their
        canonical positions ``(N, 3)`` (LPS mm in the reference's frame) when the index has them."""
        vectors = np.asarray(vectors, dtype=np.float32)
        positions = np.asarray(positions, dtype=np.float32).reshape(-1, 3)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InputError(f"{volume.name}: expected vectors of dimension {self.dim}, got shape {vectors.shape}")
        if vectors.shape[0] != positions.shape[0] or vectors.shape[0] == 0:
            raise InputError(f"{volume.name}: {vectors.shape[0]} vectors for {positions.shape[0]} positions (need >= 1)")
        if volume.name in self.volume_names():
            raise InputError(f"volume {volume.name!r} is already in the index; remove it first or give another name")
        if self.has_canonical and canonical is None:
            raise InputError(f"{volume.name}: this index ranks by canonical position; give each entry's canonical position")
        if canonical is not None:
            canonical = np.asarray(canonical, dtype=np.float32).reshape(-1, 3)
            if not self.has_canonical:
                if len(self):
                    raise InputError(f"{volume.name}: the index holds no canonical positions; add the volume without them")
                self._stored["canonical"] = np.zeros((0, 3), dtype=np.float16)
            if len(canonical) != len(vectors) or not np.all(np.isfinite(canonical)):
                raise InputError(f"{volume.name}: expected {len(vectors)} finite canonical positions, got shape {canonical.shape}")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        number = len(self.volumes)
        self.volumes.append(dataclasses.replace(volume, n_regions=int(vectors.shape[0])))
        block = {
            "vectors": vectors.astype(np.float16),
            "positions": positions,
            "volume_of": np.full(len(vectors), number, np.int32),
        }
        if canonical is not None:
            block["canonical"] = canonical.astype(np.float16)
        self._pending.append(block)
        self._pending_bytes += sum(a.nbytes for a in block.values())
        if self._pending_bytes > self.max_pending_mb * (1 << 20):
            self._spill()
        mean = vectors.mean(axis=0)
        self._volume_vectors = np.concatenate([self._volume_vectors, (mean / max(np.linalg.norm(mean), 1e-12))[None]])
        self._faiss_index = None
        self._cells = None

    def _spill(self) -> None:
        """Write the in-memory pending blocks to a temporary folder and memory-map them."""
        if self._spill_dir is None:
            self._spill_dir = tempfile.mkdtemp(prefix="anatssl-index-pending-")
        for n, block in enumerate(self._pending):
            if all(isinstance(a, np.memmap) for a in block.values()):
                continue
            stem = os.path.join(self._spill_dir, f"{time.time_ns()}-{n}")
            for name, array in block.items():
                np.save(f"{stem}-{name}.npy", array)
                block[name] = np.load(f"{stem}-{name}.npy", mmap_mode="r")
        self._pending_bytes = 0

    def remove_volume(self, name: str) -> None:
        """Remove a volume and all its entries."""
        names = self.volume_names()
        if name not in names:
            raise InputError(f"volume {name!r} is not in the index; volumes are {names}")
        number = names.index(name)
        keep = self._volume_of != number
        for key in list(self._stored):
            if key != "volume_of":
                self._stored[key] = np.asarray(self._stored[key][keep])
        vol = self._volume_of[keep]
        self._volume_of = np.where(vol > number, vol - 1, vol).astype(np.int32)
        self._volume_vectors = np.delete(self._volume_vectors, number, axis=0)
        del self.volumes[number]
        self._faiss_index = None
        self._cells = None

    # ---- FAISS ----------------------------------------------------------------------------
    def _region_index(self):
        if self._faiss_index is None:
            faiss = _faiss()
            vectors = np.ascontiguousarray(self._vectors, dtype=np.float32)
            if self.effective_kind == "hnsw":
                index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = 80
                index.add(vectors)
            else:
                index = faiss.IndexFlatIP(self.dim)
                index.add(vectors)
            self._faiss_index = index
        if hasattr(self._faiss_index, "hnsw"):
            self._faiss_index.hnsw.efSearch = self.ef_search
        return self._faiss_index

    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw FAISS search over region entries: ``(scores, entry ids)``, each ``(Q, k)``."""
        if len(self) == 0:
            raise InputError("the index is empty: add volumes first (anatssl index add)")
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return self._region_index().search(q, int(min(k, len(self))))

    def search(
        self,
        query: np.ndarray,
        *,
        k: int = 10,
        one_per_volume: bool = False,
        exclude_volumes: Sequence[str] = (),
    ) -> list[SearchHit]:
        """Rank region entries by cosine similarity to ``query`` ``(dim,)``.

        With ``one_per_volume`` only the best entry of each volume is kept (then at most one
        hit per volume, best first). ``exclude_volumes`` drops hits in those volumes (e.g. the
        query's own volume).
        """
        excluded = {self.volume_names().index(v) for v in exclude_volumes if v in self.volume_names()}
        wanted = k
        fetch = k if not (one_per_volume or excluded) else min(len(self), max(4 * k, 64))
        while True:
            scores, ids = self.search_vectors(query, fetch)
            hits: list[SearchHit] = []
            seen: set[int] = set()
            for s, i in zip(scores[0], ids[0]):
                if i < 0:
                    continue
                vol = int(self._volume_of[i])
                if vol in excluded or (one_per_volume and vol in seen):
                    continue
                seen.add(vol)
                v = self.volumes[vol]
                hits.append(SearchHit(v.name, self._positions[i].astype(float), float(s), v.path, similarity=float(s)))
                if len(hits) == wanted:
                    return hits
            if fetch >= len(self):
                return hits
            fetch = min(len(self), fetch * 4)

    # ---- canonical (position-aware) search ----------------------------------------------------
    def _cell_table(self):
        """``(origin (3,), shape (3,), order (N,), start (n_cells + 1,), canonical in that order (N, 3))``:
        the entries sorted by the cell of their canonical position (cells of ``cell_mm``); built
        once, saved with the index."""
        if self._cells is None:
            can = self._canonical
            n = len(can)
            lo = np.full(3, np.inf)
            hi = np.full(3, -np.inf)
            chunk = 1 << 22
            for a in range(0, n, chunk):
                c = np.asarray(can[a : a + chunk], dtype=np.float32)
                lo, hi = np.minimum(lo, c.min(0)), np.maximum(hi, c.max(0))
            if n == 0:
                lo = hi = np.zeros(3)
            origin = np.floor(lo / self.cell_mm) * self.cell_mm
            shape = (np.floor((hi - origin) / self.cell_mm).astype(np.int64) + 1).clip(1)
            ids = np.empty(n, dtype=np.int64 if np.prod(shape) >= 2**31 else np.int32)
            for a in range(0, n, chunk):
                cell = ((np.asarray(can[a : a + chunk], dtype=np.float32) - origin) // self.cell_mm).astype(np.int64)
                cell = np.clip(cell, 0, shape - 1)
                ids[a : a + chunk] = np.ravel_multi_index(tuple(cell.T), tuple(shape))
            order = np.argsort(ids, kind="stable").astype(np.int32 if n < 2**31 else np.int64)
            counts = np.bincount(ids, minlength=int(np.prod(shape)))
            del ids
            start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            # the canonical positions in table order: a query's first filter reads contiguous runs
            in_order = np.empty((n, 3), dtype=np.float16)
            for a in range(0, n, chunk):
                in_order[a : a + chunk] = can[np.asarray(order[a : a + chunk])]
            self._cells = (origin.astype(np.float64), shape.astype(np.int64), order, start, in_order)
        return self._cells

    def canonical_candidates(self, canonical: np.ndarray, radius_mm: float) -> np.ndarray:
        """Ids of the entries whose canonical position lies within ``radius_mm`` of ``canonical`` (3,)."""
        origin, shape, order, start, in_order = self._cell_table()
        c = np.asarray(canonical, dtype=np.float64).reshape(3)
        reach = radius_mm + self.cell_mm * np.sqrt(3) / 2
        lo = np.clip(np.floor((c - reach - origin) / self.cell_mm).astype(np.int64), 0, shape - 1)
        hi = np.clip(np.floor((c + reach - origin) / self.cell_mm).astype(np.int64), 0, shape - 1)
        if np.any(c + reach < origin) or np.any(c - reach > origin + shape * self.cell_mm):
            return np.zeros(0, dtype=np.int64)
        grids = np.meshgrid(*[np.arange(a, b + 1) for a, b in zip(lo, hi)], indexing="ij")
        cells = np.stack([g.ravel() for g in grids], axis=1)
        centres = origin + (cells + 0.5) * self.cell_mm
        cells = cells[np.linalg.norm(centres - c, axis=1) <= reach]
        flat = np.ravel_multi_index(tuple(cells.T), tuple(shape))
        a, b = start[flat], start[flat + 1]
        nonempty = b > a
        if not nonempty.any():
            return np.zeros(0, dtype=np.int64)
        # the cells' runs of ``order``, joined: one index array over all runs
        a, b = a[nonempty], b[nonempty]
        lengths = b - a
        offsets = np.repeat(a - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        at = np.arange(lengths.sum()) + offsets  # positions in table order: contiguous runs
        d2 = ((np.asarray(in_order[at], dtype=np.float32) - c.astype(np.float32)) ** 2).sum(axis=1)
        ids = np.asarray(order[at[d2 <= radius_mm**2]], dtype=np.int64)
        ids.sort()  # reading the memory-mapped arrays in file order
        return ids

    def search_canonical(
        self,
        query: np.ndarray,
        canonical: np.ndarray,
        *,
        k: int = 10,
        one_per_volume: bool = True,
        exclude_volumes: Sequence[str] = (),
        position_sigma_mm: float = 6.0,
        radius_mm: float = 8.0,
        local_step: bool = True,
        lattice_mm: float | None = None,
    ) -> list[SearchHit]:
        """Rank the entries near a canonical position by similarity and position.

        Score of entry ``j``: ``<query, v_j> - |c_j - canonical|^2 / (2 position_sigma_mm^2)`` over
        the entries with ``|c_j - canonical| <= radius_mm`` (a volume with none there gives no
        answer: the place is outside it). With ``local_step`` each answer moves off the entry
        lattice to the peak of a quadratic fitted to the scores of its neighbours in its volume
        (those within ``lattice_mm * sqrt(3)``, ``lattice_mm`` the entry spacing, from the index
        settings' ``grid_mm`` by default): a sub-voxel position from the index alone.
        """
        if not self.has_canonical:
            raise InputError("this index holds no canonical positions; rebuild it (anatssl index build) to rank by them")
        if len(self) == 0:
            raise InputError("the index is empty: add volumes first (anatssl index add)")
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        c = np.asarray(canonical, dtype=np.float32).reshape(3)
        ids = self.canonical_candidates(c, radius_mm)
        if len(ids) == 0:
            return []
        vol = np.asarray(self._volume_of[ids])
        excluded = [self.volume_names().index(v) for v in exclude_volumes if v in self.volume_names()]
        if excluded:
            keep = ~np.isin(vol, excluded)
            ids, vol = ids[keep], vol[keep]
            if len(ids) == 0:
                return []
        can = np.asarray(self._canonical[ids], dtype=np.float32)
        # einsum, not BLAS: a threaded matrix-vector product of this size costs more in thread start-up
        # than in arithmetic (measured 15 ms against 1 on a loaded 2-core machine)
        sim = np.einsum("ij,j->i", np.asarray(self._vectors[ids], dtype=np.float32), q)
        d2 = ((can - c) ** 2).sum(axis=1)
        score = sim - d2 / (2.0 * position_sigma_mm**2)
        # group the candidates by volume: entries are stored volume after volume, so ids sorted
        # in file order are already grouped (checked; else sorted)
        if len(vol) > 1 and np.any(np.diff(vol) < 0):
            by = np.argsort(vol, kind="stable")
            ids, vol, sim, d2, score = ids[by], vol[by], sim[by], d2[by], score[by]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(vol)) + 1])
        ends = np.concatenate([starts[1:], [len(vol)]])
        if one_per_volume:
            # the best entry of each volume: its segment's maximum, the first entry reaching it
            best = np.maximum.reduceat(score, starts)
            segment = np.repeat(np.arange(len(starts)), ends - starts)
            first = np.flatnonzero(score == best[segment])
            first = first[np.concatenate([[True], segment[first][1:] != segment[first][:-1]])]
            top = np.argsort(-best, kind="stable")[:k]
            order = first[top]
        else:
            kk = min(k, len(score))
            part = np.argpartition(-score, kk - 1)[:kk]
            order = part[np.argsort(-score[part], kind="stable")]
        lattice = float(lattice_mm if lattice_mm is not None else self.settings.get("grid_mm", 4.0))
        hits = []
        for j in order:
            entry = np.asarray(self._positions[ids[j]], dtype=np.float64)
            position = entry
            if local_step:
                seg = int(np.searchsorted(starts, j, side="right") - 1)
                members = np.arange(starts[seg], ends[seg])
                pos = np.asarray(self._positions[ids[members]], dtype=np.float64)
                near = np.linalg.norm(pos - entry, axis=1) <= 1.01 * lattice * np.sqrt(3)
                position = _quadratic_peak(pos[near] - entry, score[members[near]], lattice) + entry
            v = self.volumes[int(vol[j])]
            hits.append(SearchHit(v.name, position, float(score[j]), v.path, similarity=float(sim[j]),
                                  canonical_distance_mm=float(np.sqrt(d2[j])), entry_position=entry))
        return hits

    def search_volumes(self, query: np.ndarray, *, k: int = 10, exclude_volumes: Sequence[str] = ()) -> list[SearchHit]:
        """Rank volumes by the cosine similarity of their volume-level vector to ``query``."""
        if not self.volumes:
            raise InputError("the index is empty: add volumes first (anatssl index add)")
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        q = q / max(np.linalg.norm(q), 1e-12)
        scores = self._volume_vectors @ q
        order = np.argsort(-scores)
        hits = [
            SearchHit(self.volumes[i].name, None, float(scores[i]), self.volumes[i].path, similarity=float(scores[i]))
            for i in order
            if self.volumes[i].name not in set(exclude_volumes)
        ]
        return hits[:k]

    # ---- persistence ------------------------------------------------------------------------
    def _blocks(self, name: str):
        """The pieces of per-entry array ``name`` in entry order (stored, then pending), unjoined."""
        yield self._stored[name]
        for block in self._pending:
            yield block[name]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write a new generation under ``directory`` and make it current atomically.

        Arrays are written piece by piece (memory stays that of the largest piece); afterwards the
        index reads the saved, memory-mapped arrays.
        """
        faiss = _faiss()
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        if (root / "CURRENT").exists():
            other = _read_header(root)
            if other["encoder_id"] != self.encoder_id:
                raise InputError(
                    f"{root} holds an index of encoder {other['encoder_id']}; refusing to mix in embeddings of {self.encoder_id}"
                )
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=root))
        n = len(self)
        try:
            header = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "encoder_id": self.encoder_id,
                "dim": self.dim,
                "kind": self.kind,
                "effective_kind": self.effective_kind,
                "approximate_threshold": self.approximate_threshold,
                "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search,
                "settings": self.settings,
                "entries": n,
                "cell_mm": self.cell_mm,
                "canonical": self.has_canonical,
                "reference_name": self.reference_name,
                "volumes": [dataclasses.asdict(v) for v in self.volumes],
                "library_version": __version__,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            for name, dtype in _ARRAYS.items():
                if name not in self._stored:
                    continue
                width = self.dim if name == "vectors" else (3 if name in ("positions", "canonical") else None)
                out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype,
                                                shape=(n,) if width is None else (n, width))
                at = 0
                for piece in self._blocks(name):
                    for a in range(0, len(piece), 1 << 21):
                        part = piece[a : a + (1 << 21)]
                        out[at : at + len(part)] = part
                        at += len(part)
                out.flush()
                del out
            np.save(tmp / "volume_vectors.npy", self._volume_vectors.astype(np.float32))
            if self.has_canonical:
                self._reload(tmp)  # the table is computed on the memory-mapped arrays just written
                origin, shape, order, start, in_order = self._cell_table()
                np.save(tmp / "cell_order.npy", order)
                np.save(tmp / "cell_start.npy", start)
                np.save(tmp / "cell_canonical.npy", in_order)
                header["cell_origin"] = origin.tolist()
                header["cell_shape"] = shape.tolist()
            if self.reference is not None:
                ref = self.reference
                with open(tmp / "reference.npz", "wb") as fh:
                    np.savez_compressed(fh, array=np.asarray(ref.array), spacing=np.asarray(ref.spacing, float),
                                        origin=np.asarray(ref.origin, float), direction=np.asarray(ref.direction, float))
            if n and self._faiss_index is not None and hasattr(self._faiss_index, "hnsw"):
                faiss.write_index(self._faiss_index, str(tmp / "regions.faiss"))  # costly to rebuild: kept
            elif n and self.effective_kind == "hnsw" and not self.has_canonical:
                faiss.write_index(self._region_index(), str(tmp / "regions.faiss"))
            header["sha256"] = {f.name: _digest(f) for f in sorted(tmp.iterdir())}
            (tmp / "index.json").write_text(json.dumps(header, indent=1))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            gen = root / f"gen-{time.time_ns()}"
            os.rename(tmp, gen)
            pointer = root / f".CURRENT.{os.getpid()}"
            pointer.write_text(gen.name)
            os.replace(pointer, root / "CURRENT")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._reload(gen)
        for old in root.glob("gen-*"):
            if old.name != gen.name:
                shutil.rmtree(old, ignore_errors=True)
        return gen

    def _reload(self, gen: Path) -> None:
        """Read the per-entry arrays from the memory-mapped files of generation ``gen`` (pending cleared)."""
        cells = self._cells
        stored = {}
        for name in _ARRAYS:
            if (gen / f"{name}.npy").exists():
                stored[name] = np.load(gen / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        self._stored = stored
        self._pending = []
        self._pending_bytes = 0
        if self._spill_dir:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
        self._cells = cells

    @classmethod
    def create(cls, directory: str | os.PathLike, encoder_id: str, dim: int, **kwargs) -> "EmbeddingIndex":
        """A new, empty index for ``encoder_id`` (refuses a folder holding another encoder's index)."""
        root = Path(directory)
        if (root / "CURRENT").exists():
            other = _read_header(root)
            if other["encoder_id"] != encoder_id:
                raise InputError(f"{root} already holds an index of encoder {other['encoder_id']}, not {encoder_id}")
            raise InputError(f"{root} already holds an index; use `anatssl index add` or remove the folder")
        return cls(encoder_id, dim, **kwargs)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "EmbeddingIndex":
        """Load the current generation of the index in ``directory`` (arrays memory-mapped)."""
        faiss = _faiss()
        root = Path(directory)
        header = _read_header(root)
        gen = root / (root / "CURRENT").read_text().strip()
        for name, digest in header.get("sha256", {}).items():
            if not (gen / name).exists() or _digest(gen / name) != digest:
                raise InputError(
                    f"{root}: {name} is missing or altered (sha256 mismatch); rebuild the index with `anatssl index build`"
                )
        index = cls(
            header["encoder_id"], header["dim"], kind=header["kind"],
            approximate_threshold=header["approximate_threshold"], hnsw_m=header["hnsw_m"],
            ef_search=header["ef_search"], settings=header.get("settings"), cell_mm=header.get("cell_mm", 8.0),
        )
        try:
            if header["format_version"] == 1:
                with np.load(gen / "regions.npz", allow_pickle=False) as data:
                    index._stored = {
                        "vectors": data["vectors"].astype(np.float16),
                        "positions": data["positions"].astype(np.float32),
                        "volume_of": data["volume_of"].astype(np.int32),
                    }
                    index._volume_vectors = data["volume_vectors"].astype(np.float32)
            else:
                index._reload(gen)
                index._volume_vectors = np.load(gen / "volume_vectors.npy", allow_pickle=False).astype(np.float32)
                if header.get("canonical"):
                    if "canonical" not in index._stored:
                        raise ValueError("canonical positions are missing")
                    index._cells = (np.asarray(header["cell_origin"], float), np.asarray(header["cell_shape"], np.int64),
                                    np.load(gen / "cell_order.npy", mmap_mode="r", allow_pickle=False),
                                    np.load(gen / "cell_start.npy", allow_pickle=False),
                                    np.load(gen / "cell_canonical.npy", mmap_mode="r", allow_pickle=False))
                if (gen / "reference.npz").exists():
                    from .image import Image

                    with np.load(gen / "reference.npz", allow_pickle=False) as ref:
                        index.reference = Image(ref["array"], tuple(ref["spacing"].tolist()), tuple(ref["origin"].tolist()),
                                                ref["direction"], header.get("reference_name") or "reference")
                    index.reference_name = header.get("reference_name", "")
            index.volumes = [IndexedVolume(**v) for v in header["volumes"]]
            n = header["entries"]
            if index._stored["vectors"].shape != (n, header["dim"]) or len(index._stored["volume_of"]) != n:
                raise ValueError("entry count does not match the header")
            if (gen / "regions.faiss").exists():
                fi = faiss.read_index(str(gen / "regions.faiss"))
                if fi.ntotal != n or fi.d != header["dim"]:
                    raise ValueError("FAISS file does not match the header")
                index._faiss_index = fi
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{root}: the index files are damaged or incomplete ({exc}); rebuild it with `anatssl index build`") from exc
        return index


def _quadratic_peak(offsets: np.ndarray, scores: np.ndarray, lattice_mm: float) -> np.ndarray:
    """Peak of the quadratic least-squares fit of ``scores`` at ``offsets`` ``(n, 3)`` (mm from the
    best entry, which is at 0); ``0`` when the fit has no maximum within one lattice step per axis
    (too few neighbours, or not concave there)."""
    if len(offsets) < 10:
        return np.zeros(3)
    x = offsets / lattice_mm  # well conditioned
    a = np.column_stack([np.ones(len(x)), x, x**2, x[:, 0] * x[:, 1], x[:, 0] * x[:, 2], x[:, 1] * x[:, 2]])
    coef, *_ = np.linalg.lstsq(a, scores, rcond=None)
    g = coef[1:4]
    h = np.array([[2 * coef[4], coef[7], coef[8]], [coef[7], 2 * coef[5], coef[9]], [coef[8], coef[9], 2 * coef[6]]])
    try:
        if np.all(np.linalg.eigvalsh(h) < 0):
            peak = -np.linalg.solve(h, g)
            if np.all(np.abs(peak) <= 1.0):
                return peak * lattice_mm
    except np.linalg.LinAlgError:
        pass
    return np.zeros(3)


def _digest(path: Path) -> str:
    """sha256 of the file; above ``_FULL_DIGEST_BYTES`` a sampled one (size, 64 spread 1 MiB blocks,
    the last block), prefixed ``sampled:``."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _FULL_DIGEST_BYTES:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(str(size).encode())
        for at in list(np.linspace(0, size - (1 << 20), 64).astype(np.int64)) + [size - (1 << 20)]:
            fh.seek(int(at))
            h.update(fh.read(1 << 20))
    return "sampled:" + h.hexdigest()


def _read_header(root: Path) -> dict:
    current = root / "CURRENT"
    if not current.exists():
        raise InputError(f"{root}: not an AnatSSL index (no CURRENT file); build one with `anatssl index build`")
    try:
        gen = root / current.read_text().strip()
        header = json.loads((gen / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{root}: the index header is unreadable ({exc}); rebuild it with `anatssl index build`") from exc
    if header.get("format") != FORMAT:
        raise InputError(f"{root}: not an AnatSSL embedding index (format {header.get('format')!r})")
    if header.get("format_version") not in _READABLE_VERSIONS:
        raise InputError(f"{root}: index format version {header.get('format_version')} is not supported "
                         f"(expected one of {_READABLE_VERSIONS})")
    return header
