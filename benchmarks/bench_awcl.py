"""AWCL ablation (issue 6): random init, plain instance contrast and AWCL coarse/fine over the anatomy ratio.

    python benchmarks/bench_awcl.py --work /tmp/awcl_bench_acpc2 --subjects 8 --res 3 \
        --test-subjects 2 --steps 800 --seg-steps 1000 --seeds 0,1,2 \
        --out benchmarks/results/awcl_ablation.json

(add seeds with ``--seeds 3,4 --resume``, or run seeds in parallel processes, one per core, each
with its own ``--out``, and combine them with ``--resume --merge OTHER.json``; about 6 min per
configuration and seed with one torch thread, most of it the two segmentation protocols).

One run, one data set, one backbone, one step budget, one seed list for every configuration:

- **data**: a simulated population (:func:`AnatSSLLib.data.synth.synthesize_population`, t1 and
  t2) cut into a tagged 2D plane set (:func:`AnatSSLLib.data.planes.make_plane_set`: 11 fine tags
  in 3 coarse families, ``--untagged`` of the images untagged); both are built once under
  ``--work`` and reused. The last ``--test-subjects`` subjects are held out of **everything** that
  trains: pretraining, the linear probe's fit and the segmentation fine-tuning.
- **configurations**: ``random_init`` (no pretraining), ``instance_r0`` (AWCL with anatomy ratio 0
  = plain instance contrast, SimCLR), ``awcl_coarse_r{r}`` and ``awcl_fine_r{r}`` for every ``r``
  in ``--ratios``; each pretrained with :class:`AnatSSLLib.methods.awcl.AWCLTask` on the shared
  engine (Adam, weight decay 1e-6, batch 32, tau 0.5, as the paper; fewer steps, a narrow ResNet
  and 64 px images: a CPU scale-down).
- **linear probe** (:func:`AnatSSLLib.tools.awcl_eval.linear_probe`): frozen features, multinomial
  logistic regression fitted on the training subjects' images, scored on the held-out subjects'
  images; classes = the **true fine tags** (the ``true_fine_tag`` column, so untagged images are
  scored too); accuracy and macro F1. Also a **label-scarce probe** (``probe1_*``, ours, not the
  paper's): the same probe fitted on *one* training subject's images (8 per fine tag) and scored on
  the held-out subjects, averaged over the training subjects. With all training subjects' labels the
  probe reaches what end-to-end supervised training reaches (~0.94 on the default set), so it cannot
  tell representations apart; with one subject's labels it can.
- **segmentation** (:func:`AnatSSLLib.tools.awcl_eval.finetune_segmentation`): a U-Net-like decoder
  on the encoder's five stage maps, trained for ``--seg-steps`` steps with Dice + CE on the training
  subjects' label maps (25 foreground labels); Dice on the held-out subjects. Two named protocols
  (:data:`SEG_PROTOCOLS`, ``--seg-protocols``), the issue's "encoder frozen or not":

  - ``frozen`` (primary): encoder weights and BatchNorm statistics fixed, only the decoder learns.
    The segmentation counterpart of the linear probe: every configuration trains the same decoder on
    the same labels, so the Dice differences are the representation's. (Measured on the fixed plane
    set: random init 0.24 against 0.37 for instance contrast, where end to end they differ by 0.01.)
  - ``finetune``: encoder fine-tuned end to end. With every training subject's labels this measures
    the labels more than the pretraining (random init comes within ~0.01 of any pretraining).
  - ``frozen1``, ``finetune1`` (label-scarce, ours, as the one-subject probe): the same two, trained
    for 500 steps on the label maps of *one* training subject (seed ``s`` takes the ``s mod n``-th,
    so the configurations of one seed share it and stay paired).
  - ``frozen_t1t2``, ``finetune_t1t2`` (cross-contrast, the paper's "cross-domain segmentation"):
    trained for 500 steps on the training subjects' T1 planes only, scored on the held-out
    subjects' T2 planes.

  A protocol can be added to a finished run later: ``--resume --seg-protocols NEW`` evaluates the
  cached encoders of the finished (configuration, seed) pairs under ``NEW`` only.

  No random flips by default (``--seg-flip`` turns them on): the planes are in one canonical
  orientation and 14 of the 25 labels are lateralised (``*_left``/``*_right``); a left-right flip
  of image and label map shows a left structure on the right under its left label, which made one
  label of each pair score ~0 (mean Dice 0.28 with flips against 0.37 without, instance contrast,
  frozen, seed 0). Reported per protocol: the mean over all 25 foreground labels
  (``seg_<protocol>_dice_all``, primary) and over the *large* labels (``seg_<protocol>_dice_large``:
  those covering at least 1 % of the training pixels; at 3 mm and 64 px the small deep nuclei are a
  few pixels wide).

Results are written (atomically) after every configuration, so a killed run keeps what it finished;
``--resume`` (same settings) keeps the finished (configuration, seed) results of ``--out`` and runs
the rest, e.g. more seeds; ``commands`` lists every invocation that contributed.
Seeds are the outer loop: seed 0 completes every configuration before seed 1 starts. The summary
gives the mean, the spread (half the max - min range) and the standard deviation over finished
seeds; the verdict compares AWCL fine with ``instance_r0`` paired by seed, for each probe (full
labels, one subject's labels) and each segmentation protocol (:func:`verdict`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AnatSSLLib import __version__  # noqa: E402
from AnatSSLLib.methods.awcl_data import TaggedImageSet, read_tagged_images  # noqa: E402
from AnatSSLLib.tools.awcl_eval import class_labels, extract_features, finetune_segmentation, linear_probe  # noqa: E402

LARGE_LABEL_FRACTION = 0.01


# ------------------------------------------------------------------------------------------- data


def build_plane_set(
    work: str | os.PathLike, n_subjects: int, res_mm: float, per_subject: int, size: int,
    untagged: float, seed: int = 1,
) -> Path:
    """The plane set's ``planes.csv`` under ``work`` (population and planes built once, then reused)."""
    from AnatSSLLib.data.planes import make_plane_set
    from AnatSSLLib.data.synth import synthesize_population

    work = Path(work)
    pop = work / f"pop-n{n_subjects}-t1t2-s{seed}-r{res_mm:g}"
    if not (pop / "population.json").is_file():
        synthesize_population(pop, n_subjects, ("t1", "t2"), seed=seed, res_mm=res_mm, force=pop.exists())
    # "-acpc2": planes cut with the AC-PC frame fitted through midline AFIDs and L/R pair midpoints;
    # a folder made before that fix (no suffix) is not reused
    planes = work / f"planes-n{n_subjects}-s{seed}-r{res_mm:g}-{size}px-{per_subject}pp-u{untagged:g}-acpc2"
    return make_plane_set(pop, planes, per_subject=per_subject, size=size, spacing_mm=res_mm,
                          untagged_fraction=untagged, seed=0)  # fmt: skip


