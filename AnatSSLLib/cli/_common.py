"""Options and helpers shared by the verbs that run an encoder."""

from __future__ import annotations

import argparse

from .cache_cmd import add_cache_option, cache_from_args

__all__ = [
    "add_contrast_option",
    "add_encoder_options",
    "encoder_from_args",
    "output_stem",
    "output_stems",
    "parse_point",
    "read_checked_volumes",
]


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


def add_contrast_option(parser: argparse.ArgumentParser) -> None:
    """``--contrast auto|same|match`` (the tools' per-target contrast handling)."""
    from ..contrast import CONTRAST_CHOICES

    parser.add_argument(
        "--contrast", choices=CONTRAST_CHOICES, default="auto",
        help="how each target's contrast is handled: auto (default: decided per target from its intensities against "
             "the reference's; a target of another contrast, e.g. T2, PD or FLAIR from a T1 reference, is mapped into "
             "the reference's contrast before matching), same (never map), match (always map). The decision is printed "
             "and stored with each output",
    )


def _strip_suffix(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_stem(path: str, with_parent: bool = False) -> str:
    """A file-name stem for the outputs of one input volume: its name without the extension, or
    ``<parent folder>_<name>`` with ``with_parent`` (``sub-003/t2.nii.gz`` -> ``sub-003_t2``)."""
    from pathlib import Path

    p = Path(path)
    name = _strip_suffix(p.name)
    return f"{p.parent.name}_{name}" if with_parent and p.parent.name else name


def output_stems(paths) -> list[str]:
    """:func:`output_stem` of each target: its own name, with the parent folder's in front only for
    targets whose names collide (subjects of a population keep one file name per contrast in
    their own folders); two targets that still collide are refused."""
    from collections import Counter

    from ..errors import InputError

    names = [output_stem(p) for p in paths]
    count = Counter(names)
    stems = [output_stem(p, with_parent=True) if count[n] > 1 else n for p, n in zip(paths, names)]
    if len(set(stems)) != len(stems):
        raise InputError("two targets would write the same output file; give targets with distinct names")
    return stems


def read_checked_volumes(paths, what: str = "target"):
    """Read every volume and check it (3D, finite, not empty, not constant) before any heavy work,
    so that a bad tenth target fails in seconds; returns the images in order."""
    from ..image import check_volume, read_image

    images = []
    for path in paths:
        image = read_image(path)
        check_volume(image, ndim=3, name=f"{what} {path}")
        images.append(image)
    return images


class CoordinateFriendlyParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reads ``-0.3,2.8,-4.9`` as a value, not as an option: argparse
    takes any word starting with ``-`` for an option unless it looks like one negative number, and
    half of all coordinates start with a minus."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        import re

        self._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?(,-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)+$")
