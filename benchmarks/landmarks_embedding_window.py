"""The landmark benchmark with the tools' sliding-window size changed (a diagnostic, not a tool option).

The tools embed volumes with 96^3 windows (overlap 0.25); our encoders train on 32^3 crops. This
runs ``anatssl bench landmarks`` with every EmbeddingStore built with ``--roi``/``--overlap``
instead, to see whether the training window helps the landmark tool:

    python benchmarks/landmarks_embedding_window.py --roi 32 --overlap 0.5 --target-contrast t1 \\
        --out benchmarks/results/landmarks_ld_preview_roi32_t1.json

Other arguments are passed to ``anatssl bench landmarks`` (defaults: eval10, 4 targets, the preview
encoder, method ``encoder``).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--roi", type=int, required=True)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--population", default="/work/pops/eval10")
    ap.add_argument("--target-contrast", default="t1")
    ap.add_argument("--targets", default="4")
    ap.add_argument("--encoder", default="default")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import AnatSSLLib.embedding as embedding
    from AnatSSLLib.cli import main as anatssl

    original = embedding.EmbeddingStore.__init__

    def with_window(self, encoder, *, roi_size=args.roi, overlap=args.overlap, **options):
        original(self, encoder, roi_size=roi_size, overlap=overlap, **options)

    embedding.EmbeddingStore.__init__ = with_window
    rc = anatssl(["bench", "landmarks", "--population", args.population, "--target-contrast", args.target_contrast,
                  "--targets", args.targets, "--methods", "encoder", "--encoder", args.encoder, "--no-progress",
                  "--out", args.out])
    if rc == 0:
        report = json.load(open(args.out))
        report["command"] = "python benchmarks/landmarks_embedding_window.py " + " ".join(argv or sys.argv[1:])
        report["embedding_window"] = {"roi": args.roi, "overlap": args.overlap}
        json.dump(report, open(args.out, "w"), indent=1)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
