"""Labelled point sets in physical space, and their files (Slicer markups, CSV).

A :class:`PointSet` holds positions in **LPS** millimetres (the ITK frame every array of the
library uses); files and Slicer nodes name their own frame and are converted on the way in and
out.

Files (:func:`read_points`, :func:`write_points`):

- ``.mrk.json``: Slicer markups (schema ``markups-schema-v1.0.3``), ``coordinateSystem`` LPS or
  RAS, ``coordinateUnits`` mm (or um, converted).
- ``.fcsv``: Slicer's older markups fiducial CSV (v4.x/5.x), ``# CoordinateSystem = 0|RAS`` or
  ``1|LPS`` (read only).
- ``.csv``: a plain table with the header ``label,x,y,z[,confidence][,description][,frame]``;
  the frame (``RAS`` or ``LPS``) comes from a ``frame`` column or a first line ``# frame: RAS``,
  and is **LPS when neither is given**.

A confidence is kept in the Slicer description as ``confidence=<value>`` (the shortest text that
reads back to the same float), after any other description text and a ``"; "``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import InputError
from .image import atomic_output, lps_to_ras, ras_to_lps

__all__ = ["PointSet", "read_points", "write_points", "MARKUPS_SCHEMA"]

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)


@dataclasses.dataclass
class PointSet:
    """Labelled physical points.

    Args:
        labels: one label per point (e.g. the AFID name or number), unique within the set.
        positions: ``(N, 3)`` LPS millimetres.
        descriptions: optional free text per point (Slicer's control-point description).
        confidence: optional score per point (higher is surer), e.g. from the landmark tool.
    """

    labels: list[str]
    positions: np.ndarray
    descriptions: list[str] | None = None
    confidence: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = [str(label) for label in self.labels]
        self.positions = np.asarray(self.positions, dtype=float).reshape(-1, 3)
        n = len(self.labels)
        if self.positions.shape[0] != n:
            raise InputError(f"{n} labels but {self.positions.shape[0]} positions")
        if not np.all(np.isfinite(self.positions)):
            raise InputError("point positions must be finite")
        if self.descriptions is not None and len(self.descriptions) != n:
            raise InputError(f"{n} points but {len(self.descriptions)} descriptions")
        if self.confidence is not None:
            self.confidence = np.asarray(self.confidence, dtype=float).reshape(-1)
            if self.confidence.shape[0] != n:
                raise InputError(f"{n} points but {self.confidence.shape[0]} confidence values")

    def __len__(self) -> int:
        return len(self.labels)

    def position(self, label: str) -> np.ndarray:
        """LPS position of the point called ``label``."""
        try:
            return self.positions[self.labels.index(str(label))]
        except ValueError:
            raise InputError(f"no point labelled {label!r}; labels are {self.labels}") from None

    def subset(self, labels: Sequence[str]) -> "PointSet":
        """The points called ``labels``, in that order (descriptions and confidence follow)."""
        index = {}
        for i, label in enumerate(self.labels):
            index.setdefault(label, i)
        wanted = [str(label) for label in labels]
        missing = [label for label in wanted if label not in index]
        if missing:
            raise InputError(f"no point labelled {missing}; labels are {self.labels}")
        rows = [index[label] for label in wanted]
        return PointSet(
            wanted,
            self.positions[rows],
            None if self.descriptions is None else [self.descriptions[i] for i in rows],
            None if self.confidence is None else self.confidence[rows],
        )

    def to_ras(self) -> np.ndarray:
        """Positions ``(N, 3)`` in RAS millimetres (Slicer's frame)."""
        return lps_to_ras(self.positions)

    @classmethod
    def from_ras(
        cls,
        labels: Sequence[str],
        ras: np.ndarray | Sequence[Sequence[float]],
        descriptions: list[str] | None = None,
        confidence: np.ndarray | None = None,
    ) -> "PointSet":
        """A point set from positions ``(N, 3)`` in RAS millimetres (stored as LPS)."""
        return cls(list(labels), ras_to_lps(np.asarray(ras, dtype=float).reshape(-1, 3)), descriptions, confidence)


# ---- confidence in descriptions ------------------------------------------------------------------
_CONFIDENCE = re.compile(r"(?:^|;\s*)confidence=([^;\s]+)\s*$")


def _split_confidence(description: str) -> tuple[str, float]:
    """``"text; confidence=0.87"`` -> ``("text", 0.87)``; no confidence gives NaN."""
    match = _CONFIDENCE.search(description)
    if not match:
        return description, float("nan")
    try:
        value = float(match.group(1))
    except ValueError:
        return description, float("nan")
    return description[: match.start()].rstrip(), value


def _join_confidence(description: str, confidence: float) -> str:
    if not np.isfinite(confidence):
        return description
    text = f"confidence={float(confidence)!r}"
    return f"{description}; {text}" if description else text


def _point_set(
    labels: list[str], positions: list, descriptions: list[str], confidence: list[float], frame: str, name: str
) -> PointSet:
    """Assemble a PointSet (LPS) from parsed rows in ``frame``; empty descriptions/confidence become None."""
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    if frame == "RAS":
        pos = ras_to_lps(pos)
    seen: set[str] = set()
    dupes = sorted({label for label in labels if label in seen or seen.add(label)})
    if dupes:
        warnings.warn(f"{name}: labels {dupes} occur more than once; lookups by label take the first", stacklevel=4)
    conf = np.asarray(confidence, dtype=float)
    try:
        return PointSet(
            labels,
            pos,
            descriptions if any(descriptions) else None,
            conf if np.isfinite(conf).any() else None,
        )
    except InputError as exc:
        raise InputError(f"{name}: {exc}") from None


def _frame(value: object, name: str, where: str) -> str:
    text = str(value).strip().upper()
    if text in ("RAS", "0"):
        return "RAS"
    if text in ("LPS", "1"):
        return "LPS"
    raise InputError(f"{name}: {where} must be RAS or LPS, got {value!r}")


# ---- reading -------------------------------------------------------------------------------------
def read_points(path: str | os.PathLike) -> PointSet:
    """Read labelled points from a Slicer ``.mrk.json``, a Slicer ``.fcsv`` or a plain ``.csv``.

    Positions are returned in **LPS** mm whatever the file's frame. Plain CSV without a ``frame``
    column or a ``# frame:`` line is taken to be LPS. Control points whose position is undefined
    are skipped with a warning. A ``confidence=<value>`` in a description becomes
    ``PointSet.confidence`` (NaN for points without one).

    Raises:
        InputError: a missing or unreadable file, an unknown extension, frame or unit, or a
            malformed row.
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise InputError(f"{name}: no such file")
    lower = path.name.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name}: cannot read the file as text ({exc})") from None
    if lower.endswith(".json"):
        return _read_markups_json(text, name)
    if lower.endswith(".fcsv") or (lower.endswith(".csv") and text.lstrip().startswith("# Markups fiducial file")):
        return _read_fcsv(text, name)
    if lower.endswith(".csv"):
        return _read_csv(text, name)
    raise InputError(f"{name}: unknown point file type; expected .mrk.json, .fcsv or .csv")


def _read_markups_json(text: str, name: str) -> PointSet:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name}: not valid JSON ({exc})") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list) or not markups or not isinstance(markups[0], dict):
        raise InputError(f"{name}: expected a Slicer markups file with a non-empty 'markups' list")
    if len(markups) > 1:
        warnings.warn(f"{name}: holds {len(markups)} markups; reading only the first", stacklevel=3)
    markup = markups[0]
    frame = _frame(markup.get("coordinateSystem", "LPS"), name, "coordinateSystem")
    units = markup.get("coordinateUnits", "mm")
    unit = units[0] if isinstance(units, list) and units else units
    scale = {"mm": 1.0, "um": 1e-3}.get(str(unit))
    if scale is None:
        raise InputError(f"{name}: coordinateUnits must be mm (or um), got {units!r}")
    labels, positions, descriptions, confidence, undefined = [], [], [], [], []
    for n, cp in enumerate(markup.get("controlPoints") or []):
        label = str(cp.get("label") or cp.get("id") or f"point {n}")
        position = cp.get("position")
        if cp.get("positionStatus", "defined") == "undefined" or position is None:
            undefined.append(label)
            continue
        try:
            xyz = [float(v) for v in position]
        except (TypeError, ValueError):
            xyz = []
        if len(xyz) != 3:
            raise InputError(f"{name}: control point {label!r} has position {position!r}; expected 3 numbers")
        description, conf = _split_confidence(str(cp.get("description") or ""))
        labels.append(label)
        positions.append([v * scale for v in xyz])
        descriptions.append(description)
        confidence.append(conf)
    if undefined:
        warnings.warn(f"{name}: skipped control points with no defined position: {undefined}", stacklevel=3)
    return _point_set(labels, positions, descriptions, confidence, frame, name)


_FCSV_COLUMNS = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc", "associatedNodeID"]


def _read_fcsv(text: str, name: str) -> PointSet:
    frame, columns = "RAS", list(_FCSV_COLUMNS)  # Slicer 4 files without the line are RAS
    rows: list[tuple[int, list[str]]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key = key.strip().lower()
            if key == "coordinatesystem":
                if value.strip().upper() in ("2", "IJK"):
                    raise InputError(
                        f"{name}: CoordinateSystem = {value.strip()} (IJK) is not supported; "
                        f"expected RAS (0) or LPS (1)"
                    )
                frame = _frame(value, name, "CoordinateSystem")
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
            continue
        if line.strip():
            rows.append((lineno, next(csv.reader([line]))))
    col = {c: i for i, c in enumerate(columns)}
    missing = [c for c in ("x", "y", "z") if c not in col]
    if missing:
        raise InputError(f"{name}: the columns line lacks {missing}; got {columns}")
    labels, positions, descriptions, confidence = [], [], [], []
    for lineno, row in rows:
        def cell(key: str, row: list[str] = row) -> str:
            i = col.get(key)
            return row[i] if i is not None and i < len(row) else ""

        try:
            xyz = [float(cell(c)) for c in ("x", "y", "z")]
        except ValueError:
            raise InputError(f"{name}, line {lineno}: expected numbers in x, y, z, got {row[1:4]}") from None
        description, conf = _split_confidence(cell("desc"))
        labels.append(cell("label") or cell("id") or f"point {len(labels)}")
        positions.append(xyz)
        descriptions.append(description)
        confidence.append(conf)
    return _point_set(labels, positions, descriptions, confidence, frame, name)


def _read_csv(text: str, name: str) -> PointSet:
    lines = text.splitlines()
    default_frame = "LPS"
    match = re.match(r"#\s*frame\s*[:=]\s*(\S+)", lines[0].strip(), re.IGNORECASE) if lines else None
    if match:
        default_frame = _frame(match.group(1), name, "the '# frame:' line")
    body = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not body:
        raise InputError(f"{name}: empty; expected a header label,x,y,z[,confidence][,description]")
    reader = csv.reader(io.StringIO("\n".join(body)))
    header = [h.strip().lower() for h in next(reader)]
    col = {h: i for i, h in enumerate(header)}
    missing = [c for c in ("label", "x", "y", "z") if c not in col]
    if missing:
        raise InputError(
            f"{name}: the header lacks {missing}; expected label,x,y,z[,confidence][,description], got {header}"
        )
    labels, positions, descriptions, confidence = [], [], [], []
    for n, row in enumerate(reader, 2):
        def cell(key: str, row: list[str] = row) -> str:
            i = col.get(key)
            return row[i].strip() if i is not None and i < len(row) else ""

        try:
            xyz = [float(cell(c)) for c in ("x", "y", "z")]
            conf = float(cell("confidence")) if cell("confidence") else float("nan")
        except ValueError:
            raise InputError(f"{name}, row {n}: expected numbers in x, y, z (and confidence), got {row}") from None
        frame = _frame(cell("frame"), name, f"row {n} frame") if cell("frame") else default_frame
        labels.append(cell("label"))
        positions.append(xyz if frame == "LPS" else list(ras_to_lps(xyz)))
        descriptions.append(cell("description"))
        confidence.append(conf)
    return _point_set(labels, positions, descriptions, confidence, "LPS", name)


# ---- writing -------------------------------------------------------------------------------------
def write_points(points: PointSet, path: str | os.PathLike, *, frame: str = "LPS") -> Path:
    """Write ``points`` to a Slicer ``.mrk.json`` or a plain ``.csv``, atomically.

    Args:
        points: the points (LPS mm).
        path: ``.mrk.json`` (a Slicer Fiducial markups file Slicer 5 loads) or ``.csv``
            (``label,x,y,z,frame[,confidence][,description]``).
        frame: the frame of the written coordinates, "LPS" (Slicer's default for files) or "RAS".

    The confidence of each point is written as ``confidence=<value>`` in its description (and, in
    CSV, in its own column); :func:`read_points` gives it back exactly.

    Returns:
        The path written.
    """
    path = Path(path)
    frame = _frame(frame, str(path), "frame")
    pos = points.positions if frame == "LPS" else lps_to_ras(points.positions)
    n = len(points)
    descriptions = points.descriptions or [""] * n
    confidence = points.confidence if points.confidence is not None else np.full(n, np.nan)
    lower = path.name.lower()
    if lower.endswith(".json"):
        text = _markups_json(points.labels, pos, descriptions, confidence, frame, path)
    elif lower.endswith(".csv"):
        text = _csv_text(points.labels, pos, descriptions, confidence, frame, points.confidence is not None)
    else:
        raise InputError(f"{path}: unknown point file type; expected .mrk.json or .csv")
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    return path


def _markups_json(labels, pos, descriptions, confidence, frame: str, path: Path) -> str:
    # Slicer stores the (identity, in RAS) control point orientation converted to the file frame.
    flip = -1.0 if frame == "LPS" else 1.0
    orientation = [flip, 0.0, 0.0, 0.0, flip, 0.0, 0.0, 0.0, 1.0]
    control_points = [
        {
            "id": str(i + 1),
            "label": label,
            "description": _join_confidence(descriptions[i] or "", float(confidence[i])),
            "associatedNodeID": "",
            "position": [float(v) for v in pos[i]],
            "orientation": orientation,
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, label in enumerate(labels)
    ]
    stem = path.name[: -len(".mrk.json")] if path.name.lower().endswith(".mrk.json") else path.stem
    doc = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "name": stem,
                "coordinateSystem": frame,
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(labels),
                "controlPoints": control_points,
                "measurements": [],
            }
        ],
    }
    return json.dumps(doc, indent=4) + "\n"


def _csv_text(labels, pos, descriptions, confidence, frame: str, with_confidence: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["label", "x", "y", "z", "frame", "confidence", "description"] if with_confidence
                    else ["label", "x", "y", "z", "frame", "description"])
    for i, label in enumerate(labels):
        row = [label, *(repr(float(v)) for v in pos[i]), frame]
        if with_confidence:
            row.append(repr(float(confidence[i])) if np.isfinite(confidence[i]) else "")
        row.append(descriptions[i] or "")
        writer.writerow(row)
    return out.getvalue()
