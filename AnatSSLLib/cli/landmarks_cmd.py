"""``anatssl landmarks``: find the reference volume's labelled points in target volumes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ._common import add_contrast_option, add_encoder_options, encoder_from_args, output_stems, read_checked_volumes

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "landmarks",
        help="one-shot landmark localisation: propagate labelled points to other volumes",
        description=(
            "Dense embedding correspondence (LD's centre-weighted embeddings, matched globally then locally). "
            "Writes one Slicer markups file per target, <target name>.mrk.json (<parent folder>_<target name>.mrk.json "
            "where two targets share a name), with the reference labels, a confidence per point and the target's "
            "contrast decision in each point's description. Points are read and written in LPS mm (the file's frame)."
        ),
    )
    p.add_argument("--reference", required=True, metavar="IMG", help="volume the points were placed on")
    p.add_argument("--points", required=True, metavar="MARKUPS", help=".mrk.json, .fcsv or .csv points on the reference")
    p.add_argument("--targets", required=True, nargs="+", metavar="IMG", help="volumes to find the points in")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_contrast_option(p)
    p.add_argument("--min-confidence", type=float, default=0.0, help="report points below this confidence as uncertain")
    add_encoder_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..contrast import check_contrast_pair
    from ..image import check_volume, read_image
    from ..points import read_points, write_points
    from ..tools.landmarks import LandmarkLocator

    # every input is checked before the first heavy step
    reference = check_volume(read_image(args.reference), ndim=3, name=f"reference {args.reference}")
    points = read_points(args.points)
    if len(points) == 0:
        raise InputError(f"{args.points}: no points; place at least one landmark on the reference")
    outside = [lab for lab, ok in zip(points.labels, reference.contains(points.positions)) if not ok]
    if outside:
        raise InputError(f"{args.points}: points outside the reference {args.reference}: {', '.join(outside)}")
    stems = output_stems(args.targets)
    targets = read_checked_volumes(args.targets)
    for target in targets:
        check_contrast_pair(reference, target, args.contrast)
    encoder = encoder_from_args(args)
    if encoder.spatial_dims != 3:
        raise InputError(f"encoder {encoder.encoder_id} is {encoder.spatial_dims}D; landmarks need a 3D encoder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    locator = LandmarkLocator.for_encoder(encoder, contrast=args.contrast)
    for target, stem in tqdm(list(zip(targets, stems)), desc="landmarks", unit="target"):
        found = locator.locate(reference, points, [target])[0]
        write_points(found, out / f"{stem}.mrk.json")
        low = [lab for lab, c in zip(found.labels, found.confidence) if c < args.min_confidence]
        note = f"; uncertain: {', '.join(low)}" if low else ""
        decision = locator.last_decisions[0]
        print(f"{stem}: {len(found)} points, median confidence {sorted(found.confidence)[len(found) // 2]:.3f}, "
              f"{decision.describe()}{note}")
    return 0
