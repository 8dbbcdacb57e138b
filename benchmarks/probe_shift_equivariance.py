"""Does an encoder's embedding follow the anatomy, or the position in its input window?

    python benchmarks/probe_shift_equivariance.py --population /work/pops/eval10 --encoders random default ID... \
        --out benchmarks/results/shift_equivariance.json

A convolutional embedding of anatomy should give (nearly) the same vector at the same anatomical
voxel wherever the input crop starts. Two questions, on crops of one subject's T1 (normalised and
resampled as the tools do), asked directly of the network (no sliding window, no smoothing):

- **shift**: two ``--crop``^3 crops offset by ``s`` voxels (``s`` in ``--shifts``); mean cosine of
  the embeddings at the same anatomy over the crops' overlap;
- **context**: a 48^3 crop and the same crop with 16 more voxels on each side (the same pooling
  phase); mean cosine over the central 16^3 voxels.

For scale, the mean cosine of two random voxels of one crop is reported too. A random-weight
network scores about 1 on both (it is smooth and translation-equivariant inside its window).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def probe(encoder, array: np.ndarray, crop: int, shifts, trials: int = 6, seed: int = 0) -> dict:
    import torch

    embed = encoder.model.embed

    def at(origin, size):
        o = np.asarray(origin)
        x = torch.from_numpy(np.ascontiguousarray(array[o[0]:o[0] + size, o[1]:o[1] + size, o[2]:o[2] + size]))
        with torch.no_grad():
            return torch.nn.functional.normalize(embed(x[None, None].to(encoder.device))[0].float().cpu(), dim=0)

    rng = np.random.default_rng(seed)
    out = {"shift": {}, "random_pair": None, "context": None}
    random_pairs = []
    for s in shifts:
        values = []
        for _ in range(trials):
            o = np.array([rng.integers(0, n - crop - s) for n in array.shape])
            a, b = at(o, crop), at(o + s, crop)
            values.append(float((a[:, s:, s:, s:] * b[:, : crop - s, : crop - s, : crop - s]).sum(0).mean()))
            flat = a.reshape(a.shape[0], -1)
            i, j = rng.integers(0, flat.shape[1], (2, 2000))
            random_pairs.append(float((flat[:, i] * flat[:, j]).sum(0).mean()))
        out["shift"][str(s)] = float(np.mean(values))
    out["random_pair"] = float(np.mean(random_pairs))
    context = []
    for _ in range(trials):
        o = np.array([rng.integers(16, n - 48 - 16) for n in array.shape])
        a, b = at(o, 48), at(o - 16, 80)
        context.append(float((a[:, 16:32, 16:32, 16:32] * b[:, 32:48, 32:48, 32:48]).sum(0).mean()))
    out["context"] = float(np.mean(context))
    return out


def main(argv=None) -> int:
    import torch

    from AnatSSLLib.bench import _header, write_report
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.encoders import load_encoder, prepare_volume, random_weights_like

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--population", required=True)
    p.add_argument("--encoders", nargs="+", required=True, help="cache ids or names; 'random' for random weights")
    p.add_argument("--crop", type=int, default=32, help="crop edge for the shift question (default 32, the training crop)")
    p.add_argument("--shifts", default="1,2,6,16", help="comma-separated shifts in voxels (default 1,2,6,16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shifts = [int(s) for s in args.shifts.split(",")]
    subject = load_population(args.population).subjects[0]
    named = [e for e in args.encoders if e != "random"] or ["default"]
    report = _header("shift_equivariance", "python benchmarks/probe_shift_equivariance.py " + shlex.join(argv or sys.argv[1:]))
    report.update(population=args.population, subject=subject.name, crop=args.crop, encoders={})
    for name in args.encoders:
        encoder = random_weights_like(load_encoder(named[0], device="cpu")) if name == "random" else load_encoder(name, device="cpu")
        _, array = prepare_volume(subject.image("t1"), encoder)
        result = probe(encoder, array, args.crop, shifts)
        result.update(encoder_id=encoder.encoder_id if name != "random" else f"random weights like {named[0]}",
                      description=encoder.manifest.description)
        report["encoders"][name] = result
        print(name, {k: v for k, v in result.items() if k in ("shift", "random_pair", "context")}, flush=True)
        write_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
