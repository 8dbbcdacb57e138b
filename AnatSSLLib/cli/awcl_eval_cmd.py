"""``anatssl awcl-eval``: linear probe, fine-tuning and 2D segmentation with an AWCL encoder."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..tools.awcl_eval import add_eval_arguments

    p = subparsers.add_parser(
        "awcl-eval",
        help="evaluate a 2D AWCL encoder: linear probe, fine-tuned classification, segmentation",
        description="Downstream evaluation of an AWCL encoder on a tagged image CSV (anatssl data planes, or your own).",
    )
    add_eval_arguments(p)
    return p
