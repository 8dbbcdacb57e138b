"""Options and helpers shared by the verbs that run an encoder."""

from __future__ import annotations

import argparse

from .cache_cmd import add_cache_option, cache_from_args

__all__ = ["COORDINATE_OPTIONS", "add_encoder_options", "encoder_from_args", "join_negative_values", "output_stem",
           "output_stems", "parse_point"]

#: Options whose value is a coordinate list such as ``-0.3,2.8,-4.9``: argparse would read a value
#: that starts with a minus as another option, so :func:`join_negative_values` writes them ``--point=...``.
COORDINATE_OPTIONS = ("--point",)


def add_encoder_options(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--encoder ID``, ``--device`` and ``--cache-dir``."""
    parser.add_argument(
        "--encoder", metavar="ID", required=required,
        help="cached encoder id, unique prefix or name" + ("" if required else " (default: the bundled default encoder)"),
    )
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda or cuda:N (default: auto)")
    add_cache_option(parser)


def encoder_from_args(args: argparse.Namespace):
    """The :class:`~AnatSSLLib.encoders.LoadedEncoder` the options name."""
    from ..encoders import load_encoder

    return load_encoder(args.encoder, cache=cache_from_args(args), device=args.device)


def parse_point(text: str) -> tuple[float, float, float]:
    """``"x,y,z"`` (mm) -> a tuple; argparse type."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected a point as X,Y,Z in mm, got {text!r}")
    return values


def join_negative_values(argv: list[str], options=COORDINATE_OPTIONS) -> list[str]:
    """``[..., "--point", "-0.3,2.8,-4.9", ...]`` -> ``[..., "--point=-0.3,2.8,-4.9", ...]``.

    argparse takes a token starting with ``-`` for an option unless it looks like one negative
    number, so a coordinate list with a negative first value would be refused ("expected one
    argument"). Only a value that starts with a minus and a digit or a point is joined.
    """
    import re

    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in options and i + 1 < len(argv) and re.match(r"^-[0-9.]", argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def output_stem(path: str) -> str:
    """A file-name stem for the outputs of one input volume: ``<parent folder>_<name without extension>``.

    Subjects of a population keep one file name per contrast in their own folders
    (``sub-003/t2.nii.gz`` -> ``sub-003_t2``), so the parent folder keeps outputs apart.
    """
    from pathlib import Path

    p = Path(path)
    name = p.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return f"{p.parent.name}_{name}" if p.parent.name else name


def output_stems(paths) -> list[str]:
    """:func:`output_stem` of each target, refusing two targets that would write the same output file."""
    from ..errors import InputError

    stems = [output_stem(p) for p in paths]
    if len(set(stems)) != len(stems):
        raise InputError("two targets would write the same output file; give targets with distinct names")
    return stems
