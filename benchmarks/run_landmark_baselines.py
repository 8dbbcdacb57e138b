"""Landmark baselines on a small simulated population: T1 -> T1 and T1 -> T2, one JSON file.

    python benchmarks/run_landmark_baselines.py --n 4 --res 2 --seed 0 \
        --methods affine,bspline,ncc,syn --out benchmarks/results/landmarks_baselines.json

Synthesises the population (``anatssl data synth`` with the same n, res, seed) into ``--population``
unless it is already there, runs :func:`AnatSSLLib.bench.run_landmark_benchmark` for each contrast
pair and writes ``{"command", "runs": {"t1->t1": report, "t1->t2": report}}``; prints the tables.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--res", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="affine,bspline,ncc,syn")
    p.add_argument("--pairs", default="t1:t1,t1:t2", help="reference:target contrast pairs")
    p.add_argument("--population", default=None, help="population folder (default: a folder in the temp dir)")
    p.add_argument("--out", default="benchmarks/results/landmarks_baselines.json")
    args = p.parse_args(argv)

    from AnatSSLLib import bench
    from AnatSSLLib.data import load_population, synthesize_population

    command = " ".join(["python", "benchmarks/run_landmark_baselines.py"] + [shlex.quote(a) for a in (argv or sys.argv[1:])])
    pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
    contrasts = sorted({c for pair in pairs for c in pair})
    folder = pathlib.Path(args.population or pathlib.Path(tempfile.gettempdir()) /
                          f"anatssl_bench_n{args.n}_res{args.res:g}_seed{args.seed}")
    if not (folder / "population.json").is_file():
        synthesize_population(folder, args.n, contrasts=contrasts, seed=args.seed, res_mm=args.res, force=True)
    population = load_population(folder)
    methods = [m for m in args.methods.split(",") if m]
    runs = {}
    for ref_c, tgt_c in pairs:
        report = bench.run_landmark_benchmark(
            population, methods, reference_contrast=ref_c, target_contrast=tgt_c, command=command, progress=True
        )
        runs[f"{ref_c}->{tgt_c}"] = report
        print(bench.format_table(report), flush=True)
        print(flush=True)
    combined = {
        "task": "landmarks",
        "command": command,
        "population": {"n": args.n, "res_mm": args.res, "seed": args.seed, "simulated": True},
        "runs": runs,
    }
    bench.write_report(combined, args.out)
    print(f"written {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
