"""``anatssl cache``: list, show, remove, export and import cached encoders.

Also the helpers every verb that uses an encoder shares: ``add_cache_option(parser)`` adds
``--cache-dir DIR`` and ``cache_from_args(args)`` builds the ``EncoderCache`` it names.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from ..cache import EXPORT_SUFFIX, EncoderCache
from ..errors import CacheError, InputError

__all__ = ["add_parser", "run", "add_cache_option", "cache_from_args"]

_CACHE_HELP = (
    "encoder cache folder (default: $ANATSSL_CACHE, else the user cache folder, "
    "e.g. ~/.cache/anatssl/encoders)"
)


def add_cache_option(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """Add ``--cache-dir DIR`` to ``parser`` (dest ``cache_dir``).

    ``inherited=True`` is for a sub-sub-command whose parent already has the option: the value is
    then only set when given, so ``anatssl cache --cache-dir X list`` and
    ``anatssl cache list --cache-dir X`` both work.
    """
    parser.add_argument(
        "--cache-dir",
        dest="cache_dir",
        metavar="DIR",
        default=argparse.SUPPRESS if inherited else None,
        help=_CACHE_HELP,
    )


def cache_from_args(args: argparse.Namespace) -> EncoderCache:
    """The ``EncoderCache`` named by ``args.cache_dir`` (default cache when absent or None)."""
    return EncoderCache(getattr(args, "cache_dir", None))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache",
        help="list, show, remove, export and import cached encoders",
        description=(
            "Manage the encoder cache: one folder per encoder, named by a content id, with a "
            "manifest and safetensors weights checked on every load. Bundled encoders are read-only."
        ),
    )
    add_cache_option(p)
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    q = sub.add_parser("list", help="table of cached and bundled encoders")
    add_cache_option(q, inherited=True)

    q = sub.add_parser("show", help="print an encoder's manifest as JSON")
    q.add_argument("encoder", metavar="ID", help="encoder id, unique id prefix or name")
    q.add_argument("--verify", action="store_true", help="also check the weights' sha256")
    add_cache_option(q, inherited=True)

    q = sub.add_parser("rm", help="remove an encoder from the user cache")
    q.add_argument("encoder", metavar="ID", help="encoder id, unique id prefix or name")
    q.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_cache_option(q, inherited=True)

    q = sub.add_parser("export", help=f"write an encoder to one file (*{EXPORT_SUFFIX})")
    q.add_argument("encoder", metavar="ID", help="encoder id, unique id prefix or name")
    q.add_argument("file", metavar="FILE", help=f"output file (or folder: ID{EXPORT_SUFFIX} inside)")
    add_cache_option(q, inherited=True)

    q = sub.add_parser("import", help="add an exported encoder file to the user cache")
    q.add_argument("file", metavar="FILE", help=f"a file written by `anatssl cache export` (*{EXPORT_SUFFIX})")
    add_cache_option(q, inherited=True)

    p.set_defaults(run=run)
    return p


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _list(cache: EncoderCache) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = cache.list()
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    try:
        default = cache.default_encoder_id()
    except CacheError as exc:
        print(f"warning: {exc}", file=sys.stderr)
        default = None
    if not entries:
        print(f"no encoders in {cache.root} (nor bundled)")
        return 0
    rows = [["id", "method", "arch", "dims", "dim", "created", "origin"]]
    for eid, m, origin in entries:
        rows.append([
            eid, m.method, m.architecture, f"{m.spatial_dims}D", str(m.embedding_dim),
            m.created, origin + (", default" if eid == default else ""),
        ])
    print(_table(rows))
    print(f"\n{len(entries)} encoder(s); user cache: {cache.root}")
    return 0


def _confirm(prompt: str) -> bool:
    try:
        answer = input(prompt)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def run(args: argparse.Namespace) -> int:
    cache = cache_from_args(args)
    action = args.cache_command
    if action == "list":
        return _list(cache)
    if action == "show":
        eid = cache.verify(args.encoder) if args.verify else cache.resolve(args.encoder)
        manifest = cache.manifest(eid)
        print(json.dumps(manifest.to_dict(), indent=2, sort_keys=True))
        if args.verify:
            print(f"{eid}: weights sha256 verified", file=sys.stderr)
        return 0
    if action == "rm":
        eid = cache.resolve(args.encoder)
        if cache.origin(eid) != "user":
            cache.remove(eid)  # raises the read-only error
        if not args.yes:
            if not sys.stdin.isatty():
                raise InputError(f"rm {eid}: refusing to remove without confirmation; pass --yes")
            if not _confirm(f"Remove encoder {eid} ({cache.path(eid)})? [y/N] "):
                print("not removed")
                return 1
        cache.remove(eid)
        print(f"removed {eid}")
        return 0
    if action == "export":
        eid = cache.resolve(args.encoder)
        out = cache.export(eid, args.file)
        print(f"exported {eid} to {out} ({out.stat().st_size / 2**20:.1f} MB)")
        return 0
    if action == "import":
        eid = cache.import_(args.file)
        print(eid)
        return 0
    raise InputError(f"cache: unknown action {action!r}; expected list, show, rm, export or import")
