"""Downstream evaluation of an AWCL encoder on tagged 2D images (issue 6, item 4).

Three protocols on a :class:`~AnatSSLLib.methods.awcl_data.TaggedImageSet`, split **by scan** (no
scan has images on both sides):

- **linear probe**: frozen encoder features ``h`` (standardised on the training split) and a
  multinomial logistic regression (L2, fitted to convergence with L-BFGS); accuracy and macro F1
  of the fine (or coarse) tags;
- **fine-tuning classification**: encoder + linear layer trained end to end (or with the encoder
  frozen) with cross-entropy and light augmentation; same metrics;
- **segmentation fine-tuning**: a small U-Net-like decoder on the encoder's stage maps (strides
  2-32), trained with Dice + cross-entropy (MONAI ``DiceCELoss``), encoder frozen or not; Dice per
  foreground label (MONAI ``DiceMetric``) and their mean on the test split.

AWCL's paper reports P/R/F1 for plane classification and Dice for segmentation (METHODS.md §1,
§5); the exact tasks of the paper (fetal ultrasound) cannot be reproduced offline, so these run on
whatever tagged set the user gives (e.g. :mod:`AnatSSLLib.data.planes`).

Command line: :func:`add_eval_arguments` declares the options and :func:`run_eval` runs them
(the ``anatssl awcl-eval`` verb wires the two).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..methods.awcl_data import TaggedImageSet

__all__ = [
    "SegmentationDecoder",
    "add_eval_arguments",
    "class_labels",
    "classification_metrics",
    "extract_features",
    "finetune_classifier",
    "finetune_segmentation",
    "linear_probe",
    "load_awcl_encoder",
    "run_eval",
    "split_by_scan",
]


# -------------------------------------------------------------------------------------- helpers


def load_awcl_encoder(encoder: str, *, cache=None, backbone: str = "resnet18", in_channels: int = 1) -> nn.Module:
    """An AWCL encoder (:class:`~AnatSSLLib.networks.awcl_net.AWCLEncoder`) from the cache.

    ``encoder``: a cache id, unique prefix or name; or ``"random"`` for a randomly initialised
    ``backbone`` (the random-init baseline).

    Raises:
        CacheError: unknown id or corrupt weights. InputError: the entry is not a 2D AWCL encoder.
    """
    from ..networks.awcl_net import AWCLEncoder, awcl_resnet2d

    if encoder == "random":
        return AWCLEncoder(spatial_dims=2, in_channels=in_channels, backbone=backbone)
    from ..cache import EncoderCache

    cache = cache if cache is not None else EncoderCache()
    eid = cache.resolve(encoder)
    state, manifest = cache.load(eid)
    if manifest.architecture != "awcl_resnet2d":
        raise InputError(
            f"encoder {eid}: expected an AWCL 2D encoder (architecture 'awcl_resnet2d'), "
            f"got {manifest.architecture!r} (method {manifest.method!r})"
        )
    model = awcl_resnet2d(**dict(manifest.architecture_params))
    model.load_state_dict(state)
    return model


def split_by_scan(scan_ids: Sequence[str], test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/test image indices with every scan on one side only (``test_fraction`` of the scans,
    at least one, rounded). With a single scan the images are split at random (with a warning)."""
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction: expected a number in (0, 1), got {test_fraction}")
    ids = np.asarray([str(s) for s in scan_ids])
    scans = np.unique(ids)
    rng = np.random.default_rng(seed)
    if len(scans) < 2:
        warnings.warn("split_by_scan: a single scan, images split at random (train and test share a scan)", stacklevel=2)
        perm = rng.permutation(len(ids))
        k = max(1, int(round(test_fraction * len(ids))))
        return np.sort(perm[k:]), np.sort(perm[:k])
    k = min(len(scans) - 1, max(1, int(round(test_fraction * len(scans)))))
    test_scans = set(rng.permutation(scans)[:k].tolist())
    test = np.array([s in test_scans for s in ids])
    return np.nonzero(~test)[0], np.nonzero(test)[0]


