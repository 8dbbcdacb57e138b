"""Tests of the encoder cache: content ids, checked loads, atomic saves, export/import."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
from monai.networks.nets import BasicUNet
from safetensors.torch import save_file

from AnatSSLLib.cache import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    EncoderCache,
    EncoderManifest,
    default_cache_dir,
    default_encoder_id,
)
from AnatSSLLib.errors import CacheError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=4, features=(4, 4, 8, 8, 16, 4))
    return {k: v.clone() for k, v in net.state_dict().items()}


def make_manifest(**overrides) -> EncoderManifest:
    kwargs = dict(
        method="ld",
        architecture="basic_unet3d",
        architecture_params={"features": [4, 4, 8, 8, 16, 4], "out_channels": 4},
        embedding_dim=4,
        spatial_dims=3,
        spacing=[1.0, 1.0, 1.5],
        intensity={"kind": "percentile", "lower": 0.5, "upper": 99.5},
        data_fingerprint="sha256:abc",
        training={"epochs": 2, "lr": 1e-3},
        metrics={"mre_mm": 3.25},
        name="tiny-unet",
        description="test encoder",
    )
    kwargs.update(overrides)
    return EncoderManifest(**kwargs)


def new_cache(path: Path) -> EncoderCache:
    return EncoderCache(path, bundled=[])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ANATSSL_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert EncoderCache(bundled=[]).root == tmp_path / "mine"
    monkeypatch.delenv("ANATSSL_CACHE")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert default_cache_dir() == tmp_path / "xdg" / "anatssl" / "encoders"
        monkeypatch.delenv("XDG_CACHE_HOME")
        assert default_cache_dir() == Path.home() / ".cache" / "anatssl" / "encoders"


def test_manifest_round_trip_and_validation():
    m = make_manifest(extra={"future_field": [1, 2]})
    d = m.to_dict()
    assert d["future_field"] == [1, 2] and "extra" not in d
    again = EncoderManifest.from_dict(json.loads(json.dumps(d)))
    assert again == m
    assert again.content_id("0" * 64) == m.content_id("0" * 64)
    # 1 and 1.0 mm, and a new creation time, give the same id
    base = make_manifest().content_id("0" * 64)
    assert base != m.content_id("0" * 64)  # unknown fields are content too
    assert make_manifest(spacing=[1, 1, 1.5], created="2001-01-01T00:00:00Z").content_id("0" * 64) == base
    assert make_manifest(metrics={"mre_mm": 3.0}).content_id("0" * 64) != base
    assert make_manifest().content_id("1" * 64) != base

    d.pop("embedding_dim")
    with pytest.raises(CacheError, match="missing required field.*'embedding_dim'"):
        EncoderManifest.from_dict(d, source="x.json")
    with pytest.raises(CacheError, match=r"field 'spatial_dims' must be 2 or 3, got 4"):
        make_manifest(spatial_dims=4).validate()
    with pytest.raises(CacheError, match=r"field 'spacing' must be None or 3 positive numbers"):
        make_manifest(spacing=[1.0, 1.0]).validate()
    with pytest.raises(CacheError, match=r"field 'method'"):
        make_manifest(method="LD pretrain").validate()
    with pytest.raises(CacheError, match=r"field 'created'"):
        make_manifest(created="yesterday").validate()


def test_save_load_equal(tmp_path, state_dict):
    cache = new_cache(tmp_path / "c")
    m = make_manifest()
    eid = cache.save(state_dict, m)
    assert re.fullmatch(r"ld-[0-9a-f]{12}", eid)
    assert m.weights_sha256 is None  # the argument is not changed
    loaded, lm = cache.load(eid)
    assert loaded.keys() == state_dict.keys()
    for k, v in state_dict.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert lm.weights_size == (tmp_path / "c" / eid / WEIGHTS_NAME).stat().st_size
    assert lm.to_dict() | {"weights_sha256": None, "weights_size": None} == m.to_dict()
    # a network rebuilt from the cache gives the same output
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=4, features=(4, 4, 8, 8, 16, 4)).eval()
    net.load_state_dict(loaded)
    ref = BasicUNet(spatial_dims=3, in_channels=1, out_channels=4, features=(4, 4, 8, 8, 16, 4)).eval()
    ref.load_state_dict(state_dict)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    # same content, later time: same id, still one entry
    assert cache.save(state_dict, make_manifest(created="2030-01-01T00:00:00Z")) == eid
    assert [r[0] for r in cache.list()] == [eid]
    # different weights: a different id
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state_dict.items()}
    eid2 = cache.save(other, m)
    assert eid2 != eid and len(cache.list()) == 2
    assert not any(p.name.startswith(".") for p in (tmp_path / "c").iterdir())


def test_load_never_unpickles(tmp_path, state_dict, monkeypatch):
    import pickle

    cache = new_cache(tmp_path)
    eid = cache.save(state_dict, make_manifest())

    def forbidden(*a, **k):
        raise AssertionError("unpickling is not allowed")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    loaded, _ = cache.load(eid)
    assert torch.equal(loaded["final_conv.weight"], state_dict["final_conv.weight"])


def test_tied_weights_are_saved(tmp_path):
    w = torch.randn(4, 4)
    eid = new_cache(tmp_path).save({"a": w, "b": w, "c": w[:2]}, make_manifest())
    loaded, _ = new_cache(tmp_path).load(eid)
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w) and torch.equal(loaded["c"], w[:2])


def test_altered_or_missing_files_rejected(tmp_path, state_dict):
    cache = new_cache(tmp_path)
    eid = cache.save(state_dict, make_manifest())
    wpath = tmp_path / eid / WEIGHTS_NAME
    good = wpath.read_bytes()

    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    wpath.write_bytes(bytes(bad))
    with pytest.raises(CacheError, match=rf"encoder {eid}: weights file .* sha256 mismatch.*altered or truncated.*anatssl cache rm {eid}"):
        cache.load(eid)
    with pytest.raises(CacheError, match="sha256 mismatch"):
        cache.verify(eid)

    wpath.write_bytes(good[:-10])
    with pytest.raises(CacheError, match="sha256 mismatch"):
        cache.load(eid)

    wpath.unlink()
    with pytest.raises(CacheError, match=rf"encoder {eid}: weights file .*{WEIGHTS_NAME} is missing"):
        cache.load(eid)
    wpath.write_bytes(good)
    assert cache.verify(eid) == eid

    mpath = tmp_path / eid / MANIFEST_NAME
    text = mpath.read_text()
    data = json.loads(text)
    data["embedding_dim"] = 8
    mpath.write_text(json.dumps(data))
    with pytest.raises(CacheError, match=rf"encoder {eid}: .*does not match the entry id.*manifest was altered"):
        cache.load(eid)
    mpath.write_text(text[:20])
    with pytest.raises(CacheError, match="not valid JSON"):
        cache.manifest(eid)
    with pytest.warns(UserWarning, match="skipping broken encoder cache entry"):
        assert cache.list() == []
    # saving the same encoder again repairs the damaged entry
    mpath.write_text(text)
    wpath.write_bytes(bytes(bad))
    assert cache.save(state_dict, make_manifest()) == eid
    assert cache.verify(eid) == eid

    with pytest.raises(CacheError, match=r"unknown encoder 'ld-000000000000'.*known ids: " + eid):
        cache.load("ld-000000000000")


def test_resolve_prefix_name_and_ambiguity(tmp_path, state_dict):
    cache = new_cache(tmp_path)
    a = cache.save(state_dict, make_manifest(name="alpha"))
    b = cache.save(state_dict, make_manifest(name="beta"))
    assert cache.resolve(a) == a
    assert cache.resolve("alpha") == a and cache.resolve("beta") == b
    assert cache.resolve(a[:10] if a[:10] != b[:10] else a) == a
    with pytest.raises(CacheError, match="'ld-' is ambiguous"):
        cache.resolve("ld-")
    c = cache.save(state_dict, make_manifest(name="beta", description="another"))
    with pytest.raises(CacheError, match="name 'beta' is ambiguous"):
        cache.resolve("beta")
    assert cache.path(c) == tmp_path / c
    with pytest.raises(CacheError, match="no default encoder is bundled"):
        cache.resolve("default")


def test_remove_and_bundled(tmp_path, state_dict):
    bundled_root = tmp_path / "bundled"
    bid = new_cache(bundled_root).save(state_dict, make_manifest(name="shipped"))
    (bundled_root / "DEFAULT").write_text(bid + "\n")
    cache = EncoderCache(tmp_path / "user", bundled=[bundled_root, tmp_path / "absent"])
    uid = cache.save(state_dict, make_manifest(name="mine", method="alice"))
    rows = {eid: origin for eid, _, origin in cache.list()}
    assert rows == {uid: "user", bid: "bundled"}
    assert cache.default_encoder_id() == bid == default_encoder_id([bundled_root])
    assert cache.resolve("default") == bid
    loaded, m = cache.load("default")
    assert m.name == "shipped" and torch.equal(loaded["final_conv.weight"], state_dict["final_conv.weight"])
    with pytest.raises(CacheError, match=f"encoder {bid} is bundled with AnatSSL .* read-only"):
        cache.remove(bid)
    assert cache.remove("mine") == uid
    assert not (tmp_path / "user" / uid).exists()
    assert [r[0] for r in cache.list()] == [bid]
    with pytest.raises(CacheError, match="unknown encoder 'mine'"):
        cache.remove("mine")
    # no bundled folder, or one with a DEFAULT naming nothing
    assert EncoderCache(tmp_path / "user", bundled=[tmp_path / "absent"]).default_encoder_id() is None
    (bundled_root / "DEFAULT").write_text("ld-ffffffffffff\n")
    with pytest.raises(CacheError, match="DEFAULT names default encoder 'ld-ffffffffffff'"):
        cache.default_encoder_id()


def test_export_import_round_trip(tmp_path, state_dict):
    src = new_cache(tmp_path / "a")
    eid = src.save(state_dict, make_manifest())
    out = src.export(eid[:8], tmp_path / "enc.anatssl")
    assert out == tmp_path / "enc.anatssl" and zipfile.is_zipfile(out)
    assert src.export(eid, tmp_path) == tmp_path / f"{eid}.anatssl"

    dst = new_cache(tmp_path / "b")
    assert dst.import_(out) == eid
    assert dst.import_(out) == eid  # again: same entry
    loaded, m = dst.load(eid)
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
    assert m == src.manifest(eid)

    def rewrite(name: str, change) -> Path:
        bad = tmp_path / f"bad-{name}.anatssl"
        with zipfile.ZipFile(out) as zin, zipfile.ZipFile(bad, "w") as zout:
            for info in zin.infolist():
                data = zin.read(info.filename)
                zout.writestr(info.filename, change(data) if info.filename == name else data)
        return bad

    def flip(data: bytes) -> bytes:
        b = bytearray(data)
        b[len(b) // 2] ^= 0x01
        return bytes(b)

    fresh = new_cache(tmp_path / "c")
    with pytest.raises(CacheError, match="weights sha256 mismatch.*altered"):
        fresh.import_(rewrite(WEIGHTS_NAME, flip))

    def edit_manifest(data: bytes) -> bytes:
        d = json.loads(data)
        d["metrics"] = {"mre_mm": 1.0}
        return json.dumps(d).encode()

    with pytest.raises(CacheError, match="does not match the exported id.*altered"):
        fresh.import_(rewrite(MANIFEST_NAME, edit_manifest))
    (tmp_path / "not.anatssl").write_bytes(b"\x80\x04pickle?")
    with pytest.raises(CacheError, match="not an exported AnatSSL encoder"):
        fresh.import_(tmp_path / "not.anatssl")
    with pytest.raises(CacheError, match="no such file"):
        fresh.import_(tmp_path / "missing.anatssl")
    assert fresh.list() == [] and not any((tmp_path / "c").iterdir())


SAVER = textwrap.dedent(
    """
    import sys
    from safetensors.torch import load_file
    from AnatSSLLib.cache import EncoderCache, EncoderManifest
    state = load_file(sys.argv[2])
    m = EncoderManifest(method="ld", architecture="basic_unet3d", embedding_dim=4, spatial_dims=3)
    print(EncoderCache(sys.argv[1], bundled=[]).save(state, m), flush=True)
    """
)


def _saver(tmp_path: Path, state_dict, pause: float) -> tuple[list[str], dict[str, str]]:
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    weights = tmp_path / "in.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(weights))
    env = dict(os.environ, ANATSSL_CACHE_TEST_PAUSE_S=str(pause), PYTHONPATH=str(REPO))
    return [sys.executable, str(script), str(tmp_path / "cache"), str(weights)], env


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL is POSIX")
def test_killed_save_leaves_no_entry(tmp_path, state_dict):
    cmd, env = _saver(tmp_path, state_dict, pause=120)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    root = tmp_path / "cache"
    deadline = time.monotonic() + 90
    try:
        # wait until both files are written and the save sleeps before its final rename
        while time.monotonic() < deadline:
            tmps = list(root.glob(".tmp-*/" + MANIFEST_NAME)) if root.is_dir() else []
            if tmps or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert tmps, "the save never reached its pause before the final rename"
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()  # reap it and close its pipes
    assert proc.returncode == -signal.SIGKILL
    cache = new_cache(root)
    assert cache.list() == [] and cache.ids() == []
    with pytest.raises(CacheError, match="the cache is empty"):
        cache.load("ld")
    # the cache still works afterwards
    eid = cache.save(state_dict, make_manifest(method="ld", architecture="basic_unet3d"))
    assert cache.verify(eid) == eid and cache.ids() == [eid]


def test_two_processes_save_at_once(tmp_path, state_dict):
    cmd, env = _saver(tmp_path, state_dict, pause=3.0)
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    root = tmp_path / "cache"
    most_in_flight = 0  # both saves must be written and waiting to rename at the same time
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if root.is_dir():
            most_in_flight = max(most_in_flight, len(list(root.glob(".tmp-*/" + MANIFEST_NAME))))
        time.sleep(0.05)
    outs = [p.communicate(timeout=120) for p in procs]
    assert most_in_flight == 2
    assert [p.returncode for p in procs] == [0, 0], outs
    ids = {o[0].strip() for o in outs}
    assert len(ids) == 1
    (eid,) = ids
    assert sorted(p.name for p in root.iterdir()) == [eid]  # one entry, no leftovers
    loaded, _ = new_cache(root).load(eid)
    assert all(torch.equal(loaded[k], v) for k, v in state_dict.items())
