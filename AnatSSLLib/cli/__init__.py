"""The ``anatssl`` command line.

Each verb lives in its own module of this package, which defines ``add_parser(subparsers)`` and
``run(args) -> int``. Errors the user caused (:class:`AnatSSLLib.errors.AnatSSLError`) print one
line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from .. import __version__
from ..errors import AnatSSLError

# Verb modules, in the order `anatssl --help` lists them.
_COMMANDS = ("demo", "pretrain", "finetune", "landmarks", "segment", "index", "search", "awcl_eval", "data", "bench", "cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anatssl",
        description="Anatomy-aware self-supervised encoders and the tools built on them.",
    )
    parser.add_argument("--version", action="version", version=f"anatssl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        module_name = f"{__name__}.{name}_cmd"
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._common import join_negative_values

    parser = build_parser()
    args = parser.parse_args(join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        return int(args.run(args) or 0)
    except AnatSSLError as exc:
        print(f"anatssl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"anatssl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