def class_labels(
    data: TaggedImageSet, granularity: str = "fine", label_column: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rows with a class, their class ids and the class names.

    ``label_column``: take classes from this extra CSV column (e.g. ``true_fine_tag`` of a plane
    set) instead of the tags. Untagged rows are left out.

    Raises:
        InputError: fewer than two classes (a classifier cannot be trained on one).
    """
    if label_column:
        if label_column not in data.extra:
            raise InputError(f"label column {label_column!r} not in the CSV; columns: {sorted(data.extra)}")
        tags = [v or None for v in data.extra[label_column]]
    else:
        tags = data.tags(granularity)
    rows = np.array([i for i, t in enumerate(tags) if t is not None], dtype=np.int64)
    names = sorted({tags[i] for i in rows})
    if len(names) < 2:
        raise InputError(
            f"classification needs at least two {label_column or granularity} classes among tagged images, "
            f"got {names} ({len(rows)} tagged images)"
        )
    index = {n: k for k, n in enumerate(names)}
    return rows, np.array([index[tags[i]] for i in rows], dtype=np.int64), names


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 (over classes present in ``y_true`` or ``y_pred``), per-class F1."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    f1s, ps, rs = [], [], []
    per = {}
    for c in range(n_classes):
        tp = int(np.sum((y_pred == c) & (y_true == c)))
        fp = int(np.sum((y_pred == c) & (y_true != c)))
        fn = int(np.sum((y_pred != c) & (y_true == c)))
        if tp + fp + fn == 0:
            continue
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        ps.append(p), rs.append(r), f1s.append(f)
        per[c] = f
    return {
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "macro_precision": float(np.mean(ps)) if ps else float("nan"),
        "macro_recall": float(np.mean(rs)) if rs else float("nan"),
        "macro_f1": float(np.mean(f1s)) if f1s else float("nan"),
        "per_class_f1": per,
        "n_test": int(len(y_true)),
    }


@torch.no_grad()
def extract_features(encoder: nn.Module, images: np.ndarray | Tensor, batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """``h`` of every image, ``(N, F)`` float32, with the encoder in eval mode."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not isinstance(images, Tensor) else images.float()
    was = encoder.training
    encoder.eval().to(device)
    out = [encoder(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    encoder.train(was)
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------------- linear probe


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int | None = None,
    weight_decay: float = 1e-3,
    max_iter: int = 300,
) -> dict[str, Any]:
    """Multinomial logistic regression on frozen features; metrics on the test rows.

    Features are standardised with the training mean/std; the L2 penalty ``weight_decay`` is on
    the weights (not the bias); L-BFGS with strong-Wolfe line search, ``max_iter`` iterations.
    """
    n_classes = int(n_classes or (max(int(train_y.max()), int(test_y.max())) + 1))
    if len(np.unique(train_y)) < 2:
        raise InputError(f"linear probe: the training split holds one class only ({np.unique(train_y).tolist()})")
    xtr = torch.as_tensor(train_x, dtype=torch.float64)
    xte = torch.as_tensor(test_x, dtype=torch.float64)
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    ytr = torch.as_tensor(train_y, dtype=torch.long)
    lin = nn.Linear(xtr.shape[1], n_classes).double()
    nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), ytr) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = lin(xte).argmax(1).numpy()
        train_acc = float((lin(xtr).argmax(1) == ytr).double().mean())
    out = classification_metrics(np.asarray(test_y), pred, n_classes)
    out["train_accuracy"] = train_acc
    return out


# ------------------------------------------------------------------------ fine-tuned classifier


def _light_augment(x: Tensor, g: torch.Generator) -> Tensor:
    from ..methods.awcl import augment_views

    return augment_views(x, g, crop_scale=(0.6, 1.0), jitter_p=0.5, brightness=0.2, contrast=0.2, gamma=(0.9, 1.1))


