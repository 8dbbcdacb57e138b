"""``anatssl pretrain``: train an encoder without labels and put it in the encoder cache.

Run the same command again after a kill or a cancel to resume from the last checkpoint. On
several GPUs or nodes, launch it with ``torchrun --nproc_per_node=N -m AnatSSLLib.cli pretrain ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..errors import InputError
from .cache_cmd import add_cache_option, cache_from_args

__all__ = ["add_parser", "run"]

METHODS = ("ld", "awcl", "alice")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain an encoder without labels (LD 3D, AWCL 2D)",
        description=(
            "Self-supervised pretraining. LD (3D): volume files or folders (--data), or a population "
            "folder from `anatssl data synth` (--population; its co-registered contrasts of each "
            "subject become paired views). AWCL (2D): a tagged image CSV (--images; e.g. from "
            "`anatssl data planes`). Progress, checkpoints and resume are automatic; "
            "SIGTERM/SIGINT or touching --cancel-file stops after the current step with a checkpoint."
        ),
    )
    p.add_argument("--method", choices=METHODS, default="ld", help="pretraining method (default ld)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", metavar="PATH", help="volume files or folders (searched recursively)")
    src.add_argument("--population", metavar="DIR", help="a population folder from `anatssl data synth`")
    src.add_argument("--images", metavar="CSV", help="AWCL: image list CSV (image, scan_id, coarse_tag, fine_tag)")
    p.add_argument("--pattern", help="file-name glob for --data folders, e.g. 't1.nii.gz'")
    p.add_argument("--contrasts", default="t1,t2", help="population contrasts to train on (default t1,t2)")
    p.add_argument("--pd-steps", type=int, default=300, help="patch-discrimination warm-up steps (default 300)")
    p.add_argument("--ld-steps", type=int, default=1200, help="region-discrimination steps (default 1200)")
    p.add_argument("--batch-size", type=int, default=2, help="image pairs per step (default 2)")
    p.add_argument("--crop", type=int, default=32, help="crop edge in voxels, a multiple of 16 (default 32)")
    p.add_argument("--spacing", type=float, default=2.0, help="training voxel size in mm (default 2)")
    p.add_argument("--grid", type=int, default=4,
                   help="patches per crop edge for patch discrimination; the crop must divide by it (default 4: 8-voxel patches)")
    p.add_argument("--clusters", type=int, default=16, help="number of clusters K (default 16, as the paper)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3, halved every --lr-halve-every)")
    p.add_argument("--lr-halve-every", type=int, default=500)
    p.add_argument("--no-paired-contrasts", action="store_true", help="do not pair co-registered contrasts as views")
    p.add_argument("--canonical-orientation", action="store_true",
                   help="small rotations and no flips in the shared augmentation (volumes in one anatomical orientation)")
    p.add_argument("--bias-field", type=float, default=0.0, metavar="STD",
                   help="LD: give each view its own smooth multiplicative intensity field exp(N(0, STD)) (our extension; default 0 = off)")
    p.add_argument("--cross-subject", type=int, default=0, metavar="K",
                   help="LD: register K other training subjects onto each (affine) and pair crops across them, so the "
                        "same anatomy in two heads is a positive pair (our extension; default 0 = off)")
    p.add_argument("--view-warp", type=float, default=0.0, metavar="VOXELS",
                   help="deform the second view by a smooth random displacement of about this many voxels, "
                        "undone on the features (our extension; default 0: off, as the paper)")
    p.add_argument("--view-shift", type=float, default=0.0, metavar="FRACTION",
                   help="LD: take the second view from a crop moved by up to this fraction of the crop size per axis, "
                        "so that a patch cannot be recognised by where it lies in the crop (our extension; "
                        "default 0: off, as the paper)")
    p.add_argument("--view-turn", type=float, default=0.0, metavar="DEG",
                   help="LD: turn the second view's crop by up to this many degrees in each plane, undone when "
                        "patches are paired (our extension; default 0: off)")
    p.add_argument("--view-zoom", type=float, default=0.0, metavar="FRACTION",
                   help="LD: zoom the second view's crop by a factor in 1 +- FRACTION (our extension; default 0: off)")
    p.add_argument("--pd-negatives", choices=("batch", "image"), default="batch",
                   help="LD: patch-discrimination negatives from the whole batch (default, as the paper) or from the "
                        "same image only, so that the same anatomy in another subject is never pushed away (our option)")
    p.add_argument("--view-blur", type=float, default=0.0, metavar="VOXELS",
                   help="LD: blur each view by a Gaussian of up to this many voxels per axis (our extension; default 0: off)")
    p.add_argument("--view-noise", type=float, default=0.0, metavar="STD",
                   help="LD: add Gaussian noise of up to this standard deviation (fraction of the intensity range) to "
                        "each view (our extension; default 0: off)")
    p.add_argument("--view-remap", type=float, default=0.0, metavar="P",
                   help="LD: with probability P pass each view through a random intensity transfer function, so that "
                        "the embedding does not depend on the contrast (our extension; default 0: off)")
    p.add_argument("--no-view-flip", action="store_true",
                   help="LD: do not flip the second view or turn it by quarter turns (the paper does, for images with no "
                        "canonical orientation; use with --canonical-orientation; our option)")
    p.add_argument("--region-consistency", type=float, default=0.0, metavar="WEIGHT",
                   help="LD stage: weight of a term asking the same place to fall in the same cluster in both views "
                        "(our option; needs --view-shift/--view-turn/--view-zoom; default 0: off, as the paper)")
    p.add_argument("--padding", choices=("zeros", "reflect", "replicate"), default="zeros",
                   help="LD: how the network's convolutions pad their input; zeros (default, as the paper) tell the "
                        "network where the crop's border is, reflect and replicate do not (our option)")
    p.add_argument("--dense-contrast", type=float, default=0.0, metavar="WEIGHT",
                   help="LD: weight of a voxel-level contrast between the two views (with paired contrasts, the T1 "
                        "and T2 voxel of one place agree and differ from the rest of the crop; our extension; default 0: off)")
    p.add_argument("--init", metavar="ENCODER",
                   help="LD: start from this cached 3D LD encoder (id or name) of the same architecture, "
                        "e.g. to continue the bundled default (default: fresh weights)")
    awcl = p.add_argument_group("AWCL (2D) and Alice (3D)")
    awcl.add_argument("--steps", type=int, default=1000, help="AWCL or Alice training steps (default 1000)")
    awcl.add_argument("--ratio", type=float, default=0.5, help="anatomy ratio r in [0, 1] (default 0.5; 0 = plain instance contrast)")
    awcl.add_argument("--granularity", choices=("coarse", "fine"), default="fine", help="anatomy tags that define positives (default fine)")
    awcl.add_argument("--backbone", default="resnet18", help="MONAI ResNet depth: resnet10, resnet18, resnet34, resnet50 (default resnet18)")
    awcl.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    alice = p.add_argument_group("Alice views and ablations")
    alice.add_argument("--views", choices=("same", "mined"), default="same",
                       help="Alice view pairs: overlapping crops of one volume (same, default) or crops of two volumes "
                            "matched by an anatomical encoder (mined, as the paper with SAM)")
    alice.add_argument("--matcher", metavar="ID",
                       help="with --views mined: the cached 3D encoder that matches anatomy across volumes (default: the default encoder)")
    alice.add_argument("--no-cafa", action="store_true", help="Alice ablation: no CAFA module (token loss on each view's own encoder tokens)")
    alice.add_argument("--no-generative", action="store_true", help="Alice ablation: no masked-reconstruction (generative) term")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--name", help="label of the cache entry")
    p.add_argument("--run-dir", help="checkpoint folder (default: derived from the settings and data, under the user cache)")
    p.add_argument("--progress", choices=("tqdm", "jsonl", "none"), default="tqdm",
                   help="progress display: a bar, JSON lines on stdout (for the Slicer module), or none")
    p.add_argument("--cancel-file", help="stop (with a checkpoint) when this file appears")
    p.add_argument("--restart", action="store_true",
                   help="discard the run folder's checkpoints and start over (default: continue the run there, "
                        "also with more steps; other settings are refused)")
    add_cache_option(p)
    p.set_defaults(run=run)
    return p


def _subjects(args: argparse.Namespace) -> list:
    if args.population:
        from ..data.population import load_population

        pop = load_population(args.population)
        wanted = [c.strip() for c in args.contrasts.split(",") if c.strip()]
        subjects = []
        for s in pop.subjects:
            have = [c for c in wanted if c in s.contrasts]
            if not have:
                raise InputError(f"{s.name}: none of the contrasts {wanted} (it has {list(s.contrasts)})")
            subjects.append([s.image(c) for c in have])
        return subjects
    from ..datasets import find_volumes

    return [str(p) for p in find_volumes(args.data, args.pattern)]


def _run_awcl(args: argparse.Namespace, progress, token) -> object:
    from ..engine import TrainingConfig, train
    from ..methods.awcl import AWCLTask
    from ..methods.awcl_data import read_tagged_images
    from ..pretraining import check_processes, default_run_dir

    if not args.images:
        raise InputError("AWCL pretraining needs --images CSV (a tagged 2D image list)")
    data = read_tagged_images(args.images, size=(args.size, args.size), with_labels=False)
    check_processes(len(data), "images")
    task = AWCLTask(data, ratio=args.ratio, granularity=args.granularity, backbone=args.backbone)
    batch = args.batch_size if args.batch_size != 2 else 32  # 2 is LD's pair default
    run_dir = args.run_dir or str(default_run_dir() / f"awcl-{data.fingerprint()[:12]}-r{args.ratio:g}-{args.granularity}-s{args.seed}")
    config = TrainingConfig(steps=args.steps, batch_size=batch, lr=args.lr, weight_decay=1e-6, optimizer="adam",
                            seed=args.seed, checkpoint_every=100, checkpoint_dir=run_dir, device=args.device,
                            resume=not args.restart)
    identity = {"method": "awcl", "data": data.fingerprint(), "ratio": args.ratio, "granularity": args.granularity,
                "backbone": args.backbone, "size": args.size, "batch_size": batch, "lr": args.lr, "seed": args.seed}
    return train(task, config, progress=progress, cancel=token, cache=cache_from_args(args), name=args.name,
                 identity=identity)


def _run_alice(args: argparse.Namespace, progress, token) -> object:
    """Alice on volumes: same-volume views (overlapping crops under strong augmentation), or views
    of two volumes mined by a cached encoder (:class:`~AnatSSLLib.methods.alice_matcher.EncoderMatcher`;
    note that our LD encoders do not yet match anatomy across subjects reliably: benchmarks/README.md).
    """
    from ..datasets import VolumeCrops
    from ..encoders import DEFAULT_INTENSITY
    from ..engine import TrainingConfig, train
    from ..methods.alice import AliceTask, reference_optimisation
    from ..pretraining import check_processes, default_run_dir

    if args.images:
        raise InputError("Alice pretraining takes volumes (--data or --population), not --images")
    if args.crop % 32:
        raise InputError(f"Alice needs a crop that is a multiple of 32 voxels, got --crop {args.crop}")
    spacing = (args.spacing,) * 3
    data = VolumeCrops(_subjects(args), spacing=spacing, crop_size=args.crop, intensity=DEFAULT_INTENSITY)
    volumes = [arr[0] for arr in data.subjects]  # first contrast of each subject
    check_processes(len(volumes), "volumes")
    matcher = None
    if args.views == "mined":
        from ..encoders import load_encoder
        from ..methods.alice_matcher import EncoderMatcher

        matcher = EncoderMatcher(load_encoder(args.matcher, cache=cache_from_args(args), device=args.device), volumes, spacing)
    elif args.matcher:
        raise InputError("--matcher is used only with --views mined")
    ablation = "".join(f", without {part}" for part, off in (("CAFA", args.no_cafa), ("the generative term", args.no_generative)) if off)
    manifest = {
        "spacing": list(spacing), "intensity": dict(DEFAULT_INTENSITY), "data_fingerprint": data.data_fingerprint,
        "description": f"3D Alice encoder: {args.steps} steps on {len(volumes)} volumes, "
                       + ("same-volume views, " if matcher is None else f"views mined by {matcher.encoder_id}, ")
                       + f"{args.crop}^3 crops at {args.spacing} mm{ablation}",
    }
    task = AliceTask(volumes, steps=args.steps, crop=args.crop, view_mode="same" if matcher is None else "mined",
                     matcher=matcher, body_threshold=0.1, use_cafa=not args.no_cafa, use_generative=not args.no_generative, manifest=manifest)
    variant = ("-mined" if matcher is not None else "") + ("-nocafa" if args.no_cafa else "") + ("-nogen" if args.no_generative else "")
    # "-cos": runs with the reference recipe below get their own folder; the engine refuses to resume a
    # checkpoint of the earlier constant-lr runs (other settings), which would otherwise stop the run.
    # No step count in the name: the same command with more --steps continues the run (the cosine
    # schedule, warm-up and teacher schedules then follow the longer run from the step resumed at).
    run_dir = args.run_dir or str(
        default_run_dir() / f"alice-{data.data_fingerprint[-12:]}-c{args.crop}-s{args.seed}{variant}-cos")
    config = TrainingConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, checkpoint_every=50,
                            checkpoint_dir=run_dir, device=args.device, resume=not args.restart,
                            **reference_optimisation(args.steps))  # fmt: skip
    identity = {"method": "alice", "data": data.data_fingerprint, "contrasts": args.contrasts, "crop": args.crop,
                "spacing": args.spacing, "views": args.views, "matcher": None if matcher is None else matcher.encoder_id,
                "no_cafa": args.no_cafa, "no_generative": args.no_generative, "batch_size": args.batch_size,
                "lr": args.lr, "seed": args.seed}
    return train(task, config, progress=progress, cancel=token, cache=cache_from_args(args), name=args.name,
                 identity=identity)


# LDPretrainSettings fields (and the identity keys of AWCL and Alice) -> the options that set them
_LD_OPTIONS = {
    "batch_size": "--batch-size", "crop_size": "--crop", "spacing_mm": "--spacing", "num_clusters": "--clusters",
    "paired_contrasts": "--no-paired-contrasts", "view_warp_vox": "--view-warp", "view_turn_deg": "--view-turn",
    "view_flip": "--no-view-flip", "padding_mode": "--padding", "cross_subject_neighbours": "--cross-subject",
    "bias_field_std": "--bias-field", "init_encoder": "--init", "no_cafa": "--no-cafa",
    "no_generative": "--no-generative", "embedding_dim": "embedding_dim (no option)",
    "features": "features (no option)", "stage": "stage", "method": "--method",
}


def _option_names(args: argparse.Namespace) -> dict[str, str]:
    """Names of the settings in a checkpoint mismatch, as the options of this command."""
    from ..pretraining import LDPretrainSettings

    data = "--images" if args.images else "--population" if args.population else "--data"
    names = {"data": f"{data} (the training data differ)", "pd_steps": "--pd-steps", "ld_steps": "--ld-steps",
             "steps": "--steps" if args.method != "ld" else "steps"}
    fields = [f.name for f in dataclasses.fields(LDPretrainSettings)] + ["ratio", "granularity", "backbone", "size",
                                                                          "contrasts", "crop", "views", "matcher"]
    for name in fields:
        names.setdefault(name, _LD_OPTIONS.get(name, "--" + name.replace("_", "-")))
    names.update({k: v for k, v in _LD_OPTIONS.items() if k not in names})
    return names


def run(args: argparse.Namespace) -> int:
    from ..engine import CancelToken, CheckpointMismatch, distributed
    from ..pretraining import LDPretrainSettings, pretrain_ld
    from ..progress import make_progress

    settings = LDPretrainSettings(
        pd_steps=args.pd_steps, ld_steps=args.ld_steps, batch_size=args.batch_size, crop_size=args.crop,
        spacing_mm=args.spacing, grid=args.grid, num_clusters=args.clusters, lr=args.lr, lr_halve_every=args.lr_halve_every,
        paired_contrasts=not args.no_paired_contrasts, canonical_orientation=args.canonical_orientation,
        view_warp_vox=args.view_warp, view_shift=args.view_shift,
        view_turn_deg=args.view_turn, view_zoom=args.view_zoom, pd_negatives=args.pd_negatives,
        view_blur=args.view_blur, view_noise=args.view_noise, view_remap=args.view_remap, view_flip=not args.no_view_flip, region_consistency=args.region_consistency,
        padding_mode=args.padding, cross_subject_neighbours=args.cross_subject,
        bias_field_std=args.bias_field, dense_contrast=args.dense_contrast, init_encoder=args.init,
        seed=args.seed, device=args.device,
    )
    sinks: dict = {}

    def progress(event: dict) -> None:
        stage = event.get("stage", "")
        if stage not in sinks:
            sinks[stage] = make_progress(args.progress, desc=f"{args.method} {stage}".strip())
        if sinks[stage] is not None:
            sinks[stage](event)

    if (args.no_cafa or args.no_generative or args.views != "same" or args.matcher) and args.method != "alice":
        raise InputError("--views, --matcher, --no-cafa and --no-generative are Alice options; use them with --method alice")
    ld_only = (args.cross_subject, args.bias_field, args.view_warp, args.view_shift, args.view_turn, args.view_zoom,
               args.pd_negatives != "batch", args.view_blur, args.view_noise, args.view_remap, args.no_view_flip, args.region_consistency,
               args.padding != "zeros", args.dense_contrast, args.init)
    if any(ld_only) and args.method != "ld":
        raise InputError("--cross-subject, --bias-field, --pd-negatives, --padding, --dense-contrast, --init and the --view-* "
                         "options are LD options; "
                         "use them with --method ld")
    token = CancelToken(args.cancel_file)
    # One process group for the whole run (LD's two stages); a bad --device fails here on every rank.
    with distributed(args.device) as dist_info, token.handle_signals():
        try:
            if args.method == "awcl":
                result = _run_awcl(args, progress, token)
            elif args.method == "alice":
                result = _run_alice(args, progress, token)
            else:
                if args.images:
                    raise InputError("LD pretraining takes volumes (--data or --population), not --images")
                result = pretrain_ld(_subjects(args), settings, cache=cache_from_args(args), name=args.name,
                                     run_dir=args.run_dir, progress=progress, cancel=token, restart=args.restart)
        except CheckpointMismatch as exc:
            raise InputError(exc.describe(_option_names(args), restart="add --restart")) from None
    if not dist_info.is_main:  # rank 0 prints the summary
        return 3 if result.cancelled else 0
    summary = {
        "encoder_id": result.encoder_id, "cancelled": result.cancelled, "steps": result.steps_done,
        "final_loss": result.final_loss, "seconds": round(result.seconds + result.metrics.get("pd_seconds", 0.0), 1),
        "samples_per_second": round(result.samples_per_second, 3), "peak_memory_mb": round(result.peak_memory_bytes / 2**20, 1),
        "checkpoint": result.checkpoint,
    }
    if args.progress == "jsonl":
        print(json.dumps({"event": "summary", **summary}), flush=True)
    else:
        print(json.dumps(summary, indent=1))
    if result.cancelled:
        print("pretraining cancelled; run the same command again to resume", file=sys.stderr)
        return 3
    return 0
