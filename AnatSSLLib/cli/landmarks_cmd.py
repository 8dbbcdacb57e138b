"""``anatssl landmarks``: find the reference volume's labelled points in target volumes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ._common import add_encoder_options, encoder_from_args, output_stems

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "landmarks",
        help="one-shot landmark localisation: propagate labelled points to other volumes",
        description=(
            "Centre-sensitive embedding matching (LD). Writes one Slicer markups file per target, "
            "<target name>.mrk.json, with the reference labels and a confidence per point."
        ),
    )
    p.add_argument("--reference", required=True, metavar="IMG", help="volume the points were placed on")
    p.add_argument("--points", required=True, metavar="MARKUPS", help=".mrk.json, .fcsv or .csv points on the reference")
    p.add_argument("--targets", required=True, nargs="+", metavar="IMG", help="volumes to find the points in")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--sigmas", default="8,4,2", help="centre-weighting widths in mm, coarse to fine (default 8,4,2)")
    p.add_argument("--search-radius", type=float, default=12.0, help="how far a finer scale may move (mm, default 12)")
    p.add_argument("--initial-alignment", choices=("embedding", "registration"), default=None,
                   help="where matching starts: the embedding's own global affine (default), or a mutual-information "
                        "affine registration (for targets of another contrast than the reference; the default "
                        "with --match-contrast)")
    p.add_argument("--match-contrast", action="store_true",
                   help="targets of another contrast than the reference (e.g. T1 points, T2 targets): map each target's "
                        "intensities into the reference's contrast (joint histogram under a mutual-information affine) "
                        "before matching; matching then starts from that affine")
    p.add_argument("--no-whiten", action="store_true",
                   help="match the raw embedding instead of each volume's whitened one (ablation)")
    p.add_argument("--min-confidence", type=float, default=0.0, help="report points below this confidence as uncertain")
    add_encoder_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..embedding import EmbeddingStore
    from ..image import read_image
    from ..points import read_points, write_points
    from ..tools.landmarks import LandmarkLocator

    try:
        sigmas = tuple(float(s) for s in args.sigmas.split(","))
    except ValueError:
        raise InputError(f"--sigmas: expected comma-separated mm values, got {args.sigmas!r}") from None
    encoder = encoder_from_args(args)
    if encoder.spatial_dims != 3:
        raise InputError(f"encoder {encoder.encoder_id} is {encoder.spatial_dims}D; landmarks need a 3D encoder")
    reference = read_image(args.reference)
    points = read_points(args.points)
    stems = output_stems(args.targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alignment = args.initial_alignment or ("registration" if args.match_contrast else "embedding")
    locator = LandmarkLocator(EmbeddingStore(encoder, whiten=not args.no_whiten), sigmas_mm=sigmas, search_radius_mm=args.search_radius,
                              initial_alignment=alignment, match_contrast=args.match_contrast)
    for path, stem in tqdm(list(zip(args.targets, stems)), desc="landmarks", unit="target"):
        target = read_image(path)
        found = locator.locate(reference, points, [target])[0]
        write_points(found, out / f"{stem}.mrk.json")
        low = [lab for lab, c in zip(found.labels, found.confidence) if c < args.min_confidence]
        note = f"; uncertain: {', '.join(low)}" if low else ""
        print(f"{stem}: {len(found)} points, median confidence {sorted(found.confidence)[len(found) // 2]:.3f}{note}")
    return 0