def finetune_classifier(
    encoder: nn.Module,
    data: TaggedImageSet,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    *,
    freeze: bool = False,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    augment: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train a linear classifier on the encoder (a copy; the given encoder is untouched).

    ``y[i]`` is the class of image ``i`` (indices of ``data``); ``train_idx``/``test_idx`` select
    images. ``freeze``: train only the linear layer (encoder in eval mode). Adam, cross-entropy.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = copy.deepcopy(encoder).to(device)
    feat_dim = int(getattr(enc, "feature_dim", extract_features(enc, data.images[:1]).shape[1]))
    head = nn.Linear(feat_dim, n_classes).to(device)
    params = list(head.parameters()) + ([] if freeze else list(enc.parameters()))
    for p in enc.parameters():
        p.requires_grad_(not freeze)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    images = torch.from_numpy(data.images)
    yt = torch.as_tensor(y, dtype=torch.long)
    train_idx = torch.as_tensor(np.asarray(train_idx), dtype=torch.long)
    losses = []
    for _ in range(int(steps)):
        enc.train(not freeze)
        pick = train_idx[torch.randint(len(train_idx), (min(batch_size, len(train_idx)),), generator=g)]
        x = images[pick]
        if augment:
            x = _light_augment(x, g)
        loss = F.cross_entropy(head(enc(x.to(device))), yt[pick].to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    feats = torch.from_numpy(extract_features(enc, data.images[np.asarray(test_idx)], device=device))
    with torch.no_grad():
        pred = head(feats.to(device)).argmax(1).cpu().numpy()
    out = classification_metrics(np.asarray(y)[np.asarray(test_idx)], pred, n_classes)
    out.update(freeze=bool(freeze), steps=int(steps), final_train_loss=float(np.mean(losses[-10:])))
    return out


# ------------------------------------------------------------------------------- segmentation


class SegmentationDecoder(nn.Module):
    """A small U-Net-like decoder on an :class:`~AnatSSLLib.networks.awcl_net.AWCLEncoder`.

    The encoder's stage maps (strides 2, 4, 8, 16, 32) are merged from the deepest up: upsample
    (bilinear) to the next map's size, concatenate, 3x3 conv + BatchNorm + ReLU to ``width``
    channels; then upsampled to the input size and a 1x1 conv gives ``num_classes`` logits.
    Works for any input size of at least 32 px. ``forward(x (B,C,H,W)) -> (B, num_classes, H, W)``.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, width: int = 32, in_channels: int = 1) -> None:
        super().__init__()
        if not hasattr(encoder, "feature_maps"):
            raise InputError(f"SegmentationDecoder: encoder {type(encoder).__name__} has no feature_maps()")
        self.encoder = encoder
        was = encoder.training
        encoder.eval()
        with torch.no_grad():
            chans = [m.shape[1] for m in encoder.feature_maps(torch.zeros(1, in_channels, 64, 64))]
        encoder.train(was)

        def block(cin: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))

        self.lateral = block(chans[-1])
        self.merge = nn.ModuleList([block(width + c) for c in reversed(chans[:-1])])
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        maps = self.encoder.feature_maps(x)
        y = self.lateral(maps[-1])
        for skip, conv in zip(reversed(maps[:-1]), self.merge):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = conv(torch.cat([y, skip], dim=1))
        y = F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.out(y)


def finetune_segmentation(
    encoder: nn.Module,
    data: TaggedImageSet,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    *,
    freeze: bool = False,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    width: int = 32,
    flip: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train :class:`SegmentationDecoder` on the label maps of ``train_idx``; Dice on ``test_idx``.

    Images without a label map are left out (counted). ``freeze``: the encoder's weights and
    BatchNorm statistics stay fixed. ``flip``: random left-right flips (image and label map
    together, probability 0.5). Turn it off for images in one canonical orientation whose labels
    are lateralised (``*_left``/``*_right``, as in :mod:`AnatSSLLib.data.planes`' axial and coronal
    planes): a flipped image shows the left structure on the right under the left label, so
    position no longer tells the two apart and one label of each pair tends to score 0.

    Returns:
        ``{"dice": {label: value}, "mean_dice": ..., "num_classes", "n_train", "n_test", "freeze", ...}``
        (Dice of foreground labels 1..K-1 over the test images, MONAI ``DiceMetric``, "mean_batch").
    """
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric

    if data.labels is None:
        raise InputError("segmentation: the image set has no label maps (CSV column 'labels')")
    has = data.has_labels
    tr = np.asarray([i for i in train_idx if has[i]], dtype=np.int64)
    te = np.asarray([i for i in test_idx if has[i]], dtype=np.int64)
    if len(tr) == 0 or len(te) == 0:
        raise InputError(f"segmentation: need labelled images on both sides, got {len(tr)} train and {len(te)} test")
    num_classes = int(data.labels[has].max()) + 1
    if num_classes < 2:
        raise InputError("segmentation: the label maps hold background (0) only")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = copy.deepcopy(encoder)
    model = SegmentationDecoder(enc, num_classes, width=width, in_channels=data.images.shape[1]).to(device)
    for p in enc.parameters():
        p.requires_grad_(not freeze)
    params = [p for n, p in model.named_parameters() if not n.startswith("encoder.")] + ([] if freeze else list(enc.parameters()))
    opt = torch.optim.Adam(params, lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    tr_t = torch.as_tensor(tr)
    losses = []
    for _ in range(int(steps)):
        model.train()
        if freeze:
            enc.eval()
        pick = tr_t[torch.randint(len(tr_t), (min(batch_size, len(tr_t)),), generator=g)]
        x, y = images[pick], labels[pick][:, None].float()
        if flip:
            flipped = torch.rand(len(pick), generator=g) < 0.5
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
            y = torch.where(flipped.view(-1, 1, 1, 1), y.flip(-1), y)
        loss = loss_fn(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    with torch.no_grad():
        for i in range(0, len(te), 32):
            rows = torch.as_tensor(te[i : i + 32])
            pred = model(images[rows].to(device)).argmax(1).cpu()
            metric(F.one_hot(pred, num_classes).permute(0, 3, 1, 2).float(),
                   F.one_hot(labels[rows], num_classes).permute(0, 3, 1, 2).float())  # fmt: skip
    per = metric.aggregate().cpu().numpy().tolist()
    dice = {int(k + 1): float(v) for k, v in enumerate(per)}
    finite = [v for v in dice.values() if math.isfinite(v)]
    return {
        "dice": dice,
        "mean_dice": float(np.mean(finite)) if finite else float("nan"),
        "num_classes": num_classes,
        "n_train": int(len(tr)),
        "n_test": int(len(te)),
        "unlabelled_left_out": int(len(train_idx) + len(test_idx) - len(tr) - len(te)),
        "freeze": bool(freeze),
        "flip": bool(flip),
        "steps": int(steps),
        "final_train_loss": float(np.mean(losses[-10:])),
    }


# ------------------------------------------------------------------------------- command line


def add_eval_arguments(parser) -> None:
    """Options of ``anatssl awcl-eval`` (and ``parser.set_defaults(run=run_eval)``)."""
    parser.add_argument("--csv", required=True, help="image list CSV (image, scan_id, coarse_tag, fine_tag[, labels, frame])")
    parser.add_argument("--root", default=None, help="folder relative image paths start from (default: the CSV's folder)")
    parser.add_argument("--encoder", required=True, help="cache id, prefix or name of an AWCL encoder; 'random' for a random-init baseline")
    parser.add_argument("--backbone", default="resnet18", help="backbone of --encoder random (default resnet18)")
    parser.add_argument("--task", nargs="+", choices=("probe", "finetune", "segment"), default=["probe"],
                        help="linear probe, fine-tuned classification and/or segmentation (default probe)")
    parser.add_argument("--granularity", choices=("coarse", "fine"), default="fine", help="tags to classify (default fine)")
    parser.add_argument("--label-column", default=None,
                        help="classify this CSV column instead of the tags (e.g. true_fine_tag of a plane set)")
    parser.add_argument("--freeze", action="store_true", help="keep the encoder frozen when fine-tuning (finetune, segment)")
    parser.add_argument("--no-flip", action="store_true",
                        help="segment: no random left-right flips (images in one orientation with left/right labels)")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels the images are brought to (default 96)")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="fraction of scans held out for testing (default 0.3)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps of fine-tuning (default 300)")
    parser.add_argument("--batch-size", type=int, default=32, help="fine-tuning batch size (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--cache-dir", default=None, help="encoder cache folder (default: the user cache)")
    parser.add_argument("--out", default=None, help="also write the results as JSON to this file")
    parser.set_defaults(run=run_eval)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate(args) -> dict[str, Any]:
    """Run the evaluations ``args`` ask for (see :func:`add_eval_arguments`); return the results."""
    from ..cache import EncoderCache
    from ..methods.awcl_data import read_tagged_images

    data = read_tagged_images(args.csv, root=args.root, size=(args.size, args.size))
    cache = EncoderCache(args.cache_dir) if getattr(args, "cache_dir", None) else None
    encoder = load_awcl_encoder(args.encoder, cache=cache, backbone=args.backbone, in_channels=data.images.shape[1])
    train_idx, test_idx = split_by_scan(data.scan_ids, args.test_fraction, args.seed)
    results: dict[str, Any] = {
        "encoder": args.encoder,
        "csv": str(args.csv),
        "n_images": len(data),
        "n_train_scans": len({data.scan_ids[i] for i in train_idx}),
        "n_test_scans": len({data.scan_ids[i] for i in test_idx}),
    }
    if {"probe", "finetune"} & set(args.task):
        rows, y, names = class_labels(data, args.granularity, args.label_column)
        y_all = np.full(len(data), -1, dtype=np.int64)
        y_all[rows] = y
        tr, te = train_idx[y_all[train_idx] >= 0], test_idx[y_all[test_idx] >= 0]
        results["classes"] = names
        if "probe" in args.task:
            feats = extract_features(encoder, data.images, device=args.device)
            results["probe"] = linear_probe(feats[tr], y_all[tr], feats[te], y_all[te], len(names))
        if "finetune" in args.task:
            results["finetune"] = finetune_classifier(
                encoder, data, tr, te, y_all, len(names), freeze=args.freeze, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
            )  # fmt: skip
    if "segment" in args.task:
        results["segment"] = finetune_segmentation(
            encoder, data, train_idx, test_idx, freeze=args.freeze, steps=args.steps,
            batch_size=min(args.batch_size, 16), lr=args.lr, flip=not getattr(args, "no_flip", False),
            seed=args.seed, device=args.device,
        )  # fmt: skip
    return results


def run_eval(args) -> int:
    """CLI handler: print the results as JSON (and write ``--out``); exit code 0."""
    results = evaluate(args)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        _atomic_write_text(Path(args.out), text + "\n")
    return 0
