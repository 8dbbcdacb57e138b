"""Stability of the tools: the same scan must give the same answer, and noise far below a scanner's
must not move it.

    python benchmarks/bench_stability.py --population POP --contrasts t1,t2 --draws 10 \
        --noise 1e-4,1e-3 --segment-contrasts t2 --out benchmarks/results/stability.json

For each target (every subject of ``--population`` in each contrast), the landmark tool with its
defaults carries the template's 32 AFIDs from the template T1; then each of ``--draws`` copies of the
target, every voxel multiplied by ``1 + r * N(0, 1)`` (``r`` each of ``--noise``), is run again.
Reported per target and noise level: the spread (max - min) of the mean radial error over the
clean run and the draws, and the largest move of any single landmark from the clean answer (mm
and in voxels of the target's grid, its largest spacing). The segmentation tool (template T1 labels
to ``--segment-contrasts`` targets) the same way: spread of the mean tissue Dice, and the fraction
of voxels whose label changes.

``--threads``: the landmark and segment commands run on the first target of each contrast in
separate processes with 1 and with 2 threads (torch, OpenMP, MKL, ITK); their outputs are compared
point by point and voxel by voxel. ``--stages`` writes a per-stage fingerprint (sha256 of the target
embedding, the embedding's global affine, the registration affine, the final points) for each
clean target: run it on two machines, or under two CPU code paths (``--stages`` with
``ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=AVX MKL_CBWR=COMPATIBLE`` set), and compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TISSUE = [1, 2, 3] + list(range(8, 20))


def _noisy(image, rel: float, seed: int):
    if rel <= 0:
        return image
    rng = np.random.default_rng(seed)
    arr = np.asarray(image.array, np.float64)
    return dataclasses.replace(image, array=(arr * (1.0 + rel * rng.standard_normal(arr.shape))).astype(np.float32))


def _sha(x) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()[:16]


def _dice(a, b):
    den = a.sum() + b.sum()
    return float(2 * (a & b).sum() / den) if den else float("nan")


def landmark_stability(template, subjects, contrasts, draws, noise, stages: bool, on_row=None):
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    locator = LandmarkLocator.for_encoder(None, contrast="auto")
    locator.prepare(template.t1)
    rows = []
    for contrast in contrasts:
        for s in subjects:
            target = s.image(contrast)
            truth = s.landmarks().positions
            voxel = float(max(target.spacing))
            t0 = time.perf_counter()
            (clean,) = locator.locate(template.t1, template.landmarks, [target])
            seconds = time.perf_counter() - t0
            decision = locator.last_decisions[0]
            row = {"subject": s.name, "contrast": contrast, "voxel_mm": voxel, "seconds_clean": seconds,
                   "decision": decision.describe(),
                   "mean_error_mm": float(np.linalg.norm(clean.positions - truth, axis=1).mean())}
            if stages:
                row["stages"] = _stages(locator, template.t1, target, clean)
            for rel, n_draws in zip(noise, draws):
                errors, moves = [row["mean_error_mm"]], []
                modes = set()
                for d in range(n_draws):
                    (found,) = locator.locate(template.t1, template.landmarks, [_noisy(target, rel, 1000 + d)])
                    modes.add(locator.last_decisions[0].mode)
                    errors.append(float(np.linalg.norm(found.positions - truth, axis=1).mean()))
                    moves.append(float(np.linalg.norm(found.positions - clean.positions, axis=1).max()))
                    locator._maps.clear()  # bounded memory: the noisy copies are never asked for again
                locator.store._volumes = type(locator.store._volumes)(list(locator.store._volumes.items())[:1])
                row[f"noise_{rel:g}"] = {
                    "mean_errors_mm": errors, "spread_mm": max(errors) - min(errors),
                    "largest_move_mm": max(moves), "largest_move_voxels": max(moves) / voxel,
                    "decisions": sorted(modes),
                }
            print(json.dumps({k: v for k, v in row.items() if k != "stages"}), flush=True)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
    return rows


def _stages(locator, reference, target, found) -> dict:
    """Fingerprints of each stage of the landmark pipeline for one clean target."""
    from AnatSSLLib.embedding import volume_key

    match = next(m for k, m in locator._maps.items() if k[1] == volume_key(target))
    embedded = locator.store.get(target)
    return {
        "target_array": _sha(target.array),
        "target_embedding": _sha(embedded.features.numpy()),
        "target_embedding_sum": float(embedded.features.double().sum()),
        "affine": _sha(np.round(match.correspondence.affine, 4)),
        "affine_matrix": match.correspondence.affine.round(6).tolist(),
        "decision": match.decision.describe(),
        "points": _sha(np.round(found.positions, 3)),
        "points_lps": found.positions.round(4).tolist(),
    }


def segmentation_stability(template, subjects, contrasts, draws, noise):
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import load_encoder
    from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

    segmenter = CrossModalitySegmenter(EmbeddingStore(load_encoder(None)))
    rows = []
    for contrast in contrasts:
        for s in subjects:
            target = s.image(contrast)
            truth = np.asarray(s.labels().array)
            clean = np.asarray(segmenter.segment(template.t1, template.labels, target).array)
            dice = lambda lab: float(np.nanmean([_dice(lab == k, truth == k) for k in TISSUE]))  # noqa: E731
            row = {"subject": s.name, "contrast": contrast, "decision": segmenter.last_decisions[0].describe(),
                   "tissue_dice": dice(clean)}
            for rel, n_draws in zip(noise, draws):
                dices, changed = [row["tissue_dice"]], []
                for d in range(n_draws):
                    lab = np.asarray(segmenter.segment(template.t1, template.labels, _noisy(target, rel, 2000 + d)).array)
                    dices.append(dice(lab))
                    changed.append(float((lab != clean).mean()))
                segmenter.store._volumes = type(segmenter.store._volumes)(list(segmenter.store._volumes.items())[:1])
                row[f"noise_{rel:g}"] = {"tissue_dice": dices, "spread": max(dices) - min(dices),
                                         "largest_changed_fraction": max(changed)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def thread_identity(template, subjects, contrasts) -> list[dict]:
    """``anatssl landmarks`` and ``anatssl segment`` on the first subject of each contrast with 1 and
    2 threads, in fresh processes: identical outputs?"""
    from AnatSSLLib.image import read_image, write_image
    from AnatSSLLib.points import read_points, write_points

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref = write_image(template.t1, tmp / "template_t1.nii.gz")
        labels = write_image(template.labels, tmp / "template_labels.nii.gz")
        pts = write_points(template.landmarks, tmp / "afids.mrk.json")
        for contrast in contrasts:
            target = str(subjects[0].folder / f"{contrast}.nii.gz")
            outs = {}
            for threads in (1, 2):
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                           ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
                out = tmp / f"{contrast}-{threads}"
                cli = [sys.executable, "-m", "AnatSSLLib.cli"]
                subprocess.run(cli + ["landmarks", "--reference", str(ref), "--points", str(pts), "--targets", target,
                                      "--out", str(out)], env=env, check=True, capture_output=True)
                subprocess.run(cli + ["segment", "--reference", str(ref), "--reference-labels", str(labels),
                                      "--targets", target, "--out", str(out)], env=env, check=True, capture_output=True)
                outs[threads] = (read_points(out / f"{contrast}.mrk.json").positions,
                                 np.asarray(read_image(out / f"{contrast}_labels.nii.gz").array))
            (p1, l1), (p2, l2) = outs[1], outs[2]
            row = {"subject": subjects[0].name, "contrast": contrast,
                   "landmarks_identical": bool(np.array_equal(p1, p2)),
                   "landmarks_largest_difference_mm": float(np.abs(p1 - p2).max()),
                   "labels_identical": bool(np.array_equal(l1, l2)),
                   "labels_changed_fraction": float((l1 != l2).mean())}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _summary(rows, noise, key_spread, key_move=None):
    out = {}
    for rel in noise:
        k = f"noise_{rel:g}"
        entry = {"largest_spread": max(r[k][key_spread] for r in rows)}
        if key_move:
            entry["largest_move_mm"] = max(r[k]["largest_move_mm"] for r in rows)
            entry["largest_move_voxels"] = max(r[k]["largest_move_voxels"] for r in rows)
        out[k] = entry
    return out


def main(argv=None) -> int:
    from AnatSSLLib.bench import _header, write_report
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.data.templates import load_template

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--population", required=True)
    p.add_argument("--contrasts", default="t1,t2")
    p.add_argument("--segment-contrasts", default="t2", help="contrasts of the segmentation targets ('' for none)")
    p.add_argument("--draws", default="10", help="noise draws per target, one for all noise levels or one per level")
    p.add_argument("--segment-draws", default=None, help="draws for the segmentation tool (default --draws)")
    p.add_argument("--subjects", type=int, default=None, help="first N subjects only")
    p.add_argument("--noise", default="1e-4,1e-3")
    p.add_argument("--threads", action="store_true", help="also compare the CLI's outputs with 1 and 2 threads")
    p.add_argument("--stages", action="store_true", help="record per-stage fingerprints of each clean target")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    noise = [float(v) for v in args.noise.split(",") if v]

    def per_level(text):
        counts = [int(v) for v in str(text).split(",")]
        return counts * len(noise) if len(counts) == 1 else counts

    draws = per_level(args.draws)
    segment_draws = per_level(args.segment_draws or args.draws)
    population = load_population(args.population)
    subjects = population.subjects[: args.subjects] if args.subjects else population.subjects
    template = load_template(2.0)
    report = _header("stability", None)
    report["population"] = {"path": str(args.population), "subjects": [s.name for s in population.subjects]}
    report["settings"] = {"draws": draws, "segment_draws": segment_draws, "noise": noise, "contrasts": args.contrasts}
    report["code_paths"] = {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    contrasts = [c for c in args.contrasts.split(",") if c]
    def partial(rows):
        report["landmarks"] = rows
        write_report(report, args.out)

    report["landmarks"] = landmark_stability(template, subjects, contrasts, draws, noise, args.stages, partial)
    report["summary"] = {"landmarks": _summary(report["landmarks"], noise, "spread_mm", "largest_move_mm")}
    write_report(report, args.out)
    seg = [c for c in args.segment_contrasts.split(",") if c]
    if seg:
        report["segmentation"] = segmentation_stability(template, subjects, seg, segment_draws, noise)
        report["summary"]["segmentation"] = _summary(report["segmentation"], noise, "spread")
        write_report(report, args.out)
    if args.threads:
        report["threads"] = thread_identity(template, subjects, contrasts)
        write_report(report, args.out)
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
