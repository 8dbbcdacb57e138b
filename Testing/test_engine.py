"""Tests of the training engine on a real small task (denoising real T1w MRI patches).

Covers: config checks and schedules; the loss decreasing; exact determinism; checkpoints that
load with ``torch.load(weights_only=True)``; resume after a cancel from a thread and after a real
SIGKILL of a subprocess (same loss curve as an uninterrupted run, 1e-6); cancel through a file
touched by another process and through SIGTERM; JSON-lines progress; saving into the encoder cache;
continuing a finished run with more steps, and refusing a checkpoint of other settings by name.
The two-process torchrun test is in ``test_engine_ddp.py``.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from AnatSSLLib.engine import (
    CancelToken,
    CheckpointMismatch,
    TrainingConfig,
    batch_shard,
    checkpoint_path,
    load_checkpoint,
    lr_factor,
    step_generator,
    train,
    verify_identity,
)
from AnatSSLLib.errors import AnatSSLError, InputError
from AnatSSLLib.progress import (
    CallbackProgress,
    JsonLinesProgress,
    TqdmProgress,
    combine,
    make_progress,
    parse_event,
)

from helpers_engine import DenoiseTask, small_config

HELPER = Path(__file__).with_name("helpers_engine.py")
ROOT = HELPER.parent.parent
REF_STEPS = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Same thread count as the helper subprocesses (1), so float sums agree bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task() -> DenoiseTask:
    return DenoiseTask()


@pytest.fixture(scope="module")
def reference(task) -> list[tuple[int, float]]:
    """Loss curve of an uninterrupted 16-step run (the one every resume must reproduce)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(task, small_config(steps=REF_STEPS)).losses
    finally:
        torch.set_num_threads(before)


def assert_same_curve(got, want, tol=1e-6):
    assert [s for s, _ in got] == [s for s, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- config and schedule


def test_config_budget_and_round_trip():
    cfg = TrainingConfig(epochs=3, steps_per_epoch=7, optimizer="AdamW", schedule="cosine")
    assert cfg.total_steps == 21
    assert TrainingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InputError, match="optimizer"):
        TrainingConfig(steps=5, optimizer="lamb")
    with pytest.raises(InputError, match="not both"):
        TrainingConfig(steps=5, epochs=2, steps_per_epoch=3)
    with pytest.raises(InputError, match="epochs and steps_per_epoch"):
        TrainingConfig()
    with pytest.raises(InputError, match="lr"):
        TrainingConfig(steps=5, lr=-1.0)
    with pytest.raises(InputError, match="unknown field"):
        TrainingConfig.from_dict({"steps": 5, "learning_rate": 0.1})


