"""``anatssl search``: places (or volumes) in an index that look like a point, region or volume."""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from ._common import add_encoder_options, encoder_from_args, parse_point

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="find similar places across indexed volumes",
        description="Query an embedding index by a point, a label mask or a whole volume.",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="index folder (anatssl index build)")
    p.add_argument("--image", required=True, metavar="IMG", help="the query volume")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--point", type=parse_point, metavar="X,Y,Z", help="query point in mm (frame: --frame)")
    what.add_argument("--mask", metavar="LAB", help="label map on the query volume; voxels > 0 are the region")
    what.add_argument("--volume", action="store_true", help="rank whole volumes")
    p.add_argument("--frame", choices=("LPS", "RAS"), default="LPS", help="frame of --point and of the printed positions (default LPS)")
    p.add_argument("-k", type=int, default=10, help="number of answers (default 10)")
    p.add_argument("--all-per-volume", action="store_true", help="allow several answers per volume")
    p.add_argument("--refine", action="store_true", help="place each point hit with the landmark tool (dense correspondence from the query volume; the first query per volume takes seconds)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_encoder_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..embedding import EmbeddingStore
    from ..image import lps_to_ras, ras_to_lps, read_image
    from ..index import EmbeddingIndex
    from ..tools.search import EmbeddingSearch

    index = EmbeddingIndex.open(args.index)
    if args.encoder is None:
        args.encoder = index.encoder_id
    encoder = encoder_from_args(args)
    search = EmbeddingSearch(EmbeddingStore(encoder, whiten=False), **index.settings)
    image = read_image(args.image)
    if args.point is not None:
        point = np.asarray(args.point, float)
        point = ras_to_lps(point) if args.frame == "RAS" else point
        hits = search.search_point(index, image, point, k=args.k, one_per_volume=not args.all_per_volume, refine=args.refine)
    elif args.mask is not None:
        hits = search.search_mask(index, image, read_image(args.mask), k=args.k, one_per_volume=not args.all_per_volume)
    else:
        hits = search.search_volume(index, image, k=args.k)
    if not hits:
        raise InputError("no answer: the index holds no other volume")
    rows = []
    for rank, h in enumerate(hits, 1):
        pos = None if h.position is None else (lps_to_ras(h.position) if args.frame == "RAS" else h.position)
        rows.append({"rank": rank, "volume": h.volume, "score": round(h.score, 4),
                     "position_mm": None if pos is None else [round(float(v), 2) for v in pos], "frame": args.frame,
                     "path": h.path})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            where = "" if r["position_mm"] is None else " at " + ",".join(f"{v:.1f}" for v in r["position_mm"]) + f" mm {args.frame}"
            print(f"{r['rank']:>3}  {r['score']:.3f}  {r['volume']}{where}")
    return 0
