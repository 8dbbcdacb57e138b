"""`anatssl pretrain` as the README launches it on several processes: ``torchrun --nproc_per_node=2
-m AnatSSLLib.cli pretrain ...`` with 2 CPU processes (gloo), for LD (PD then LD), AWCL and Alice.

SLOW-ISH: about 2.5 minutes on 2 cores (nine torchrun launches of a few steps each, 1 thread per
process, and two one-process runs). Each method runs to the end and leaves its encoder in the cache (a temporary
``--cache-dir``), written by rank 0 alone.

Loss curves against one process with the same global batch:

- Alice without CAFA: equal (to 1e-4). Its whole global batch (volumes, crops, masks) is drawn
  from the step's generator, its terms are means over samples with equal mask counts, and its
  network has no batch statistics.
- Alice with CAFA (the default): not equal, by design of the engine: CAFA's dropout draws from a
  per-rank random stream, so the two ranks drop other units than one process does.
- LD: not equal. Its networks use BatchNorm, whose statistics stay per rank on the CPU (gloo has
  no SyncBatchNorm; on CUDA the engine converts it), and patch and region discrimination take
  their negatives and cross-image regions from the rank's own pairs only.
- AWCL: not equal with the command line's default BatchNorm ResNet (per-rank statistics); its
  projections are gathered over the ranks, and with group norm the curves agree (that equality is
  tested in ``test_awcl.py``).

Ctrl-C under torchrun stops both ranks with a checkpoint, and the run continues (with more steps).
Bad input (more processes than volumes, ``--device cuda`` without a GPU, a run folder holding
another run) ends every rank with the same one-line error before any training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from AnatSSLLib.cache import EncoderCache
from AnatSSLLib.engine import checkpoint_path, load_checkpoint
from AnatSSLLib.progress import parse_event

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def launch(args: list[str], cache: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=N -m AnatSSLLib.cli pretrain ARGS`` (nproc 1: plain python)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", ANATSSL_CACHE=str(cache))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if nproc == 1:
        launcher = [sys.executable]
    else:
        exe = Path(sys.executable).with_name("torchrun")
        launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
        launcher += ["--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, "-m", "AnatSSLLib.cli", "pretrain", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def events(run: subprocess.CompletedProcess) -> list[dict]:
    return [e for e in map(parse_event, run.stdout.splitlines()) if e is not None]


def cached(cache: Path) -> list:
    return EncoderCache(cache, bundled=[]).list()


def assert_finished(run: subprocess.CompletedProcess, cache: Path, method: str, stages=(None,)) -> list[dict]:
    assert run.returncode == 0, run.stderr[-3000:]
    seen = events(run)
    for stage in stages:
        mine = [e for e in seen if e.get("stage") == stage]
        assert mine[0]["event"] == "start" and mine[0]["world_size"] == 2
        assert [e["event"] for e in mine].count("done") == 1  # rank 0 alone reports
    summaries = [e for e in seen if e["event"] == "summary"]
    assert len(summaries) == 1 and summaries[0]["encoder_id"]
    entries = cached(cache)
    assert [eid for eid, _, _ in entries] == [summaries[0]["encoder_id"]]
    manifest = entries[0][1]
    assert manifest.method == method and manifest.training["world_size"] == 2
    return seen


@pytest.fixture(scope="module")
def ld_run(population_small, tmp_path_factory):
    """The README's torchrun line, a few steps: 2 processes, PD then LD."""
    tmp = tmp_path_factory.mktemp("ld_ddp")
    args = ["--method", "ld", "--population", str(population_small.path), "--pd-steps", "2", "--ld-steps", "2",
            "--spacing", "3", "--progress", "jsonl", "--run-dir", str(tmp / "run"), "--name", "ddp-probe"]
    return args, tmp, launch([*args, "--device", "cpu"], tmp / "cache")


def test_ld_pd_then_ld_under_torchrun(ld_run):
    args, tmp, run = ld_run
    assert_finished(run, tmp / "cache", "ld", stages=("pd", "ld"))
    for stage in ("pd", "ld"):
        saved = load_checkpoint(checkpoint_path(tmp / "run" / stage))
        assert saved["world_size"] == 2 and saved["step"] == 2 and len(saved["rng"]) == 2
    assert not list((tmp / "run").rglob(".*.tmp"))


def test_alice_under_torchrun_caches_its_encoder(population_small, tmp_path):
    args = ["--method", "alice", "--population", str(population_small.path), "--contrasts", "t1", "--steps", "2",
            "--crop", "32", "--spacing", "3", "--device", "cpu", "--progress", "jsonl", "--run-dir", str(tmp_path / "run")]
    assert_finished(launch(args, tmp_path / "cache"), tmp_path / "cache", "alice")