def test_lr_schedules():
    step = TrainingConfig(steps=100, schedule="step", step_size=10, gamma=0.5)
    assert [lr_factor(s, step) for s in (0, 9, 10, 25, 99)] == [1.0, 1.0, 0.5, 0.25, 0.5**9]
    cos = TrainingConfig(steps=14, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, cos) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cos) == pytest.approx(1.0)  # cosine starts at the peak after warm-up
    assert lr_factor(9 - 0, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert lr_factor(13, cos) == pytest.approx(0.1)  # last step: min_lr_ratio
    const = TrainingConfig(steps=5, warmup_steps=2)
    assert [lr_factor(s, const) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_batch_shard_and_step_generator():
    assert [batch_shard(8, r, 2) for r in (0, 1)] == [slice(0, 4), slice(4, 8)]
    assert batch_shard(6, 0, 1) == slice(0, 6)
    with pytest.raises(InputError, match="multiple of the number of processes"):
        batch_shard(6, 0, 4)
    a = torch.rand(3, generator=step_generator(7, 12))
    assert torch.equal(a, torch.rand(3, generator=step_generator(7, 12)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(7, 13)))
    assert not torch.equal(a, torch.rand(3, generator=step_generator(8, 12)))


# ------------------------------------------------------------------------------------ training


def test_loss_decreases_and_result_fields(task):
    events = []
    result = train(task, small_config(steps=30, schedule="cosine", warmup_steps=3), progress=events.append)
    first = np.mean([v for _, v in result.losses[:5]])
    last = np.mean([v for _, v in result.losses[-5:]])
    assert last < 0.5 * first, (first, last)
    assert result.steps_done == 30 and not result.cancelled and result.encoder_id is None
    assert [s for s, _ in result.losses] == list(range(1, 31))
    assert result.samples_per_second > 0 and result.peak_memory_bytes > 0
    assert set(result.metrics) == {"mse"}
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("progress") == 30
    prog = [e for e in events if e["event"] == "progress"]
    assert prog[0]["lr"] == pytest.approx(3e-3 / 3)  # warm-up
    assert prog[-1]["eta_s"] == 0.0 and prog[-1]["step"] == prog[-1]["total"] == 30
    assert all(e["samples_per_s"] > 0 for e in prog)


def test_same_seed_same_curve_other_seed_other_curve(task, reference):
    again = train(task, small_config(steps=REF_STEPS, prefetch=0))  # batches made inline
    assert again.losses == reference  # bit for bit (the reference made them in a thread)
    other = train(task, small_config(steps=4, seed=8))
    assert other.losses[0][1] != reference[0][1]


def test_nan_loss_raises_and_reports_error(task):
    class Diverging(DenoiseTask):
        def loss(self, model, batch):
            loss, m = super().loss(model, batch)
            return loss * float("nan"), m

    bad = Diverging.__new__(Diverging)
    bad.__dict__.update(task.__dict__)
    events = []
    with pytest.raises(AnatSSLError, match="diverged.*step 1"):
        train(bad, small_config(steps=3), progress=events.append)
    assert events[-1]["event"] == "error" and "diverged" in events[-1]["message"]


# --------------------------------------------------------------------- checkpoints and cancelling


def test_cancel_from_thread_checkpoint_then_resume(task, reference, tmp_path):
    token = CancelToken()
    events = []

    def progress(event):
        events.append(event)
        if event["event"] == "progress" and event["step"] == 5:
            t = threading.Thread(target=token.cancel)  # the cancel comes from another thread
            t.start()
            t.join()

    cfg = small_config(steps=REF_STEPS, checkpoint_dir=tmp_path, checkpoint_every=100)
    result = train(task, cfg, progress=progress, cancel=token)
    assert result.cancelled and result.encoder_id is None
    assert 5 <= result.steps_done <= 6
    assert events[-1]["event"] == "cancelled" and events[-2]["event"] == "checkpoint"

    # The checkpoint holds only tensors and plain values: the safe loader reads it.
    raw = torch.load(checkpoint_path(tmp_path), weights_only=True)
    assert raw["step"] == result.steps_done and len(raw["losses"]) == result.steps_done
    assert set(raw) >= {"model", "optimizer", "scaler", "rng", "config", "trajectory", "task"}
    assert raw["optimizer"]["state"][0]["step"].item() == result.steps_done  # Adam's step count
    assert load_checkpoint(checkpoint_path(tmp_path))["total"] == REF_STEPS
    assert not list(tmp_path.glob(".*.tmp"))

    resumed = train(task, cfg)
    assert resumed.resumed_from == result.steps_done and not resumed.cancelled
    assert_same_curve(resumed.losses, reference)


def test_checkpoint_of_other_settings_is_refused(task, tmp_path):
    cfg = small_config(steps=3, checkpoint_dir=tmp_path)
    train(task, cfg)
    events = []
    with pytest.raises(InputError, match=r"other settings \(lr: checkpoint 0.003 vs now 0.001\)"):
        train(task, small_config(steps=3, lr=1e-3, checkpoint_dir=tmp_path), progress=events.append)
    assert [e["event"] for e in events] == ["error"] and "other settings" in events[0]["message"]
    fresh = train(task, small_config(steps=3, lr=1e-3, checkpoint_dir=tmp_path, resume=False))
    assert fresh.resumed_from == 0
    # Logging/checkpoint settings are not part of the match.
    again = train(task, small_config(steps=3, lr=1e-3, checkpoint_dir=tmp_path, log_every=2))
    assert again.resumed_from == 3 and again.steps_done == 3
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_more_steps_continue_the_run_and_fewer_are_refused(task, reference, tmp_path):
    """The step budget is not part of a run's identity: asked for more steps, a finished run
    continues from its checkpoint and (constant schedule) trains exactly as one started with the
    larger budget; asked for fewer steps than it has done, it is refused by name."""
    half = REF_STEPS // 2
    train(task, small_config(steps=half, checkpoint_dir=tmp_path))
    events = []
    longer = train(task, small_config(steps=REF_STEPS, checkpoint_dir=tmp_path), progress=events.append)
    assert longer.resumed_from == half and longer.steps_done == REF_STEPS
    assert_same_curve(longer.losses, reference)
    start = events[0]
    assert start["event"] == "start" and start["resumed"] and start["resumed_total"] == half
    assert f"resumed from step {half}" in start["message"] and f"continued to {REF_STEPS}" in start["message"]
    with pytest.raises(CheckpointMismatch, match=f"steps: the run there is at step {REF_STEPS} already, {half} asked") as err:
        train(task, small_config(steps=half, checkpoint_dir=tmp_path))
    assert err.value.differences == [("steps", REF_STEPS, half)]


def test_identity_is_checked_by_name_and_pickles(task, tmp_path):
    import pickle

    train(task, small_config(steps=2, checkpoint_dir=tmp_path), identity={"crop": 32, "data": "abc"})
    with pytest.raises(CheckpointMismatch) as err:
        train(task, small_config(steps=4, checkpoint_dir=tmp_path), identity={"crop": 48, "data": "abc"})
    assert err.value.differences == [("crop", 32, 48)]
    assert "--crop: checkpoint 32 vs now 48" in err.value.describe({"crop": "--crop"}, restart="add --restart")
    assert "add --restart to start over" in err.value.describe({}, restart="add --restart")
    again = pickle.loads(pickle.dumps(err.value))  # torch.distributed hands it to every rank
    assert isinstance(again, CheckpointMismatch) and again.differences == err.value.differences
    verify_identity(checkpoint_path(tmp_path), {"crop": 32, "data": "abc"})
    with pytest.raises(CheckpointMismatch, match="data: checkpoint 'abc' vs now 'xyz'"):
        verify_identity(checkpoint_path(tmp_path), {"crop": 32, "data": "xyz"})
    # the description (free text naming step counts) is not part of the task
    described = DenoiseTask.__new__(DenoiseTask)
    described.__dict__.update(task.__dict__)
    described.manifest_fields = lambda: {**task.manifest_fields(), "description": "4 steps"}
    done = train(described, small_config(steps=4, checkpoint_dir=tmp_path), identity={"crop": 32, "data": "abc"})
    assert done.resumed_from == 2 and done.steps_done == 4


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HELPER), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, bufsize=1,
    )


