"""Search benchmark (issue 32): what the index alone finds, what each part of the descriptor adds, and scale.

Two parts, each writing its own JSON (git commit, date, machine, threads, command):

1. ``accuracy`` -> ``search_accuracy.json``: a simulated population with real anatomy (``anatssl data
   synth``: the MNI152 2009c T1w under random affine + diffeomorphic warps; a seed the default
   encoder was not trained on), every subject indexed, the 32 AFIDs of the template T1 queried
   through the project's own path (:meth:`EmbeddingSearch.search_points`); the answer in each
   subject is scored against that subject's own landmark. Ablation of the descriptor, each with the
   index-only answer (the best entry) and after the local step:

   - ``vector``: the 4 mm-smoothed local vector alone (the index of before);
   - ``multiscale``: the vector averaged at 4, 8, 16 and 32 mm, concatenated (benchmark only);
   - ``affine``: the vector + canonical position through the correspondence's affine part;
   - ``position``: the canonical position (dense correspondence) alone, no vector;
   - ``dense`` (**the default**): the vector + canonical position (dense correspondence);
   - ``dense+multiscale``.

   Optionally (``--refine``) the landmark tool's refined answers (seconds per volume pair).
2. ``scale`` -> ``search_scale.json``: ``--scale-volumes`` volumes (default 1000) on disk. **Their
   entries are the real subjects' entries reused with small perturbations** (each copy: its
   vectors plus a small random direction, renormalised; its positions and canonical positions
   shifted by a random offset of a few mm): fit for latency, memory and disk, never for accuracy.
   Query latency (first and warm) through the project's path in a fresh process, and through the
   CLI (one ``--point``, and ``--points`` with all 32 AFIDs), peak memory of those processes and
   the index's size on disk.

    python benchmarks/bench_search.py --work /tmp/bench32 --n 10 --seed 7 --res 2 --threads 1 \\
        --refine --scale-volumes 1000 --out-dir benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _header(args, part: str) -> dict:
    import torch

    from AnatSSLLib.bench import machine_info

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    return {"task": f"search_{part}", "git_commit": commit, "git_dirty": dirty,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "machine": machine_info(), "torch_threads": torch.get_num_threads()}


def _write(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path}", flush=True)


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's memory from /proc (MiB): VmRSS (resident, file pages of the memory-mapped index
    included), RssAnon (its own memory), RssFile (mapped file pages: shared page cache), VmHWM (peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _summary(errors: np.ndarray, radius: float = 4.0) -> dict:
    finite = errors[np.isfinite(errors)]
    return {"within_4mm": float(np.mean(errors <= radius)), "median_mm": float(np.median(errors)),
            "mean_mm": float(finite.mean()) if len(finite) else None, "p90_mm": float(np.percentile(errors, 90)),
            "no_answer": int(np.sum(~np.isfinite(errors))), "n": int(len(errors))}


# ---- part 1 ------------------------------------------------------------------------------------
def population(args):
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.data.synth import synthesize_population

    folder = Path(args.work) / f"pop-n{args.n}-s{args.seed}-r{args.res:g}"
    if not (folder / "population.json").exists():
        synthesize_population(folder, n=args.n, contrasts=("t1",), seed=args.seed, res_mm=args.res)
    return load_population(folder)


def accuracy(args) -> dict:
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import load_encoder
    from AnatSSLLib.index import EmbeddingIndex, IndexedVolume
    from AnatSSLLib.tools.landmarks import LandmarkLocator, _sample_trilinear
    from AnatSSLLib.tools.search import EmbeddingSearch, region_entries

    pop = population(args)
    encoder = load_encoder(args.encoder, device="cpu")
    store = EmbeddingStore(encoder, max_volumes=args.n + 4)
    subjects = pop.subjects
    names = [s.name for s in subjects]
    images = {s.name: s.image("t1") for s in subjects}
    truths = {s.name: s.landmarks() for s in subjects}
    query_image, query_points = pop.template.image("t1"), pop.template.landmarks()
    labels = list(query_points.labels)

    # the project's own path, default settings: index every subject, then all 32 AFIDs in one batch
    search = EmbeddingSearch(store)
    index = search.new_index()
    began = time.perf_counter()
    embed_s, match_s = [], []
    for name in names:
        t = time.perf_counter()
        store.get(images[name])
        embed_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        search.add(index, [images[name]], names=[name])
        match_s.append(time.perf_counter() - t)
    index_s = time.perf_counter() - began
    index._cell_table()
    t = time.perf_counter()
    first = search.search_points(index, query_image, query_points.positions[:1], k=len(names))
    first_s = time.perf_counter() - t
    warm = []
    results = {True: [], False: []}
    for step in (False, True):
        for p in query_points.positions:
            t = time.perf_counter()
            results[step].append(search.search_point(index, query_image, p, k=len(names), local_step=step))
            warm.append(time.perf_counter() - t)

    def errors_of(hit_lists):
        out = np.full((len(labels), len(names)), np.inf)
        for li, hits in enumerate(hit_lists):
            got = {h.volume: h.position for h in hits}
            for vi, name in enumerate(names):
                if name in got:
                    out[li, vi] = float(np.linalg.norm(np.asarray(got[name]) - truths[name].position(labels[li])))
        return out

    project = {"index_only": _summary(errors_of(results[False]).ravel()),
               "local_step": _summary(errors_of(results[True]).ravel())}
    per_landmark = {lab: {"index_only": float(np.mean(a <= 4)), "local_step": float(np.mean(b <= 4))}
                    for lab, a, b in zip(labels, errors_of(results[False]), errors_of(results[True]))}

    # the ablation: the same entries and correspondences, other descriptors (no re-embedding, no re-matching:
    # the correspondences are the ones the search kept, ``_maps`` holding their bound transform methods)
    from AnatSSLLib.embedding import volume_key

    ref_image = index.reference
    ref_key = search._reference_keys[id(ref_image)]
    full = {name: (search._maps[(v.key, ref_key, "dense")].__self__ if v.key != ref_key else None)
            for name, v in zip(names, index.volumes)}
    qcorr = search._maps[(volume_key(query_image), ref_key, "dense")].__self__
    scales = (4.0, 8.0, 16.0, 32.0)
    qe = store.get(query_image)
    qkji = qe.grid.physical_to_index(query_points.positions)[:, ::-1]
    qvec = {s: _sample_trilinear(qe.smoothed_features(s), qkji).numpy() for s in scales}
    entries = {}
    for name in names:
        e = store.get(images[name])
        vecs = {}
        for s in scales:
            v, pos = region_entries(e, grid_mm=4.0, sigma_mm=s)
            vecs[s] = v
        entries[name] = (vecs, pos)

    def canon(name, pos, mode):
        if full[name] is None:
            return pos
        return full[name].transform_points(pos) if mode == "dense" else full[name].affine_points(pos)

    qcan = {"dense": qcorr.transform_points(query_points.positions), "affine": qcorr.affine_points(query_points.positions)}

    def variant(use_scales, mode, vector=True):
        dim = encoder.manifest.embedding_dim * len(use_scales)
        idx = EmbeddingIndex("bench", dim, settings={"grid_mm": 4.0})
        if mode != "none":
            idx.set_reference(ref_image, names[0])
        for name in names:
            vecs, pos = entries[name]
            v = np.concatenate([vecs[s] for s in use_scales], axis=1)
            idx.add_volume(IndexedVolume(name, "", name, 0), v, pos, None if mode == "none" else canon(name, pos, mode))
        q = np.concatenate([qvec[s] for s in use_scales], axis=1)
        if not vector:
            q = np.zeros_like(q)
        out = {}
        for step in (False, True):
            hit_lists = []
            for li in range(len(labels)):
                if mode == "none":
                    hit_lists.append(idx.search(q[li], k=len(names), one_per_volume=True))
                else:
                    hit_lists.append(idx.search_canonical(q[li], qcan[mode][li], k=len(names), local_step=step))
            out["local_step" if step else "index_only"] = _summary(errors_of(hit_lists).ravel())
            if mode == "none":
                out["local_step"] = None  # no local step without the position term (the fit needs a peak)
                break
        return out

    ablation = {
        "vector": variant((4.0,), "none"),
        "multiscale": variant(scales, "none"),
        "affine": variant((4.0,), "affine"),
        "position": variant((4.0,), "dense", vector=False),
        "dense": variant((4.0,), "dense"),
        "dense+multiscale": variant(scales, "dense"),
    }
    report = _header(args, "accuracy")
    report.update(
        population={"folder": str(pop.path), "n": args.n, "seed": args.seed, "res_mm": args.res, "contrast": "t1",
                    "simulated": True, "query": "template T1, 32 AFIDs"},
        encoder=encoder.encoder_id,
        settings=search.settings,
        entries=len(index),
        entries_per_volume=float(len(index) / len(names)),
        reference=names[0],
        project_path=project,
        per_landmark=per_landmark,
        ablation=ablation,
        seconds={"embed_per_volume": float(np.mean(embed_s)), "index_add_per_volume_after_embedding": float(np.mean(match_s)),
                 "index_total": index_s, "first_query_batch_of_1": first_s,
                 "warm_query_median": float(np.median(warm)), "warm_query_p90": float(np.percentile(warm, 90))},
    )
    if args.refine:
        locator = LandmarkLocator(store)
        t = time.perf_counter()
        refined = []
        for li, p in enumerate(query_points.positions):
            hits = [type(h)(h.volume, locator.carry(query_image, p, images[h.volume])[0], h.score) for h in results[False][li]]
            refined.append(hits)
        report["refined"] = _summary(errors_of(refined).ravel())
        report["seconds"]["refined_all_queries"] = time.perf_counter() - t
    index.save(Path(args.work) / "accuracy-index")
    return report


# ---- part 2 ------------------------------------------------------------------------------------
def build_scale_index(args, folder: Path) -> dict:
    from AnatSSLLib.index import EmbeddingIndex, IndexedVolume

    acc = EmbeddingIndex.open(Path(args.work) / "accuracy-index")
    vol = np.asarray(acc._volume_of)
    base = [(np.asarray(acc._vectors[vol == i], np.float32), np.asarray(acc._positions[vol == i]),
             np.asarray(acc._canonical[vol == i], np.float32)) for i in range(len(acc.volumes))]
    rng = np.random.default_rng(0)
    index = EmbeddingIndex(acc.encoder_id, acc.dim, settings=acc.settings)
    index.set_reference(acc.reference, acc.reference_name)
    noise = rng.standard_normal((max(len(b[0]) for b in base) + 4096, acc.dim)).astype(np.float32) * (0.05 / np.sqrt(acc.dim))
    t = time.perf_counter()
    for i in range(args.scale_volumes):
        v, p, c = base[i % len(base)]
        shift = rng.uniform(-3, 3, 3).astype(np.float32)
        start = int(rng.integers(0, 4096))
        vec = v + noise[start : start + len(v)] + rng.standard_normal(acc.dim).astype(np.float32) * (0.05 / np.sqrt(acc.dim))
        index.add_volume(IndexedVolume(f"copy-{i:05d}-of-{acc.volumes[i % len(base)].name}", "", f"copy{i}", 0),
                         vec, p + shift, c + shift)
    add_s = time.perf_counter() - t
    t = time.perf_counter()
    index.save(folder)
    save_s = time.perf_counter() - t
    return {"add_seconds": add_s, "save_seconds": save_s, "entries": len(index)}


def _latency_child(args) -> None:
    """In a fresh process: open the scale index and query through EmbeddingSearch; print JSON."""
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import load_encoder
    from AnatSSLLib.index import EmbeddingIndex
    from AnatSSLLib.tools.search import EmbeddingSearch

    pop = population(args)
    query_image, points = pop.template.image("t1"), pop.template.landmarks()
    rss0 = _rss_mb()
    t = time.perf_counter()
    index = EmbeddingIndex.open(args.latency_child)
    open_s = time.perf_counter() - t
    rss_open = _rss_mb()
    search = EmbeddingSearch(EmbeddingStore(load_encoder(args.encoder, device="cpu")), **index.settings)
    t = time.perf_counter()
    search.search_point(index, query_image, points.positions[0])
    first_s = time.perf_counter() - t  # embeds the query and the reference, matches them
    lat, lat_all, lat_idx = [], [], []
    for rep in range(3):
        for p in points.positions:
            t = time.perf_counter()
            search.search_point(index, query_image, p, k=10)
            lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            search.search_point(index, query_image, p, k=10, local_step=False)
            lat_idx.append(time.perf_counter() - t)
    for p in points.positions[:8]:
        t = time.perf_counter()
        hits = search.search_point(index, query_image, p, k=len(index.volumes))
        lat_all.append(time.perf_counter() - t)
    out = {"open_seconds": open_s, "first_query_seconds": first_s,
           "warm_query_k10_ms": {"median": 1e3 * float(np.median(lat)), "p90": 1e3 * float(np.percentile(lat, 90)),
                                 "max": 1e3 * float(np.max(lat)), "n": len(lat)},
           "warm_query_k10_index_only_ms": {"median": 1e3 * float(np.median(lat_idx)), "p90": 1e3 * float(np.percentile(lat_idx, 90))},
           "warm_query_best_in_every_volume_ms": {"median": 1e3 * float(np.median(lat_all)), "answers": len(hits)},
           "rss_mb": {"before_open": rss0, "after_open": rss_open, "after_queries": _rss_mb(),
                      "after_queries_anonymous": _rss_mb("RssAnon"), "after_queries_file_pages": _rss_mb("RssFile"),
                      "peak_VmHWM": _rss_mb("VmHWM")}}
    print("LATENCY " + json.dumps(out), flush=True)


def scale(args) -> dict:
    folder = Path(args.work) / f"scale-index-{args.scale_volumes}"
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    rss_before = _rss_mb()
    built = build_scale_index(args, folder)
    built["builder_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    built["builder_rss_before_mb"] = rss_before
    disk = {f.name: f.stat().st_size for f in next(folder.glob("gen-*")).iterdir()}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, str(Path(__file__).resolve()), "--work", args.work, "--n", str(args.n), "--seed", str(args.seed),
            "--res", str(args.res), "--threads", str(args.threads)] + (["--encoder", args.encoder] if args.encoder else [])
    proc = subprocess.run(base + ["--latency-child", str(folder)], capture_output=True, text=True, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LATENCY ")]
    if not line:
        raise SystemExit(f"latency child failed:\n{proc.stdout}\n{proc.stderr}")
    project = json.loads(line[0][len("LATENCY "):])
    # the CLI, cold processes
    pop = population(args)
    qimg = Path(pop.template.folder) / "t1.nii.gz"
    afids = Path(pop.template.folder) / "landmarks.mrk.json"
    from AnatSSLLib.points import read_points

    first = read_points(afids).positions[0]
    cli = [sys.executable, "-m", "AnatSSLLib.cli", "search", "--index", str(folder), "--image", str(qimg), "--json"]
    cli += ["--encoder", args.encoder] if args.encoder else []
    timings = {}
    for what, extra in (("one_point", ["--point", ",".join(f"{v:.3f}" for v in first)]), ("32_points", ["--points", str(afids)])):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        proc = subprocess.run(cli + extra, capture_output=True, text=True, env=env)
        took = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"CLI failed: {proc.stderr}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        # (ru_maxrss of children is not reset by exec on Linux: it may report the builder's own peak)
        timings[what] = {"seconds": took, "answers": len(json.loads(proc.stdout)), "peak_rss_mb_children_so_far": max(before, peak) / 1024.0}
    timings["per_point_seconds_in_batch"] = (timings["32_points"]["seconds"] - timings["one_point"]["seconds"]) / 31.0
    report = _header(args, "scale")
    report.update(
        note=("latency/memory/disk only: the volumes are the accuracy run's real subjects' entries reused with small "
              "perturbations (vectors + a random direction of norm ~0.05, renormalised; positions and canonical positions "
              "shifted by up to 3 mm); no accuracy is read from this index"),
        volumes=args.scale_volumes,
        build=built,
        disk_bytes=disk,
        disk_total_gb=sum(disk.values()) / 1e9,
        project_path=project,
        cli=timings,
    )
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/bench_search", help="folder for the population and the indexes")
    ap.add_argument("--n", type=int, default=10, help="simulated subjects (default 10)")
    ap.add_argument("--seed", type=int, default=7, help="population seed (default 7; the default encoder was trained on 100)")
    ap.add_argument("--res", type=float, default=2.0, help="voxel size in mm (default 2)")
    ap.add_argument("--encoder", default=None, help="cached encoder (default: the bundled default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--refine", action="store_true", help="also the landmark tool's refined answers (seconds per volume pair)")
    ap.add_argument("--scale-volumes", type=int, default=1000, help="volumes of the scale part (0: skip it)")
    ap.add_argument("--skip-accuracy", action="store_true", help="reuse the accuracy part's index in --work")
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--latency-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.latency_child:
        _latency_child(args)
        return
    out = Path(args.out_dir)
    if not args.skip_accuracy:
        _write(accuracy(args), out / "search_accuracy.json")
    if args.scale_volumes > 0:
        _write(scale(args), out / f"search_scale_{args.scale_volumes}.json")


if __name__ == "__main__":
    main()
