"""Real individual heads for qualitative checks, and a landmark picture to look at them.

The synthetic population (DATA.md §4) shares one underlying anatomy; these real scans are the
"second subjects" on which tools are checked by eye (DATA.md §3):

- :func:`load_colin27`: Colin27 (one real person's averaged T1, MNI space), Debian package
  ``mricron-data``, ``/usr/share/mricron/templates/ch2.nii.gz`` (181 x 217 x 181, 1 mm).
- :func:`load_invesalius_ct`: a real head CT (HU), Debian package ``invesalius-examples``,
  ``Cranium.inv3`` (256 x 256 x 108, 0.957 x 0.957 x 1.5 mm).

:func:`render_landmarks_png` draws axial, coronal and sagittal thumbnails through each landmark
(needs matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import os
import plistlib
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import Image
from ..points import PointSet

__all__ = [
    "COLIN27_PATH",
    "INVESALIUS_PATH",
    "load_colin27",
    "load_invesalius_ct",
    "render_landmarks_png",
]

COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")
INVESALIUS_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def load_colin27(path: str | os.PathLike | None = None, brain_only: bool = False) -> Image:
    """Colin27 whole-head T1 (or the brain-extracted ``ch2bet``), 1 mm, physical LPS mm.

    Raises:
        InputError: the file is missing (install with: apt-get install -y mricron-data).
    """
    import SimpleITK as sitk

    if path is None:
        path = COLIN27_PATH.with_name("ch2bet.nii.gz") if brain_only else COLIN27_PATH
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: Colin27 not found; install with: apt-get install -y mricron-data")
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    return Image.from_sitk(img, name=f"Colin27 ({path.name})")


def load_invesalius_ct(path: str | os.PathLike | None = None) -> Image:
    """The InVesalius example head CT ("ProMED CT 0051") in Hounsfield units (int16).

    ``matrix.dat`` holds int16 HU indexed ``(z, y, x)`` = (108, 256, 256), slices inferior to
    superior, spacing (x, y, z) = (0.957, 0.957, 1.5) mm (read from ``main.plist``). Rows
    (``y``) run posterior to anterior (the face is at high ``y``, checked by eye); columns
    (``x``) are taken to run right to left as in DICOM (the head is nearly symmetric, so the
    left-right sense is an assumption). The direction is therefore ``diag(1, -1, 1)`` in LPS
    and the origin puts the volume centre at (0, 0, 0) mm (the file has no patient position).

    Raises:
        InputError: the file is missing (install with: apt-get install -y invesalius-examples)
            or not an InVesalius project.
    """
    path = Path(path) if path is not None else INVESALIUS_PATH
    if not path.is_file():
        raise InputError(
            f"{path}: InVesalius example CT not found; install with: apt-get install -y invesalius-examples"
        )
    try:
        with tarfile.open(path) as tf:
            member = {name.rsplit("/", 1)[-1]: name for name in tf.getnames()}
            main = plistlib.loads(tf.extractfile(member["main.plist"]).read())
            info = main["matrix"]
            raw = tf.extractfile(member[info["filename"]]).read()
    except (tarfile.TarError, KeyError, plistlib.InvalidFileException) as exc:
        raise InputError(f"{path}: not an InVesalius .inv3 project ({type(exc).__name__}: {exc})") from None
    shape = tuple(int(s) for s in info["shape"])
    array = np.frombuffer(raw, dtype=np.dtype(info.get("dtype", "int16"))).reshape(shape).copy()
    spacing = tuple(float(s) for s in main["spacing"])
    direction = np.diag([1.0, -1.0, 1.0])
    size = np.array(array.shape[::-1], dtype=float)
    origin = -direction @ (np.asarray(spacing) * (size - 1) / 2.0)
    return Image(array, spacing, tuple(origin), direction, name=f"InVesalius CT ({main.get('name', path.name)})")


_VIEWS = {
    # name: (u = column direction, v = row direction), LPS; radiological display
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


def render_landmarks_png(
    image: Image,
    points: PointSet,
    path: str | os.PathLike,
    title: str = "",
    fov_mm: float = 120.0,
    pixel_mm: float = 1.0,
    window: tuple[float, float] | None = None,
    blocks_per_row: int = 2,
    reference: PointSet | None = None,
) -> Path:
    """Save a PNG with axial / coronal / sagittal thumbnails through each landmark.

    Each landmark gets a labelled block of three views (``fov_mm`` wide, centred on the point,
    radiological: patient left on the image right, anterior up in axial, anterior left in
    sagittal) with the point drawn as a red cross; ``reference`` points of the same label
    (e.g. ground truth) are drawn as green circles when given.

    Args:
        image: a 3D image (LPS mm).
        points: the landmarks (LPS mm).
        path: output PNG, written atomically.
        title: figure title.
        window: grey window ``(lo, hi)``; default the (1, 99) percentiles of the image.

    Raises:
        InputError: matplotlib is missing (``pip install 'anatssl[bench]'``) or the image is not 3D.
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("render_landmarks_png needs matplotlib: pip install 'anatssl[bench]'") from None
    from .planes import resample_plane

    if image.ndim != 3:
        raise InputError(f"{image.name}: expected a 3D image, got shape {image.array.shape}")
    if len(points) == 0:
        raise InputError("render_landmarks_png: no points to draw")
    if window is None:
        lo, hi = np.percentile(image.array[:: 2, :: 2, :: 2], [1.0, 99.0])
        window = (float(lo), float(hi if hi > lo else lo + 1))
    vol = image.to_sitk()
    import SimpleITK as sitk

    vol = sitk.Cast(vol, sitk.sitkFloat32)
    n_px = int(round(fov_mm / pixel_mm))
    n = len(points)
    rows = int(np.ceil(n / blocks_per_row))
    fig, axes = plt.subplots(
        rows, 3 * blocks_per_row, figsize=(3 * blocks_per_row * 1.9, rows * 2.05 + 0.6), squeeze=False
    )
    half = (n_px - 1) / 2.0
    for ax in axes.ravel():
        ax.axis("off")
    for idx in range(n):
        p = points.positions[idx]
        r, c0 = divmod(idx, blocks_per_row)
        ref = None
        if reference is not None and points.labels[idx] in reference.labels:
            ref = reference.position(points.labels[idx])
        for vi, (view, (u, v)) in enumerate(_VIEWS.items()):
            ax = axes[r, 3 * c0 + vi]
            sl = resample_plane(vol, p, np.array(u), np.array(v), n_px, pixel_mm, default=window[0])
            ax.imshow(sl, cmap="gray", vmin=window[0], vmax=window[1], interpolation="bilinear")
            ax.plot([half], [half], "r+", markersize=11, markeredgewidth=1.6)
            if ref is not None:
                d = ref - p
                ax.plot([half + d @ np.array(u) / pixel_mm], [half + d @ np.array(v) / pixel_mm], "o",
                        markerfacecolor="none", markeredgecolor="lime", markersize=8)  # fmt: skip
            if vi == 0:
                desc = points.descriptions[idx] if points.descriptions else ""
                label = points.labels[idx] + (f" ({desc})" if desc and desc != points.labels[idx] else "")
                ax.set_title(label[:46], fontsize=7.5, loc="left", color="navy")
            ax.text(2, n_px - 4, view[:3], color="yellow", fontsize=7)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=11)
        top = 1.0 - 0.45 / fig.get_figheight()
    fig.tight_layout(rect=(0.0, 0.0, 1.0, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", prefix=f".{path.stem}.", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        plt.close(fig)
    return path
