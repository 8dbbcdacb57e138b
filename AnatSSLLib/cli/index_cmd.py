"""``anatssl index build|add|rm|info``: the on-disk embedding index of many volumes."""

from __future__ import annotations

import argparse
import json

from ._common import add_encoder_options, encoder_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "index",
        help="build and maintain an embedding index of many volumes",
        description="An index of region and volume embeddings of many volumes, for `anatssl search`.",
    )
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    for name, text in (("build", "create an index from volumes (files or folders)"),
                       ("add", "add volumes to an existing index")):
        q = sub.add_parser(name, help=text)
        q.add_argument("--index", required=True, metavar="DIR", help="index folder")
        q.add_argument("volumes", nargs="+", metavar="VOLUME", help="volume files or folders")
        q.add_argument("--pattern", help="file-name glob when a folder is given (e.g. 't1.nii.gz')")
        add_encoder_options(q)
        if name == "build":
            q.add_argument("--grid-mm", type=float, default=4.0, help="distance between region entries (mm, default 4)")
            q.add_argument("--sigma-mm", type=float, default=4.0, help="width of the centre-weighted average (mm, default 4)")
            q.add_argument("--canonical", choices=("dense", "affine", "none"), default="dense",
                           help="each entry's position in the frame of the first volume (the reference), through the "
                                "dense embedding correspondence (default), only its affine part, or none (rank by the "
                                "vector alone); matching each volume to the reference takes seconds")
            q.add_argument("--position-sigma-mm", type=float, default=6.0,
                           help="width of the ranking's Gaussian position term (mm, default 6)")
            q.add_argument("--radius-mm", type=float, default=8.0,
                           help="a point query ranks the entries whose canonical position is this close to its own (mm, default 8)")
            q.add_argument("--kind", choices=("auto", "exact", "hnsw"), default="auto",
                           help="exact search, HNSW, or auto: exact below --threshold entries (default auto)")
            q.add_argument("--threshold", type=int, default=200_000, help="entries above which auto switches to HNSW")
    q = sub.add_parser("rm", help="remove a volume from the index")
    q.add_argument("--index", required=True, metavar="DIR")
    q.add_argument("volume", help="volume name as `anatssl index info` lists it")
    q = sub.add_parser("info", help="summary of an index")
    q.add_argument("--index", required=True, metavar="DIR")
    q.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..datasets import find_volumes
    from ..embedding import EmbeddingStore
    from ..index import EmbeddingIndex
    from ..tools.search import EmbeddingSearch

    if args.index_command in ("build", "add"):
        if args.index_command == "add" and args.encoder is None:
            args.encoder = EmbeddingIndex.open(args.index).encoder_id  # the index's own encoder
        encoder = encoder_from_args(args)
        # the reference volume stays embedded (every volume is matched to it), plus the one being added
        store = EmbeddingStore(encoder, max_volumes=3, whiten=False)  # the index holds raw embeddings
        if args.index_command == "build":
            search = EmbeddingSearch(store, grid_mm=args.grid_mm, sigma_mm=args.sigma_mm, canonical=args.canonical,
                                     position_sigma_mm=args.position_sigma_mm, radius_mm=args.radius_mm)
            index = EmbeddingIndex.create(args.index, encoder.encoder_id, int(encoder.manifest.embedding_dim),
                                          kind=args.kind, approximate_threshold=args.threshold, settings=search.settings)
        else:
            index = EmbeddingIndex.open(args.index)
            search = EmbeddingSearch(store, **index.settings)
            search.check_index(index)
        paths = find_volumes(args.volumes, args.pattern)
        bar = tqdm(total=len(paths), desc=f"index {args.index_command}", unit="volume")
        for path in paths:
            search.add(index, [path])
            bar.update(1)
        bar.close()
        index.save(args.index)
        ranking = (f"ranked by similarity and canonical position (reference {index.reference_name})" if index.has_canonical
                   else f"ranked by similarity ({index.effective_kind})")
        print(f"{args.index}: {len(index.volumes)} volumes, {len(index)} region entries, {ranking}")
        return 0
    index = EmbeddingIndex.open(args.index)
    if args.index_command == "rm":
        index.remove_volume(args.volume)
        index.save(args.index)
        print(f"removed {args.volume}; {len(index.volumes)} volumes left")
        return 0
    info = {
        "encoder_id": index.encoder_id, "dim": index.dim, "kind": index.effective_kind, "entries": len(index),
        "settings": index.settings, "volumes": [v.name for v in index.volumes],
        "canonical": index.has_canonical, "reference": index.reference_name,
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"encoder {info['encoder_id']}, {info['dim']}-d, {info['kind']} search, {info['entries']} region entries")
        for v in index.volumes:
            print(f"  {v.name}  ({v.n_regions} regions)  {v.path}")
    if not index.volumes:
        print("  (empty: add volumes with `anatssl index add`)")
    return 0
