"""AWCL's data interface: a folder of 2D images listed in a CSV with scan ids and anatomy tags.

The CSV has one row per image (or per multi-frame file, see ``frame``) and these columns:

- ``image`` (required): path of a 2D image (PNG, JPEG, BMP, TIFF, 2D DICOM or NIfTI, anything
  SimpleITK reads) or of a multi-frame file (e.g. an ultrasound cine DICOM). Relative paths are
  resolved against ``root`` (default: the CSV's folder).
- ``scan_id`` (required): the scan (video, volume, subject) the image comes from.
- ``coarse_tag``, ``fine_tag`` (optional columns): anatomy tags at coarse and fine granularity.
  An empty cell (or ``NA``, ``None``, ``nan``, ``-1``) means *untagged*: the image still takes part
  in pretraining, as AWCL's unlabelled pool does (its only positive is an augmented view of itself).
- ``frame`` (optional): 0-based frame of a multi-frame file. Empty: every frame becomes an image
  with the row's scan id and tags.
- ``labels`` (optional): a label-map image (same geometry as the image) for segmentation
  evaluation; resized with nearest neighbour.

This accepts the plane sets of :mod:`AnatSSLLib.data.planes` (``planes.csv``: image, labels,
scan_id, coarse_tag, fine_tag, contrast, true_coarse_tag, ...); columns not named above are kept
as strings in :attr:`TaggedImageSet.extra` (e.g. ``true_fine_tag`` for evaluation).

Bad input is never dropped silently:

- rows whose image is missing or unreadable are dropped with **one warning that counts them**
  (and names the first few); if none is left, :class:`~AnatSSLLib.errors.InputError`;
- colour images (RGB/RGBA) are converted to grey (ITU-R 601 luma, alpha ignored) and multi-channel
  images of other kinds keep their first channel, with a warning that counts them; a 3D file is
  read as frames;
- images whose size differs from ``size`` are resized (padded to the target aspect ratio first
  unless ``fit="stretch"``), with a warning counting them if the sizes are mixed;
- a tag column with a single class among tagged images gets a warning (AWCL then makes every
  tagged pair positive, i.e. the tags carry no anatomy); tags held by a single image also get a
  warning (they cannot give cross-image positives). Evaluation (:mod:`AnatSSLLib.tools.awcl_eval`)
  raises instead, since a one-class classifier cannot be trained.

Intensities: 8-bit images are divided by 255 (manifest intensity ``{"kind": "window", "min": 0,
"max": 255}``); other pixel types are mapped per image from their (0.5, 99.5) percentiles to [0, 1].
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["Granularity", "TaggedImageSet", "UNTAGGED_VALUES", "check_tags", "read_tagged_images"]

UNTAGGED_VALUES = frozenset({"", "na", "n/a", "none", "nan", "null", "-1", "untagged"})
_KNOWN_COLUMNS = ("image", "scan_id", "coarse_tag", "fine_tag", "frame", "labels")
_MAX_NAMED = 5


class Granularity(str, enum.Enum):
    """Tag granularity: which tag column defines anatomy (AWCL: fine beats coarse)."""

    COARSE = "coarse"
    FINE = "fine"

    @classmethod
    def check(cls, value: Granularity | str) -> str:
        """The option's string value; InputError for an unknown name."""
        try:
            return cls(str(getattr(value, "value", value)).lower()).value
        except ValueError:
            raise InputError(f"granularity: expected 'coarse' or 'fine', got {value!r}") from None


