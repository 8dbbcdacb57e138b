"""`anatssl pretrain --method alice` on a real (simulated) population: a cached 3D encoder the tools can load."""

from __future__ import annotations

import numpy as np
import pytest

from AnatSSLLib.cache import EncoderCache
from AnatSSLLib.cli import main
from AnatSSLLib.embedding import EmbeddingStore
from AnatSSLLib.encoders import load_encoder


def test_alice_pretrain_cli_caches_a_usable_encoder(population_small, tmp_path):
    cache = tmp_path / "cache"
    args = ["pretrain", "--method", "alice", "--population", str(population_small.path), "--contrasts", "t1",
            "--steps", "2", "--batch-size", "1", "--crop", "32", "--spacing", "3", "--device", "cpu",
            "--progress", "none", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(cache), "--name", "alice-test"]
    assert main(args) == 0
    entries = EncoderCache(cache, bundled=[]).list()
    assert len(entries) == 1
    encoder = load_encoder("alice-test", cache=EncoderCache(cache, bundled=[]), device="cpu")
    assert encoder.method == "alice" and encoder.spatial_dims == 3 and tuple(encoder.spacing) == (3.0, 3.0, 3.0)
    # the reference code's optimisation: AdamW, weight decay 0.04, warm-up, cosine, gradient clipping at 3
    config = encoder.manifest.training["config"]
    assert (config["optimizer"], config["weight_decay"], config["schedule"], config["grad_clip"]) == ("adamw", 0.04, "cosine", 3.0)
    assert config["warmup_steps"] == 1
    subject = population_small.subjects[0]
    embedded = EmbeddingStore(encoder, roi_size=32).get(subject.image("t2"))
    assert embedded.features.shape[0] == encoder.manifest.embedding_dim


def test_alice_pretrain_cli_refuses_a_crop_it_cannot_use(population_small, tmp_path, capsys):
    rc = main(["pretrain", "--method", "alice", "--population", str(population_small.path), "--crop", "48",
               "--steps", "1", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")])
    assert rc != 0 and "multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # nothing cached


def test_alice_pretrain_cli_mines_views_across_volumes_with_an_encoder(population_small, tmp_path):
    from AnatSSLLib.encoders import load_encoder as load
    from AnatSSLLib.methods.alice_matcher import EncoderMatcher

    cache = tmp_path / "cache"
    args = ["pretrain", "--method", "alice", "--population", str(population_small.path), "--contrasts", "t1",
            "--views", "mined", "--steps", "1", "--batch-size", "1", "--crop", "32", "--spacing", "3", "--device", "cpu",
            "--progress", "none", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(cache), "--name", "alice-mined"]
    assert main(args) == 0
    encoder = load_encoder("alice-mined", cache=EncoderCache(cache, bundled=[]), device="cpu")
    assert "views mined by ld-" in encoder.manifest.description
    # the matcher maps a voxel of one volume into the other, and a volume onto itself near the identity
    s = population_small.subjects[0]
    volume = s.image("t1").array.astype("float32")
    matcher = EncoderMatcher(load(None, device="cpu"), [volume, volume], (3.0, 3.0, 3.0))
    point = (np.array(volume.shape) // 2).astype(float)
    found, score = matcher(0, 1, point)
    assert np.linalg.norm((found - point) * 3.0) <= 6.0 and score > 0.5


def test_method_options_are_refused_with_another_method(population_small, tmp_path, capsys):
    base = ["pretrain", "--population", str(population_small.path), "--steps", "1", "--cache-dir", str(tmp_path / "c")]
    assert main(base + ["--method", "ld", "--no-cafa"]) != 0
    assert "Alice options" in capsys.readouterr().err
    assert main(base + ["--method", "alice", "--cross-subject", "2"]) != 0
    assert "LD options" in capsys.readouterr().err
    assert main(base + ["--method", "alice", "--padding", "reflect"]) != 0
    assert "LD options" in capsys.readouterr().err


def test_ld_view_settings_out_of_range_are_refused(population_small, tmp_path, capsys):
    from AnatSSLLib.errors import InputError
    from AnatSSLLib.pretraining import LDPretrainSettings

    for bad in (dict(view_shift=0.5), dict(view_turn_deg=60.0), dict(view_zoom=-0.1), dict(view_blur=5.0),
                dict(view_noise=0.6), dict(view_remap=1.5), dict(region_consistency=1.0), dict(dense_contrast=-1.0)):
        with pytest.raises(InputError):
            LDPretrainSettings(**bad)
    LDPretrainSettings(view_shift=0.25, view_turn_deg=15.0, region_consistency=1.0)  # a valid combination
    base = ["pretrain", "--population", str(population_small.path), "--cache-dir", str(tmp_path / "c")]
    assert main(base + ["--region-consistency", "5"]) == 2  # the CLI reports the same check, before any training
    assert "--view-shift" in capsys.readouterr().err


def test_ld_continues_a_cached_encoder_with_the_dense_term(population_small, tmp_path, capsys):
    from AnatSSLLib.cache import EncoderCache

    cache_dir = tmp_path / "c"
    base = ["pretrain", "--population", str(population_small.path), "--cache-dir", str(cache_dir), "--progress", "none",
            "--pd-steps", "0", "--ld-steps", "1", "--batch-size", "1", "--canonical-orientation", "--view-shift", "0.2"]
    # the bundled default is reflect-padded: starting a zero-padded network from it is refused
    assert main(base + ["--init", "ld-4b497518b8d2"]) == 2
    assert "--padding" in capsys.readouterr().err
    assert main(base + ["--init", "ld-4b497518b8d2", "--padding", "reflect", "--dense-contrast", "1", "--name", "cont"]) == 0
    cache = EncoderCache(cache_dir)
    _, manifest = cache.load(cache.resolve("cont"))
    assert "voxel-level cross-view contrast (weight 1)" in manifest.description
    assert "started from encoder ld-4b497518b8d2" in manifest.description
    alice = ["pretrain", "--population", str(population_small.path), "--cache-dir", str(cache_dir), "--method", "alice"]
    assert main(alice + ["--steps", "1", "--init", "ld-4b497518b8d2"]) == 2
    assert "LD options" in capsys.readouterr().err
