"""``anatssl data``: the real template with expert landmarks, and simulated populations grown from it.

- ``anatssl data synth --n N --contrasts t1,t2,ct --seed S --res MM --out DIR [--force]``: write a
  *simulated* population (random affine + diffeomorphic warps of the MNI152 2009c template; see
  :mod:`AnatSSLLib.data.synth`).
- ``anatssl data template --res MM --out DIR [--contrasts ...] [--force]``: export the template
  (T1w, T2w, optional synthetic contrasts, labels, both AFIDs placements).
- ``anatssl data planes``: a tagged 2D plane set for AWCL (:mod:`AnatSSLLib.data.planes`).
- ``anatssl data info``: which data packages are installed, and how to install the missing ones.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import tempfile

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from ..data.synth import CONTRASTS

    p = subparsers.add_parser(
        "data",
        help="export the real template with expert landmarks; synthesise a simulated population",
        description=(
            "Real anatomy with expert landmarks (MNI152 2009c T1w/T2w + 32 AFIDs, from pip data wheels) "
            "and simulated populations grown from it with exact landmark ground truth."
        ),
    )
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    s = sub.add_parser(
        "synth",
        help="write a simulated population (random affine + diffeomorphic warps of the template)",
        description=(
            "Write N simulated subjects: the MNI152 2009c template under a random affine and a random "
            "diffeomorphic deformation, with bias field, noise, a new (often anisotropic) grid and a cropped "
            "field of view; contrasts are the warped real T1w/T2w and label-driven CT/PD/FLAIR-like images. "
            "Each subject gets its label map and the 32 AFIDs mapped exactly, all in LPS physical space. "
            "The subjects are simulated, not real people."
        ),
    )
    s.add_argument("--n", type=int, required=True, help="number of subjects (>= 1)")
    s.add_argument("--contrasts", default="t1,t2", help=f"comma-separated, from {','.join(CONTRASTS)} (default t1,t2)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)")
    s.add_argument("--res", type=float, default=2.0, help="nominal voxel size in mm, 1 to 8 (default 2)")
    s.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    s.add_argument("--force", action="store_true", help="replace an existing population in --out")
    s.set_defaults(run=_run_synth)

    t = sub.add_parser("template", help="export the template, its labels and both AFIDs placements",
                       description="Write the MNI152 2009c template at --res mm: t1/t2 (and any synthetic contrast "
                                   "asked for), labels.nii.gz, landmarks.mrk.json (expert ground truth) and "
                                   "landmarks_rater2.mrk.json (second placement: the inter-rater floor).")
    t.add_argument("--res", type=float, default=1.0, help="voxel size in mm, 1 to 8 (default 1)")
    t.add_argument("--contrasts", default="t1,t2", help=f"comma-separated, from {','.join(CONTRASTS)} (default t1,t2)")
    t.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    t.add_argument("--force", action="store_true", help="replace the files in an existing --out")
    t.set_defaults(run=_run_template)

    i = sub.add_parser("info", help="list the data packages, their state and the install command")
    i.set_defaults(run=_run_info)

    from ..data.planes import add_planes_arguments

    pl = sub.add_parser(
        "planes",
        help="cut a tagged 2D plane set (PNG + planes.csv) from a population, for AWCL",
        description=(
            "Standard anatomical planes (AC-PC frame from each subject's AFIDs) with scan id, coarse tag "
            "(plane family) and fine tag; optional simulated ultrasound look; --real-ultrasound writes the "
            "real ultrasound DICOM frames instead."
        ),
    )
    add_planes_arguments(pl)
    return p


def run(args: argparse.Namespace) -> int:
    return args.run(args)


def _run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.synth import synthesize_population

    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="subject", desc="anatssl data synth")
        bar.update(done - bar.n)

    try:
        out = synthesize_population(args.out, args.n, args.contrasts, seed=args.seed, res_mm=args.res,
                                    force=args.force, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {args.n} simulated subjects to {out}")
    return 0


def _run_template(args: argparse.Namespace) -> int:
    from ..data.synth import _check_res, _write_template, parse_contrasts
    from ..data.templates import load_template
    from ..errors import InputError

    contrasts = parse_contrasts(args.contrasts)
    res = _check_res(args.res)
    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise InputError(f"output folder {out}: is not empty; choose an empty folder or pass --force")
    template = load_template(res)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-template-", dir=out.parent))
    try:
        _write_template(template, contrasts, tmp / "t")
        out.mkdir(exist_ok=True)
        for f in (tmp / "t").iterdir():
            f.replace(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote the MNI152 2009c template at {res:g} mm with 32 AFIDs (two raters) to {out}")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from ..data.packages import PACKAGES, install_command, package_dir, package_version
    from ..errors import InputError

    missing = []
    for module, pkg in PACKAGES.items():
        try:
            where = package_dir(module)
            print(f"{pkg.dist:<14} {package_version(module):<14} {pkg.content}  [{where}]")
        except InputError:
            missing.append(module)
            print(f"{pkg.dist:<14} {'missing':<14} {pkg.content}")
    if missing:
        print(f"install the missing data packages with: {install_command(*missing)}")
    return 0
