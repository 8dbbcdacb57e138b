"""``anatssl demo``: the tools end to end on bundled data, with the answers checked.

It simulates a few subjects from the bundled template (real MNI 2009c T1w/T2w with expert AFIDs
landmarks; a PD-like contrast synthesised from the labels), propagates the 32 landmarks from the
template's T1w to every subject's T1w, T2w and PD with the default pipeline (each target's contrast
decided on its own), writes them as Slicer markups, and prints each error against the exact ground
truth beside affine registration's on the same targets and the human inter-rater floor. Then it
indexes the subjects and searches them for the anterior commissure clicked on the template: the
index's own answer and the refined one (the landmark tool in each returned volume).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ._common import add_encoder_options, encoder_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="run the landmark and search tools on bundled data and check the answers",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--out", default="anatssl-demo", metavar="DIR", help="output folder (default ./anatssl-demo)")
    p.add_argument("--subjects", type=int, default=3, help="number of simulated subjects (default 3)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the simulated subjects")
    add_encoder_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..baselines.registration import RegistrationLandmarks
    from ..data.population import load_population
    from ..data.synth import synthesize_population
    from ..embedding import EmbeddingStore
    from ..index import EmbeddingIndex
    from ..points import write_points
    from ..tools.landmarks import LandmarkLocator
    from ..tools.search import EmbeddingSearch

    started = time.perf_counter()
    out = Path(args.out)
    pop_dir = out / "population"
    contrasts = ("t1", "t2", "pd")
    meta = pop_dir / "population.json"
    if not meta.exists() or tuple(load_population(pop_dir).contrasts) != contrasts:
        print(f"simulating {args.subjects} subjects from the template (seed {args.seed}) into {pop_dir} ...")
        synthesize_population(pop_dir, args.subjects, contrasts=contrasts, seed=args.seed, res_mm=2.0, force=True)
    pop = load_population(pop_dir)
    encoder = encoder_from_args(args)
    print(f"encoder {encoder.encoder_id}: {encoder.manifest.name or encoder.method}")

    reference = pop.template.image("t1")
    points = pop.template.landmarks()
    rater2 = pop.template.landmarks_rater2()
    floor = np.linalg.norm(rater2.positions - np.array([points.position(lab) for lab in rater2.labels]), axis=1)
    (out / "landmarks").mkdir(parents=True, exist_ok=True)
    locator = LandmarkLocator(EmbeddingStore(encoder))
    affine = RegistrationLandmarks("affine")
    t0 = time.perf_counter()
    locator.prepare(reference)
    affine.prepare(reference, points)
    print(f"reference embedded in {time.perf_counter() - t0:.1f} s")
    errors: dict[str, tuple[list, list]] = {}
    for contrast in contrasts:
        ours, theirs = [], []
        for subject in pop.subjects:
            target = subject.image(contrast)
            truth = subject.landmarks()
            t0 = time.perf_counter()
            found = locator.locate(reference, points, [target])[0]
            seconds = time.perf_counter() - t0
            write_points(found, out / "landmarks" / f"{subject.name}_{contrast}.mrk.json")
            e = np.linalg.norm(found.positions - np.array([truth.position(lab) for lab in found.labels]), axis=1)
            reg = affine.locate(target)
            a = np.linalg.norm(reg.positions - np.array([truth.position(lab) for lab in reg.labels]), axis=1)
            ours.append(e)
            theirs.append(a)
            print(f"  template T1 -> {subject.name} {contrast.upper()}: mean error {e.mean():.2f} mm ({seconds:.1f} s; "
                  f"{locator.last_decisions[0].describe()}); affine registration {a.mean():.2f} mm")
        errors[contrast] = (np.concatenate(ours), np.concatenate(theirs))
    print(f"human inter-rater floor (second expert vs ground truth on the template): mean {floor.mean():.2f} mm")
    for contrast, (e, a) in errors.items():
        print(f"T1 -> {contrast.upper()}: AnatSSL {e.mean():.2f} mm ({100 * np.mean(e < 4):.0f} % within 4 mm), "
              f"affine registration {a.mean():.2f} mm ({100 * np.mean(a < 4):.0f} %)")

    search = EmbeddingSearch(EmbeddingStore(encoder, whiten=False))  # the index holds raw embeddings
    index = search.new_index()
    search.add(index, [str(s.folder / "t1.nii.gz") for s in pop.subjects], names=[s.name for s in pop.subjects])
    index.save(out / "index")
    index = EmbeddingIndex.open(out / "index")
    ac = points.position("AC")
    by_name = {s.name: s for s in pop.subjects}
    print("search for the template's anterior commissure in the indexed subjects' T1:")
    for refine, what in ((False, "index only"), (True, "refined by the landmark tool in each volume")):
        hits = search.search_point(index, reference, ac, k=len(pop.subjects), refine=refine, locator=locator)
        dist = [np.linalg.norm(h.position - by_name[h.volume].landmarks().position("AC")) for h in hits]
        print(f"  {what}: " + ", ".join(f"{h.volume} {d:.1f} mm" for h, d in zip(hits, dist))
              + f" from each subject's AC")
    print(f"markups written to {out / 'landmarks'} (open them in Slicer with the volumes in {pop_dir})")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0
