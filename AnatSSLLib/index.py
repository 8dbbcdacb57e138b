"""An on-disk index of embedding vectors with their volume and physical position.

:class:`EmbeddingIndex` stores, for one encoder, two kinds of entries:

- *region* entries: one unit vector per sampled place of a volume, with its LPS position (mm);
- *volume* entries: one unit vector per volume (the normalised mean of its region vectors).

FAISS does the nearest-neighbour work on inner products (cosine similarity, the vectors being
unit norm): an exact ``IndexFlatIP`` while the index is small, an ``IndexHNSWFlat`` past
``approximate_threshold`` entries (overridable with ``kind``).

On disk a folder holds ``CURRENT`` (the name of the live generation) and one folder per
generation with ``index.json`` (encoder id, dimension, volumes, sha256 of every file), ``regions.npz`` (float16
vectors, positions, volume numbers) and the FAISS files. A build, add or remove writes a new
generation and then replaces ``CURRENT`` atomically, so an interrupted write leaves the previous
index intact. Nothing is unpickled: ``.npz`` files are read with ``allow_pickle=False``.
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
FORMAT_VERSION = 1


@dataclasses.dataclass
class IndexedVolume:
    """A volume in the index: a stable name, where it was read from, and its content key."""

    name: str
    path: str
    key: str
    n_regions: int


@dataclasses.dataclass
class SearchHit:
    """One answer: a volume, a position in it (LPS mm; ``None`` for a volume-level hit) and a score."""

    volume: str
    position: np.ndarray | None
    score: float
    path: str = ""


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
        self.volumes: list[IndexedVolume] = []
        self._stored = {
            "vectors": np.zeros((0, self.dim), dtype=np.float16),
            "positions": np.zeros((0, 3), dtype=np.float32),
            "volume_of": np.zeros((0,), dtype=np.int32),
        }
        # Volumes added since the arrays were last joined: joining once per read instead of once
        # per add keeps building an index of thousands of volumes linear in its size.
        self._pending: list[dict[str, np.ndarray]] = []
        self._volume_vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._faiss_index = None

    def _joined(self, key: str) -> np.ndarray:
        if self._pending:
            for name in self._stored:
                self._stored[name] = np.concatenate([self._stored[name]] + [block[name] for block in self._pending])
            self._pending = []
        return self._stored[key]

    _vectors = property(lambda self: self._joined("vectors"), lambda self, v: self._stored.__setitem__("vectors", v))
    _positions = property(lambda self: self._joined("positions"), lambda self, v: self._stored.__setitem__("positions", v))
    _volume_of = property(lambda self: self._joined("volume_of"), lambda self, v: self._stored.__setitem__("volume_of", v))

    # ---- contents ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._stored["vectors"].shape[0]) + sum(len(block["vectors"]) for block in self._pending)

    @property
    def effective_kind(self) -> str:
        if self.kind != "auto":
            return self.kind
        return "hnsw" if len(self) > self.approximate_threshold else "exact"

    def volume_names(self) -> list[str]:
        return [v.name for v in self.volumes]

    def add_volume(self, volume: IndexedVolume, vectors: np.ndarray, positions: np.ndarray) -> None:
        """Add one volume's region vectors ``(N, dim)`` at LPS ``positions`` ``(N, 3)``."""
        vectors = np.asarray(vectors, dtype=np.float32)
        positions = np.asarray(positions, dtype=np.float32).reshape(-1, 3)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InputError(f"{volume.name}: expected vectors of dimension {self.dim}, got shape {vectors.shape}")
        if vectors.shape[0] != positions.shape[0] or vectors.shape[0] == 0:
            raise InputError(f"{volume.name}: {vectors.shape[0]} vectors for {positions.shape[0]} positions (need >= 1)")
        if volume.name in self.volume_names():
            raise InputError(f"volume {volume.name!r} is already in the index; remove it first or give another name")
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        number = len(self.volumes)
        self.volumes.append(dataclasses.replace(volume, n_regions=int(vectors.shape[0])))
        self._pending.append({
            "vectors": vectors.astype(np.float16),
            "positions": positions,
            "volume_of": np.full(len(vectors), number, np.int32),
        })
        mean = vectors.mean(axis=0)
        self._volume_vectors = np.concatenate([self._volume_vectors, (mean / max(np.linalg.norm(mean), 1e-12))[None]])
        self._faiss_index = None

    def remove_volume(self, name: str) -> None:
        """Remove a volume and all its entries."""
        names = self.volume_names()
        if name not in names:
            raise InputError(f"volume {name!r} is not in the index; volumes are {names}")
        number = names.index(name)
        keep = self._volume_of != number
        self._vectors, self._positions = self._vectors[keep], self._positions[keep]
        vol = self._volume_of[keep]
        self._volume_of = np.where(vol > number, vol - 1, vol).astype(np.int32)
        self._volume_vectors = np.delete(self._volume_vectors, number, axis=0)
        del self.volumes[number]
        self._faiss_index = None

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
                hits.append(SearchHit(v.name, self._positions[i].astype(float), float(s), v.path))
                if len(hits) == wanted:
                    return hits
            if fetch >= len(self):
                return hits
            fetch = min(len(self), fetch * 4)

    def search_volumes(self, query: np.ndarray, *, k: int = 10, exclude_volumes: Sequence[str] = ()) -> list[SearchHit]:
        """Rank volumes by the cosine similarity of their volume-level vector to ``query``."""
        if not self.volumes:
            raise InputError("the index is empty: add volumes first (anatssl index add)")
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        q = q / max(np.linalg.norm(q), 1e-12)
        scores = self._volume_vectors @ q
        order = np.argsort(-scores)
        hits = [
            SearchHit(self.volumes[i].name, None, float(scores[i]), self.volumes[i].path)
            for i in order
            if self.volumes[i].name not in set(exclude_volumes)
        ]
        return hits[:k]

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write a new generation under ``directory`` and make it current atomically."""
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
                "entries": len(self),
                "volumes": [dataclasses.asdict(v) for v in self.volumes],
                "library_version": __version__,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            with open(tmp / "regions.npz", "wb") as fh:
                np.savez(fh, vectors=self._vectors, positions=self._positions, volume_of=self._volume_of,
                         volume_vectors=self._volume_vectors)
            if len(self):
                faiss.write_index(self._region_index(), str(tmp / "regions.faiss"))
            header["sha256"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
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
        for old in root.glob("gen-*"):
            if old.name != gen.name:
                shutil.rmtree(old, ignore_errors=True)
        return gen

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
        """Load the current generation of the index in ``directory``."""
        faiss = _faiss()
        root = Path(directory)
        header = _read_header(root)
        gen = root / (root / "CURRENT").read_text().strip()
        for name, digest in header.get("sha256", {}).items():
            if not (gen / name).exists() or _sha256(gen / name) != digest:
                raise InputError(
                    f"{root}: {name} is missing or altered (sha256 mismatch); rebuild the index with `anatssl index build`"
                )
        index = cls(
            header["encoder_id"], header["dim"], kind=header["kind"],
            approximate_threshold=header["approximate_threshold"], hnsw_m=header["hnsw_m"],
            ef_search=header["ef_search"], settings=header.get("settings"),
        )
        try:
            with np.load(gen / "regions.npz", allow_pickle=False) as data:
                index._vectors = data["vectors"].astype(np.float16)
                index._positions = data["positions"].astype(np.float32)
                index._volume_of = data["volume_of"].astype(np.int32)
                index._volume_vectors = data["volume_vectors"].astype(np.float32)
            index.volumes = [IndexedVolume(**v) for v in header["volumes"]]
            if index._vectors.shape != (header["entries"], header["dim"]) or len(index._volume_of) != header["entries"]:
                raise ValueError("entry count does not match the header")
            if (gen / "regions.faiss").exists():
                fi = faiss.read_index(str(gen / "regions.faiss"))
                if fi.ntotal != header["entries"] or fi.d != header["dim"]:
                    raise ValueError("FAISS file does not match the header")
                index._faiss_index = fi
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{root}: the index files are damaged or incomplete ({exc}); rebuild it with `anatssl index build`") from exc
        return index


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    if header.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{root}: index format version {header.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return header
