"""The real anatomy seed: MNI152 2009c T1w + T2w, a tissue/structure label map, and 32 expert AFIDs.

Sources (all installed from PyPI, read offline; see DATA.md §1.1-1.3 and ``Resources/Data/README.md``):

- **Images**: ``autoafids`` ships the MNI152NLin2009cAsym template, real T1w and T2w contrasts, whole
  head, 1 mm, one grid (193 x 229 x 193). A 2 mm copy is committed under ``Resources/Data`` (the
  MNI/McGill notice allows redistribution) and used when ``autoafids`` is not installed.
- **Landmarks**: the 32 AFIDs (anatomical fiducials) placed by experts on that template
  (``landmarks``, ground truth) and a second placement of the same points (``landmarks_rater2``):
  the distance between the two is the human inter-rater floor, to be reported beside every
  landmark result. The ``.fcsv`` files are RAS; here they are LPS.
- **Labels** (:data:`LABEL_NAMES`), built once on the 1 mm grid and cached (see :func:`cache_dir`):
  named structures from the Neuromorphometrics atlas shipped by ``deepmriprep`` (aligned to 2009c;
  licence CC BY-NC, so the label map is *built* on the user's machine, never committed), cortex /
  white matter / CSF refined by the real T1w intensity, and bone, soft tissue and air outside the
  brain from SPM12's tissue probability map (``spm-runtime``, GPL-2).

Label ids (uint8): 0 background (air), 1 csf, 2 gm (cortical and other grey matter), 3 wm
(cerebral white matter), 4/5 lateral ventricle left/right (with the temporal horn), 6 third
ventricle, 7 fourth ventricle, 8/9 thalamus L/R, 10/11 caudate L/R, 12/13 putamen L/R, 14/15
pallidum L/R, 16/17 hippocampus L/R, 18/19 amygdala L/R, 20 ventral diencephalon, 21 brainstem,
22 cerebellum grey matter, 23 cerebellum white matter, 24 bone, 25 soft tissue. Left and right are
the subject's (anatomical) sides: "left" lies at positive LPS x.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import os
import pathlib
import tempfile

import numpy as np

from ..errors import InputError
from ..image import Image, ras_to_lps
from ..points import PointSet
from . import packages

__all__ = [
    "Template",
    "load_template",
    "load_afids",
    "template_grid",
    "resample_to_grid",
    "cache_dir",
    "LABEL_NAMES",
    "TISSUE_OF_LABEL",
    "RES_RANGE",
    "AFID_STEM",
    "load_template_images",
    "export_compact_copy",
    "forget_loaded",
]

AFID_STEM = "tpl-MNI152NLin2009cAsym_res-01"
RES_RANGE = (1.0, 8.0)

LABEL_NAMES: dict[int, str] = {
    0: "background",
    1: "csf",
    2: "gm",
    3: "wm",
    4: "lateral_ventricle_left",
    5: "lateral_ventricle_right",
    6: "third_ventricle",
    7: "fourth_ventricle",
    8: "thalamus_left",
    9: "thalamus_right",
    10: "caudate_left",
    11: "caudate_right",
    12: "putamen_left",
    13: "putamen_right",
    14: "pallidum_left",
    15: "pallidum_right",
    16: "hippocampus_left",
    17: "hippocampus_right",
    18: "amygdala_left",
    19: "amygdala_right",
    20: "ventral_dc",
    21: "brainstem",
    22: "cerebellum_gm",
    23: "cerebellum_wm",
    24: "bone",
    25: "soft_tissue",
}

# Tissue class of every label, used by label-driven synthesis: air, csf, gm, wm, bone, soft.
TISSUE_OF_LABEL: dict[int, str] = {
    0: "air", 1: "csf", 2: "gm", 3: "wm", 4: "csf", 5: "csf", 6: "csf", 7: "csf",
    **{i: "gm" for i in range(8, 20)},
    20: "wm", 21: "wm", 22: "gm", 23: "wm", 24: "bone", 25: "soft",
}

# Neuromorphometrics (deepmriprep/CAT12 ids) -> our ids; ids >= 100 are cortical gyri (-> gm).
_NEUROMORPHOMETRICS = {
    4: 6, 11: 7, 23: 2, 30: 2, 31: 19, 32: 18, 35: 21, 36: 11, 37: 10, 38: 22, 39: 22, 40: 23, 41: 23,
    44: 3, 45: 3, 46: 1, 47: 17, 48: 16, 49: 5, 50: 4, 51: 5, 52: 4, 55: 15, 56: 14, 57: 13, 58: 12,
    59: 9, 60: 8, 61: 20, 62: 20, 69: 3, 71: 22, 72: 22, 73: 22, 75: 2, 76: 2,
}
_LABEL_BUILD_VERSION = "1"
_RESOURCES = pathlib.Path(__file__).resolve().parents[2] / "Resources" / "Data"


@dataclasses.dataclass
class Template:
    """The MNI152 2009c template on one grid, with labels and the two AFIDs placements.

    Attributes:
        t1, t2: real T1w and T2w intensities (float32, template units 0..10000), same grid.
        labels: uint8 label map on the same grid (ids in :data:`LABEL_NAMES`).
        label_names: id -> name.
        landmarks: the 32 AFIDs, expert ground truth, LPS mm (labels "AC", "PC", ...;
            descriptions "AFID <n>").
        landmarks_rater2: the second expert placement of the same 32 points (inter-rater floor).
        res_mm: isotropic voxel size of the grid.
    """

    t1: Image
    t2: Image
    labels: Image
    label_names: dict[int, str]
    landmarks: PointSet
    landmarks_rater2: PointSet
    res_mm: float

    def copy(self) -> "Template":
        def cp(img: Image) -> Image:
            return Image(img.array.copy(), img.spacing, img.origin, img.direction.copy(), img.name)

        def cpp(ps: PointSet) -> PointSet:
            return PointSet(list(ps.labels), ps.positions.copy(), list(ps.descriptions or []) or None)

        return Template(cp(self.t1), cp(self.t2), cp(self.labels), dict(self.label_names),
                        cpp(self.landmarks), cpp(self.landmarks_rater2), self.res_mm)

    def inter_rater_mm(self) -> np.ndarray:
        """Per-landmark distance (mm) between the two expert placements, shape ``(32,)``."""
        return np.linalg.norm(self.landmarks.positions - self.landmarks_rater2.positions, axis=1)


# ---- cache ------------------------------------------------------------------------------------
def cache_dir() -> pathlib.Path:
    """Folder for derived data: ``$ANATSSL_DATA_CACHE`` or ``~/.cache/anatssl/data`` (created)."""
    root = os.environ.get("ANATSSL_DATA_CACHE")
    path = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "anatssl" / "data"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"data cache folder {path}: cannot create it ({exc}); set ANATSSL_DATA_CACHE") from None
    return path


def _write_sitk_atomic(img, path: pathlib.Path) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".nii.gz", dir=path.parent)
    os.close(fd)
    try:
        sitk.WriteImage(img, tmp, True)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- reading ----------------------------------------------------------------------------------
def _read_image(path: pathlib.Path, name: str, dtype=np.float32) -> Image:
    import SimpleITK as sitk

    if not path.exists():
        raise InputError(f"{name}: file {path} not found")
    img = Image.from_sitk(sitk.ReadImage(str(path)), name=name)
    img.array = img.array.astype(dtype, copy=False)
    return img


def load_afids(path: str | os.PathLike) -> PointSet:
    """Read an AFIDs Slicer ``.fcsv`` file (RAS mm, ``CoordinateSystem = 0``) as a LPS :class:`PointSet`.

    Labels are the AFID names (``"AC"``, ``"PC"``, ...), descriptions ``"AFID <n>"``; points come
    sorted by AFID number.
    """
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"AFIDs file {path}: cannot read it ({exc})") from None
    frame_ras = True
    rows = []
    for row in csv.reader(text.splitlines()):
        if not row:
            continue
        if row[0].startswith("#"):
            line = ",".join(row)
            if "CoordinateSystem" in line:
                value = line.split("=")[-1].strip()
                frame_ras = value in ("0", "RAS")
            continue
        rows.append(row)
    if not rows or any(len(r) < 13 for r in rows):
        raise InputError(f"AFIDs file {path}: expected Slicer fcsv rows with 13+ columns")
    rows.sort(key=lambda r: int(r[11]))
    xyz = np.array([[float(v) for v in r[1:4]] for r in rows])
    lps = ras_to_lps(xyz) if frame_ras else xyz
    return PointSet([r[12] for r in rows], lps, [f"AFID {int(r[11])}" for r in rows])


# ---- grids and resampling --------------------------------------------------------------------
def template_grid(reference: Image, res_mm: float) -> Image:
    """An empty grid with voxel size ``res_mm`` covering ``reference``'s field of view (same origin
    voxel centre and direction); the array is a zero uint8 placeholder."""
    size = [int(np.floor((n - 1) * s / res_mm + 1e-6)) + 1 for n, s in zip(reference.size, reference.spacing)]
    return Image(np.zeros(size[::-1], np.uint8), (res_mm,) * 3, reference.origin, reference.direction, "grid")


def resample_to_grid(image: Image, grid: Image, order: int = 1, smooth: bool = True, fill: float = 0.0) -> Image:
    """Resample ``image`` onto ``grid`` in physical space (``order`` 0 nearest, 1 linear).

    With ``smooth`` and a coarser target, a Gaussian pre-filter (FWHM ~ the target voxel) avoids
    aliasing; label maps (``order=0``) are never smoothed.
    """
    from scipy import ndimage as ndi

    src = image.array
    if order > 0 and smooth:
        ratio = np.asarray(grid.spacing) / np.asarray(image.spacing)  # (x, y, z)
        sigma = np.sqrt(np.clip(ratio**2 - 1.0, 0.0, None)) / 2.355
        if np.any(sigma > 0.1):
            src = ndi.gaussian_filter(src.astype(np.float32), sigma[::-1])
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.array.shape], indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    src_idx = image.physical_to_index(grid.index_to_physical(ijk))
    out = ndi.map_coordinates(src, src_idx[:, ::-1].T, order=order, mode="constant", cval=fill, prefilter=False)
    return grid.with_array(out.reshape(grid.array.shape).astype(image.array.dtype, copy=False), name=image.name)


# ---- label map ------------------------------------------------------------------------------
def _label_cache_path() -> pathlib.Path:
    key = "|".join(
        [_LABEL_BUILD_VERSION]
        + [f"{m}={packages.package_version(m)}" for m in ("autoafids", "deepmriprep", "spm_runtime")]
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return cache_dir() / f"mni2009c_labels_1mm_{digest}.nii.gz"


def _build_labels(t1: Image, t2: Image) -> np.ndarray:
    """The uint8 label map on the 1 mm template grid (see the module docstring)."""
    import SimpleITK as sitk

    ref = t1.to_sitk()
    atlas_path = packages.deepmriprep_templates() / "neuromorphometrics.nii.gz"
    atlas = sitk.Resample(sitk.ReadImage(str(atlas_path)), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    atlas = sitk.GetArrayFromImage(atlas).astype(np.int32)
    with packages.spm_archive() as arc:
        member = packages.SPM_PREFIX + "tpm/TPM.nii"
        try:
            raw = arc.read(member)
        except KeyError:
            raise InputError(f"spm-runtime: {member} missing from the SPM data zip; "
                             f"reinstall with: {packages.PACKAGES['spm_runtime'].pip}") from None
    probs = []
    with tempfile.TemporaryDirectory(prefix="anatssl-tpm-") as tmp:
        path = os.path.join(tmp, "TPM.nii")
        with open(path, "wb") as fh:
            fh.write(raw)
        del raw
        tpm = sitk.ReadImage(path)  # 4D: 6 classes along the 4th axis
    size = list(tpm.GetSize())
    for c in range(size[3]):
        vol = sitk.Extract(tpm, size[:3] + [0], [0, 0, 0, c])  # the 3D geometry is kept
        moved = sitk.Resample(sitk.Cast(vol, sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear,
                              1.0 if c == size[3] - 1 else 0.0)
        probs.append(sitk.GetArrayFromImage(moved))
    tpm_class = np.argmax(np.stack(probs), axis=0)  # 0 GM, 1 WM, 2 CSF, 3 bone, 4 soft tissue, 5 air

    i1 = t1.array.astype(np.float32)
    i2 = t2.array.astype(np.float32)
    wm_ref = np.median(i1[np.isin(atlas, (44, 45))])
    gm_ref = np.median(i1[atlas >= 100])
    csf_ref = np.median(i1[np.isin(atlas, (51, 52))])
    t_cg, t_gw = 0.5 * (csf_ref + gm_ref), 0.5 * (gm_ref + wm_ref)

    def by_t1(mask: np.ndarray) -> np.ndarray:
        return np.where(i1[mask] < t_cg, 1, np.where(i1[mask] < t_gw, 2, 3))

    lut = np.zeros(max(256, int(atlas.max()) + 1), np.uint8)
    for src, dst in _NEUROMORPHOMETRICS.items():
        lut[src] = dst
    lut[100:] = 2
    labels = lut[atlas]
    labels[atlas == 0] = 0
    in_atlas = atlas > 0

    # Cortex and cerebral white matter: tissue from the real T1w intensity (sharp boundaries).
    generic = in_atlas & np.isin(labels, (1, 2, 3))
    labels[generic] = by_t1(generic)
    # Named grey/white structures: sulcal/cisternal CSF the atlas swallowed becomes csf.
    named = in_atlas & ~np.isin(labels, (1, 2, 3, 4, 5, 6, 7))
    labels[named & (i1 < t_cg)] = 1
    # Ventricles: bright (white-matter-like) voxels at their rim become wm.
    vent = in_atlas & np.isin(labels, (4, 5, 6, 7))
    labels[vent & (i1 > t_gw)] = 3

    out = ~in_atlas
    brainish = out & (tpm_class <= 2)
    labels[brainish] = by_t1(brainish)
    labels[out & (tpm_class == 3)] = 24
    labels[out & (tpm_class == 4)] = 25
    air_air = out & (tpm_class == 5)
    labels[air_air] = np.where(i1[air_air] > 0.25 * gm_ref, 25, 0)
    # Dark in both contrasts outside the brain (sinuses, outside air under a tissue prior): air.
    dark = out & (i1 < 0.06 * gm_ref) & (i2 < 0.06 * gm_ref)
    labels[dark] = 0
    return labels.astype(np.uint8)


# ---- public --------------------------------------------------------------------------------
def _check_res(res_mm: float) -> float:
    try:
        res = float(res_mm)
    except (TypeError, ValueError):
        raise InputError(f"resolution: expected a number of mm, got {res_mm!r}") from None
    if not (RES_RANGE[0] <= res <= RES_RANGE[1]) or not np.isfinite(res):
        raise InputError(f"resolution: expected {RES_RANGE[0]:g} to {RES_RANGE[1]:g} mm, got {res_mm!r}")
    return res


def _source_files() -> tuple[pathlib.Path, pathlib.Path, pathlib.Path, pathlib.Path, float]:
    """T1w, T2w, AFIDs rater 1, rater 2 paths and their resolution: the wheel, else the committed copy."""
    try:
        res = packages.autoafids_resources()
        return (res / f"{AFID_STEM}_T1w.nii.gz", res / f"{AFID_STEM}_T2w.nii.gz",
                res / f"{AFID_STEM}_desc-groundtruth_afids.fcsv", res / f"{AFID_STEM}_T1w.fcsv", 1.0)
    except InputError:
        if (_RESOURCES / "tpl-MNI152NLin2009cAsym_res-02_T1w.nii.gz").exists():
            stem = "tpl-MNI152NLin2009cAsym_res-02"
            return (_RESOURCES / f"{stem}_T1w.nii.gz", _RESOURCES / f"{stem}_T2w.nii.gz",
                    _RESOURCES / "afids_groundtruth.fcsv", _RESOURCES / "afids_rater2.fcsv", 2.0)
        raise


@functools.lru_cache(maxsize=4)
def _load_1mm() -> tuple[Image, Image, Image]:
    t1p, t2p, _, _, src_res = _source_files()
    if src_res != 1.0:
        raise InputError(f"the 1 mm template needs autoafids; install it with: {packages.PACKAGES['autoafids'].pip}")
    t1 = _read_image(t1p, "MNI152NLin2009cAsym T1w")
    t2 = _read_image(t2p, "MNI152NLin2009cAsym T2w")
    cached = _label_cache_path()
    labels = None
    if cached.exists():
        try:
            labels = _read_image(cached, "labels", np.uint8)
            if not labels.same_geometry(t1):
                labels = None
        except Exception:  # a damaged cache entry is rebuilt
            labels = None
    if labels is None:
        labels = t1.with_array(_build_labels(t1, t2), name="labels")
        _write_sitk_atomic(labels.to_sitk(), cached)
    labels.name = "MNI152NLin2009cAsym labels"
    return t1, t2, labels


@functools.lru_cache(maxsize=4)
def _load_cached(res: float) -> Template:
    t1p, t2p, gt_path, r2_path, src_res = _source_files()
    landmarks = load_afids(gt_path)
    rater2 = load_afids(r2_path)
    if src_res == 1.0:
        t1, t2, labels = _load_1mm()
    else:
        # Only the committed 2 mm T1w/T2w: the label map is built on the 1 mm template.
        packages.package_dir("autoafids")
    if res != 1.0:
        grid = template_grid(t1, res)
        t1 = resample_to_grid(t1, grid, order=1)
        t2 = resample_to_grid(t2, grid, order=1)
        labels = resample_to_grid(labels, grid, order=0)
    return Template(t1, t2, labels, dict(LABEL_NAMES), landmarks, rater2, res)


def forget_loaded() -> None:
    """Drop the templates kept in memory (the on-disk cache stays); the next load reads again."""
    _load_1mm.cache_clear()
    _load_cached.cache_clear()


def load_template(res_mm: float = 1.0) -> Template:
    """The MNI152 2009c template (real T1w, T2w), its label map and the 32 expert AFIDs, on an
    isotropic grid of ``res_mm`` mm (1 to 8) covering the whole head, all in LPS physical space.

    The first call builds the label map from the installed ``deepmriprep`` and ``spm-runtime``
    packages (about 10 s) and caches it under :func:`cache_dir`; later calls read the cache.

    Raises:
        InputError: ``res_mm`` out of range, or a data package missing (the message is the
            pip command that installs it).
    """
    res = _check_res(res_mm)
    return _load_cached(res).copy()


def load_template_images(res_mm: float = 2.0) -> tuple[Image, Image, PointSet, PointSet]:
    """T1w, T2w and the two AFIDs placements only (no label map, so no atlas packages needed):
    from ``autoafids`` when installed, else from the 2 mm copy committed under ``Resources/Data``."""
    res = _check_res(res_mm)
    t1p, t2p, gt_path, r2_path, src_res = _source_files()
    t1 = _read_image(t1p, "MNI152NLin2009cAsym T1w")
    t2 = _read_image(t2p, "MNI152NLin2009cAsym T2w")
    if res != src_res:
        grid = template_grid(t1, res)
        t1 = resample_to_grid(t1, grid, order=1)
        t2 = resample_to_grid(t2, grid, order=1)
    return t1, t2, load_afids(gt_path), load_afids(r2_path)


def export_compact_copy(folder: str | os.PathLike, res_mm: float = 2.0) -> list[pathlib.Path]:
    """Write the redistributable compact copy committed under ``Resources/Data``: T1w and T2w at
    ``res_mm`` (int16 NIfTI, same field of view) and the two AFIDs ``.fcsv`` files verbatim.

    The label map is *not* written: it derives from the CC BY-NC Neuromorphometrics atlas and
    GPL-2 SPM data, and is built on the user's machine instead.
    """
    import shutil

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t1, t2, _, _ = load_template_images(res_mm)
    stem = f"tpl-MNI152NLin2009cAsym_res-{int(round(res_mm)):02d}"
    written = []
    for img, c in ((t1, "T1w"), (t2, "T2w")):
        path = folder / f"{stem}_{c}.nii.gz"
        _write_sitk_atomic(img.with_array(np.round(img.array).astype(np.int16)).to_sitk(), path)
        written.append(path)
    src = packages.autoafids_resources()
    for name, dst in ((f"{AFID_STEM}_desc-groundtruth_afids.fcsv", "afids_groundtruth.fcsv"),
                      (f"{AFID_STEM}_T1w.fcsv", "afids_rater2.fcsv")):
        shutil.copyfile(src / name, folder / dst)
        written.append(folder / dst)
    import importlib.metadata

    licence = importlib.metadata.distribution("autoafids").read_text("LICENSE")
    if not licence:
        raise InputError("autoafids: its LICENSE file is missing from the installed metadata")
    (folder / "LICENSE-AFIDs-MIT.txt").write_text(licence)
    written.append(folder / "LICENSE-AFIDs-MIT.txt")
    return written
