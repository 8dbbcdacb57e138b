"""``anatssl segment``: carry a reference label map to volumes of another contrast."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ._common import add_contrast_option, add_encoder_options, encoder_from_args, output_stems, read_checked_volumes

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "segment",
        help="cross-modality segmentation: transfer a reference label map to target volumes",
        description=(
            "Shape-guided label transfer through dense embedding correspondence (LD embeddings, SAM-style "
            "global then local matching): each target is registered to the reference (mutual information) and "
            "mapped into the reference's contrast where its contrast differs, then matched. Writes one label map per "
            "target, <target name>_labels.nii.gz (<parent folder>_<target name>_labels.nii.gz where two targets share "
            "a name), on the target's own grid, and beside it <...>_labels.json with the contrast decision."
        ),
    )
    p.add_argument("--reference", required=True, nargs="+", metavar="IMG",
                   help="labelled reference volume(s); several are fused by a per-voxel vote")
    p.add_argument("--reference-labels", required=True, nargs="+", metavar="LAB",
                   help="label map of each reference, on that reference's grid (same order)")
    p.add_argument("--targets", required=True, nargs="+", metavar="IMG", help="volumes to segment")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--labels", default=None, metavar="IDS",
                   help="comma-separated label ids to transfer (default: every non-zero id)")
    p.add_argument("--likelihood-weight", type=float, default=0.0,
                   help="weight of LD's region-embedding likelihood (0: shape prior only, the default)")
    add_contrast_option(p)
    p.add_argument("--em-weight", type=float, default=0.0, metavar="BETA",
                   help="weight of the target's own appearance model (one Gaussian per label on its intensities, fitted "
                        "by EM; default 0: off. Measured on T1 -> T2: CSF, GM and WM gain, deep nuclei lose)")
    add_encoder_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    from tqdm import tqdm

    from ..contrast import check_contrast_pair
    from ..embedding import EmbeddingStore
    from ..image import atomic_output, check_volume, read_image, write_image
    from ..tools.segmentation import CrossModalitySegmenter, check_reference_labels

    if len(args.reference) != len(args.reference_labels):
        raise InputError(
            f"--reference-labels: expected one label map per reference ({len(args.reference)}), "
            f"got {len(args.reference_labels)}"
        )
    labels = None
    if args.labels:
        try:
            labels = [int(v) for v in args.labels.split(",") if v.strip()]
        except ValueError:
            raise InputError(f"--labels: expected comma-separated integer ids, got {args.labels!r}") from None
    stems = output_stems(args.targets)
    references = [check_volume(read_image(r), ndim=3, name=f"reference {r}") for r in args.reference]
    ref_labels = [read_image(r) for r in args.reference_labels]
    for image, lab in zip(references, ref_labels):
        check_reference_labels(lab, image)  # before any work: a mismatched pair fails at once
    targets = read_checked_volumes(args.targets)
    for target in targets:
        for image in references:
            check_contrast_pair(image, target, args.contrast)
    if args.em_weight and args.likelihood_weight:
        raise InputError("--em-weight and --likelihood-weight are two appearance models; give one of them")
    encoder = encoder_from_args(args)
    likelihood = {"likelihood": "gaussian", "likelihood_weight": args.em_weight} if args.em_weight else \
        {"likelihood_weight": args.likelihood_weight}
    segmenter = CrossModalitySegmenter(EmbeddingStore(encoder, whiten=True), contrast=args.contrast, **likelihood)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, target, stem in tqdm(list(zip(args.targets, targets, stems)), desc="segment", unit="target"):
        result = segmenter.segment(references, ref_labels, target, labels=labels)
        dest = write_image(result, out / f"{stem}_labels.nii.gz")
        decisions = [d.describe() for d in segmenter.last_decisions]
        with atomic_output(out / f"{stem}_labels.json") as tmp:
            tmp.write_text(json.dumps({
                "target": str(path), "references": list(args.reference), "encoder": encoder.encoder_id,
                "contrast": decisions, "labels": sorted(int(v) for v in np.unique(result.array) if v != 0),
            }, indent=2) + "\n")
        corr = segmenter.last_correspondences[0]
        print(f"{stem}: {dest.name}, {int((result.array != 0).sum())} labelled voxels, "
              f"{len(corr.confidence)} dense matches, {'; '.join(decisions)}")
    return 0
