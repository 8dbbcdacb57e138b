"""``anatssl bench TASK``: run a benchmark on a population folder, write a JSON report, print a table.

- ``anatssl bench landmarks --population DIR [--reference template] [--contrast t1]
  [--target-contrast t2] [--methods affine,bspline,ncc,syn] [--encoder ID] [--targets N|a,b]
  [--out results.json] [--per-landmark]``
- ``anatssl bench segmentation --population DIR [...same...] [--methods affine,bspline,syn]``
- ``anatssl bench search --population DIR --method NAME --encoder ID [--radius-mm 4]``
- ``anatssl bench pretrain --method NAME [--encoder ID] [--steps 20]``

Baselines (registration, NCC patch matching) are built in; encoder-based methods are registered in
:mod:`AnatSSLLib.bench` by the tool modules (see ``bench.PLUGIN_MODULES``).
"""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="benchmark landmarks, segmentation, search or pretraining against registration baselines",
        description=(
            "Run every method on the same cases of a population folder ('anatssl data synth') and write a JSON "
            "report (errors in mm, Dice, precision, timings, inter-rater floor, machine, command) plus a Markdown "
            "table. Baselines: SimpleITK affine and B-spline (Mattes MI), ANTs SyN (needs antspyx), NCC patch "
            "matching. Encoder methods are added to the registries by the tool modules."
        ),
    )
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)

    def common(q: argparse.ArgumentParser, methods_default: str) -> None:
        q.add_argument("--population", required=True, metavar="DIR", help="population folder (with population.json)")
        q.add_argument("--reference", default="template", help="'template' or a subject name (default: template)")
        q.add_argument("--contrast", default="t1", help="reference contrast (default: t1)")
        q.add_argument("--target-contrast", default=None, help="target contrast (default: the reference contrast)")
        q.add_argument("--methods", default=methods_default, help=f"comma-separated method names (default: {methods_default}); encoder-based "
                       "methods (e.g. 'embedding') are registered by the tool modules and need --encoder")
        q.add_argument("--encoder", metavar="ID", default=None, help="encoder id passed to encoder-based methods")
        q.add_argument("--targets", default=None, help="number of first subjects, or comma-separated subject names (default: all)")
        q.add_argument("--out", metavar="JSON", default=None, help="write the report here (atomically)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(run=run)

    lm = sub.add_parser("landmarks", help="one-shot landmarks: radial error (mm) per method and landmark")
    common(lm, "affine,bspline,ncc,syn")
    lm.add_argument("--per-landmark", action="store_true", help="also print the per-landmark table")

    sg = sub.add_parser("segmentation", help="label transfer: Dice per label per method")
    common(sg, "affine,bspline,syn")
    sg.add_argument("--labels", default=None, help="comma-separated label ids to score (default: all in the reference)")

    se = sub.add_parser("search", help="embedding search: precision at 1 and 10 (needs an encoder method)")
    se.add_argument("--population", required=True, metavar="DIR")
    se.add_argument("--method", default=None, help="search method name (registered by the search tool)")
    se.add_argument("--encoder", metavar="ID", default=None)
    se.add_argument("--contrast", default="t1")
    se.add_argument("--radius-mm", type=float, default=4.0, help="a match within this distance is correct (default 4)")
    se.add_argument("--out", metavar="JSON", default=None)
    se.set_defaults(run=run)

    pt = sub.add_parser("pretrain", help="pretraining throughput and peak memory (needs a pretraining method)")
    pt.add_argument("--method", default=None, help="pretraining probe name (registered by the pretraining methods)")
    pt.add_argument("--encoder", metavar="ID", default=None)
    pt.add_argument("--steps", type=int, default=20)
    pt.add_argument("--warmup", type=int, default=3)
    pt.add_argument("--out", metavar="JSON", default=None)
    pt.set_defaults(run=run)
    return p


def _targets(text: str | None):
    if text is None:
        return None
    text = text.strip()
    if text.isdigit():
        return int(text)
    return [t.strip() for t in text.split(",") if t.strip()]


def _command(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["anatssl"] + [shlex.quote(a) for a in args])


def _pick(registry: dict, name: str | None, encoder: str | None, what: str):
    from ..errors import InputError

    if not registry:
        raise InputError(
            f"no encoder given: no {what} method is registered; {what} methods come with an encoder and are "
            "registered by the tool modules (AnatSSLLib.bench.PLUGIN_MODULES)"
        )
    if name is None:
        name = next(iter(registry))
    if name not in registry:
        raise InputError(f"unknown {what} method {name!r}; available: {', '.join(sorted(registry))}")
    if encoder is None:
        raise InputError(f"no encoder given: the {what} method {name!r} needs --encoder ID")
    return registry[name](encoder=encoder)


def run(args: argparse.Namespace) -> int:
    from .. import bench
    from ..data import load_population

    problems = bench.load_plugins()
    for module, why in problems.items():
        print(f"anatssl bench: note: {module} could not be imported ({why}); its methods are unavailable", file=sys.stderr)
    command = _command()
    if args.task in ("landmarks", "segmentation"):
        population = load_population(args.population)
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        kwargs = dict(
            reference=args.reference,
            reference_contrast=args.contrast,
            target_contrast=args.target_contrast,
            targets=_targets(args.targets),
            out_json=args.out,
            encoder=args.encoder,
            command=command,
            progress=not args.no_progress,
        )
        if args.task == "landmarks":
            report = bench.run_landmark_benchmark(population, names, **kwargs)
            print(bench.format_table(report, per_landmark=args.per_landmark))
        else:
            labels = None if args.labels is None else [int(v) for v in args.labels.split(",") if v.strip()]
            report = bench.run_segmentation_benchmark(population, names, labels=labels, **kwargs)
            print(bench.format_table(report))
    elif args.task == "search":
        population = load_population(args.population)
        searcher = _pick(bench.SEARCH_METHODS, args.method, args.encoder, "search")
        report = bench.run_search_benchmark(
            population, searcher, contrast=args.contrast, radius_mm=args.radius_mm, out_json=args.out, command=command
        )
        print(bench.format_table(report))
    else:
        probe = _pick(bench.PRETRAIN_PROBES, args.method, args.encoder, "pretrain")
        report = bench.run_pretrain_benchmark(probe, steps=args.steps, warmup=args.warmup, out_json=args.out, command=command)
        print(bench.format_table(report))
    if args.out:
        print(f"report written to {args.out}", file=sys.stderr)
    return 0
