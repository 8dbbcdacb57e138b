"""A 2D plane set cut from a population at anatomical standard planes, with anatomy tags.

This is the 2D data AWCL pretrains on (METHODS.md §1): each image carries a **scan id** (the
subject), a **coarse tag** (the plane family: axial, coronal, sagittal) and a **fine tag** (a named
position within the family, e.g. ``axial_ventricles``). A configurable fraction of images is
*untagged* (empty tags), as AWCL's unlabelled pool; their true tags are kept in separate
``true_*`` columns for evaluation only.

Standard planes are defined **anatomically**, per subject, from its AFIDs landmarks:

- the **AC-PC frame**: anterior axis ``A`` = AC - PC, left axis ``L`` = normal of the
  mid-sagittal plane fitted (least squares) through the midline AFIDs and the midpoints of the
  left/right AFID pairs, pointing to the subject's left (checked with the pairs), superior axis
  ``S = A x L``. (The midline AFIDs alone lie close to one A-P line; on strongly warped subjects
  their fit rolled the frame by up to 38 degrees from the subject's true orientation.)
- each family has a normal (``S``, ``A`` or ``L``) and each fine position an offset along it,
  read off that subject's landmarks (e.g. ``axial_ventricles`` passes through the mean height of
  the four "LV at AC/PC" points). Sagittal planes off the midline take a random side (left or
  right; the anatomy is mirror-symmetric, the side is recorded).

Every image gets a small random jitter (offset along the normal, in-plane shift, a rotation of
a few degrees) so that images of one tag differ. Planes are resampled with SimpleITK at a fixed
size and pixel spacing (linear for intensities, nearest neighbour for the tissue labels), stored
as 8-bit grey PNGs (intensity) and 8-bit label PNGs, plus ``planes.csv``:

``image, labels, scan_id, coarse_tag, fine_tag, contrast, ultrasound, true_coarse_tag,
true_fine_tag, side, size, spacing_mm, offset_mm, angle_deg, center_{x,y,z}, u_{x,y,z},
v_{x,y,z}, normal_{x,y,z}`` (paths relative to the CSV; positions LPS mm; ``u``/``v`` the
physical directions of the image columns/rows).

What is simulated: the anatomy comes from the population (itself synthetic, DATA.md §4); the
optional ultrasound look (:mod:`.ultrasound`) is a crude appearance model, not an acoustic
simulation. No real fetal ultrasound exists offline (DATA.md §3).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..points import PointSet

__all__ = [
    "FIXED_WINDOWS",
    "PLANE_FAMILIES",
    "PlaneRecord",
    "StandardPlane",
    "acpc_frame",
    "add_planes_arguments",
    "cli_planes",
    "fine_tags",
    "jitter_plane",
    "make_plane_set",
    "read_plane_set",
    "resample_plane",
    "standard_planes",
]

# ---- landmark names (AFIDs, DATA.md §1.1) ----------------------------------------------------
# Each entry: candidate labels/descriptions (compared case-insensitively) incl. the AFID number.
_AFID = {
    "AC": ("AC", "1"),
    "PC": ("PC", "2"),
    "ICS": ("infracollicular sulcus", "3"),
    "PMJ": ("PMJ", "4"),
    "SIPF": ("superior interpeduncular fossa", "5"),
    "R_SLMS": ("R superior LMS", "6"),
    "L_SLMS": ("L superior LMS", "7"),
    "CUL": ("culmen", "10"),
    "IMS": ("intermammillary sulcus", "11"),
    "R_MB": ("R MB", "12"),
    "L_MB": ("L MB", "13"),
    "PG": ("pineal gland", "14"),
    "R_LVAC": ("R LV at AC", "15"),
    "L_LVAC": ("L LV at AC", "16"),
    "R_LVPC": ("R LV at PC", "17"),
    "L_LVPC": ("L LV at PC", "18"),
    "GENU": ("genu of CC", "19"),
    "SPLE": ("splenium of CC", "20"),
    "R_ALTH": ("R AL temporal horn", "21"),
    "L_ALTH": ("L AL temporal horn", "22"),
    "R_VOH": ("R ventral occipital horn", "29"),
    "L_VOH": ("L ventral occipital horn", "30"),
    "R_OSF": ("R olfactory sulcal fundus", "31"),
    "L_OSF": ("L olfactory sulcal fundus", "32"),
}
_MIDLINE = ("AC", "PC", "ICS", "PMJ", "SIPF", "CUL", "IMS", "PG", "GENU", "SPLE")
_PAIRS = (("L_LVAC", "R_LVAC"), ("L_LVPC", "R_LVPC"), ("L_ALTH", "R_ALTH"), ("L_SLMS", "R_SLMS"))
# left/right pairs whose midpoints also lie on the mid-sagittal plane (they widen its fit: the midline
# AFIDs alone are nearly collinear along A-P, which lets a warped subject's fitted plane roll by 30+ deg)
_SYMMETRIC = _PAIRS + (("L_MB", "R_MB"), ("L_VOH", "R_VOH"), ("L_OSF", "R_OSF"))


def _point(points: PointSet, key: str) -> np.ndarray:
    """LPS position of AFID ``key`` (matched on labels, then descriptions; case-insensitive)."""
    names = [n.lower() for n in _AFID[key]] + [f"afid {_AFID[key][1]}"]
    for i, label in enumerate(points.labels):
        if label.strip().lower() in names:
            return points.positions[i]
    if points.descriptions is not None:
        for i, desc in enumerate(points.descriptions):
            if str(desc).strip().lower() in names:
                return points.positions[i]
    raise InputError(
        f"landmarks: no point named {_AFID[key][0]!r} (AFID {_AFID[key][1]}); "
        f"the standard planes need the AFIDs, got labels {points.labels[:8]}..."
    )


def acpc_frame(points: PointSet) -> tuple[np.ndarray, np.ndarray]:
    """The AC-PC frame of a subject from its AFIDs.

    Returns:
        origin: AC, ``(3,)`` LPS mm.
        axes: ``(3, 3)`` rows ``L`` (left), ``A`` (anterior), ``S`` (superior), orthonormal
        unit vectors in LPS, ``S = A x L`` (so ``(L, -A, S)`` is right-handed, like LPS).
    """
    ac, pc = _point(points, "AC"), _point(points, "PC")
    mid = [_point(points, k) for k in _MIDLINE if _has(points, k)]
    mid += [(_point(points, a) + _point(points, b)) / 2 for a, b in _SYMMETRIC if _has(points, a) and _has(points, b)]
    centred = np.array(mid) - np.mean(mid, axis=0)
    normal = np.linalg.svd(centred)[2][-1]  # least-squares mid-sagittal plane normal
    left_dir = np.mean([_point(points, a) - _point(points, b) for a, b in _PAIRS], axis=0)
    if np.dot(normal, left_dir) < 0:
        normal = -normal
    a = ac - pc
    a = a - np.dot(a, normal) * normal
    if np.linalg.norm(a) < 1e-3:
        raise InputError("landmarks: AC and PC coincide; cannot build the AC-PC frame")
    a /= np.linalg.norm(a)
    s = np.cross(a, normal)
    return ac.copy(), np.stack([normal, a, s])


def _has(points: PointSet, key: str) -> bool:
    try:
        _point(points, key)
        return True
    except InputError:
        return False


# ---- standard planes -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StandardPlane:
    """One standard plane of one subject (before jitter).

    ``center`` is LPS mm; ``u``/``v`` are the physical directions of the image columns (left to
    right) and rows (top to bottom); ``normal = u x v``.
    """

    coarse_tag: str
    fine_tag: str
    center: np.ndarray
    u: np.ndarray
    v: np.ndarray
    side: str = ""

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.u, self.v)


# family -> (fine position -> rule giving the signed offset from AC along the family normal)
# Offsets are read from the subject's own landmarks, in its AC-PC frame (L, A, S rows).
def _mean(points: PointSet, *keys: str) -> np.ndarray:
    return np.mean([_point(points, k) for k in keys], axis=0)


_Rule = Callable[[PointSet, str], np.ndarray]  # (points, side 'L'/'R') -> an LPS point on the plane

PLANE_FAMILIES: dict[str, dict[str, tuple[_Rule, bool]]] = {
    # axial (normal S): image columns to patient left (radiological), rows to posterior
    "axial": {
        "temporal_horns": (lambda p, s: _mean(p, "L_ALTH", "R_ALTH"), False),
        "midbrain": (lambda p, s: _mean(p, "IMS", "SIPF", "L_MB", "R_MB"), False),
        "acpc": (lambda p, s: _mean(p, "AC", "PC"), False),
        "ventricles": (lambda p, s: _mean(p, "L_LVAC", "R_LVAC", "L_LVPC", "R_LVPC"), False),
    },
    # coronal (normal A): columns to patient left, rows to inferior
    "coronal": {
        "genu": (lambda p, s: _point(p, "GENU"), False),
        "ac": (lambda p, s: _point(p, "AC"), False),
        "pc": (lambda p, s: _point(p, "PC"), False),
        "occipital_horns": (lambda p, s: _mean(p, "L_VOH", "R_VOH"), False),
    },
    # sagittal (normal L): columns to posterior, rows to inferior; off-midline planes take a side
    "sagittal": {
        "midline": (lambda p, s: _mean(p, "AC", "PC"), False),
        "lateral_ventricle": (lambda p, s: _mean(p, f"{s}_LVAC", f"{s}_LVPC"), True),
        "temporal_horn": (lambda p, s: _point(p, f"{s}_ALTH"), True),
    },
}


def fine_tags() -> list[tuple[str, str]]:
    """All ``(coarse_tag, fine_tag)`` pairs, fine tags written ``<family>_<position>`` (unique)."""
    return [(fam, f"{fam}_{pos}") for fam, positions in PLANE_FAMILIES.items() for pos in positions]


def standard_planes(points: PointSet, side: str = "L", centre_shift_s_mm: float = 10.0) -> list[StandardPlane]:
    """The standard planes of one subject from its AFIDs (LPS mm).

    Args:
        points: the subject's AFIDs (labels or descriptions = AFID names or numbers).
        side: ``"L"`` or ``"R"``: the side of the off-midline sagittal planes.
        centre_shift_s_mm: the image centre is the AC-PC midpoint moved this far superiorly
            (then projected onto the plane), so the field of view covers the brain.
    """
    if side not in ("L", "R"):
        raise InputError(f"side: expected 'L' or 'R', got {side!r}")
    ac, (e_l, e_a, e_s) = acpc_frame(points)
    mid = _mean(points, "AC", "PC") + centre_shift_s_mm * e_s
    axes = {"axial": (e_l, -e_a, e_s), "coronal": (e_l, -e_s, -e_a), "sagittal": (-e_a, -e_s, None)}
    planes = []
    for fam, positions in PLANE_FAMILIES.items():
        u, v, _ = axes[fam]
        n = np.cross(u, v)
        for pos, (rule, sided) in positions.items():
            through = rule(points, side)
            centre = mid + np.dot(through - mid, n) * n
            planes.append(StandardPlane(fam, f"{fam}_{pos}", centre, u.copy(), v.copy(), side if sided else ""))
    return planes


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def jitter_plane(
    plane: StandardPlane,
    rng: np.random.Generator,
    offset_mm: float = 2.0,
    shift_mm: float = 3.0,
    angle_deg: float = 5.0,
) -> tuple[StandardPlane, float, float]:
    """A randomly perturbed copy of ``plane``: returns ``(plane, offset_mm, angle_deg)`` drawn.

    Offset along the normal uniform in ``±offset_mm``, in-plane shift uniform in ``±shift_mm``
    per axis, rotation about a random axis by an angle uniform in ``[0, angle_deg]``.
    """
    off = float(rng.uniform(-offset_mm, offset_mm))
    shift = rng.uniform(-shift_mm, shift_mm, size=2)
    ang = float(rng.uniform(0.0, angle_deg))
    rot = _rotation(rng.normal(size=3), np.deg2rad(ang))
    centre = plane.center + off * plane.normal + shift[0] * plane.u + shift[1] * plane.v
    return dataclasses.replace(plane, center=centre, u=rot @ plane.u, v=rot @ plane.v), off, ang


# ---- resampling ------------------------------------------------------------------------------
def resample_plane(
    volume,
    center: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    size: int | tuple[int, int],
    spacing_mm: float,
    nearest: bool = False,
    default: float = 0.0,
) -> np.ndarray:
    """Cut a 2D plane out of a 3D ``SimpleITK.Image``.

    Args:
        volume: the 3D image (physical LPS mm).
        center: LPS mm position of the image centre.
        u, v: unit directions of the image columns (``i``) and rows (``j``), orthogonal.
        size: ``W`` or ``(W, H)`` pixels.
        spacing_mm: pixel size in mm (square pixels).
        nearest: nearest-neighbour interpolation (labels) instead of linear.
        default: value outside the volume.

    Returns:
        ``(H, W)`` float64 array (row ``j``, column ``i``).
    """
    import SimpleITK as sitk

    w, h = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    u, v = np.asarray(u, float), np.asarray(v, float)
    n = np.cross(u, v)
    origin = np.asarray(center, float) - 0.5 * (w - 1) * spacing_mm * u - 0.5 * (h - 1) * spacing_mm * v
    ref = sitk.Image([w, h, 1], sitk.sitkFloat32)
    ref.SetSpacing((spacing_mm, spacing_mm, spacing_mm))
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(tuple(np.stack([u, v, n], axis=1).ravel()))
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(volume, ref, sitk.Transform(), interp, float(default), sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)[0]


# ---- the plane set ---------------------------------------------------------------------------
@dataclasses.dataclass
class PlaneRecord:
    """One row of ``planes.csv``; paths are absolute, empty tags are ``None``."""

    image: Path
    scan_id: str
    coarse_tag: str | None
    fine_tag: str | None
    contrast: str
    labels: Path | None = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tagged(self) -> bool:
        return self.fine_tag is not None

    def load(self) -> np.ndarray:
        """The image, ``(H, W)`` uint8."""
        return _read_png(self.image)

    def load_labels(self) -> np.ndarray:
        """The tissue labels of the plane, ``(H, W)`` uint8."""
        if self.labels is None:
            raise InputError(f"{self.image}: this plane has no label image")
        return _read_png(self.labels)


_COLUMNS = [
    "image", "labels", "scan_id", "coarse_tag", "fine_tag", "contrast", "ultrasound",
    "true_coarse_tag", "true_fine_tag", "side", "size", "spacing_mm", "offset_mm", "angle_deg",
    "center_x", "center_y", "center_z", "u_x", "u_y", "u_z", "v_x", "v_y", "v_z",
    "normal_x", "normal_y", "normal_z",
]  # fmt: skip


def _read_png(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    if not Path(path).is_file():
        raise InputError(f"{path}: plane image not found")
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _write_png(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8)), str(path))


# Fixed grey windows for calibrated contrasts (HU for CT: a brain window, bone saturates).
FIXED_WINDOWS: dict[str, tuple[float, float]] = {"ct": (-50.0, 150.0)}


def _intensity_window(array: np.ndarray, contrast: str = "") -> tuple[float, float]:
    """The grey window of a volume: :data:`FIXED_WINDOWS` for calibrated contrasts, else the
    robust (0.5, 99.5) percentiles of its non-background voxels."""
    if contrast.lower() in FIXED_WINDOWS:
        return FIXED_WINDOWS[contrast.lower()]
    a = np.asarray(array, dtype=np.float32)
    lo_all = float(a.min())
    fg = a[a > lo_all]
    if fg.size < 10:
        return lo_all, float(a.max()) if a.max() > lo_all else lo_all + 1.0
    lo, hi = np.percentile(fg[:: max(1, fg.size // 200000)], [0.5, 99.5])
    return float(min(lo, lo_all)), float(hi if hi > lo else lo + 1.0)


def _load_population(population):
    if isinstance(population, (str, os.PathLike)):
        path = Path(population)
        if not path.exists():
            raise InputError(f"{path}: population folder not found (make one with `anatssl data synth`)")
        from .population import load_population

        return load_population(path)
    return population


def publish_plane_set(tmp: Path, out_dir: Path, rows: Sequence[dict], fieldnames: Sequence[str]) -> None:
    """Write ``planes.csv`` into the finished temporary folder ``tmp``, then put it in place of
    ``out_dir`` (an existing folder is moved aside first and removed after the swap)."""
    with open(tmp / "planes.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def make_plane_set(
    population,
    out_dir: str | os.PathLike,
    per_subject: int = 44,
    size: int = 96,
    spacing_mm: float = 2.0,
    contrasts: Sequence[str] | None = None,
    ultrasound: bool = False,
    untagged_fraction: float = 0.1,
    seed: int = 0,
    jitter_offset_mm: float = 2.0,
    jitter_shift_mm: float = 3.0,
    jitter_angle_deg: float = 5.0,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Cut a tagged 2D plane set out of a population and write it as PNGs + ``planes.csv``.

    Args:
        population: a population folder (see :func:`.population.load_population`) or a loaded
            population (anything with ``.subjects`` of ``.name``, ``.contrasts``, ``.image(c)``,
            ``.labels()``, ``.landmarks()``).
        out_dir: output folder; receives ``planes.csv``, ``images/`` and ``labels/``.
        per_subject: images per subject, spread evenly over the fine tags (11 of them).
        size: image width = height, pixels.
        spacing_mm: pixel size, mm (96 px x 2 mm = 192 mm field of view).
        contrasts: contrasts to draw from (one at random per image); default all of the subject's.
        ultrasound: give the intensity images an ultrasound-like look (:mod:`.ultrasound`).
        untagged_fraction: fraction of images (over the whole set, exact up to rounding) whose
            tags are left empty, as AWCL's unlabelled pool.
        seed: random seed; the set is a deterministic function of its arguments.
        jitter_offset_mm, jitter_shift_mm, jitter_angle_deg: per-image random perturbation.
        force: rebuild even if ``out_dir/planes.csv`` exists (else it is returned as is); a
            non-empty ``out_dir`` without ``planes.csv`` is only replaced with ``force``.
        progress: called as ``progress(done_subjects, n_subjects)``.

    Returns:
        the path of ``planes.csv``. The folder is written atomically (built beside, then renamed).
    """
    out_dir = Path(out_dir)
    csv_path = out_dir / "planes.csv"
    if csv_path.is_file() and not force:
        return csv_path
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not force)):
        raise InputError(f"plane set output folder {out_dir}: exists and is not empty (no planes.csv); "
                         "choose an empty folder or pass force=True (--force)")
    if per_subject < 1 or size < 8 or spacing_mm <= 0:
        raise InputError(
            f"plane set: expected per_subject >= 1, size >= 8 and spacing_mm > 0, "
            f"got {per_subject}, {size}, {spacing_mm}"
        )
    if not 0.0 <= untagged_fraction <= 1.0:
        raise InputError(f"untagged_fraction: expected a value in [0, 1], got {untagged_fraction}")
    pop = _load_population(population)
    subjects = list(pop.subjects)
    if not subjects:
        raise InputError("plane set: the population has no subjects")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        n_total = per_subject * len(subjects)
        n_untagged = int(round(untagged_fraction * n_total))
        untagged = set(np.random.default_rng([seed, 1_000_003]).permutation(n_total)[:n_untagged].tolist())
        rows = []
        for s_idx, subject in enumerate(subjects):
            rng = np.random.default_rng([seed, s_idx])
            points = subject.landmarks()
            avail = list(subject.contrasts)
            use = list(contrasts) if contrasts is not None else avail
            missing = [c for c in use if c not in avail]
            if missing:
                raise InputError(f"subject {subject.name}: contrasts {missing} not available; it has {avail}")
            vols, windows = {}, {}
            for c in use:
                img = subject.image(c)
                vols[c] = img.to_sitk()
                windows[c] = _intensity_window(img.array, c)
            lab = subject.labels().to_sitk()
            by_side = {side: standard_planes(points, side) for side in ("L", "R")}
            n_tags = len(by_side["L"])
            order = rng.permutation(per_subject)
            for n in range(per_subject):
                t_idx = int(order[n]) % n_tags
                side = "L" if rng.random() < 0.5 else "R"
                base = by_side[side][t_idx]
                plane, off, ang = jitter_plane(base, rng, jitter_offset_mm, jitter_shift_mm, jitter_angle_deg)
                contrast = use[int(rng.integers(len(use)))]
                lo, hi = windows[contrast]
                img2d = resample_plane(vols[contrast], plane.center, plane.u, plane.v, size, spacing_mm, default=lo)
                img2d = np.clip((img2d - lo) / (hi - lo), 0.0, 1.0)
                lab2d = resample_plane(lab, plane.center, plane.u, plane.v, size, spacing_mm, nearest=True)
                if ultrasound:
                    from .ultrasound import ultrasound_appearance

                    img2d = ultrasound_appearance(img2d, rng)
                global_idx = s_idx * per_subject + n
                stem = f"{subject.name}_{n:04d}"
                _write_png(np.round(img2d * 255.0), tmp / "images" / f"{stem}.png")
                _write_png(lab2d, tmp / "labels" / f"{stem}.png")
                hidden = global_idx in untagged
                rows.append(
                    {
                        "image": f"images/{stem}.png",
                        "labels": f"labels/{stem}.png",
                        "scan_id": subject.name,
                        "coarse_tag": "" if hidden else plane.coarse_tag,
                        "fine_tag": "" if hidden else plane.fine_tag,
                        "contrast": contrast,
                        "ultrasound": int(bool(ultrasound)),
                        "true_coarse_tag": plane.coarse_tag,
                        "true_fine_tag": plane.fine_tag,
                        "side": plane.side,
                        "size": size,
                        "spacing_mm": spacing_mm,
                        "offset_mm": f"{off:.3f}",
                        "angle_deg": f"{ang:.3f}",
                        **{f"center_{a}": f"{x:.4f}" for a, x in zip("xyz", plane.center)},
                        **{f"u_{a}": f"{x:.6f}" for a, x in zip("xyz", plane.u)},
                        **{f"v_{a}": f"{x:.6f}" for a, x in zip("xyz", plane.v)},
                        **{f"normal_{a}": f"{x:.6f}" for a, x in zip("xyz", plane.normal)},
                    }
                )
            if progress is not None:
                progress(s_idx + 1, len(subjects))
        publish_plane_set(tmp, out_dir, rows, _COLUMNS)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return csv_path