def load_planes(csv_path: str | os.PathLike, size: int) -> TaggedImageSet:
    """Read the plane set (no warning expected; any is re-raised as a note on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = read_tagged_images(csv_path, size=size)
    for w in caught:
        print(f"note: {w.message}", file=sys.stderr)
    return data


def split_subjects(data: TaggedImageSet, n_test: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Train/test image indices: the last ``n_test`` scan ids (sorted) are held out."""
    scans = sorted(set(data.scan_ids))
    if not 1 <= n_test < len(scans):
        raise ValueError(f"--test-subjects: expected 1..{len(scans) - 1} (the set has {len(scans)} subjects), got {n_test}")
    held = scans[-n_test:]
    test = np.array([s in held for s in data.scan_ids])
    return np.nonzero(~test)[0], np.nonzero(test)[0], held


def large_labels(data: TaggedImageSet, train_idx: np.ndarray, fraction: float = LARGE_LABEL_FRACTION) -> list[int]:
    """Foreground labels covering at least ``fraction`` of the training images' pixels."""
    counts = np.bincount(data.labels[train_idx].ravel(), minlength=int(data.labels.max()) + 1)
    share = counts / counts.sum()
    return [int(k) for k in range(1, len(counts)) if share[k] >= fraction]


# ------------------------------------------------------------------------------------ evaluation