def _read_until(proc: subprocess.Popen, predicate) -> list[dict]:
    """Events from the child's stdout up to the first one matching ``predicate``."""
    seen = []
    for line in proc.stdout:
        event = parse_event(line)
        if event is None:
            continue
        seen.append(event)
        if predicate(event):
            return seen
    proc.wait()
    raise AssertionError(f"child ended (rc {proc.returncode}) before the event; stderr: {proc.stderr.read()}")


def test_resume_after_sigkill_matches_uninterrupted_run(task, reference, tmp_path):
    proc = _spawn("--steps", str(REF_STEPS), "--checkpoint-dir", str(tmp_path), "--checkpoint-every", "3",
                  "--sleep", "0.15")
    try:
        _read_until(proc, lambda e: e["event"] == "checkpoint" and e["step"] >= 6)
        os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: a real kill
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(checkpoint_path(tmp_path))["step"]
    assert 6 <= killed_at < REF_STEPS

    resumed = train(task, small_config(steps=REF_STEPS, checkpoint_dir=tmp_path, checkpoint_every=3))
    assert resumed.resumed_from == killed_at
    assert_same_curve(resumed.losses, reference)


def test_cancel_file_touched_by_another_process(tmp_path):
    flag = tmp_path / "CANCEL"
    out = tmp_path / "result.json"
    proc = _spawn("--steps", "500", "--checkpoint-dir", str(tmp_path / "ck"), "--cancel-file", str(flag),
                  "--sleep", "0.05", "--out", str(out))
    try:
        _read_until(proc, lambda e: e["event"] == "progress" and e["step"] >= 2)
        subprocess.run([sys.executable, "-c", f"open({str(flag)!r}, 'w').close()"], check=True)
        rest = [parse_event(line) for line in proc.stdout]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0
    events = [e for e in rest if e is not None]
    assert events[-1]["event"] == "cancelled" and "cancel file" in events[-1]["reason"]
    result = json.loads(out.read_text())
    assert result["cancelled"] and result["steps_done"] < 100
    assert load_checkpoint(checkpoint_path(tmp_path / "ck"))["step"] == result["steps_done"]


