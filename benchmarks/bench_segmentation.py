"""Cross-modality segmentation benchmark: template T1 + labels -> each subject's T2 / T1 / CT.

    python benchmarks/bench_segmentation.py --population /work/pops/eval10 --encoder pilot2 \
        --contrasts t2,t1,ct --out benchmarks/results/segmentation.json

Methods, all on the same reference (the population template's ``--reference-contrast`` image and
label map) and the same targets:

- ``embedding``: :class:`AnatSSLLib.tools.segmentation.CrossModalitySegmenter` with ``--encoder``
  (shape prior only, the default);
- ``embedding+likelihood``: the same with LD's region-embedding likelihood (``--likelihood-weight``);
- ``hybrid``: the same tool started from a SimpleITK Mattes-MI affine instead of the embedding
  affine (``initial_alignment="registration"``), then the embedding's local levels;
- ``random`` / ``random+hybrid``: the same tool (embedding / registration start) with a random-weight
  encoder of the same architecture and manifest;
- ``<method>+em`` for any of the four above: the same prior, then the target's own appearance model
  (``likelihood="gaussian"``: one Gaussian per class over ``--appearance``, re-estimated by EM,
  :func:`AnatSSLLib.tools.segmentation.appearance_em`, exponent ``--em-weight``);
- ``hybrid+contrast`` / ``hybrid+contrast+em`` / ``random+hybrid+contrast[+em]``: the registration
  start, with the target's intensities first mapped into the reference's contrast
  (``match_contrast=True``, :mod:`AnatSSLLib.contrast`), then the embedding's local levels (and EM);
- ``affine+em``: the same EM on the prior of the SimpleITK affine alone (no encoder): what the
  appearance model gives without the embedding's correspondence;
- ``affine`` / ``bspline``: registration-based label propagation (SimpleITK affine, then affine +
  B-spline, Mattes MI; :mod:`AnatSSLLib.baselines.registration`, target fixed, reference moving,
  nearest-neighbour labels). One B-spline registration gives both (its first stage is the affine),
  so ``affine`` seconds are not measured separately.

Dice per label (each target's own grid and label map), the mean over *tissue* labels (csf, gm, wm
and the deep structures 8-19), over *brain* labels (1-23) and over all labels, and seconds per
target (embedding of the target included, reference embedding excluded) are written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TISSUE = [1, 2, 3] + list(range(8, 20))
BRAIN = list(range(1, 24))
ALL = list(range(1, 26))


def summary(d: dict[int, float]) -> dict[str, float]:
    def m(ids):
        v = [d[i] for i in ids if not np.isnan(d[i])]
        return float(np.mean(v)) if v else float("nan")

    return {"mean_tissue": m(TISSUE), "mean_brain": m(BRAIN), "mean_all": m(ALL)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--population", default="/work/pops/eval10")
    p.add_argument("--encoder", required=True)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--contrasts", default="t2,t1,ct")
    p.add_argument("--reference-contrast", default="t1")
    p.add_argument("--subjects", type=int, default=10, help="first N subjects")
    p.add_argument("--methods", default="embedding,embedding+likelihood,random,bspline")
    p.add_argument("--likelihood-weight", type=float, default=1.0)
    p.add_argument("--em-weight", type=float, default=2.0, help="likelihood exponent of the '+em' methods")
    p.add_argument("--appearance", default="intensity", help="features of the '+em' methods: intensity and/or embedding")
    p.add_argument("--contrast-passes", type=int, default=1, help="transfer-function fits of the '+contrast' methods")
    p.add_argument("--whiten", action="store_true", help="whiten each volume's embedding (EmbeddingStore(whiten=True))")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared, loaded CPU)")
    p.add_argument("--out", default="benchmarks/results/segmentation.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="do not run: merge the runs of these result files (methods side by side) into --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))


    import torch

    from AnatSSLLib.baselines.registration import register, resample_labels
    from AnatSSLLib.cache import EncoderCache
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import load_encoder, random_weights_like
    from AnatSSLLib.metrics import dice_per_label
    from AnatSSLLib.tools.correspondence import EmbeddingCorrespondence
    from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

    torch.set_num_threads(args.threads)
    pop = load_population(args.population)
    ref = pop.template.image(args.reference_contrast)
    ref_labels = pop.template.labels()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cache = EncoderCache(args.cache_dir) if args.cache_dir else EncoderCache()
    enc = load_encoder(args.encoder, cache=cache, device="cpu")
    segmenters = {}
    em = dict(likelihood="gaussian", likelihood_weight=args.em_weight,
              appearance=tuple(a.strip() for a in args.appearance.split(",") if a.strip()))
    contrast = dict(initial_alignment="registration", match_contrast=True, contrast_passes=args.contrast_passes)
    if {"embedding", "embedding+likelihood", "hybrid", "embedding+em", "hybrid+em", "affine+em", "hybrid+contrast",
            "hybrid+contrast+em"} & set(methods):
        store = EmbeddingStore(enc, whiten=args.whiten)
        segmenters["embedding"] = CrossModalitySegmenter(store)
        segmenters["embedding+likelihood"] = CrossModalitySegmenter(store, likelihood_weight=args.likelihood_weight)
        segmenters["hybrid"] = CrossModalitySegmenter(store, initial_alignment="registration")
        segmenters["embedding+em"] = CrossModalitySegmenter(store, **em)
        segmenters["hybrid+em"] = CrossModalitySegmenter(store, initial_alignment="registration", **em)
        segmenters["hybrid+contrast"] = CrossModalitySegmenter(store, **contrast)
        segmenters["hybrid+contrast+em"] = CrossModalitySegmenter(store, **contrast, **em)
        # the registration affine alone as the prior (no local embedding levels): the encoder-free EM
        segmenters["affine+em"] = CrossModalitySegmenter(store, correspondence=EmbeddingCorrespondence(store, levels=()),
                                                         initial_alignment="registration", **em)
    if {"random", "random+hybrid", "random+em", "random+hybrid+em", "random+hybrid+contrast", "random+hybrid+contrast+em"} & set(methods):
        rstore = EmbeddingStore(random_weights_like(enc), whiten=args.whiten)
        segmenters["random"] = CrossModalitySegmenter(rstore)
        segmenters["random+hybrid"] = CrossModalitySegmenter(rstore, initial_alignment="registration")
        segmenters["random+em"] = CrossModalitySegmenter(rstore, **em)
        segmenters["random+hybrid+em"] = CrossModalitySegmenter(rstore, initial_alignment="registration", **em)
        segmenters["random+hybrid+contrast"] = CrossModalitySegmenter(rstore, **contrast)
        segmenters["random+hybrid+contrast+em"] = CrossModalitySegmenter(rstore, **contrast, **em)
    for s in segmenters.values():
        s.store.get(ref)
    report = {
        "task": "segmentation",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "population": str(args.population),
        "reference": f"template/{args.reference_contrast} + template labels",
        "encoder": enc.encoder_id,
        "encoder_spacing_mm": list(enc.spacing or []),
        "torch_threads": args.threads,
        "machine": f"{platform.node()} {platform.processor()} {os.cpu_count()} cpus (shared)",
        "label_sets": {"tissue": TISSUE, "brain": BRAIN, "all": ALL},
        "label_names": {str(k): v for k, v in pop.label_names.items()},
        "runs": {},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp_out = out_path.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(report, indent=1))
        os.replace(tmp_out, out_path)

    for contrast in [c.strip() for c in args.contrasts.split(",") if c.strip()]:
        run = {m: {"per_target": {}, "seconds": {}} for m in methods + (["affine"] if "bspline" in methods else [])}
        report["runs"][f"{args.reference_contrast}->{contrast}"] = run
        for subject in pop.subjects[: args.subjects]:
            target = subject.image(contrast)
            truth = subject.labels()
            for m in methods:
                t0 = time.perf_counter()
                if m == "bspline":
                    tr = register(target, ref, "bspline")
                    dt = time.perf_counter() - t0
                    for name, t in (("bspline", tr), ("affine", tr.GetNthTransform(0))):
                        pred = resample_labels(ref_labels, target, t)
                        run[name]["per_target"][subject.name] = dice_per_label(pred, truth, ALL)
                        run[name]["seconds"][subject.name] = dt
                    continue
                seg = segmenters[m]
                pred = seg.segment(ref, ref_labels, target)
                dt = time.perf_counter() - t0
                run[m]["per_target"][subject.name] = dice_per_label(pred, truth, ALL)
                run[m]["seconds"][subject.name] = dt
                if m in ("embedding", "random", "hybrid", "random+hybrid") or m.endswith(("+em", "+contrast")):
                    c = seg.last_correspondences[0]
                    run[m].setdefault("matches", {})[subject.name] = {
                        "global": c.global_matches, "affine_inliers": c.affine_inliers, "dense": int(len(c.confidence))}
            line = " ".join(f"{m}={summary(run[m]['per_target'][subject.name])['mean_tissue']:.3f}({run[m]['seconds'][subject.name]:.0f}s)"
                            for m in run if subject.name in run[m]["per_target"])
            print(f"{contrast} {subject.name}: {line}", flush=True)
            for m, entry in run.items():
                per = entry["per_target"]
                if not per:
                    continue
                labs = {lab: float(np.nanmean([d[lab] for d in per.values()])) for lab in ALL}
                entry["dice_per_label"] = {str(k): v for k, v in labs.items()}
                entry.update(summary(labs))
                entry["seconds_per_target"] = float(np.mean(list(entry["seconds"].values())))
                entry["n_targets"] = len(per)
            save()
    print(json.dumps({k: {m: {s: round(e[s], 4) for s in ("mean_tissue", "mean_brain", "mean_all", "seconds_per_target")}
                          for m, e in r.items() if "mean_tissue" in e} for k, r in report["runs"].items()}, indent=1))
    return 0


def merge(paths, out: Path) -> int:
    """Combine result files run separately (e.g. the slow registration baseline in its own process)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    report = dict(docs[0])
    report["merged_from"] = [{"file": str(p), "command": d.get("command"), "encoder": d.get("encoder")} for p, d in zip(paths, docs)]
    report["runs"] = {}
    for d in docs:
        for run, methods in d["runs"].items():
            for m, entry in methods.items():
                if entry.get("per_target"):
                    report["runs"].setdefault(run, {})[m] = entry
    # the bar: compare methods on the targets they all have
    for run, methods in report["runs"].items():
        common = set.intersection(*[set(e["per_target"]) for e in methods.values()])
        for e in methods.values():
            per = [e["per_target"][t] for t in sorted(common)]
            if per:
                labs = {lab: float(np.nanmean([d[str(lab)] if str(lab) in d else d[lab] for d in per])) for lab in ALL}
                e["common_targets"] = sorted(common)
                e["common"] = summary(labs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    print(json.dumps({k: {m: {"n": len(e["per_target"]), **{s: round(e[s], 4) for s in ("mean_tissue", "mean_all", "seconds_per_target")},
                              "common_tissue": round(e.get("common", {}).get("mean_tissue", float("nan")), 4)}
                          for m, e in r.items()} for k, r in report["runs"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