# Named segmentation protocols (issue 6: "fine-tuning for 2D segmentation of the tissue labels, with
# the encoder frozen or not"). Both train the same decoder for the same steps on the training subjects'
# label maps and score Dice on the held-out subjects; they differ only in whether the encoder learns.
SEG_PROTOCOLS: dict[str, dict[str, Any]] = {
    "frozen": {
        "freeze": True,
        "doc": "encoder frozen (weights and BatchNorm statistics), only the decoder trained: the segmentation "
               "counterpart of the linear probe, its Dice a function of the pretrained features "
               "(primary: measures the representation)",
    },
    "finetune": {
        "freeze": False,
        "doc": "encoder fine-tuned end to end with the decoder (the pretraining is only an initialisation; "
               "with every training subject's labels it measures the labels more than the pretraining)",
    },
    # label-scarce counterparts (ours, as probe1): the label maps of ONE training subject, the subject
    # rotating with the seed (seed s -> the (s mod n)-th training subject, sorted), so every
    # configuration of a seed trains on the same subject and the comparison stays paired
    "frozen1": {
        "freeze": True, "one_subject": True, "steps": 500,
        "doc": "label-scarce, encoder frozen: the decoder trained for 500 steps (~90 epochs) on the label maps of one "
               "training subject (seed s: the (s mod n)-th training subject), Dice on the held-out subjects",
    },
    "finetune1": {
        "freeze": False, "one_subject": True, "steps": 500,
        "doc": "label-scarce, end to end: encoder and decoder trained for 500 steps (~90 epochs) on the label maps of "
               "one training subject (seed s: the (s mod n)-th training subject), Dice on the held-out subjects",
    },
    # cross-contrast counterparts (the paper's "cross-domain segmentation"): the decoder learns from the
    # training subjects' T1 planes only and is scored on the held-out subjects' T2 planes. Tag
    # positives pair T1 and T2 planes of one anatomy; instance contrast never sees such a pair.
    "frozen_t1t2": {
        "freeze": True, "train_contrast": "t1", "test_contrast": "t2", "steps": 500,
        "doc": "cross-contrast, encoder frozen: the decoder trained for 500 steps on the training subjects' T1 planes "
               "only, Dice on the held-out subjects' T2 planes (the paper's cross-domain segmentation)",
    },
    "finetune_t1t2": {
        "freeze": False, "train_contrast": "t1", "test_contrast": "t2", "steps": 500,
        "doc": "cross-contrast, end to end: encoder and decoder trained for 500 steps on the training subjects' T1 "
               "planes only, Dice on the held-out subjects' T2 planes",
    },
}  # fmt: skip


