"""One-shot landmark tool: physical-space bookkeeping, session reuse, the CLI, and bad input.

Accuracy with a trained encoder is asserted in test_default_encoder.py; here a random-weight
encoder suffices, because a target that is the reference moved in space (or stored with another
axis order) has the same content on the encoder grid, so the answer is known exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnatSSLLib.errors import InputError
from AnatSSLLib.image import Image, write_image
from AnatSSLLib.points import PointSet, read_points, write_points


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
                               spatial_dims=3, spacing=[3.0, 3.0, 3.0], intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5})
    eid = cache.save(net.state_dict(), manifest)
    return load_encoder(eid, cache=cache, device="cpu"), root


def _moved(image: Image, shift_mm) -> Image:
    return Image(image.array, image.spacing, tuple(np.add(image.origin, shift_mm)), image.direction, "moved")


def _flipped_storage(image: Image) -> Image:
    """The same physical image stored with the i axis reversed (direction column negated)."""
    direction = image.direction.copy()
    direction[:, 0] *= -1
    last = image.index_to_physical([image.size[0] - 1, 0, 0])
    return Image(image.array[:, :, ::-1].copy(), image.spacing, tuple(last), direction, "flipped")


def test_moved_and_reoriented_targets_give_exact_answers(random_encoder, template_2mm):
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    encoder, _ = random_encoder
    reference = template_2mm.t1
    points = template_2mm.landmarks.subset(["AC", "PC", "genu of CC", "L superior LMS", "R superior LMS", "culmen"])
    shift = np.array([6.0, -9.0, 3.0])  # a multiple of the 3 mm encoder grid
    locator = LandmarkLocator(EmbeddingStore(encoder))
    moved, flipped = locator.locate(reference, points, [_moved(reference, shift), _flipped_storage(reference)])
    err_moved = np.linalg.norm(moved.positions - (points.positions + shift), axis=1)
    err_flipped = np.linalg.norm(flipped.positions - points.positions, axis=1)
    assert np.median(err_moved) < 1.5, err_moved
    assert np.median(err_flipped) < 1.5, err_flipped
    assert moved.labels == points.labels
    assert moved.confidence is not None and np.all(moved.confidence <= 1.0 + 1e-5)


def test_embeddings_are_kept_for_the_session(random_encoder, template_2mm):
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    encoder, _ = random_encoder
    store = EmbeddingStore(encoder)
    calls = []
    original = store._embed
    store._embed = lambda image, progress: calls.append(image.name) or original(image, progress)
    locator = LandmarkLocator(store)
    target = _moved(template_2mm.t1, (3.0, 0.0, 0.0))
    one = template_2mm.landmarks.subset(template_2mm.landmarks.labels[:1])
    two = template_2mm.landmarks.subset(template_2mm.landmarks.labels[:2])
    locator.locate(template_2mm.t1, one, [target])
    locator.locate(template_2mm.t1, two, [target])  # one more point: nothing re-embedded
    assert len(calls) == 2
    assert template_2mm.t1 in store and target in store


def test_bad_input(random_encoder, template_2mm):
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    encoder, _ = random_encoder
    locator = LandmarkLocator(EmbeddingStore(encoder))
    reference = template_2mm.t1
    outside = PointSet(["far"], [[500.0, 0.0, 0.0]])
    with pytest.raises(InputError, match="outside the reference"):
        locator.locate(reference, outside, [reference])
    with pytest.raises(InputError, match="no reference points"):
        locator.locate(reference, PointSet([], np.zeros((0, 3))), [reference])
    flat = Image(np.zeros((16, 16)), (1.0, 1.0), (0.0, 0.0), np.eye(2), "slice")
    with pytest.raises(InputError):
        locator.locate(reference, template_2mm.landmarks.subset(["AC"]), [flat])
    nan = reference.with_array(np.where(reference.array > 0, np.nan, 0.0).astype(np.float32), name="nan volume")
    with pytest.raises(InputError, match="nan volume"):
        locator.locate(reference, template_2mm.landmarks.subset(["AC"]), [nan])


def test_cli_writes_one_markups_file_per_target(random_encoder, template_2mm, tmp_path):
    from AnatSSLLib.cli import main

    encoder, cache_root = random_encoder
    ref = write_image(template_2mm.t1, tmp_path / "ref.nii.gz")
    (tmp_path / "subj").mkdir()
    tgt = write_image(_moved(template_2mm.t1, (0.0, 6.0, 0.0)), tmp_path / "subj" / "t1.nii.gz")
    pts = write_points(template_2mm.landmarks.subset(["AC", "PC"]), tmp_path / "ref.mrk.json")
    code = main(["landmarks", "--cache-dir", str(cache_root), "--encoder", encoder.encoder_id, "--reference", str(ref),
                 "--points", str(pts), "--targets", str(tgt), "--out", str(tmp_path / "out")])
    assert code == 0
    found = read_points(tmp_path / "out" / "t1.mrk.json")
    assert found.labels == ["AC", "PC"] and found.confidence is not None
    doc = json.loads((tmp_path / "out" / "t1.mrk.json").read_text())
    assert "confidence=" in doc["markups"][0]["controlPoints"][0]["description"]
    truth = template_2mm.landmarks.subset(["AC", "PC"]).positions + np.array([0.0, 6.0, 0.0])
    assert np.median(np.linalg.norm(found.positions - truth, axis=1)) < 2.0

    assert main(["landmarks", "--cache-dir", str(cache_root), "--encoder", "nope", "--reference", str(ref),
                 "--points", str(pts), "--targets", str(tgt), "--out", str(tmp_path / "out2")]) == 2


def test_registration_start_finds_a_moved_target(random_encoder, template_2mm):
    """``initial_alignment="registration"``: a mutual-information affine starts the local levels
    (for targets of another contrast); on the reference moved in space the answer is known."""
    from AnatSSLLib.embedding import EmbeddingStore
    from AnatSSLLib.tools.landmarks import LandmarkLocator

    encoder, _ = random_encoder
    reference = template_2mm.t1
    points = template_2mm.landmarks.subset(["AC", "PC", "genu of CC", "culmen"])
    shift = np.array([6.0, -9.0, 3.0])
    locator = LandmarkLocator(EmbeddingStore(encoder), initial_alignment="registration")
    (found,) = locator.locate(reference, points, [_moved(reference, shift)])
    err = np.linalg.norm(found.positions - (points.positions + shift), axis=1)
    assert np.median(err) < 1.5, err
    with pytest.raises(InputError, match="initial alignment"):
        LandmarkLocator(EmbeddingStore(encoder), initial_alignment="atlas")


def test_a_volume_slightly_longer_than_the_window_is_embedded_in_one_window(random_encoder):
    """A padded volume with no more voxels than the window goes through the network once."""
    from AnatSSLLib.embedding import EmbeddingStore

    encoder, _ = random_encoder
    shapes = []
    model = encoder.model
    original = model.embed
    model.embed = lambda x: shapes.append(tuple(x.shape[2:])) or original(x)
    try:
        rng = np.random.default_rng(0)
        image = Image(rng.random((20, 56, 24)).astype(np.float32), (3.0, 3.0, 3.0), (0.0, 0.0, 0.0), np.eye(3), "long")
        # padded to 32 x 64 x 32: fewer voxels than one 48^3 window, though longer than 48 on one axis
        EmbeddingStore(encoder, roi_size=48).get(image)
    finally:
        model.embed = original
    assert shapes == [(32, 64, 32)], shapes
