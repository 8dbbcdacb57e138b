"""AWCL's data interface: reading tagged 2D images from a CSV (real slices of the 2009c T1w/T2w)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.methods.awcl_data import TaggedImageSet, check_tags, read_tagged_images

# fine tag -> (axis of the 2009c array [k, j, i] at 2 mm, slice index): coarse tag = the axis name
SLICE_TAGS = {
    "axial_k30": ("axial", 0, 30),
    "axial_k50": ("axial", 0, 50),
    "axial_k65": ("axial", 0, 65),
    "coronal_j40": ("coronal", 1, 40),
    "coronal_j70": ("coronal", 1, 70),
    "sagittal_i30": ("sagittal", 2, 30),
    "sagittal_i48": ("sagittal", 2, 48),
}
_VOLUMES: dict = {}


def _volumes():
    if not _VOLUMES:
        from AnatSSLLib.data.packages import package_dir

        try:
            package_dir("autoafids")
        except InputError as exc:
            pytest.skip(f"autoafids is not installed: {exc}")
        from AnatSSLLib.data.templates import load_template_images

        t1, t2, _, _ = load_template_images(2.0)
        for name, img in (("t1", t1), ("t2", t2)):
            a = np.asarray(img.array, np.float32)
            lo, hi = np.percentile(a[a > a.min()], [0.5, 99.5])
            _VOLUMES[name] = np.clip((a - lo) / (hi - lo), 0, 1)
    return _VOLUMES


def cut_slice(volume: np.ndarray, axis: int, index: int, size: int = 96) -> np.ndarray:
    """A centred ``size`` x ``size`` crop of slice ``index`` along ``axis`` of a [k, j, i] array."""
    s = np.take(volume, index, axis=axis)
    y0, x0 = (s.shape[0] - size) // 2, (s.shape[1] - size) // 2
    return s[y0 : y0 + size, x0 : x0 + size]


def write_png(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.uint8)), str(path))


def write_slice_set(
    folder: Path,
    per_tag_per_scan: int = 2,
    size: int = 96,
    tags: dict | None = None,
    seed: int = 0,
    labels: bool = True,
    untagged_every: int = 0,
) -> Path:
    """Write PNGs of real 2009c slices (scans: t1, t2 and a shifted t1) and ``images.csv`` in the
    plane-set format (image, labels, scan_id, coarse_tag, fine_tag, contrast, true_fine_tag).

    Each image is its tag's slice moved by a random -2..2 slices; labels are 3 intensity classes
    of the T1 slice (0 background, 1 dark, 2 bright tissue). Every ``untagged_every``-th image has
    empty tags."""
    vols = _volumes()
    tags = SLICE_TAGS if tags is None else tags
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for scan, (contrast, shift) in {"s1": ("t1", 0), "s2": ("t2", 0), "s3": ("t1", 3)}.items():
        for fine, (coarse, axis, index) in tags.items():
            for r in range(per_tag_per_scan):
                k = index + shift + int(rng.integers(-2, 3))
                img = cut_slice(vols[contrast], axis, k, size)
                ref = cut_slice(vols["t1"], axis, k, size)
                lab = np.digitize(ref, [0.15, 0.55]).astype(np.uint8)
                name = f"{scan}_{fine}_{r}"
                write_png(np.round(img * 255), folder / f"{name}.png")
                if labels:
                    write_png(lab, folder / f"{name}_lab.png")
                hide = untagged_every and n % untagged_every == untagged_every - 1
                rows.append({
                    "image": f"{name}.png", "labels": f"{name}_lab.png" if labels else "", "scan_id": scan,
                    "coarse_tag": "" if hide else coarse, "fine_tag": "" if hide else fine,
                    "contrast": contrast, "true_fine_tag": fine,
                })  # fmt: skip
                n += 1
    csv_path = folder / "images.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return csv_path


def _rewrite(csv_path: Path, rows: list[dict]) -> None:
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_reads_plane_set_format(tmp_path):
    csv_path = write_slice_set(tmp_path, per_tag_per_scan=1, untagged_every=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean set warns about nothing
        data = read_tagged_images(csv_path, size=(64, 64))
    assert isinstance(data, TaggedImageSet)
    assert data.images.shape == (21, 1, 64, 64) and data.images.dtype == np.float32
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0 and data.images.std() > 0.1
    assert data.scan_ids[:2] == ["s1", "s1"] and set(data.scan_ids) == {"s1", "s2", "s3"}
    assert data.fine[0] == "axial_k30" and data.coarse[0] == "axial"
    assert sum(t is None for t in data.fine) == 5  # every 4th of 21 rows
    assert data.fine[3] is None and data.extra["true_fine_tag"][3] == "coronal_j40"
    assert data.labels is not None and data.labels.shape == (21, 64, 64)
    assert set(np.unique(data.labels)) <= {0, 1, 2} and data.has_labels.all()
    assert data.intensity == {"kind": "window", "min": 0.0, "max": 255.0}
    # at the native size, 8-bit PNGs are read back exactly (value / 255), labels too
    import SimpleITK as sitk

    native = read_tagged_images(csv_path, size=96)
    png = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s1_axial_k30_0.png")))
    np.testing.assert_allclose(native.images[0, 0], png / 255.0, atol=1e-6)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "s1_axial_k30_0_lab.png")))
    np.testing.assert_array_equal(native.labels[0], lab)
    assert len(data.fingerprint()) == 64 and data.fingerprint() == read_tagged_images(csv_path, size=(64, 64)).fingerprint()


def test_user_format_and_missing_images(tmp_path):
    csv_path = write_slice_set(tmp_path, per_tag_per_scan=1, labels=False)
    rows = [{k: r[k] for k in ("image", "scan_id", "coarse_tag", "fine_tag")} for r in _rows(csv_path)]
    rows[2]["image"] = "gone_1.png"
    rows[5]["image"] = "gone_2.png"
    rows[7]["image"] = ""
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows[9]["image"] = "broken.png"
    user = tmp_path / "user.csv"
    _rewrite(user, rows)
    with pytest.warns(UserWarning, match=r"dropped 4 of 21 rows") as rec:
        data = read_tagged_images(user, size=48)
    assert len(data) == 17 and data.labels is None
    msg = " ".join(str(w.message) for w in rec)
    assert "gone_1.png" in msg and "broken.png" in msg
    # nothing readable: a clear error, not an empty set
    _rewrite(user, [dict(rows[0], image="nothing.png")])
    with pytest.raises(InputError, match="none of the 1 listed images"):
        with pytest.warns(UserWarning):
            read_tagged_images(user)
    # bad columns
    _rewrite(user, [{"path": "a.png", "scan_id": "s"}])
    with pytest.raises(InputError, match=r"missing \['image'\]"):
        read_tagged_images(user)
    with pytest.raises(InputError, match="not found"):
        read_tagged_images(tmp_path / "absent.csv")


def test_one_class_tags_warn(tmp_path):
    one = {"axial_k30": ("axial", 0, 30), "axial_k50": ("axial", 0, 50)}
    csv_path = write_slice_set(tmp_path, per_tag_per_scan=1, tags=one, labels=False)
    with pytest.warns(UserWarning, match=r"same coarse tag 'axial' \(6 images\)"):
        data = read_tagged_images(csv_path, size=48)
    assert set(data.fine) == {"axial_k30", "axial_k50"}
    rows = _rows(csv_path)
    rows[0]["fine_tag"] = "lonely"
    _rewrite(csv_path, rows)
    with pytest.warns(UserWarning, match=r"1 fine tags are held by one image only"):
        read_tagged_images(csv_path, size=48)


def test_mixed_sizes_and_channels(tmp_path):
    import SimpleITK as sitk

    vol = _volumes()["t1"]
    rows = []
    slices = [np.take(vol, 40, axis=1)[:96, :96], np.take(vol, 41, axis=1)[:80, :96], np.take(vol, 48, axis=2)]
    for n, s in enumerate(slices):  # 96x96, 80x96 and a whole 97x115 sagittal slice
        a = np.round(s * 255).astype(np.uint8)
        write_png(a, tmp_path / f"g{n}.png")
        rows.append({"image": f"g{n}.png", "scan_id": "a", "coarse_tag": "c", "fine_tag": f"f{n % 2}"})
    # an RGB PNG of a known grey slice (R = G = B) and a 16-bit image
    a = np.round(np.take(vol, 50, axis=1)[:96, :96] * 255).astype(np.uint8)
    rgb = sitk.GetImageFromArray(np.stack([a, a, a], axis=-1), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.png"))
    rows.append({"image": "rgb.png", "scan_id": "b", "coarse_tag": "d", "fine_tag": "f0"})
    sitk.WriteImage(sitk.GetImageFromArray((a.astype(np.uint16) * 200)), str(tmp_path / "deep.nrrd"))
    rows.append({"image": "deep.nrrd", "scan_id": "b", "coarse_tag": "d", "fine_tag": "f1"})
    _rewrite(tmp_path / "mixed.csv", rows)
    with pytest.warns(UserWarning) as rec:
        data = read_tagged_images(tmp_path / "mixed.csv", size=(64, 64))
    msgs = [str(w.message) for w in rec]
    assert any("1 colour images" in m for m in msgs)
    assert any("mixed sizes" in m and "5 resized to 64x64" in m for m in msgs)
    assert data.images.shape == (5, 1, 64, 64)
    # mixed 8/16-bit: every image is mapped by its percentiles; the RGB copy matches the 16-bit one
    assert data.intensity["kind"] == "percentile"
    assert np.abs(data.images[3] - data.images[4]).max() < 0.02
    # the 97x115 slice is padded to a square (top and bottom rows empty), not stretched
    assert data.images[2, 0, :3].max() < 0.02 and data.images[2, 0, -3:].max() < 0.02
    assert data.images[2, 0, 20:40].max() > 0.3


def test_multiframe_files_and_frames(tmp_path):
    import SimpleITK as sitk

    vol = np.round(_volumes()["t1"][40:44, :96, :96] * 255).astype(np.uint8)  # 4 axial frames
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(tmp_path / "cine.nrrd"))
    _rewrite(tmp_path / "c.csv", [
        {"image": "cine.nrrd", "scan_id": "v", "fine_tag": "", "frame": ""},
        {"image": "cine.nrrd", "scan_id": "v", "fine_tag": "x", "frame": "2"},
        {"image": "cine.nrrd", "scan_id": "v", "fine_tag": "x", "frame": "9"},
    ])  # fmt: skip
    with pytest.warns(UserWarning, match="dropped 1 rows whose frame is out of range"):
        data = read_tagged_images(tmp_path / "c.csv", size=96)
    assert len(data) == 5 and data.fine == [None] * 4 + ["x"] and data.coarse == [None] * 5
    np.testing.assert_allclose(data.images[4, 0], vol[2] / 255.0, atol=1e-6)
    np.testing.assert_allclose(data.images[2, 0], data.images[4, 0])
    assert data.paths[4].endswith("cine.nrrd#2")


def test_check_tags_counts():
    imgs = np.zeros((4, 1, 8, 8), np.float32)
    d = TaggedImageSet(imgs, ["a"] * 4, ["x", "x", "y", None], ["p", "q", "q", None])
    with pytest.warns(UserWarning, match="1 fine tags are held by one image only"):
        counts = check_tags(d)
    assert counts == {"coarse": {"x": 2, "y": 1}, "fine": {"p": 1, "q": 2}}
    assert d.subset([2, 3]).fine == ["q", None]