@dataclasses.dataclass
class TaggedImageSet:
    """Tagged 2D images, all of one size.

    Attributes:
        images: ``(N, 1, H, W)`` float32 in [0, 1].
        scan_ids: N scan ids.
        coarse, fine: N tags each, ``None`` where untagged.
        labels: ``(N, H, W)`` int64 label maps, -1 where a row has no label map; None if no row has one.
        paths: N source descriptions (``path`` or ``path#frame``).
        intensity: how intensities were mapped (a manifest ``intensity`` entry).
        extra: other CSV columns, N strings each.
    """

    images: np.ndarray
    scan_ids: list[str]
    coarse: list[str | None]
    fine: list[str | None]
    labels: np.ndarray | None = None
    paths: list[str] = dataclasses.field(default_factory=list)
    intensity: dict[str, Any] = dataclasses.field(default_factory=dict)
    extra: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[1] != 1:
            raise InputError(f"TaggedImageSet images: expected (N, 1, H, W), got {self.images.shape}")
        for name in ("scan_ids", "coarse", "fine"):
            if len(getattr(self, name)) != n:
                raise InputError(f"TaggedImageSet {name}: expected {n} entries, got {len(getattr(self, name))}")
        if self.labels is not None and self.labels.shape != (n, *self.images.shape[2:]):
            raise InputError(
                f"TaggedImageSet labels: expected shape {(n, *self.images.shape[2:])}, got {self.labels.shape}"
            )
        if not self.paths:
            self.paths = [f"#{i}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` pixels."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def tags(self, granularity: str = "fine") -> list[str | None]:
        """The tags at ``"coarse"`` or ``"fine"`` granularity (``None`` = untagged)."""
        return list(self.coarse if Granularity.check(granularity) == "coarse" else self.fine)

    @property
    def has_labels(self) -> np.ndarray:
        """``(N,)`` bool: rows with a label map."""
        if self.labels is None:
            return np.zeros(len(self), bool)
        return (self.labels >= 0).all(axis=(1, 2))

    def subset(self, index: Sequence[int] | np.ndarray) -> TaggedImageSet:
        """The rows ``index`` (a new set; arrays copied)."""
        idx = np.asarray(index, dtype=np.int64)
        pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
        return TaggedImageSet(
            images=self.images[idx].copy(),
            scan_ids=pick(self.scan_ids),
            coarse=pick(self.coarse),
            fine=pick(self.fine),
            labels=None if self.labels is None else self.labels[idx].copy(),
            paths=pick(self.paths),
            intensity=dict(self.intensity),
            extra={k: pick(v) for k, v in self.extra.items()},
        )

    def fingerprint(self) -> str:
        """sha256 (hex) over the sources, scan ids, tags and pixel data: identifies the data set."""
        h = hashlib.sha256()
        for row in zip(self.paths, self.scan_ids, self.coarse, self.fine):
            h.update(repr(row).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------------------------------- reading


def _clean_tag(value: str | None) -> str | None:
    if value is None:
        return None
    v = value.strip()
    return None if v.lower() in UNTAGGED_VALUES else v


def _read_frames(path: Path) -> tuple[list[np.ndarray], str, bool]:
    """Frames ``(H, W)`` of an image file, a note on conversions ("", "colour" or "channels") and
    whether the pixels are 8-bit unsigned."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)  # (H, W[, C]) or (D, H, W[, C])
    eight_bit = arr.dtype == np.uint8
    note = ""
    if ncomp > 1:
        if ncomp in (3, 4):
            rgb = arr[..., :3].astype(np.float64)
            arr = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
            note = "colour"
        else:
            arr = arr[..., 0]
            note = "channels"
    if arr.ndim == 2:
        frames = [arr]
    elif arr.ndim == 3:
        frames = [arr[k] for k in range(arr.shape[0])]
    else:
        raise InputError(f"{path}: expected a 2D image or a stack of 2D frames, got an array of shape {arr.shape}")
    return frames, note, bool(eight_bit)


def _to_unit(frame: np.ndarray, eight_bit: bool) -> np.ndarray:
    a = np.asarray(frame, dtype=np.float64)
    if eight_bit:
        return np.clip(a / 255.0, 0.0, 1.0)
    lo, hi = np.percentile(a, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(a.min()), float(a.max())
    if not hi > lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def _fit(array: np.ndarray, size: tuple[int, int], fit: str, nearest: bool, fill: float) -> np.ndarray:
    """Resize ``(h, w)`` to ``size`` (H, W): pad to the target aspect ratio (``fit="pad"``) or not."""
    import torch
    import torch.nn.functional as F

    H, W = size
    h, w = array.shape
    if (h, w) == (H, W):
        return array
    if fit == "pad":
        # smallest canvas with the target aspect ratio that holds the image, image centred
        ch, cw = max(h, int(np.ceil(w * H / W))), max(w, int(np.ceil(h * W / H)))
        canvas = np.full((ch, cw), fill, dtype=array.dtype)
        y0, x0 = (ch - h) // 2, (cw - w) // 2
        canvas[y0 : y0 + h, x0 : x0 + w] = array
        array = canvas
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    if nearest:
        out = F.interpolate(t, size=(H, W), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def _named(items: list[str]) -> str:
    head = ", ".join(items[:_MAX_NAMED])
    return head + (f", ... ({len(items) - _MAX_NAMED} more)" if len(items) > _MAX_NAMED else "")


def read_tagged_images(
    csv_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    size: tuple[int, int] | int = (96, 96),
    fit: str = "pad",
    with_labels: bool = True,
) -> TaggedImageSet:
    """Read the images listed in an AWCL CSV (see the module docstring for the columns).

    Args:
        csv_path: the CSV file.
        root: folder relative image paths are resolved against (default: the CSV's folder).
        size: ``(H, W)`` (or one int) every image is brought to.
        fit: ``"pad"`` (pad to the target aspect ratio with the image minimum, then resize; keeps
            shapes) or ``"stretch"`` (resize directly).
        with_labels: read the ``labels`` column's label maps when present.

    Returns:
        :class:`TaggedImageSet`.

    Raises:
        InputError: the CSV is missing, lacks ``image``/``scan_id`` columns, has no row, or no
            listed image could be read; a bad ``frame`` value; an unknown ``fit``.

    Warns:
        UserWarning: dropped rows (missing/unreadable images, frames out of range), converted
            colour or multi-channel images, resized images of mixed sizes, missing label maps, a tag
            column with a single class, tags held by one image only. Each warning counts.
    """
    csv_path = Path(csv_path)
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = (int(size[0]), int(size[1]))
    if min(size) < 8:
        raise InputError(f"size: expected (H, W) of at least 8 px each, got {size}")
    if fit not in ("pad", "stretch"):
        raise InputError(f"fit: expected 'pad' or 'stretch', got {fit!r}")
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: image list CSV not found")
    base = Path(root) if root is not None else csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        missing_cols = [c for c in ("image", "scan_id") if c not in columns]
        if missing_cols:
            raise InputError(
                f"{csv_path}: expected columns image and scan_id (optional coarse_tag, fine_tag, frame, "
                f"labels), missing {missing_cols}; got {columns}"
            )
        rows = list(reader)
    if not rows:
        raise InputError(f"{csv_path}: the CSV lists no image")
    extra_cols = [c for c in columns if c not in _KNOWN_COLUMNS]

    images: list[np.ndarray] = []
    label_maps: list[np.ndarray | None] = []
    scan_ids: list[str] = []
    coarse: list[str | None] = []
    fine: list[str | None] = []
    paths: list[str] = []
    extra: dict[str, list[str]] = {c: [] for c in extra_cols}
    dropped: list[str] = []
    bad_frames: list[str] = []
    converted: Counter[str] = Counter()
    sizes: Counter[tuple[int, int]] = Counter()
    eight_bit_all = True
    raw_frames: list[tuple[np.ndarray, bool]] = []
    labels_missing: list[str] = []
    have_label_col = with_labels and "labels" in columns

    for line, row in enumerate(rows, start=2):
        rel = (row.get("image") or "").strip()
        if not rel:
            dropped.append(f"line {line} (empty image cell)")
            continue
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        if not path.is_file():
            dropped.append(f"{rel} (not found)")
            continue
        try:
            frames, note, eight = _read_frames(path)
        except (RuntimeError, InputError) as exc:  # SimpleITK raises RuntimeError on unreadable files
            dropped.append(f"{rel} (unreadable: {str(exc).strip().splitlines()[0][:80]})")
            continue
        if note:
            converted[note] += 1
        frame_cell = (row.get("frame") or "").strip()
        if frame_cell:
            try:
                k = int(frame_cell)
            except ValueError:
                raise InputError(f"{csv_path} line {line}: frame must be a 0-based integer, got {frame_cell!r}") from None
            if not 0 <= k < len(frames):
                bad_frames.append(f"{rel}#{k} (has {len(frames)} frames)")
                continue
            chosen = [(k, frames[k])]
        else:
            chosen = list(enumerate(frames))
        lab_frames: list[np.ndarray] | None = None
        lab_rel = (row.get("labels") or "").strip() if have_label_col else ""
        if lab_rel:
            lab_path = Path(lab_rel) if Path(lab_rel).is_absolute() else base / lab_rel
            try:
                lab_frames = _read_frames(lab_path)[0] if lab_path.is_file() else None
            except (RuntimeError, InputError):
                lab_frames = None
            if lab_frames is None:
                labels_missing.append(lab_rel)
        eight_bit_all &= eight
        for k, frame in chosen:
            sizes[frame.shape] += 1
            raw_frames.append((frame, eight))
            lab = None
            if lab_frames is not None:
                if k < len(lab_frames) and lab_frames[k].shape == frame.shape:
                    lab = lab_frames[k]
                else:
                    labels_missing.append(f"{lab_rel} (shape does not match the image)")
            label_maps.append(lab)
            scan_ids.append((row.get("scan_id") or "").strip())
            coarse.append(_clean_tag(row.get("coarse_tag")))
            fine.append(_clean_tag(row.get("fine_tag")))
            paths.append(str(path) if len(frames) == 1 else f"{path}#{k}")
            for c in extra_cols:
                extra[c].append((row.get(c) or "").strip())

    if dropped:
        warnings.warn(
            f"{csv_path}: dropped {len(dropped)} of {len(rows)} rows whose image is missing or unreadable: "
            f"{_named(dropped)}",
            stacklevel=2,
        )
    if bad_frames:
        warnings.warn(f"{csv_path}: dropped {len(bad_frames)} rows whose frame is out of range: {_named(bad_frames)}", stacklevel=2)
    if not raw_frames:
        raise InputError(f"{csv_path}: none of the {len(rows)} listed images could be read (see the warning above)")
    empty_scan = sum(1 for s in scan_ids if not s)
    if empty_scan:
        warnings.warn(f"{csv_path}: {empty_scan} images have an empty scan_id; each is treated as its own scan", stacklevel=2)
        scan_ids = [s if s else f"__row{i}" for i, s in enumerate(scan_ids)]
    if converted:
        warnings.warn(
            f"{csv_path}: converted to grey: {converted.get('colour', 0)} colour images (luma), "
            f"{converted.get('channels', 0)} multi-channel images (first channel kept)",
            stacklevel=2,
        )
    n_resized = sum(c for s, c in sizes.items() if s != size)
    if len(sizes) > 1:
        desc = ", ".join(f"{c} of {s[0]}x{s[1]}" for s, c in sizes.most_common(_MAX_NAMED))
        warnings.warn(
            f"{csv_path}: images of mixed sizes ({desc}); {n_resized} resized to {size[0]}x{size[1]} ({fit})",
            stacklevel=2,
        )

    for frame, eight in raw_frames:
        unit = _to_unit(frame, eight and eight_bit_all)
        images.append(_fit(unit, size, fit, nearest=False, fill=0.0).astype(np.float32))
    stack = np.clip(np.stack(images)[:, None], 0.0, 1.0).astype(np.float32)

    labels = None
    if have_label_col and any(m is not None for m in label_maps):
        labels = np.full((len(images), *size), -1, dtype=np.int64)
        for i, m in enumerate(label_maps):
            if m is not None:
                labels[i] = np.rint(_fit(np.asarray(m, np.float64), size, fit, nearest=True, fill=0.0)).astype(np.int64)
    if labels_missing:
        warnings.warn(
            f"{csv_path}: {len(labels_missing)} label maps missing, unreadable or not matching their image "
            f"(those images have no labels: -1): {_named(labels_missing)}",
            stacklevel=2,
        )

    intensity = (
        {"kind": "window", "min": 0.0, "max": 255.0}
        if eight_bit_all
        else {"kind": "percentile", "lower": 0.5, "upper": 99.5}
    )
    out = TaggedImageSet(stack, scan_ids, coarse, fine, labels, paths, intensity, extra)
    check_tags(out, source=str(csv_path))
    return out


def check_tags(data: TaggedImageSet, source: str = "image set") -> dict[str, dict[str, int]]:
    """Warn about tag columns that cannot teach anatomy; return ``{granularity: {tag: count}}``.

    A column whose tagged images all share one tag, and tags held by a single image, get a
    warning each (counted). No tag at all is fine (AWCL is then SimCLR) and gets no warning.
    """
    counts: dict[str, dict[str, int]] = {}
    for gran in ("coarse", "fine"):
        c = Counter(t for t in data.tags(gran) if t is not None)
        counts[gran] = dict(c)
        if len(c) == 1:
            (tag, n), = c.items()
            warnings.warn(
                f"{source}: every tagged image has the same {gran} tag {tag!r} ({n} images): "
                f"{gran} tags then make all tagged images mutual positives and carry no anatomy",
                stacklevel=3,
            )
        single = sorted(t for t, n in c.items() if n == 1)
        if single and len(c) > 1:
            warnings.warn(
                f"{source}: {len(single)} {gran} tags are held by one image only (no cross-image "
                f"positive for them): {_named(single)}",
                stacklevel=3,
            )
    return counts