def read_plane_set(csv_path: str | os.PathLike) -> list[PlaneRecord]:
    """Read a ``planes.csv`` (this module's, or any CSV with at least ``image`` and ``scan_id``).

    Empty tag cells become ``None``; other columns go to ``PlaneRecord.params`` (strings, except
    numeric ones converted to float). Paths are resolved against the CSV's folder.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: plane set CSV not found")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "scan_id"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{csv_path}: expected columns image and scan_id, missing {sorted(missing)}")
        rows = list(reader)
    base = csv_path.parent
    records = []
    for row in rows:
        params: dict[str, Any] = {}
        for key, value in row.items():
            if key in ("image", "labels", "scan_id", "coarse_tag", "fine_tag", "contrast"):
                continue
            try:
                params[key] = float(value)
            except (TypeError, ValueError):
                params[key] = value
        records.append(
            PlaneRecord(
                image=base / row["image"],
                scan_id=row["scan_id"],
                coarse_tag=row.get("coarse_tag") or None,
                fine_tag=row.get("fine_tag") or None,
                contrast=row.get("contrast", ""),
                labels=base / row["labels"] if row.get("labels") else None,
                params=params,
            )
        )
    return records


# ---- command line (wired under `anatssl data planes` by the data verb) ------------------------
def add_planes_arguments(parser) -> None:
    """Add the ``anatssl data planes`` options to an argparse parser and set its handler."""
    parser.add_argument("--population", help="population folder (from `anatssl data synth`)")
    parser.add_argument("--out", required=True, help="output folder for planes.csv, images/ and labels/")
    parser.add_argument("--per-subject", type=int, default=44, help="images per subject (default 44, 4 per fine tag)")
    parser.add_argument("--size", type=int, default=96, help="image width = height in pixels (default 96)")
    parser.add_argument("--spacing", type=float, default=2.0, help="pixel size in mm (default 2.0)")
    parser.add_argument("--contrasts", default=None, help="comma-separated contrasts to draw from (default all)")
    parser.add_argument("--ultrasound", action="store_true", help="give the images a simulated ultrasound look")
    parser.add_argument("--untagged-fraction", type=float, default=0.1, help="fraction with empty tags (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--real-ultrasound", action="store_true",
                        help="instead: write the frames of the installed real ultrasound DICOM samples "
                             "(pydicom-data, deid-data) as an untagged plane set; no --population needed")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rebuild even if planes.csv exists in --out")
    parser.set_defaults(run=cli_planes)


def cli_planes(args) -> int:
    """Handler of ``anatssl data planes``: build the plane set and print the CSV path and counts."""
    from tqdm import tqdm

    if getattr(args, "real_ultrasound", False):
        from .ultrasound import write_ultrasound_plane_set

        path = write_ultrasound_plane_set(args.out, size=args.size, force=args.force)
    else:
        if not args.population:
            raise InputError("anatssl data planes: --population is required (or pass --real-ultrasound)")
        contrasts = [c.strip() for c in args.contrasts.split(",") if c.strip()] if args.contrasts else None
        bar = None

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(total=total, unit="subject", desc="anatssl data planes")
            bar.update(done - bar.n)

        try:
            path = make_plane_set(
                args.population,
                args.out,
                per_subject=args.per_subject,
                size=args.size,
                spacing_mm=args.spacing,
                contrasts=contrasts,
                ultrasound=args.ultrasound,
                untagged_fraction=args.untagged_fraction,
                seed=args.seed,
                force=args.force,
                progress=progress,
            )
        finally:
            if bar is not None:
                bar.close()
    records = read_plane_set(path)
    n_tagged = sum(r.tagged for r in records)
    print(f"{path}: {len(records)} planes ({n_tagged} tagged) from {len({r.scan_id for r in records})} scans")
    return 0
