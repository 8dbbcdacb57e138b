"""`anatssl pretrain` run again: the same command with more steps continues the run in its folder;
other settings are refused by option name, with ``--restart`` as the way to start over.

LD's "step" schedule (halve every --lr-halve-every steps) does not depend on the step count, so an
LD run continued from 2 to 3 LD steps trains exactly as one started with 3 (same loss curve). About
1.5 minutes on 2 cores (one process, in-process CLI calls of a few steps at 3 mm).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from AnatSSLLib.cli import main
from AnatSSLLib.engine import checkpoint_path, load_checkpoint
from AnatSSLLib.progress import parse_event


def ld_args(population, run_dir, cache, *extra: str) -> list[str]:
    return ["pretrain", "--method", "ld", "--population", str(population.path), "--pd-steps", "1", "--spacing", "3",
            "--device", "cpu", "--progress", "jsonl", "--run-dir", str(run_dir), "--cache-dir", str(cache), *extra]


def run_cli(args, capsys) -> tuple[int, list[dict], str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, [e for e in map(parse_event, out.out.splitlines()) if e is not None], out.err


@pytest.fixture(scope="module")
def finished(population_small, tmp_path_factory):
    """An LD run of 1 PD + 2 LD steps, finished."""
    tmp = tmp_path_factory.mktemp("continue")
    assert main(ld_args(population_small, tmp / "run", tmp / "cache", "--ld-steps", "2")) == 0
    return tmp


def test_more_steps_continue_and_match_a_run_started_with_them(population_small, finished, tmp_path, capsys):
    rc, events, _ = run_cli(ld_args(population_small, finished / "run", finished / "cache", "--ld-steps", "3"), capsys)
    assert rc == 0
    starts = {e["stage"]: e for e in events if e["event"] == "start"}
    assert starts["pd"]["resumed"] and "complete" in starts["pd"]["message"]
    ld = starts["ld"]
    assert ld["resumed"] and ld["resumed_from"] == 2 and ld["resumed_total"] == 2
    assert "resumed from step 2" in ld["message"] and "continued to 3" in ld["message"]
    assert [e["step"] for e in events if e["event"] == "progress" and e["stage"] == "ld"] == [3]

    assert main(ld_args(population_small, tmp_path / "fresh", tmp_path / "cache", "--ld-steps", "3")) == 0
    continued = load_checkpoint(checkpoint_path(finished / "run" / "ld"))["losses"]
    fresh = load_checkpoint(checkpoint_path(tmp_path / "fresh" / "ld"))["losses"]
    assert [s for s, _ in continued] == [s for s, _ in fresh] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in continued], [v for _, v in fresh], rtol=1e-5)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--ld-steps", "3", "--clusters", "8"), "--clusters: checkpoint 16 vs now 8"),
        (("--ld-steps", "3", "--pd-steps", "2"), "--pd-steps: checkpoint 1 vs now 2"),
        (("--ld-steps", "1"), "--ld-steps: the run there is at step"),
        (("--ld-steps", "3", "--no-paired-contrasts"), "--no-paired-contrasts: checkpoint True vs now False"),
    ],
)
def test_other_settings_are_refused_by_option_before_training(population_small, finished, capsys, extra, needle):
    before = {s: load_checkpoint(checkpoint_path(finished / "run" / s))["step"] for s in ("pd", "ld")}
    rc, events, err = run_cli(ld_args(population_small, finished / "run", finished / "cache", *extra), capsys)
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("anatssl pretrain: error: ") and needle in line and "add --restart to start over" in line
    assert not [e for e in events if e["event"] == "progress"]
    assert {s: load_checkpoint(checkpoint_path(finished / "run" / s))["step"] for s in ("pd", "ld")} == before


def test_restart_starts_over_with_other_settings(population_small, tmp_path, capsys):
    assert main(ld_args(population_small, tmp_path / "run", tmp_path / "cache", "--ld-steps", "1")) == 0
    rc, events, _ = run_cli(ld_args(population_small, tmp_path / "run", tmp_path / "cache", "--ld-steps", "1",
                                    "--clusters", "8", "--restart"), capsys)
    assert rc == 0
    assert all(not e["resumed"] for e in events if e["event"] == "start")
    saved = load_checkpoint(checkpoint_path(tmp_path / "run" / "ld"))
    assert saved["step"] == 1 and json.loads(saved["identity"])["num_clusters"] == 8
