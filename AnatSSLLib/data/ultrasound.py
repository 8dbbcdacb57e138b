"""Ultrasound-like 2D images: a simulated appearance, and real ultrasound DICOM frames.

**Simulated** (:func:`ultrasound_appearance`): a crude *appearance* model applied to a 2D slice,
not an acoustic simulation. It has a fan (sector) field of view with the probe at the top centre,
echogenicity from the slice intensity plus its edges (specular-like boundaries), multiplicative
speckle (the magnitude of smoothed complex Gaussian noise, Rayleigh distributed, a few fields
averaged as in spatial compounding),
exponential depth attenuation and log compression. It gives AWCL an ultrasound-looking smoke
test (DATA.md §3); it has no shadowing, reverberation, beam focusing or real scan conversion.
Everything outside the sector is exactly 0.

**Real** (:func:`read_ultrasound_frames`): frames of ultrasound DICOM files (a cine gives one 2D
image per frame), converted to grey. :func:`real_ultrasound_samples` lists the offline samples
of DATA.md §1.7 (``deid-data`` echo cine, ``pydicom-data`` ALOKA pelvis and US1 Doppler), found
without any download. Needs ``pydicom`` (the ``data2d`` extra).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InputError

__all__ = [
    "read_ultrasound_frames",
    "real_ultrasound_samples",
    "sector_mask",
    "ultrasound_appearance",
    "write_ultrasound_plane_set",
]


def sector_mask(
    shape: tuple[int, int],
    opening_deg: float = 75.0,
    apex_row: float = -0.05,
    r_min: float = 0.1,
    r_max: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A fan-shaped field of view with the probe at the top centre.

    Args:
        shape: ``(H, W)`` pixels.
        opening_deg: full opening angle of the fan.
        apex_row: row of the apex as a fraction of ``H`` (negative: above the image).
        r_min, r_max: inner and outer radius as fractions of ``H``.

    Returns:
        ``mask`` ``(H, W)`` bool and ``depth`` ``(H, W)`` float (distance from the apex / ``H``).
    """
    h, w = shape
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    dy, dx = rows - apex_row * h, cols - (w - 1) / 2.0
    depth = np.hypot(dy, dx) / h
    angle = np.degrees(np.arctan2(dx, dy))
    mask = (np.abs(angle) <= opening_deg / 2.0) & (depth >= r_min) & (depth <= r_max) & (dy > 0)
    return mask, depth


def ultrasound_appearance(
    img2d: np.ndarray,
    rng: np.random.Generator,
    opening_deg: float | None = None,
    attenuation: float | None = None,
    speckle_sigma_px: float = 0.6,
    edge_weight: float = 0.3,
    dynamic_range_db: float = 50.0,
    compounding: int = 3,
) -> np.ndarray:
    """Give a 2D slice an ultrasound-like look (simulated; see the module docstring).

    Args:
        img2d: ``(H, W)`` intensities in ``[0, 1]`` (e.g. a normalised MRI plane).
        rng: random generator (speckle and the drawn parameters).
        opening_deg: fan opening; default drawn uniformly in ``[60, 90]``.
        attenuation: amplitude attenuation ``exp(-attenuation * depth / H)``; default drawn in
            ``[0.8, 2.0]``.
        speckle_sigma_px: smoothing of the complex noise (speckle grain size, pixels); the
            lateral grain is 1.5 times the axial one.
        edge_weight: weight of the gradient magnitude (boundaries echo strongly).
        dynamic_range_db: displayed dynamic range of the log compression, dB.
        compounding: number of independent speckle fields averaged (spatial compounding; 1 =
            fully developed Rayleigh speckle, more = smoother).

    Returns:
        ``(H, W)`` float64 in ``[0, 1]``, exactly 0 outside the sector.
    """
    img = np.asarray(img2d, dtype=float)
    if img.ndim != 2:
        raise InputError(f"ultrasound_appearance: expected a 2D image, got shape {img.shape}")
    h, w = img.shape
    opening = float(rng.uniform(60.0, 90.0)) if opening_deg is None else float(opening_deg)
    alpha = float(rng.uniform(0.8, 2.0)) if attenuation is None else float(attenuation)
    mask, depth = sector_mask((h, w), opening)
    grad = ndimage.gaussian_gradient_magnitude(img, 1.0)
    grad = grad / (grad.max() + 1e-12)
    # echogenicity: ~40 dB between the darkest and brightest tissue, boundaries echo strongly
    echo = (1.0 - edge_weight) * (0.01 + np.clip(img, 0.0, 1.0) ** 2) + edge_weight * grad
    sigma = (speckle_sigma_px, 1.5 * speckle_sigma_px)
    speckle = np.zeros((h, w))
    for _ in range(compounding):  # each field: magnitude of smoothed complex noise (Rayleigh)
        re = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma)
        im = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma)
        speckle += np.hypot(re, im)
    speckle /= speckle.mean() + 1e-12
    amp = echo * speckle * np.exp(-alpha * depth)
    # log compression to a ``dynamic_range_db`` display range below the brightest 1 %
    ref = np.percentile(amp[mask], 99.0) if mask.any() else 1.0
    out = 1.0 + 20.0 * np.log10(np.maximum(amp, 1e-12) / (ref + 1e-12)) / dynamic_range_db
    out = np.clip(out, 0.0, 1.0)
    out[~mask] = 0.0
    return out


# ---- real ultrasound DICOM -------------------------------------------------------------------
def _require_pydicom():
    try:
        import pydicom
    except ImportError:
        raise InputError(
            "reading ultrasound DICOM needs pydicom: pip install 'anatssl[data2d]' (pydicom, pydicom-data, deid-data)"
        ) from None
    return pydicom


