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
        description="Query an embedding index by a point (or many), a label mask or a whole volume. "
                    "Coordinates may be negative: --point -0.3,2.8,-4.9 (or --point=-0.3,2.8,-4.9).",
    )
    p.add_argument("--index", required=True, metavar="DIR", help="index folder (anatssl index build)")
    p.add_argument("--image", required=True, metavar="IMG", help="the query volume")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--point", type=parse_point, metavar="X,Y,Z", help="query point in mm (frame: --frame)")
    what.add_argument("--points", metavar="FILE",
                      help="many query points in one run: markups (.mrk.json, .fcsv) or CSV (label,x,y,z; frame from the "
                           "file, LPS when it names none); the index and the query volume load once")
    what.add_argument("--mask", metavar="LAB", help="label map on the query volume; voxels > 0 are the region")
    what.add_argument("--volume", action="store_true", help="rank whole volumes")
    p.add_argument("--frame", choices=("LPS", "RAS"), default="LPS", help="frame of --point and of the printed positions (default LPS)")
    p.add_argument("-k", type=int, default=10, help="number of answers per query (default 10)")
    p.add_argument("--all-per-volume", action="store_true", help="allow several answers per volume")
    p.add_argument("--index-only", action="store_true",
                   help="answer with the index entries themselves (no local step between them)")
    p.add_argument("--refine", action="store_true", help="place each point hit with the landmark tool (dense correspondence from the query volume; the first query per volume takes seconds)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_encoder_options(p)
    p.set_defaults(run=run)
    return p


def _row(rank: int, hit, frame: str, lps_to_ras) -> dict:
    def out(pos):
        if pos is None:
            return None
        pos = lps_to_ras(pos) if frame == "RAS" else pos
        return [round(float(v), 2) for v in pos]

    row = {"rank": rank, "volume": hit.volume, "score": round(hit.score, 4), "position_mm": out(hit.position),
           "frame": frame, "path": hit.path}
    if hit.similarity is not None:
        row["similarity"] = round(hit.similarity, 4)
    if hit.canonical_distance_mm is not None:
        row["canonical_distance_mm"] = round(hit.canonical_distance_mm, 2)
    return row


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..embedding import EmbeddingStore
    from ..image import lps_to_ras, ras_to_lps, read_image
    from ..index import EmbeddingIndex
    from ..points import read_points
    from ..tools.search import EmbeddingSearch

    if args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    index = EmbeddingIndex.open(args.index)
    if args.encoder is None:
        args.encoder = index.encoder_id
    encoder = encoder_from_args(args)
    search = EmbeddingSearch(EmbeddingStore(encoder, whiten=False), **index.settings)
    image = read_image(args.image)
    one = not args.all_per_volume
    step = False if args.index_only else None
    queries = None  # [(label, hits)] for point queries
    if args.point is not None or args.points is not None:
        if args.points is not None:
            points = read_points(args.points)
            if len(points) == 0:
                raise InputError(f"{args.points}: no points in the file")
            labels, lps = list(points.labels), np.asarray(points.positions, float)
        else:
            point = np.asarray(args.point, float)
            labels, lps = ["point"], (ras_to_lps(point) if args.frame == "RAS" else point)[None]
        found = search.search_points(index, image, lps, k=args.k, one_per_volume=one, refine=args.refine, local_step=step)
        queries = list(zip(labels, lps, found))
        hits = found[0]
    elif args.mask is not None:
        hits = search.search_mask(index, image, read_image(args.mask), k=args.k, one_per_volume=one)
    else:
        hits = search.search_volume(index, image, k=args.k)
    if queries is None or args.point is not None:
        if not hits:
            raise InputError("no answer: the index holds no other volume" + (
                "" if queries is None else " with anatomy near the query point's place"))
        rows = [_row(rank, h, args.frame, lps_to_ras) for rank, h in enumerate(hits, 1)]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for r in rows:
                where = "" if r["position_mm"] is None else " at " + ",".join(f"{v:.1f}" for v in r["position_mm"]) + f" mm {args.frame}"
                print(f"{r['rank']:>3}  {r['score']:.3f}  {r['volume']}{where}")
        return 0
    rows = []
    for label, lps, hits in queries:
        query_pos = lps_to_ras(lps) if args.frame == "RAS" else lps
        for rank, h in enumerate(hits, 1):
            rows.append({"query": label, "query_mm": [round(float(v), 2) for v in query_pos],
                         **_row(rank, h, args.frame, lps_to_ras)})
        if not hits and not args.json:
            print(f"{label}: no answer (no indexed volume has anatomy near this place)")
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            where = ",".join(f"{v:.1f}" for v in r["position_mm"])
            print(f"{r['query']}  {r['rank']:>3}  {r['score']:.3f}  {r['volume']} at {where} mm {args.frame}")
    return 0
