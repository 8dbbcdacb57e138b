"""Diagnostic probe of an encoder's voxel embeddings: contrast invariance and cross-subject consistency.

    python benchmarks/probe_ld_features.py --population /work/pops/eval10 --encoders random default ID... \
        --out benchmarks/results/ld_feature_probe.json

Two questions the landmark tool depends on, asked without its global stage, so that an encoder's
failure can be told apart from the matching pipeline's:

- **A: same subject, T1 -> T2.** 300 random anatomy voxels of each subject's T1 embedding are
  searched in the same subject's T2 embedding (the same grid, so the answer is the same voxel)
  within a 16 mm window; centre-weighted features at sigma 2 mm. Reported: median error (mm) and
  the fraction within 4 mm. A random guess in the window has a median of about 16 mm.
- **B: template -> subject, AFIDs.** Each template landmark's centre-weighted feature (sigma 4 mm)
  is searched in the subject's T1 and T2 embeddings within 12 mm of the true position. Reported:
  mean error (mm) and the fraction within 4 mm. A uniform random voxel of the window (13^3 voxels of
  2 mm) averages 12.5 mm, 1.5 % within 4 mm.

``random`` is the first named encoder's architecture with random weights (the bundled preview's if none is named).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def window_argmax(features, vector, centre, radius: int) -> np.ndarray:
    """``[k, j, i]`` of the voxel most similar to ``vector`` within ``radius`` voxels of ``centre``."""
    import torch

    shape = np.array(features.shape[1:])
    lo = np.maximum(centre - radius, 0)
    hi = np.minimum(centre + radius + 1, shape)
    window = features[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    sim = torch.einsum("d,dabc->abc", vector, window)
    return np.array(np.unravel_index(int(sim.argmax()), sim.shape)) + lo


def probe(store, population, n_subjects: int, seed: int = 0) -> dict:
    from AnatSSLLib.tools.correspondence import foreground_mask

    rng = np.random.default_rng(seed)
    same_subject = []
    for s in population.subjects[:n_subjects]:
        e1, e2 = store.get(s.image("t1")), store.get(s.image("t2"))
        f1, f2 = e1.smoothed_features(2.0), e2.smoothed_features(2.0)
        voxels = np.argwhere(foreground_mask(e1.intensity))
        voxels = voxels[rng.choice(len(voxels), 300, replace=False)]
        spacing = np.array(e1.grid.spacing[::-1])
        for v in voxels:
            same_subject.append(float(np.linalg.norm((window_argmax(f2, f1[:, v[0], v[1], v[2]], v, 8) - v) * spacing)))
    same_subject = np.array(same_subject)
    out = {"A_same_subject_t1_to_t2": {"median_mm": float(np.median(same_subject)), "within_4mm": float(np.mean(same_subject <= 4))}}
    ref = store.get(population.template.image("t1"))
    ref_features = ref.smoothed_features(4.0)
    landmarks = population.template.landmarks()
    for contrast in ("t1", "t2"):
        errors = []
        for s in population.subjects[:n_subjects]:
            tgt = store.get(s.image(contrast))
            tgt_features = tgt.smoothed_features(4.0)
            truth = s.landmarks()
            for label, position in zip(landmarks.labels, landmarks.positions):
                r = np.round(ref.grid.physical_to_index(position[None])[0][::-1]).astype(int)
                t = np.asarray(truth.position(label), float)
                c = np.round(tgt.grid.physical_to_index(t[None])[0][::-1]).astype(int)
                found = window_argmax(tgt_features, ref_features[:, r[0], r[1], r[2]], c, 6)
                errors.append(float(np.linalg.norm(tgt.grid.index_to_physical(found[::-1][None].astype(float))[0] - t)))
        errors = np.array(errors)
        out[f"B_template_to_{contrast}"] = {"mean_mm": float(errors.mean()), "within_4mm": float(np.mean(errors <= 4))}
    return out


def main(argv=None) -> int:
    import torch

    from AnatSSLLib.bench import _header, write_report
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import load_encoder, random_weights_like

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--population", required=True)
    p.add_argument("--encoders", nargs="+", required=True, help="cache ids or names; 'random' for random weights")
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--roi", type=int, default=96, help="sliding-window size in voxels (default 96, the tools' default)")
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    population = load_population(args.population)
    named = [e for e in args.encoders if e != "random"] or ["default"]  # 'random' alone: the preview's architecture
    report = _header("ld_feature_probe", "python benchmarks/probe_ld_features.py " + shlex.join(argv or sys.argv[1:]))
    report.update(population=args.population, subjects=[s.name for s in population.subjects[: args.subjects]], encoders={})
    for name in args.encoders:
        start = time.perf_counter()
        encoder = random_weights_like(load_encoder(named[0], device="cpu")) if name == "random" else load_encoder(name, device="cpu")
        result = probe(EmbeddingStore(encoder, roi_size=args.roi, overlap=args.overlap), population, args.subjects)
        result.update(encoder_id=encoder.encoder_id if name != "random" else f"random weights like {named[0]}",
                      description=encoder.manifest.description, seconds=time.perf_counter() - start)
        report["encoders"][name] = result
        print(name, {k: v for k, v in result.items() if k.startswith(("A_", "B_"))}, flush=True)
        write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
