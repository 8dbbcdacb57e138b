"""Tests of `anatssl cache`: list, show, rm, export, import, and the --cache-dir option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from AnatSSLLib.cache import EncoderCache, EncoderManifest
from AnatSSLLib.cli import main

REPO = Path(__file__).resolve().parents[1]


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(8, 1, 3, 3, 3, generator=g), "enc.bias": torch.zeros(8)}


@pytest.fixture
def filled(tmp_path):
    cache = EncoderCache(tmp_path / "cache", bundled=[])
    a = cache.save(_state(0), EncoderManifest(method="ld", architecture="ld_unet3d", embedding_dim=8,
                                              spatial_dims=3, name="brain-ld"))
    b = cache.save(_state(1), EncoderManifest(method="awcl", architecture="resnet18_2d", embedding_dim=128,
                                              spatial_dims=2, name="us-awcl"))
    return cache, a, b


def test_list_and_show(filled, capsys):
    cache, a, b = filled
    assert main(["cache", "--cache-dir", str(cache.root), "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["id", "method", "arch", "dims", "dim", "created", "origin"]
    rows = {line.split()[0]: line.split() for line in out[1:-2]}
    assert rows[a][1:5] == ["ld", "ld_unet3d", "3D", "8"] and rows[a][-1] == "user"
    assert rows[b][1:5] == ["awcl", "resnet18_2d", "2D", "128"]
    bundled = [eid for eid, _, origin in EncoderCache(cache.root).list() if origin == "bundled"]  # the package default
    assert all(rows[eid][-1] in ("bundled", "default") for eid in bundled)
    assert f"{2 + len(bundled)} encoder(s)" in out[-1]

    # the option also works after the action
    assert main(["cache", "show", "us-awcl", "--cache-dir", str(cache.root)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == cache.manifest(b).to_dict()
    assert main(["cache", "--cache-dir", str(cache.root), "show", a[:6], "--verify"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["name"] == "brain-ld" and "verified" in captured.err


def test_errors_are_one_line_with_status_2(filled, capsys, tmp_path):
    cache, a, _ = filled
    assert main(["cache", "--cache-dir", str(cache.root), "show", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anatssl cache: error: unknown encoder 'nope'") and "\n" not in err
    weights = cache.path(a) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert main(["cache", "--cache-dir", str(cache.root), "show", a, "--verify"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    (cache.path(a) / "manifest.json").write_text("{")  # a broken entry is listed as a warning ...
    assert main(["cache", "--cache-dir", str(cache.root), "list"]) == 0
    captured = capsys.readouterr()
    assert a not in captured.out and f"warning: skipping broken encoder cache entry: encoder {a}" in captured.err
    assert main(["cache", "--cache-dir", str(cache.root), "rm", a, "--yes"]) == 0  # ... and can be removed
    assert capsys.readouterr().out.strip() == f"removed {a}"
    assert main(["cache", "--cache-dir", str(cache.root), "import", str(tmp_path / "none.anatssl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_rm_needs_yes_without_a_terminal(filled, capsys, monkeypatch):
    cache, a, b = filled
    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        assert main(["cache", "--cache-dir", str(cache.root), "rm", a]) == 2
    assert "pass --yes" in capsys.readouterr().err
    assert set(cache.ids()) == {a, b}
    assert main(["cache", "--cache-dir", str(cache.root), "rm", "brain-ld", "--yes"]) == 0
    assert capsys.readouterr().out.strip() == f"removed {a}"
    assert cache.ids() == [b]


def test_export_import(filled, capsys, tmp_path):
    cache, a, _ = filled
    out_file = tmp_path / "brain.anatssl"
    assert main(["cache", "--cache-dir", str(cache.root), "export", a, str(out_file)]) == 0
    assert out_file.is_file() and f"exported {a}" in capsys.readouterr().out
    other = tmp_path / "other"
    assert main(["cache", "--cache-dir", str(other), "import", str(out_file)]) == 0
    assert capsys.readouterr().out.strip() == a
    state, manifest = EncoderCache(other, bundled=[]).load(a)
    assert torch.equal(state["enc.weight"], _state(0)["enc.weight"]) and manifest.name == "brain-ld"


def test_cache_option_helpers(tmp_path, monkeypatch):
    import argparse

    from AnatSSLLib.cli.cache_cmd import add_cache_option, cache_from_args

    parser = argparse.ArgumentParser()
    add_cache_option(parser)
    assert cache_from_args(parser.parse_args(["--cache-dir", str(tmp_path)])).root == tmp_path
    monkeypatch.setenv("ANATSSL_CACHE", str(tmp_path / "env"))
    assert cache_from_args(parser.parse_args([])).root == tmp_path / "env"
    assert cache_from_args(argparse.Namespace()).root == tmp_path / "env"


def test_real_command_uses_anatssl_cache_variable(filled):
    cache, a, b = filled
    exe = Path(sys.executable).parent / "anatssl"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    env = dict(os.environ, ANATSSL_CACHE=str(cache.root))
    proc = subprocess.run([str(exe), "cache", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert a in proc.stdout and b in proc.stdout and str(cache.root) in proc.stdout