def read_ultrasound_frames(path: str | os.PathLike) -> list[np.ndarray]:
    """The frames of an ultrasound DICOM file as grey 2D images.

    RGB and YBR pixels are converted to luminance (0.299 R + 0.587 G + 0.114 B), palette colour
    through its lookup table first. A multi-frame file (cine) gives one image per frame.

    Returns:
        a list of ``(rows, columns)`` float32 arrays (grey levels in the file's range, 0-255
        for 8-bit colour).
    """
    pydicom = _require_pydicom()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: ultrasound DICOM file not found")
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for bad or undecodable files
        raise InputError(f"{path}: cannot decode DICOM pixels ({type(exc).__name__}: {exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        pixels = apply_color_lut(pixels, ds).astype(np.float32)
        if pixels.max() > 255:
            pixels = pixels / 257.0  # 16-bit LUT entries to 8-bit
    if photometric.startswith("YBR") and getattr(pixels, "ndim", 0) >= 3 and pixels.shape[-1] == 3:
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    pixels = np.asarray(pixels, dtype=np.float32)
    colour = pixels.shape[-1] == 3 and (int(ds.get("SamplesPerPixel", 1)) == 3 or photometric == "PALETTE COLOR")
    if colour:
        pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if n_frames == 1 and pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3:
        raise InputError(f"{path}: expected 2D frames, got pixel data of shape {pixels.shape}")
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return [np.ascontiguousarray(frame) for frame in pixels]


def real_ultrasound_samples() -> dict[str, Path]:
    """The real ultrasound samples installed here, found with no download (DATA.md §1.7).

    Returns:
        name -> path, for those present of ``echo_cine`` (deid-data, 30 x 600 x 800 RGB, PLAX +
        colour Doppler), ``aloka_pelvis`` (pydicom-data ``gdcm-US-ALOKA-16.dcm``, 480 x 640
        palette, B-mode dual view) and ``us1_doppler`` (pydicom-data ``US1_UNCR.dcm``,
        480 x 640 RGB, lymph node power Doppler).
    """
    found: dict[str, Path] = {}
    spec = importlib.util.find_spec("deid_data")
    if spec is not None and spec.submodule_search_locations:
        echo = Path(list(spec.submodule_search_locations)[0]) / "data" / "ultrasounds" / "ultrasound-multiframe.dcm"
        if echo.is_file():
            found["echo_cine"] = echo
    if importlib.util.find_spec("pydicom") is not None:
        from pydicom.data import get_testdata_file

        for key, name in (("aloka_pelvis", "gdcm-US-ALOKA-16.dcm"), ("us1_doppler", "US1_UNCR.dcm")):
            path = get_testdata_file(name, download=False)  # local stores only: never the network
            if path is not None and Path(path).is_file():
                found[key] = Path(path)
    return found


def write_ultrasound_plane_set(
    out_dir: str | os.PathLike,
    samples: dict[str, str | os.PathLike] | None = None,
    size: int = 96,
    force: bool = False,
) -> Path:
    """Write the frames of real ultrasound DICOM files as an untagged plane set (PNGs + CSV).

    Each frame becomes one ``size x size`` 8-bit grey PNG (the frame scaled to fit, aspect
    kept, zero-padded), one row of ``planes.csv`` with ``scan_id`` = the sample name, empty tags
    and ``contrast`` = ``us``: readable by :func:`.planes.read_plane_set`, for AWCL's unlabelled
    pool or I/O smoke tests. These images are real (not simulated) but carry no anatomy tag.

    Args:
        out_dir: output folder (``planes.csv`` + ``images/``), written atomically.
        samples: name -> DICOM path; default :func:`real_ultrasound_samples`.
        size: output width = height, pixels.
        force: rebuild even if ``planes.csv`` exists.

    Returns:
        the path of ``planes.csv``.
    """
    import shutil
    import tempfile

    import SimpleITK as sitk

    out_dir = Path(out_dir)
    csv_path = out_dir / "planes.csv"
    if csv_path.is_file() and not force:
        return csv_path
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not force)):
        raise InputError(f"ultrasound plane set output folder {out_dir}: exists and is not empty (no planes.csv); "
                         "choose an empty folder or pass force=True (--force)")
    samples = real_ultrasound_samples() if samples is None else {k: Path(v) for k, v in samples.items()}
    if not samples:
        raise InputError(
            "no real ultrasound samples installed: pip install 'anatssl[data2d]' (pydicom-data, deid-data)"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        rows = []
        for name, path in samples.items():
            for f_idx, frame in enumerate(read_ultrasound_frames(path)):
                zoom = size / max(frame.shape)
                small = ndimage.zoom(frame, zoom, order=1, prefilter=False)[:size, :size]
                canvas = np.zeros((size, size), dtype=np.float32)
                r0, c0 = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
                canvas[r0 : r0 + small.shape[0], c0 : c0 + small.shape[1]] = small
                hi = float(frame.max()) if frame.max() > 0 else 1.0
                stem = f"{name}_{f_idx:04d}"
                png = np.clip(np.round(canvas / hi * 255.0), 0, 255).astype(np.uint8)
                sitk.WriteImage(sitk.GetImageFromArray(png), str(tmp / "images" / f"{stem}.png"))
                rows.append({"image": f"images/{stem}.png", "labels": "", "scan_id": name, "coarse_tag": "",
                             "fine_tag": "", "contrast": "us", "ultrasound": 1, "source": str(path),
                             "frame": f_idx, "size": size})  # fmt: skip
        from .planes import publish_plane_set

        publish_plane_set(tmp, out_dir, rows, list(rows[0]))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return csv_path
