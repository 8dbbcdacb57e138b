"""Scale benchmark of the embedding index: build time, query latency, recall@10, memory, disk.

Synthetic unit vectors of the encoder's dimension stand in for region embeddings: a mixture of
``clusters`` Gaussian blobs on the sphere (embeddings of anatomy are clustered: many places look
alike) plus, as the worst case, uniformly random directions. Recall@10 is measured against exact
search (FAISS ``IndexFlatIP``) on the same vectors.

    python benchmarks/bench_index_scale.py --n 1000000 --dim 32 --out benchmarks/results/index_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AnatSSLLib.index import EmbeddingIndex, IndexedVolume  # noqa: E402


def synthetic_vectors(n: int, dim: int, rng: np.random.Generator, clusters: int) -> np.ndarray:
    if clusters <= 0:
        v = rng.standard_normal((n, dim), dtype=np.float32)
    else:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        v = centres[rng.integers(clusters, size=n)] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(n: int, dim: int, queries: int, clusters: int, seed: int, ef_search: int) -> dict:
    import faiss

    rng = np.random.default_rng(seed)
    vectors = synthetic_vectors(n, dim, rng, clusters)
    q = vectors[rng.integers(n, size=queries)] + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32) / np.sqrt(dim)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    positions = np.zeros((n, 3), dtype=np.float32)

    index = EmbeddingIndex("bench", dim, kind="hnsw", ef_search=ef_search)
    chunk = 100_000
    for start in range(0, n, chunk):
        index.add_volume(IndexedVolume(f"v{start // chunk}", "", "", 0), vectors[start : start + chunk], positions[start : start + chunk])
    rss_before = rss_mb()
    t0 = time.perf_counter()
    index._region_index()
    build_s = time.perf_counter() - t0

    exact = faiss.IndexFlatIP(dim)
    exact.add(index._vectors.astype(np.float32))
    _, truth = exact.search(q, 10)

    latencies = []
    found = np.zeros((queries, 10), dtype=np.int64)
    faiss.omp_set_num_threads(1)  # single-query latency, as one click would see it
    for i in range(queries):
        t = time.perf_counter()
        _, ids = index.search_vectors(q[i], 10)
        latencies.append(time.perf_counter() - t)
        found[i] = ids[0]
    recall = float(np.mean([len(set(found[i]) & set(truth[i])) / 10.0 for i in range(queries)]))

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        gen = index.save(tmp)
        save_s = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in Path(gen).iterdir())
        t = time.perf_counter()
        EmbeddingIndex.open(tmp)
        open_s = time.perf_counter() - t
    lat = np.asarray(latencies) * 1e3
    return {
        "n": n, "dim": dim, "queries": queries, "clusters": clusters, "kind": "hnsw", "hnsw_m": index.hnsw_m,
        "ef_search": ef_search, "build_s": round(build_s, 2), "save_s": round(save_s, 2), "open_s": round(open_s, 2),
        "latency_ms": {"median": round(float(np.median(lat)), 3), "p90": round(float(np.percentile(lat, 90)), 3),
                       "max": round(float(lat.max()), 3)},
        "recall_at_10": round(recall, 4),
        "peak_rss_mb": round(rss_mb(), 1), "rss_before_build_mb": round(rss_before, 1),
        "disk_mb": round(disk / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--clusters", type=int, default=2000, help="0: uniformly random directions (worst case)")
    ap.add_argument("--ef-search", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = run(args.n, args.dim, args.queries, args.clusters, args.seed, args.ef_search)
    result.update(command=" ".join(["python"] + sys.argv), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  date=time.strftime("%Y-%m-%d"))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
