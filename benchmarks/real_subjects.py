"""Qualitative check on real people: the template's AFIDs propagated to Colin27 (MRI) and to a real head CT.

No landmark ground truth exists for these subjects, so the output is a picture per subject
(axial / coronal / sagittal thumbnails through each propagated landmark) for a person to judge,
plus the seconds each method took. Methods: the B-spline registration baseline (SimpleITK,
Mattes MI), and the encoder's landmark tool when ``--encoder`` is given.

    python benchmarks/real_subjects.py --out docs --landmarks AC,PC,"genu of CC","R LV at AC"

Needs the Debian packages mricron-data (Colin27) and invesalius-examples (head CT), and
matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AnatSSLLib.baselines.registration import RegistrationLandmarks  # noqa: E402
from AnatSSLLib.data.realsubjects import load_colin27, load_invesalius_ct, render_landmarks_png  # noqa: E402
from AnatSSLLib.data.templates import load_template  # noqa: E402
from AnatSSLLib.encoders import to_encoder_grid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--landmarks", default="AC,PC,genu of CC,splenium of CC,R LV at AC,L LV at AC")
    ap.add_argument("--encoder", help="also propagate with this cached encoder's landmark tool")
    ap.add_argument("--res", type=float, default=2.0, help="working resolution in mm (default 2)")
    args = ap.parse_args()

    template = load_template(args.res)
    labels = [s.strip() for s in args.landmarks.split(",") if s.strip()]
    points = template.landmarks.subset(labels)
    subjects = {
        "colin27": (load_colin27(), template.t1, None),
        "head_ct": (load_invesalius_ct(), template.t1, (-100.0, 200.0)),
    }
    methods = {"bspline": lambda: RegistrationLandmarks("bspline")}
    if args.encoder:
        from AnatSSLLib.embedding import EmbeddingStore
        from AnatSSLLib.encoders import load_encoder
        from AnatSSLLib.tools.landmarks import LandmarkLocator

        store = EmbeddingStore(load_encoder(args.encoder))

        class _Tool:
            def prepare(self, reference, ref_points):
                self.reference, self.points = reference, ref_points

            def locate(self, target):
                return LandmarkLocator(store).locate(self.reference, self.points, [target])[0]

        methods["encoder"] = _Tool
    report = {"command": " ".join(["python"] + sys.argv), "subjects": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (image, reference, window) in subjects.items():
        target = to_encoder_grid(image, (args.res,) * 3)
        report["subjects"][name] = {}
        for method, make in methods.items():
            tool = make()
            t0 = time.perf_counter()
            tool.prepare(reference, points)
            found = tool.locate(target)
            seconds = time.perf_counter() - t0
            png = args.out / f"real_{name}_{method}.png"
            render_landmarks_png(image, found, png, title=f"{name}: template AFIDs by {method} ({seconds:.0f} s)",
                                 window=window)
            report["subjects"][name][method] = {"seconds": round(seconds, 1), "png": str(png)}
            print(f"{name} {method}: {seconds:.1f} s -> {png}")
    (args.out / "real_subjects.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