def test_sigterm_cancels_and_checkpoints(tmp_path):
    proc = _spawn("--steps", "500", "--checkpoint-dir", str(tmp_path), "--signals", "--sleep", "0.05")
    try:
        _read_until(proc, lambda e: e["event"] == "progress" and e["step"] >= 2)
        proc.send_signal(signal.SIGTERM)
        events = [e for e in map(parse_event, proc.stdout) if e is not None]
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == 0
    assert [e["event"] for e in events][-2:] == ["checkpoint", "cancelled"]
    assert events[-1]["reason"] == "signal SIGTERM"
    assert load_checkpoint(checkpoint_path(tmp_path))["step"] == events[-1]["step"]


# ---------------------------------------------------------------------------------- progress sinks


def test_json_lines_progress_parses_back(task):
    stream = io.StringIO()
    throttled = []
    sink = combine(JsonLinesProgress(stream), CallbackProgress(throttled.append, min_interval_s=3600))
    train(task, small_config(steps=4), progress=sink)
    lines = stream.getvalue().splitlines()
    events = [parse_event(line) for line in lines]
    assert [e["event"] for e in events] == ["start"] + ["progress"] * 4 + ["done"]
    assert all(json.loads(line) == e for line, e in zip(lines, events, strict=True))
    assert events[2]["step"] == 2 and events[2]["total"] == 4 and events[2]["loss"] > 0
    # The throttled callback let one progress event through, and every other kind.
    assert [e["event"] for e in throttled] == ["start", "progress", "done"]
    # Non-finite numbers become null (strict JSON); other lines parse to None.
    s = io.StringIO()
    JsonLinesProgress(s)({"event": "error", "loss": float("nan"), "step": np.int64(3)})
    assert parse_event(s.getvalue()) == {"event": "error", "loss": None, "step": 3}
    assert parse_event("Traceback (most recent call last):") is None
    assert parse_event('{"event": "other"}') is None


def test_tqdm_progress_writes_bar_and_messages():
    out = io.StringIO()
    bar = TqdmProgress(desc="pretrain", file=out)
    bar({"event": "start", "step": 0, "total": 4})
    bar({"event": "progress", "step": 2, "total": 4, "loss": 0.5, "lr": 1e-3})
    bar({"event": "checkpoint", "step": 2, "total": 4, "path": "/x/checkpoint.pt"})
    bar({"event": "done", "step": 4, "total": 4, "encoder_id": "ld-0123456789ab"})
    text = out.getvalue()
    assert "pretrain" in text and "4/4" in text
    assert "checkpoint at step 2: /x/checkpoint.pt" in text and "saved encoder ld-0123456789ab" in text
    assert isinstance(make_progress("tqdm"), TqdmProgress) and make_progress("none") is None
    assert isinstance(make_progress("jsonl"), JsonLinesProgress)
    with pytest.raises(ValueError, match="progress kind"):
        make_progress("bar")


# ------------------------------------------------------------------------------------------- cache


def test_trained_encoder_saved_into_cache(task, tmp_path):
    from AnatSSLLib.cache import EncoderCache

    cache = EncoderCache(tmp_path / "cache", bundled=[])
    events = []
    result = train(task, small_config(steps=5), cache=cache, name="tiny test", progress=events.append)
    assert result.encoder_id is not None and result.encoder_id.startswith("test_denoise-")
    assert events[-1]["event"] == "done" and events[-1]["encoder_id"] == result.encoder_id
    state, manifest = cache.load(result.encoder_id)
    assert sorted(state) == ["encoder.0.bias", "encoder.0.weight", "encoder.2.bias", "encoder.2.weight"]
    assert state["encoder.0.weight"].shape == (8, 1, 3, 3, 3)
    assert manifest.method == "test_denoise" and manifest.architecture == "tiny_dae3d"
    assert manifest.spacing == [4.0, 4.0, 4.0] and manifest.name == "tiny test"
    assert manifest.training["steps"] == 5 and manifest.training["config"]["lr"] == 3e-3
    assert manifest.metrics["final_loss"] == pytest.approx(result.final_loss)
    assert cache.resolve("tiny test") == result.encoder_id
