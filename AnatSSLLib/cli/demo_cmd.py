"""``anatssl demo``: the main job end to end on bundled data, with the answer checked.

It simulates a few subjects from the bundled template (real MNI 2009c T1w/T2w with expert AFIDs
landmarks), propagates the 32 landmarks from the template's T1w to every subject's T1w and
T2w with the default encoder, writes them as Slicer markups, and prints the error against the
exact ground truth next to the human inter-rater floor. Then it indexes the subjects and
searches for the anterior commissure clicked on the template.
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
    from ..data.population import load_population
    from ..data.synth import synthesize_population
    from ..embedding import EmbeddingStore
    from ..index import EmbeddingIndex
    from ..points import write_points
    from ..tools.landmarks import LandmarkLocator
    from ..tools.search import EmbeddingSearch

    out = Path(args.out)
    pop_dir = out / "population"
    if not (pop_dir / "population.json").exists():
        print(f"simulating {args.subjects} subjects from the template (seed {args.seed}) into {pop_dir} ...")
        synthesize_population(pop_dir, args.subjects, contrasts=("t1", "t2"), seed=args.seed, res_mm=2.0, force=True)
    pop = load_population(pop_dir)
    encoder = encoder_from_args(args)
    print(f"encoder {encoder.encoder_id}: {encoder.manifest.name or encoder.method}")
    if encoder.manifest.description:
        print(f"  {encoder.manifest.description}")

    reference = pop.template.image("t1")
    points = pop.template.landmarks()
    rater2 = pop.template.landmarks_rater2()
    floor = np.linalg.norm(rater2.positions - np.array([points.position(lab) for lab in rater2.labels]), axis=1)
    (out / "landmarks").mkdir(parents=True, exist_ok=True)
    store = EmbeddingStore(encoder, whiten=True)
    locator = LandmarkLocator(store)
    t0 = time.perf_counter()
    store.get(reference)
    print(f"reference embedded in {time.perf_counter() - t0:.1f} s")
    errors = {}
    for contrast in ("t1", "t2"):
        errs = []
        for subject in pop.subjects:
            target = subject.image(contrast)
            t0 = time.perf_counter()
            found = locator.locate(reference, points, [target])[0]
            seconds = time.perf_counter() - t0
            write_points(found, out / "landmarks" / f"{subject.name}_{contrast}.mrk.json")
            truth = subject.landmarks()
            e = np.linalg.norm(found.positions - np.array([truth.position(lab) for lab in found.labels]), axis=1)
            errs.append(e)
            print(f"  template T1 -> {subject.name} {contrast.upper()}: mean error {e.mean():.2f} mm, "
                  f"median {np.median(e):.2f} mm ({seconds:.1f} s)")
        errors[contrast] = np.concatenate(errs)
    print(f"human inter-rater floor (second expert vs ground truth on the template): mean {floor.mean():.2f} mm")
    for contrast, e in errors.items():
        print(f"T1 -> {contrast.upper()}: mean radial error {e.mean():.2f} mm, {100 * np.mean(e < 4):.0f} % within 4 mm")

    search = EmbeddingSearch(EmbeddingStore(encoder, whiten=False))  # the index holds raw embeddings
    index = search.new_index()
    search.add(index, [s.image("t1") for s in pop.subjects], names=[s.name for s in pop.subjects])
    index.save(out / "index")
    ac = points.position("AC")
    hits = search.search_point(EmbeddingIndex.open(out / "index"), reference, ac, k=len(pop.subjects), refine=False)
    print("search: places most like the template's anterior commissure:")
    by_name = {s.name: s for s in pop.subjects}
    for h in hits:
        truth = by_name[h.volume].landmarks().position("AC")
        print(f"  {h.volume}: score {h.score:.3f}, {np.linalg.norm(h.position - truth):.1f} mm from that subject's AC")
    print(f"markups written to {out / 'landmarks'} (open them in Slicer with the volumes in {pop_dir})")
    return 0
