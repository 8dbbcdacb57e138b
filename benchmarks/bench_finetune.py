"""Fine-tuning benchmark (issue 5): segmentation networks initialised from pretrained encoders
against the same networks from random weights, with labels from 1 and from 4 subjects.

Train on the first N subjects of ``--train`` (their T1 and full label maps, 25 structures), then
segment every subject of ``--eval`` (T1) and compare with its label map. For each encoder named in
``--encoders`` the network is built from the encoder's architecture (SwinUNETR for Alice, LD's
U-Net for LD) and trained twice per N: from the encoder's weights, and (once per architecture) from
random weights. Everything else is equal: steps, batch, crop, learning rate, seed, crops drawn.

Reported per run: Dice per label on each target, the mean over *tissue* labels (csf, gm, wm and
the deep structures 8-19, as bench_segmentation.py), over *brain* labels (1-23) and over all
labels, training seconds, samples/s, peak memory, and seconds per segmented target.

    python benchmarks/bench_finetune.py --train /work/pops/train20 --eval /work/pops/eval10 \\
        --encoders alice=ID,alice-no-cafa=ID,alice-no-generative=ID,ld=ID --subjects 1,4 --steps 400 \\
        --out benchmarks/results/finetune.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench_segmentation import ALL, BRAIN, TISSUE, summary  # the same label sets and means


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="population folder with the labelled training subjects")
    ap.add_argument("--eval", required=True, help="population folder with the evaluation subjects")
    ap.add_argument("--encoders", required=True, help="NAME=ID,... cached encoders to fine-tune from")
    ap.add_argument("--subjects", default="1,4", help="numbers of labelled training subjects (default 1,4)")
    ap.add_argument("--contrast", default="t1")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated run names to do (default all)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from AnatSSLLib.bench import machine_info, write_report
    from AnatSSLLib.data.population import load_population
    from AnatSSLLib.encoders import load_encoder
    from AnatSSLLib.metrics import dice_per_label
    from AnatSSLLib.tools.finetune import FinetuneSettings, finetune

    train_pop, eval_pop = load_population(args.train), load_population(args.eval)
    named = [item.split("=", 1) for item in args.encoders.split(",")]
    encoders = {name: load_encoder(eid, device="cpu") for name, eid in named}
    runs: list[tuple[str, str, str]] = []  # (run name, encoder name, init)
    seen_arch: set[str] = set()
    for name, enc in encoders.items():
        runs.append((name, name, "encoder"))
        arch = enc.manifest.architecture
        if arch not in seen_arch:
            seen_arch.add(arch)
            runs.append((f"random-{'swinunetr' if arch == 'alice_swin3d' else 'ld-unet'}", name, "random"))
    only = set(args.only.split(",")) if args.only else None
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.is_file() else {}
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    result.update({
        "task": "finetune",
        "command": command,
        # every invocation that wrote into this file (runs are added to an existing file)
        "commands": result.get("commands", [result["command"]] if "command" in result else []) + [command],
        "train_population": args.train, "eval_population": args.eval, "contrast": args.contrast,
        "encoders": {name: {"id": enc.encoder_id, "architecture": enc.manifest.architecture,
                            "description": enc.manifest.description,
                            # how the encoder was pretrained (optimiser, schedule, clipping), from its manifest
                            "pretraining_config": (enc.manifest.training or {}).get("config")}
                     for name, enc in encoders.items()},
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "crop": args.crop, "lr": args.lr,
                     "seed": args.seed, "loss": "MONAI DiceCELoss", "optimizer": "AdamW"},
        "label_sets": {"tissue": TISSUE, "brain": BRAIN, "all": ALL},
        "label_names": {str(k): v for k, v in train_pop.label_names.items()},
        "torch_threads": args.threads, "machine": machine_info(),
    })
    result.setdefault("runs", {})
    write_report(result, out_path)  # the settings and encoders now, the runs as they finish
    targets = [(s.name, s.image(args.contrast), s.labels()) for s in eval_pop.subjects]
    for n in (int(v) for v in args.subjects.split(",")):
        subjects = train_pop.subjects[:n]
        images = [s.image(args.contrast) for s in subjects]
        labels = [s.labels() for s in subjects]
        for run_name, enc_name, init in runs:
            if only and run_name not in only:
                continue
            settings = FinetuneSettings(init=init, steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                                        lr=args.lr, seed=args.seed, device="cpu")
            seg = finetune(encoders[enc_name], images, labels, settings)
            per_target, t0 = {}, time.perf_counter()
            for name, image, truth in targets:
                per_target[name] = dice_per_label(seg.segment(image), truth, ALL)
            seg_s = (time.perf_counter() - t0) / len(targets)
            per_label = {k: float(np.nanmean([d[k] for d in per_target.values()])) for k in ALL}
            means = summary(per_label)
            entry = {
                "encoder": encoders[enc_name].encoder_id, "init": init, "training_subjects": [s.name for s in subjects],
                "mean_dice_tissue": means["mean_tissue"], "mean_dice_brain": means["mean_brain"],
                "mean_dice_all": means["mean_all"],
                "per_target_tissue": {k: summary(v)["mean_tissue"] for k, v in per_target.items()},
                "dice_per_label": {str(k): v for k, v in per_label.items()},
                "train_seconds": seg.info["seconds"], "samples_per_second": seg.info["samples_per_second"],
                "peak_memory_mb": seg.info["peak_memory_mb"], "final_loss": seg.info["final_loss"],
                "seconds_per_target": round(seg_s, 2),
            }
            result["runs"].setdefault(f"{n}_subject{'s' if n > 1 else ''}", {})[run_name] = entry
            print(f"{n} subj {run_name:22s} tissue {entry['mean_dice_tissue']:.3f} brain {entry['mean_dice_brain']:.3f} "
                  f"all {entry['mean_dice_all']:.3f}  train {entry['train_seconds']:.0f} s", flush=True)
            write_report(result, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
