"""Two CPU processes under ``torchrun`` (gloo) train like one process with the same global batch.

The helper task (denoising real T1w patches, no BatchNorm) makes the batch of every step from
(seed, step) and each rank keeps its half, so DistributedDataParallel's averaged gradient equals
the one-process gradient and the loss curves agree to float round-off. A second torchrun run is
cancelled on rank 0 alone (both ranks stop together) and resumed by one process. A third has
one rank fail mid-run: both stop at once with its error.
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

from AnatSSLLib.engine import checkpoint_path, load_checkpoint, train

from helpers_engine import DenoiseTask, small_config

HELPER = Path(__file__).with_name("helpers_engine.py")
ROOT = HELPER.parent.parent
STEPS = 10

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch_vars}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [*launcher, "--standalone", f"--nproc_per_node={nproc}", str(HELPER), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_gloo_processes_match_one_process(tmp_path, one_thread):
    out = tmp_path / "ddp.json"
    ck = tmp_path / "ck"
    run = torchrun("--steps", str(STEPS), "--batch-size", "4", "--checkpoint-dir", str(ck),
                   "--checkpoint-every", "4", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = json.loads(out.read_text())
    # Only rank 0 reports: each progress event appears once.
    progress_lines = [line for line in run.stdout.splitlines() if '"event":"progress"' in line]
    assert len(progress_lines) == STEPS

    task = DenoiseTask()
    single = train(task, small_config(steps=STEPS, batch_size=4))
    assert [s for s, _ in ddp["losses"]] == [s for s, _ in single.losses] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in ddp["losses"]], [v for _, v in single.losses], rtol=1e-3)
    assert ddp["losses"][-1][1] < 0.5 * ddp["losses"][0][1]

    # The checkpoint of the 2-process run holds both ranks' RNG states.
    final = load_checkpoint(checkpoint_path(ck))
    assert final["world_size"] == 2 and len(final["rng"]) == 2 and final["step"] == STEPS
    assert not torch.equal(final["rng"][0]["torch"], final["rng"][1]["torch"])



def test_cancel_on_rank0_stops_both_ranks_and_one_process_resumes(tmp_path, one_thread):
    """Rank 0 alone is cancelled at step 4; the ranks agree to stop after step 5 (the cancel is
    seen with the next step's all-reduce), checkpoint, and one process resumes."""
    out, ck = tmp_path / "ddp.json", tmp_path / "ck"
    run = torchrun("--steps", str(STEPS), "--batch-size", "4", "--checkpoint-dir", str(ck),
                   "--cancel-at", "4", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = json.loads(out.read_text())
    assert ddp["cancelled"] and ddp["steps_done"] == 5
    assert '"event":"cancelled"' in run.stdout.splitlines()[-1]
    saved = load_checkpoint(checkpoint_path(ck))
    assert saved["step"] == 5 and saved["world_size"] == 2 and len(saved["rng"]) == 2

    task = DenoiseTask()
    resumed = train(task, small_config(steps=STEPS, batch_size=4, checkpoint_dir=ck))
    single = train(task, small_config(steps=STEPS, batch_size=4))
    assert resumed.resumed_from == 5 and resumed.steps_done == STEPS
    assert [s for s, _ in resumed.losses] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in resumed.losses], [v for _, v in single.losses], rtol=1e-3)


def test_a_failing_rank_stops_every_rank_with_its_error(tmp_path, one_thread):
    """Rank 1 raises in its loss at step 3 while rank 0 waits for its gradients: rank 0 stops
    within seconds with rank 1's error (from the launcher's store), without torchrun's SIGKILL."""
    import time

    t0 = time.monotonic()
    run = torchrun("--steps", str(STEPS), "--batch-size", "4", "--fail-at", "1:3")
    elapsed = time.monotonic() - t0
    assert run.returncode != 0
    assert "ValueError: planted failure on rank 1 at step 3" in run.stderr
    assert "PeerFailure: stopped because process 1 of 2 failed: ValueError: planted failure" in run.stderr
    errors = [line for line in run.stdout.splitlines() if '"event":"error"' in line]
    assert len(errors) == 1 and "planted failure on rank 1" in errors[0]  # rank 0 reports it once
    assert "forcefully exiting via 9" not in run.stderr
    assert elapsed < 60, elapsed