def seg_images(
    data: TaggedImageSet, train_idx: np.ndarray, test_idx: np.ndarray, protocol: str, seed: int,
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """The training and test images of segmentation ``protocol`` and its training subject (None: all).

    Every training image, or (a label-scarce protocol) those of the ``seed mod n``-th training
    subject; each side restricted to one contrast where the protocol names one (``contrast`` column).
    """
    spec = SEG_PROTOCOLS[protocol]
    subject = None
    if spec.get("one_subject"):
        scans = np.asarray(data.scan_ids)
        subjects = sorted(set(scans[train_idx]))
        subject = subjects[int(seed) % len(subjects)]
        train_idx = train_idx[scans[train_idx] == subject]
    if "train_contrast" in spec:
        contrast = np.asarray(data.extra.get("contrast", [""] * len(data)))
        train_idx = train_idx[contrast[train_idx] == spec["train_contrast"]]
        test_idx = test_idx[contrast[test_idx] == spec["test_contrast"]]
        if not len(train_idx) or not len(test_idx):
            raise ValueError(f"segmentation protocol {protocol}: needs {spec['train_contrast']} training and "
                             f"{spec['test_contrast']} test images (column 'contrast')")  # fmt: skip
    return train_idx, test_idx, subject


def parse_seg_protocols(text: str) -> list[str]:
    """``"frozen,finetune"`` -> ``["frozen", "finetune"]`` (known names, no repeats, at least one)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in SEG_PROTOCOLS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"--seg-protocols: expected distinct names from {sorted(SEG_PROTOCOLS)}, got {text!r}")
    return names


def evaluate_encoder(
    encoder: torch.nn.Module, data: TaggedImageSet, train_idx: np.ndarray, test_idx: np.ndarray, *,
    seg_steps: int, seg_protocols: list[str], seed: int, large: list[int], seg_flip: bool = False,
    probe_column: str = "true_fine_tag", probes: bool = True,
) -> dict[str, Any]:
    """Linear probes on ``probe_column`` (unless ``probes=False``) and segmentation under each of
    ``seg_protocols`` (:data:`SEG_PROTOCOLS`); metrics on ``test_idx``.

    Segmentation metrics are named ``seg_<protocol>_dice_all`` (mean over the foreground labels),
    ``seg_<protocol>_dice_large`` (mean over ``large``), ``seg_<protocol>_dice_per_label``, ...
    A protocol's own ``steps`` (the label-scarce and cross-contrast ones) replaces ``seg_steps``.
    """
    out: dict[str, Any] = _probe_metrics(encoder, data, train_idx, test_idx, probe_column) if probes else {}
    for name in seg_protocols:
        t1 = time.time()
        spec = SEG_PROTOCOLS[name]
        seg_train, seg_test, subject = seg_images(data, train_idx, test_idx, name, seed)
        seg = finetune_segmentation(encoder, data, seg_train, seg_test, freeze=spec["freeze"],
                                    steps=spec.get("steps", seg_steps), batch_size=16, lr=1e-3, flip=seg_flip, seed=seed)  # fmt: skip
        dice = seg["dice"]
        big = [dice[k] for k in large if np.isfinite(dice.get(k, float("nan")))]
        out[f"seg_{name}_dice_all"] = seg["mean_dice"]
        out[f"seg_{name}_dice_large"] = float(np.mean(big)) if big else float("nan")
        out[f"seg_{name}_dice_per_label"] = {str(k): round(v, 4) for k, v in dice.items()}
        out[f"seg_{name}_final_train_loss"] = seg["final_train_loss"]
        if subject is not None:
            out[f"seg_{name}_training_subject"] = subject
        out[f"seg_{name}_seconds"] = round(time.time() - t1, 1)
    return out


def _probe_metrics(
    encoder: torch.nn.Module, data: TaggedImageSet, train_idx: np.ndarray, test_idx: np.ndarray, probe_column: str,
) -> dict[str, Any]:
    """The full-label and the one-subject linear probes (see :func:`evaluate_encoder`)."""
    t0 = time.time()
    rows, y, names = class_labels(data, label_column=probe_column)
    y_all = np.full(len(data), -1, dtype=np.int64)
    y_all[rows] = y
    tr, te = train_idx[y_all[train_idx] >= 0], test_idx[y_all[test_idx] >= 0]
    feats = extract_features(encoder, data.images)
    probe = linear_probe(feats[tr], y_all[tr], feats[te], y_all[te], len(names))
    # label-scarce probe: fitted on one training subject at a time (subjects with < 2 classes skipped)
    scans = np.asarray(data.scan_ids)
    few = [linear_probe(feats[tr][scans[tr] == q], y_all[tr][scans[tr] == q], feats[te], y_all[te], len(names))
           for q in sorted(set(scans[tr])) if len(np.unique(y_all[tr][scans[tr] == q])) > 1]  # fmt: skip
    out: dict[str, Any] = {
        "probe_accuracy": probe["accuracy"],
        "probe_macro_f1": probe["macro_f1"],
        "probe_train_accuracy": probe["train_accuracy"],
        "probe1_accuracy": float(np.mean([f["accuracy"] for f in few])) if few else float("nan"),
        "probe1_macro_f1": float(np.mean([f["macro_f1"] for f in few])) if few else float("nan"),
        "probe1_n_subjects": len(few),
        "probe_n_train": int(len(tr)),
        "probe_n_test": int(len(te)),
        "probe_seconds": round(time.time() - t0, 1),
    }
    return out


def configurations(ratios: list[float]) -> list[tuple[str, float | None, str]]:
    """``(name, anatomy ratio, granularity)``; ratio None = random init (no pretraining)."""
    out: list[tuple[str, float | None, str]] = [("random_init", None, "-"), ("instance_r0", 0.0, "fine")]
    out += [(f"awcl_coarse_r{r:g}", r, "coarse") for r in ratios]
    out += [(f"awcl_fine_r{r:g}", r, "fine") for r in ratios]
    return out


def pretrain(
    data: TaggedImageSet, ratio: float, granularity: str, arch: dict[str, Any], *, steps: int, batch_size: int,
    seed: int, cache,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """AWCL pretraining on ``data``; the trained encoder (loaded back from ``cache``) and run facts."""
    from AnatSSLLib.engine import TrainingConfig, train
    from AnatSSLLib.methods.awcl import AWCLTask
    from AnatSSLLib.tools.awcl_eval import load_awcl_encoder

    task = AWCLTask(data, ratio=ratio, granularity=granularity, **arch)
    config = TrainingConfig(steps=steps, batch_size=batch_size, lr=1e-3, weight_decay=1e-6, device="cpu", seed=seed,
                            log_every=10**9, prefetch=0, checkpoint_every=0)  # fmt: skip
    res = train(task, config, cache=cache, name=f"bench-awcl-{granularity}-r{ratio:g}-s{seed}")
    encoder = load_awcl_encoder(res.encoder_id, cache=cache)
    losses = [v for _, v in res.losses]
    return encoder, {
        "pretrain_seconds": round(res.seconds, 1),
        "samples_per_s": round(res.samples_per_second, 1),
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "first_loss": round(float(np.mean(losses[:20])), 4),
        "last_step_metrics": {k: round(float(v), 4) for k, v in res.metrics.items()},
        "encoder_id": res.encoder_id,
    }


# --------------------------------------------------------------------------------------- summary

PROBE_METRICS = ("probe_accuracy", "probe_macro_f1", "probe1_accuracy", "probe1_macro_f1")
PROBES = {"probe": "full-label probe", "probe1": "label-scarce probe (one training subject)"}


def metric_names(runs: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The summarised metrics: the probes' and every ``seg_<protocol>_dice_{all,large}`` in ``runs``."""
    keys = {k for by_seed in runs.values() for r in by_seed.values() for k in r}
    segs = sorted(k for k in keys if k.startswith("seg_") and k.endswith(("_dice_all", "_dice_large")))
    return [m for m in PROBE_METRICS if m in keys] + segs


def summarise(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per configuration: mean and spread (half the range) of each metric over its finished seeds."""
    out = {}
    for name, by_seed in runs.items():
        row: dict[str, Any] = {"seeds": sorted(by_seed)}
        for m in metric_names(runs):
            if not all(m in r for r in by_seed.values()):
                continue  # a metric added after some of these runs were made (--resume)
            v = np.array([r[m] for r in by_seed.values()], dtype=float)
            row[m] = round(float(v.mean()), 4)
            row[m + "_spread"] = round(float((v.max() - v.min()) / 2), 4)
            row[m + "_std"] = round(float(v.std(ddof=1)), 4) if len(v) > 1 else 0.0
        out[name] = row
    return out


def verdict(runs: dict[str, dict[str, dict[str, Any]]], ratios: list[float]) -> dict[str, Any]:
    """Issue 6's bar: AWCL fine against plain instance contrast (``instance_r0``), paired by seed.

    Per fine ratio: the mean over common seeds of (fine - instance) for each metric
    (``<metric>_delta``), its standard error (``_delta_se``, sd of the paired deltas / sqrt(n)) and
    the number of seeds where fine is ahead (``_seeds_ahead``). ``bar`` holds, for each probe
    (``probe``: full labels, ``probe1``: one subject's labels) and each segmentation protocol ``p``
    found, ``"<probe>+seg_<p>"``: ``beats`` (mean delta > 0 on the probe's accuracy, its macro F1 and
    ``seg_<p>_dice_all``) and ``clearly`` (each of the three deltas exceeds two standard errors;
    needs >= 2 seeds). ``fine_ratios_beating_instance`` / ``fine_ratios_clearly_beating_instance``
    list, per such pair, the fine configurations that meet it.
    """
    base = runs.get("instance_r0", {})
    metrics = metric_names(runs)
    protocols = [m[len("seg_") : -len("_dice_all")] for m in metrics if m.endswith("_dice_all")]
    out: dict[str, Any] = {}
    for r in ratios:
        name = f"awcl_fine_r{r:g}"
        fine = runs.get(name, {})
        common = sorted(set(base) & set(fine))
        if not common:
            continue
        row: dict[str, Any] = {"seeds": common}
        for m in metrics:
            if not all(m in fine[s] and m in base[s] for s in common):
                continue
            d = np.array([fine[s][m] - base[s][m] for s in common])
            row[m + "_delta"] = round(float(d.mean()), 4)
            row[m + "_delta_se"] = round(float(d.std(ddof=1) / np.sqrt(len(d))), 4) if len(d) > 1 else None
            row[m + "_seeds_ahead"] = int((d > 0).sum())
        bar: dict[str, Any] = {}
        for probe in PROBES:
            for p in protocols:
                main = (f"{probe}_accuracy", f"{probe}_macro_f1", f"seg_{p}_dice_all")
                if not all(m + "_delta" in row for m in main):
                    continue
                bar[f"{probe}+seg_{p}"] = {
                    "beats": bool(all(row[m + "_delta"] > 0 for m in main)),
                    # "clearly": the paired mean difference exceeds two standard errors
                    "clearly": bool(all(row[m + "_delta_se"] is not None and row[m + "_delta"] > 2 * row[m + "_delta_se"]
                                        for m in main)),
                }  # fmt: skip
        row["bar"] = bar
        out[name] = row
    rows = dict(out)
    pairs = sorted({k for v in rows.values() for k in v["bar"]})
    for key, test in (("fine_ratios_beating_instance", "beats"), ("fine_ratios_clearly_beating_instance", "clearly")):
        out[key] = {k: [n for n, v in rows.items() if v["bar"].get(k, {}).get(test)] for k in pairs}
    return out


def atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, default=str)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a results file is for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/awcl_bench_data", help="folder for the population, plane set and encoder cache")
    p.add_argument("--csv", default=None, help="use this plane set CSV instead of building one")
    p.add_argument("--subjects", type=int, default=8, help="simulated subjects (default 8)")
    p.add_argument("--res", type=float, default=3.0, help="voxel size and plane pixel size, mm (default 3)")
    p.add_argument("--per-subject", type=int, default=88, help="planes per subject (default 88 = 8 per fine tag)")
    p.add_argument("--size", type=int, default=64, help="plane side, pixels (default 64)")
    p.add_argument("--untagged", type=float, default=0.2, help="fraction of untagged images (default 0.2)")
    p.add_argument("--test-subjects", type=int, default=2, help="subjects held out of all training (default 2)")
    p.add_argument("--ratios", default="0.25,0.5,0.75,1", help="anatomy ratios of the AWCL runs")
    p.add_argument("--configs", default=None, help="comma-separated subset of configuration names (default all)")
    p.add_argument("--backbone", default="resnet10", help="MONAI ResNet depth (default resnet10)")
    p.add_argument("--widen", type=float, default=0.5, help="ResNet width factor (default 0.5: h is 256-d)")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps per configuration (default 600)")
    p.add_argument("--batch-size", type=int, default=32, help="pretraining batch (default 32, the paper's)")
    p.add_argument("--seg-steps", type=int, default=1000, help="segmentation fine-tuning steps (default 1000)")
    p.add_argument("--seg-protocols", default="frozen,finetune",
                   help=f"comma-separated segmentation protocols, from {sorted(SEG_PROTOCOLS)} (default frozen,finetune)")
    p.add_argument("--seg-flip", action="store_true",
                   help="random left-right flips when training segmentation (default off: the planes are in one "
                        "orientation and their labels lateralised, so a flip would swap left and right structures)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (outer loop)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                   help="also take the finished runs of these reports (same settings; other seeds run by parallel "
                        "processes, e.g. --seeds 1 --out seed1.json beside --seeds 0), then run what is left")
    p.add_argument("--resume", action="store_true",
                   help="keep the (config, seed) results already in --out (same settings) and run only the missing ones")
    p.add_argument("--out", default="benchmarks/results/awcl_ablation.json", help="result JSON (atomic, rewritten after each config)")
    return p.parse_args(argv)


def _same_settings(old: dict[str, Any], report: dict[str, Any], path: Path) -> dict[str, Any]:
    """``old`` (an earlier report read from ``path``) if it was made with ``report``'s settings,
    protocol and data (seeds and the list of segmentation protocols aside: a protocol missing from
    a run is added to it); otherwise exit with the difference."""
    for key in ("settings", "protocol"):
        a = {k: v for k, v in old.get(key, {}).items() if k not in ("seeds", "spread", "seg_protocols")}
        b = {k: v for k, v in report[key].items() if k not in ("seeds", "spread", "seg_protocols")}
        if a != b:
            raise SystemExit(f"{path} was made with other {key}: {a} != {b}")
    if old.get("data", {}).get("csv") != report["data"]["csv"]:
        raise SystemExit(f"{path} was made from {old.get('data', {}).get('csv')}, not {report['data']['csv']}")
    return old


def merge_runs(runs: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], source: str | Path) -> None:
    """Add ``other``'s (configuration, seed) results to ``runs`` in place. A pair in both is kept
    once if the metrics both hold are the same (the runs are deterministic on one machine), and
    takes the metrics only ``other`` holds (a protocol added later); different figures mean
    different code or data, and stop the merge."""
    for name, by_seed in other.items():
        for seed, res in by_seed.items():
            mine = runs.get(name, {}).get(seed)
            if mine is None:
                runs.setdefault(name, {})[seed] = res
                continue
            shared = [m for m in metric_names({name: {seed: res}}) if m in mine]
            differ = [m for m in shared if mine[m] != res[m]]
            if differ:
                raise SystemExit(f"--merge: {source} disagrees with the runs so far on {name} seed {seed}: {differ}")
            for k, v in res.items():
                mine.setdefault(k, v)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from AnatSSLLib.cache import EncoderCache

    t_start = time.time()
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    seg_protocols = parse_seg_protocols(args.seg_protocols)
    csv_path = Path(args.csv) if args.csv else build_plane_set(args.work, args.subjects, args.res, args.per_subject,
                                                                args.size, args.untagged)  # fmt: skip
    data = load_planes(csv_path, args.size)
    train_idx, test_idx, held = split_subjects(data, args.test_subjects)
    pre = data.subset(train_idx)  # pretraining never sees a held-out subject
    large = large_labels(data, train_idx)
    label_names = {}
    for cand in sorted(Path(csv_path).parent.parent.glob("pop-*/population.json")):
        label_names = json.loads(cand.read_text()).get("label_names", {})
        break
    configs = configurations(ratios)
    if args.configs:
        keep = set(args.configs.split(","))
        configs = [c for c in configs if c[0] in keep]
    arch = {"backbone": args.backbone, "widen_factor": args.widen, "proj_hidden": int(512 * args.widen), "proj_dim": 128}
    cache = EncoderCache(Path(args.work) / "cache", bundled=())
    fine_tags = sorted({t for t in data.extra["true_fine_tag"] if t})
    report: dict[str, Any] = {
        "benchmark": "AWCL ablation (issue 6): anatomy ratio x tag granularity",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "library_version": __version__,
        "torch_version": torch.__version__,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus (shared with another training job)",
        "torch_threads": torch.get_num_threads(),
        "data": {
            "source": "simulated population (anatssl data synth: MNI152 2009c under random affine + diffeomorphic "
                      "warps, t1 and t2), cut into anatomical standard planes (anatssl data planes)",
            "csv": str(csv_path),
            "subjects": sorted(set(data.scan_ids)),
            "held_out_subjects": held,
            "held_out_from": "pretraining, linear-probe fit and segmentation training",
            "n_images": len(data),
            "n_train_images": int(len(train_idx)),
            "n_test_images": int(len(test_idx)),
            "image_size_px": args.size,
            "pixel_mm": args.res,
            "untagged_fraction": args.untagged,
            "contrasts": sorted(set(data.extra.get("contrast", []))),
            "fine_tags": fine_tags,
            "coarse_tags": sorted({t for t in data.extra["true_coarse_tag"] if t}),
            "seg_labels": "25 foreground labels (csf, gm, wm, deep nuclei, ventricles, brainstem, cerebellum, bone, soft tissue)",
            "seg_large_labels": {str(k): label_names.get(str(k), str(k)) for k in large},
        },
        "settings": {
            "backbone": args.backbone, "widen_factor": args.widen, "norm": "batch", "feature_dim": int(512 * args.widen),
            "projection": f"Linear({int(512 * args.widen)},{int(512 * args.widen)})-ReLU-Linear(.,128), L2",
            "tau": 0.5, "base_tau": 0.07, "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-6,
            "batch_size": args.batch_size, "pretrain_steps": args.steps, "prefetch": 0,
            "ratios": ratios, "seeds": seeds,
            "seed_controls": "random-init weights, pretraining batches/augmentations/weights, segmentation decoder and batches; "
                             "the subject split is fixed",
        },
        "protocol": {
            "probe": "linear probe (frozen features standardised on train, multinomial logistic regression, L2 1e-3, "
                     "L-BFGS 300 it.) on the true fine tag (11 classes) of every image; train = training subjects, "
                     "test = held-out subjects; probe1_*: the same probe fitted on one training subject's "
                     "images at a time (label-scarce), scored on the held-out subjects, mean over training subjects",
            "segmentation": (f"U-Net-like decoder (width 32) on the encoder's 5 stage maps, trained on the training "
                             f"subjects' label maps: DiceCE, Adam 1e-3, batch 16, {args.seg_steps} steps, "
                             f"{'random left-right flips' if args.seg_flip else 'no flips'}; Dice on held-out subjects "
                             f"(MONAI DiceMetric, mean_batch); seg_<protocol>_dice_all = mean over the 25 foreground "
                             f"labels (primary), seg_<protocol>_dice_large = mean over labels >= 1 % of training pixels"),
            "seg_protocols": {n: SEG_PROTOCOLS[n]["doc"] for n in seg_protocols},
            "seg_flip": bool(args.seg_flip),
            "seg_steps": args.seg_steps,
            "spread": "<metric>_spread = half the range (max - min)/2 over seeds (with 2 seeds mean +- spread covers both); "
                      "<metric>_std = sample standard deviation over seeds",
        },
        "runs": {},
        "summary": {},
        "verdict": {},
    }
    out = Path(args.out)
    report["commands"] = [report["command"]]
    if args.resume and out.is_file():
        old = _same_settings(json.loads(out.read_text()), report, out)
        report["runs"] = old.get("runs", {})
        report["commands"] = old.get("commands", [old.get("command")]) + [report["command"]]
        report["date_first"] = old.get("date_first", old.get("date"))
        report["settings"]["seeds"] = sorted({*map(int, old["settings"]["seeds"]), *seeds})
        report["protocol"]["seg_protocols"] = {**old["protocol"].get("seg_protocols", {}),
                                               **report["protocol"]["seg_protocols"]}  # fmt: skip
        # wall time of the earlier invocations (if a file lacks it: the sum of its config times)
        spent = sum(r.get("config_seconds", 0.0) for by_seed in report["runs"].values() for r in by_seed.values())
        t_start -= float(old.get("total_seconds", spent))
    for path in args.merge:
        other = _same_settings(json.loads(Path(path).read_text()), report, Path(path))
        merge_runs(report["runs"], other.get("runs", {}), path)
        # a report resumed from this one repeats its commands: list each command once
        report["commands"] += [f"(merged from {path}) {c}" for c in other.get("commands", [other.get("command")])
                               if c not in report["commands"]]  # fmt: skip
        report["settings"]["seeds"] = sorted({*report["settings"]["seeds"], *map(int, other["settings"]["seeds"])})
        report["protocol"]["seg_protocols"] = {**other["protocol"].get("seg_protocols", {}),
                                               **report["protocol"]["seg_protocols"]}  # fmt: skip
    report["summary"] = summarise(report["runs"])
    report["verdict"] = verdict(report["runs"], ratios)
    atomic_write_json(out, report)
    print(f"data: {len(data)} images, train {len(train_idx)} / test {len(test_idx)} (held out {held}); "
          f"large labels {large}", flush=True)  # fmt: skip
    for seed in seeds:
        for name, ratio, gran in configs:
            done = report["runs"].get(name, {}).get(str(seed))
            missing = [p for p in seg_protocols if done is None or f"seg_{p}_dice_all" not in done]
            if not missing:
                continue  # finished in an earlier run (--resume)
            t0 = time.time()
            torch.manual_seed(seed)
            facts: dict[str, Any] = {}
            if ratio is None:
                from AnatSSLLib.networks.awcl_net import awcl_resnet2d

                # the same weights as the first time: the seed alone decides them
                encoder = awcl_resnet2d(in_channels=1, backbone=args.backbone, widen_factor=args.widen)
            elif done is not None:  # a protocol added to a finished run: its encoder from the cache
                from AnatSSLLib.tools.awcl_eval import load_awcl_encoder

                encoder = load_awcl_encoder(done["encoder_id"], cache=cache)
            else:
                encoder, facts = pretrain(pre, ratio, gran, arch, steps=args.steps, batch_size=args.batch_size,
                                          seed=seed, cache=cache)  # fmt: skip
            res = evaluate_encoder(encoder, data, train_idx, test_idx, seg_steps=args.seg_steps, probes=done is None,
                                   seg_protocols=missing, seg_flip=args.seg_flip, seed=seed, large=large)  # fmt: skip
            if done is not None:
                done.update(res, config_seconds=round(done.get("config_seconds", 0.0) + time.time() - t0, 1))
                res = done
            else:
                res.update(facts, ratio=ratio, granularity=gran, config_seconds=round(time.time() - t0, 1))
            report["runs"].setdefault(name, {})[str(seed)] = res
            report["summary"] = summarise(report["runs"])
            report["verdict"] = verdict(report["runs"], ratios)
            report["total_seconds"] = round(time.time() - t_start, 1)
            atomic_write_json(out, report)
            print(f"seed {seed} {name:18s} probe acc {res['probe_accuracy']:.3f} F1 {res['probe_macro_f1']:.3f} "
                  f"1-subject probe acc {res['probe1_accuracy']:.3f} "
                  + "".join(f"seg {p} dice all {res[f'seg_{p}_dice_all']:.3f} large {res[f'seg_{p}_dice_large']:.3f} "
                            for p in missing)
                  + f"({res['config_seconds']:.0f} s)", flush=True)  # fmt: skip
    report["finished"] = True
    report["total_seconds"] = round(time.time() - t_start, 1)
    atomic_write_json(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
