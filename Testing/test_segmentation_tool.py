"""Cross-modality segmentation tool: geometry bookkeeping, label fusion, the CLI, and bad input.

Accuracy across contrasts needs a trained encoder (benchmarks/bench_segmentation.py); here a
random-weight encoder suffices, because a target that is the reference moved in space (or stored
with another axis order) has the same content on the encoder grid, so its labels are known.
The template is used at 4 mm (and the encoder at 4 mm) to keep the file well under a minute.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image, read_image, resample_image, write_image

BIG_LABELS = (2, 3, 24, 25)  # gm, wm, bone, soft tissue


@pytest.fixture(scope="module")
def random_encoder(tmp_path_factory):
    import torch

    from AnatSSLLib.cache import EncoderCache, EncoderManifest
    from AnatSSLLib.encoders import load_encoder
    from AnatSSLLib.networks import build_network

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("cache")
    cache = EncoderCache(root, bundled=[])
    net = build_network("ld_unet3d", {})
    manifest = EncoderManifest(method="ld", architecture="ld_unet3d", architecture_params={}, embedding_dim=32,
                               spatial_dims=3, spacing=[4.0, 4.0, 4.0], intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5})
    eid = cache.save(net.state_dict(), manifest)
    return load_encoder(eid, cache=cache, device="cpu"), root


@pytest.fixture(scope="module")
def small(template_2mm):
    """The template T1 and labels at 4 mm."""
    t1 = resample_image(template_2mm.t1, 4.0)
    labels = resample_image(template_2mm.labels, 4.0, interpolator="nearest")
    return types.SimpleNamespace(t1=t1, labels=labels)


@pytest.fixture(scope="module")
def segmenter(random_encoder):
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

    return CrossModalitySegmenter(EmbeddingStore(random_encoder[0]))


def _moved(image: Image, shift_mm, name="moved") -> Image:
    return Image(image.array, image.spacing, tuple(np.add(image.origin, shift_mm)), image.direction, name)


def _flipped_storage(image: Image, name="flipped") -> Image:
    """The same physical image stored with the i axis reversed (direction column negated)."""
    direction = image.direction.copy()
    direction[:, 0] *= -1
    last = image.index_to_physical([image.size[0] - 1, 0, 0])
    return Image(image.array[:, :, ::-1].copy(), image.spacing, tuple(last), direction, name)


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    return float(2 * (x & y).sum() / max(1, x.sum() + y.sum()))


def test_moved_and_reoriented_targets_get_their_labels_back(segmenter, small):
    shift = np.array([8.0, -12.0, 4.0])  # a multiple of the 4 mm encoder grid
    for target, truth in (
        (_moved(small.t1, shift), small.labels.array),
        (_flipped_storage(small.t1), small.labels.array[:, :, ::-1]),
    ):
        out = segmenter.segment(small.t1, small.labels, target)
        assert out.same_geometry(target) and out.array.dtype == np.uint8
        dices = {lab: _dice(out.array, truth, lab) for lab in BIG_LABELS}
        assert min(dices.values()) > 0.9, (target.name, dices)
        corr = segmenter.last_correspondences[0]
        assert corr.affine_inliers >= 20 and len(corr.confidence) > 100
        # target (fixed) -> reference (moving): the moved target's points map back by -shift
        if target.name == "moved":
            pts = target.index_to_physical(np.array([[10.0, 12.0, 10.0], [20.0, 30.0, 25.0]]))
            assert np.abs(corr.transform_points(pts) - (pts - shift)).max() < 2.0
            sitk_tr = corr.to_sitk()
            via_sitk = np.array([sitk_tr.TransformPoint(tuple(p)) for p in pts])
            assert np.allclose(via_sitk, corr.transform_points(pts), atol=0.05)


def test_label_subset_and_two_references(segmenter, small):
    shift = np.array([8.0, -12.0, 4.0])  # the moved target above: its embedding is reused
    target = _moved(small.t1, shift)
    two = segmenter.segment([small.t1, small.t1], [small.labels, small.labels], target, labels=[2, 3])
    assert len(segmenter.last_correspondences) == 2
    assert set(np.unique(two.array)) <= {0, 2, 3}
    assert min(_dice(two.array, small.labels.array, lab) for lab in (2, 3)) > 0.9


def test_bad_input(segmenter, small, random_encoder):
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.encoders import LoadedEncoder
    from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

    shifted_labels = _moved(small.labels, (4.0, 0.0, 0.0), name="shifted labels")
    with pytest.raises(InputError, match="does not lie on the grid"):
        segmenter.segment(small.t1, shifted_labels, small.t1)
    empty = small.labels.with_array(np.zeros_like(small.labels.array), name="empty labels")
    with pytest.raises(InputError, match="empty"):
        segmenter.segment(small.t1, empty, small.t1)
    flat = Image(np.random.default_rng(0).random((16, 16)), (1.0, 1.0), (0.0, 0.0), np.eye(2), "slice")
    with pytest.raises(InputError, match="slice: expected a 3D image"):
        segmenter.segment(small.t1, small.labels, flat)
    with pytest.raises(InputError, match="one label map per reference"):
        segmenter.segment([small.t1, small.t1], [small.labels], small.t1)
    with pytest.raises(InputError, match="not in the reference"):
        segmenter.segment(small.t1, small.labels, small.t1, labels=[99])
    with pytest.raises(InputError, match="initial_alignment"):
        CrossModalitySegmenter(segmenter.store, initial_alignment="moments")
    enc = random_encoder[0]
    for change, match in (({"spatial_dims": 2}, "needs a 3D encoder"), ({"method": "awcl"}, "dense-embedding encoder")):
        fields = {"spatial_dims": 3, "method": "ld", "spacing": enc.manifest.spacing, **change}
        other = LoadedEncoder("other", types.SimpleNamespace(**fields), enc.model, enc.device)
        with pytest.raises(InputError, match=match):
            CrossModalitySegmenter(EmbeddingStore(other))


def test_appearance_em_separates_two_classes_the_prior_leaves_open():
    from AnatSSLLib.tools.segmentation import appearance_em

    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1], 500)
    feats = np.where(truth == 1, 3.0, 0.0)[:, None] + rng.normal(0, 0.5, (1000, 1))  # classes 6 sigma apart
    prior = np.full((1000, 2), 0.5)
    prior[:50] = [0.9, 0.1]  # a weak hint which class is which, on a few voxels of each
    prior[500:550] = [0.1, 0.9]
    post = appearance_em(prior, feats, weight=1.0, iterations=10).numpy()
    assert np.allclose(post.sum(1), 1.0, atol=1e-5)
    assert (post.argmax(1) == truth).mean() > 0.99
    # weight 0: the prior unchanged; a confident prior wins over a weak likelihood
    assert np.allclose(appearance_em(prior, feats, weight=0.0).numpy(), prior)
    sure = np.tile([0.999, 0.001], (1000, 1))
    assert (appearance_em(sure, feats, weight=0.05).numpy().argmax(1) == 0).all()
    with pytest.raises(InputError, match="appearance_em"):
        appearance_em(prior, feats[:10])


def test_gaussian_likelihood_options_are_checked(segmenter):
    from AnatSSLLib.tools.segmentation import CrossModalitySegmenter

    with pytest.raises(InputError, match="likelihood must be"):
        CrossModalitySegmenter(segmenter.store, likelihood="kmeans")
    with pytest.raises(InputError, match="appearance must name"):
        CrossModalitySegmenter(segmenter.store, likelihood="gaussian", appearance=("texture",))


def test_robust_affine_fit_ignores_outliers():
    from AnatSSLLib.tools.correspondence import fit_affine_ransac

    rng = np.random.default_rng(1)
    src = rng.uniform(-80, 80, (200, 3))
    a = np.array([[1.05, 0.1, 0.0], [-0.08, 0.95, 0.05], [0.0, 0.02, 1.1]])
    dst = src @ a.T + np.array([5.0, -3.0, 12.0]) + rng.normal(0, 0.5, (200, 3))
    dst[:60] = rng.uniform(-80, 80, (60, 3))  # 30 % wrong matches
    m, inliers = fit_affine_ransac(src, dst, threshold_mm=4.0)
    assert np.allclose(m[:3, :3], a, atol=0.02) and np.allclose(m[:3, 3], [5.0, -3.0, 12.0], atol=1.0)
    assert inliers[60:].mean() > 0.95 and inliers[:60].mean() < 0.1


def test_affine_from_sitk_matches_the_transform():
    import SimpleITK as sitk

    from AnatSSLLib.tools.correspondence import affine_from_sitk

    inner = sitk.AffineTransform(3)
    inner.SetMatrix((1.1, 0.1, 0.0, 0.0, 0.9, 0.05, 0.02, 0.0, 1.0))
    inner.SetCenter((10.0, 20.0, -5.0))
    inner.SetTranslation((3.0, -4.0, 7.0))
    for t in (inner, sitk.CompositeTransform([sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 0.2, 0.3, (4.0, 5.0, 6.0))])):
        m = affine_from_sitk(t)
        for p in ([12.0, -30.0, 44.0], [-70.0, 5.0, 0.5]):
            assert np.allclose(m[:3, :3] @ p + m[:3, 3], t.TransformPoint(tuple(p)), atol=1e-6)


def test_cli_writes_one_label_map_per_target(random_encoder, small, tmp_path):
    from AnatSSLLib.cli import main

    encoder, cache_root = random_encoder
    ref = write_image(small.t1, tmp_path / "ref.nii.gz")
    lab = write_image(small.labels, tmp_path / "ref_labels.nii.gz")
    (tmp_path / "subj").mkdir()
    tgt = write_image(_moved(small.t1, (0.0, 8.0, 0.0)), tmp_path / "subj" / "t2.nii.gz")
    code = main(["segment", "--cache-dir", str(cache_root), "--encoder", encoder.encoder_id, "--reference", str(ref),
                 "--reference-labels", str(lab), "--targets", str(tgt), "--out", str(tmp_path / "out"),
                 "--labels", "2,3,24,25"])
    assert code == 0
    out = read_image(tmp_path / "out" / "t2_labels.nii.gz")
    assert out.same_geometry(read_image(tgt))
    assert set(np.unique(out.array)) <= {0, 2, 3, 24, 25}
    assert _dice(out.array, np.where(np.isin(small.labels.array, [2, 3, 24, 25]), small.labels.array, 0), 3) > 0.9
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # nothing half-written left
    # labels on another grid than their image: a one-line error, exit code 2, no output
    bad = write_image(_moved(small.labels, (4.0, 0.0, 0.0)), tmp_path / "bad_labels.nii.gz")
    assert main(["segment", "--cache-dir", str(cache_root), "--encoder", encoder.encoder_id, "--reference", str(ref),
                 "--reference-labels", str(bad), "--targets", str(tgt), "--out", str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2" / "t2_labels.nii.gz").exists()
