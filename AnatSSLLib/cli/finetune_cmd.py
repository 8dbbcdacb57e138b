"""``anatssl finetune``: train a segmentation network from a pretrained encoder with a few label maps.

Trains (or, with ``--segmenter``, reuses) a fine-tuned network and segments the ``--targets``.
The encoder's weights initialise the network (``--init encoder``); ``--init random`` trains the
same architecture from scratch, the baseline a pretrained encoder should beat.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from ._common import add_encoder_options, encoder_from_args, output_stems

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a segmentation network initialised from a 3D Alice or LD encoder",
        description=(
            "Fine-tune a MONAI segmentation network (SwinUNETR for Alice encoders, LD's U-Net for LD encoders) "
            "on labelled volumes; save it to --out (segmenter.safetensors + segmenter.json) and write "
            "<target name>_labels.nii.gz for each --targets volume, on the target's own grid. With --segmenter DIR, "
            "skip training and segment the targets with a saved network. Resume after a kill with the same "
            "--checkpoint-dir; SIGTERM/SIGINT or --cancel-file stops after the current step."
        ),
    )
    p.add_argument("--images", nargs="+", metavar="IMG", help="training volumes")
    p.add_argument("--labels", nargs="+", metavar="LAB", help="label map of each training volume, on its grid (same order)")
    p.add_argument("--segmenter", metavar="DIR", help="use this saved fine-tuned network instead of training")
    p.add_argument("--targets", nargs="*", default=[], metavar="IMG", help="volumes to segment")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--init", choices=("encoder", "random"), default="encoder",
                   help="start from the encoder's weights (default) or from random weights (baseline)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    p.add_argument("--batch-size", type=int, default=4, help="crops per step (default 4)")
    p.add_argument("--crop", type=int, default=32, help="crop edge in voxels: a multiple of 32 for Alice, 16 for LD (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="checkpoint here and resume from here")
    p.add_argument("--progress", choices=("tqdm", "jsonl", "none"), default="tqdm")
    p.add_argument("--cancel-file", help="stop (with a checkpoint) when this file appears")
    add_encoder_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..engine import CancelToken
    from ..image import read_image, write_image
    from ..progress import make_progress
    from ..tools.finetune import FinetuneSettings, finetune, load_segmenter

    stems = output_stems(args.targets)
    out = Path(args.out)
    if args.segmenter:
        if args.images or args.labels:
            raise InputError("--segmenter reuses a trained network: give --targets, not --images/--labels")
        if not args.targets:
            raise InputError("--segmenter: give the --targets to segment")
        segmenter = load_segmenter(args.segmenter, device=args.device)
    else:
        if not args.images or not args.labels:
            raise InputError("fine-tuning needs --images and their --labels (or --segmenter DIR to reuse a network)")
        if len(args.images) != len(args.labels):
            raise InputError(f"--labels: expected one label map per image ({len(args.images)}), got {len(args.labels)}")
        images = [read_image(p) for p in args.images]
        labels = [read_image(p) for p in args.labels]
        encoder = encoder_from_args(args)
        settings = FinetuneSettings(init=args.init, steps=args.steps, batch_size=args.batch_size, crop=args.crop,
                                    lr=args.lr, seed=args.seed, device=args.device, checkpoint_dir=args.checkpoint_dir)
        token = CancelToken(args.cancel_file)
        with token.handle_signals():
            segmenter = finetune(encoder, images, labels, settings, progress=make_progress(args.progress, desc="finetune"),
                                 cancel=token)
        if segmenter.info.get("cancelled"):
            print("fine-tuning cancelled; run the same command again (with --checkpoint-dir) to resume", file=sys.stderr)
            return 3
        segmenter.save(out)
        summary = {"event": "summary", "out": str(out), **segmenter.info}
        print(json.dumps(summary) if args.progress == "jsonl" else json.dumps(summary, indent=1), flush=True)
    if args.targets:
        out.mkdir(parents=True, exist_ok=True)
    for path, stem in zip(args.targets, stems):
        result = segmenter.segment(read_image(path))
        dest = write_image(result, out / f"{stem}_labels.nii.gz")
        print(f"{stem}: {dest.name}, {int((result.array != 0).sum())} labelled voxels", flush=True)
    return 0