def test_alice_without_cafa_matches_one_process(population_small, tmp_path):
    common = ["--method", "alice", "--no-cafa", "--population", str(population_small.path), "--contrasts", "t1",
              "--steps", "3", "--crop", "32", "--spacing", "3", "--device", "cpu", "--progress", "jsonl"]
    two = launch([*common, "--run-dir", str(tmp_path / "two")], tmp_path / "cache2")
    assert_finished(two, tmp_path / "cache2", "alice")
    one = launch([*common, "--run-dir", str(tmp_path / "one")], tmp_path / "cache1", nproc=1)
    assert one.returncode == 0, one.stderr[-3000:]
    curves = [load_checkpoint(checkpoint_path(tmp_path / d))["losses"] for d in ("one", "two")]
    assert [s for s, _ in curves[0]] == [s for s, _ in curves[1]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in curves[1]], [v for _, v in curves[0]], rtol=1e-4)


def test_awcl_under_torchrun_caches_its_encoder(population_small, tmp_path):
    from AnatSSLLib.data.planes import make_plane_set

    csv = make_plane_set(population_small.path, tmp_path / "planes", per_subject=11, size=48, spacing_mm=4.0,
                         untagged_fraction=0.0)
    args = ["--method", "awcl", "--images", str(csv), "--size", "48", "--backbone", "resnet10", "--batch-size", "4",
            "--steps", "2", "--device", "cpu", "--progress", "jsonl", "--run-dir", str(tmp_path / "run")]
    assert_finished(launch(args, tmp_path / "cache"), tmp_path / "cache", "awcl")


def test_ctrl_c_under_torchrun_checkpoints_and_the_run_continues(population_small, tmp_path):
    """Ctrl-C (SIGINT to torchrun's process group: each worker gets it from the terminal and again
    from torchrun) stops both ranks after the same step with a checkpoint; the same command, here
    on one process and with more steps, continues it and says so."""
    import signal

    common = ["--method", "alice", "--population", str(population_small.path), "--contrasts", "t1", "--crop", "32",
              "--spacing", "3", "--device", "cpu", "--progress", "jsonl", "--run-dir", str(tmp_path / "run")]
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", ANATSSL_CACHE=str(tmp_path / "cache"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([*launcher, "--standalone", "--nproc_per_node=2", "-m", "AnatSSLLib.cli", "pretrain",
                             *common, "--steps", "40"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            event = parse_event(line)
            if event is not None:
                seen.append(event)
                if event["event"] == "progress" and len([e for e in seen if e["event"] == "progress"]) == 1:
                    os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stdout.close()
    cancelled = [e for e in seen if e["event"] == "cancelled"]
    assert len(cancelled) == 1 and cancelled[0]["reason"] == "signal SIGINT"
    stopped = load_checkpoint(checkpoint_path(tmp_path / "run"))
    assert stopped["world_size"] == 2 and stopped["step"] == cancelled[0]["step"] < 40
    assert not cached(tmp_path / "cache")

    more = stopped["step"] + 1
    run = launch([*common, "--steps", str(more)], tmp_path / "cache", nproc=1)
    assert run.returncode == 0, run.stderr[-3000:]
    start = events(run)[0]
    assert start["resumed"] and start["resumed_from"] == stopped["step"] and "resumed from step" in start["message"]
    assert load_checkpoint(checkpoint_path(tmp_path / "run"))["step"] == more and len(cached(tmp_path / "cache")) == 1


def assert_refused_on_every_rank(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("anatssl pretrain: error: ")]
    assert len(lines) == 2, run.stderr[-3000:]  # one line from each rank
    for needle in needles:
        assert all(needle in line for line in lines), (needle, lines)
    assert not [e for e in events(run) if e["event"] == "progress"]  # nothing trained


def test_bad_input_fails_on_every_rank_before_training(ld_run, population_small, tmp_path):
    args, tmp, _ = ld_run
    one_volume = str(population_small.path / "sub-000" / "t1.nii.gz")
    run = launch(["--method", "ld", "--data", one_volume, "--pd-steps", "1", "--ld-steps", "1", "--device", "cpu",
                  "--progress", "jsonl", "--run-dir", str(tmp_path / "run")], tmp_path / "cache")
    assert_refused_on_every_rank(run, "2 processes", "only 1 subjects", "at most 1 processes")
    if not torch.cuda.is_available():
        run = launch([*args, "--device", "cuda"], tmp_path / "cache")
        assert_refused_on_every_rank(run, "CUDA was asked for", "--device cpu")
    # the finished run's folder with another crop: named, with the way to start over
    run = launch([*args, "--device", "cpu", "--crop", "48"], tmp / "cache")
    assert_refused_on_every_rank(run, "--crop: checkpoint 32 vs now 48", "--restart")
    assert len(cached(tmp / "cache")) == 1  # nothing added
