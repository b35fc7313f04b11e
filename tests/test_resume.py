"""Checkpoints and resume: a run killed with SIGKILL ends, once resumed, like an uninterrupted one."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_rows, strip_timing

from fedsim.runner import RunInputError, simulate

# Every client hangs for 2 s in the evaluation of round 4, so the test can kill the run after
# round 3 has been written; the comparison run has the same delay, so the configs are equal.
CONFIG = """
run: {rounds: 6, checkpoint_every: 1, progress: false}
data: {num_clients: 6}
model: {hidden: [32]}
strategy: {name: %s, fraction_train: 0.5}
backend: {name: local}
faults:
  - {kind: hang, rounds: [4], partitions: [0, 1, 2, 3, 4, 5], seconds: 2.0, phase: evaluate}
"""


def _fedsim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, timeout=300)


def _kill_after_rows(config: Path, run_dir: Path, rows: int) -> None:
    process = subprocess.Popen([sys.executable, "-m", "fedsim", "simulate", str(config), "--output-dir", str(run_dir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= rows:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.parametrize("strategy", ["fedavg", "local"])
def test_killed_run_resumes_to_identical_rows(tmp_path, strategy):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG % strategy)
    whole = _fedsim("simulate", str(config), "--output-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    _kill_after_rows(config, tmp_path / "killed", rows=3)
    killed_rows = read_rows(tmp_path / "killed")
    assert 3 <= len(killed_rows) < 6
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = _fedsim("resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert strip_timing(read_rows(tmp_path / "killed")) == strip_timing(read_rows(tmp_path / "whole"))


def test_resume_rejects_changed_config(run_config, tmp_path):
    base = ["backend.name=local", "run.progress=false", "run.rounds=2", "run.checkpoint_every=1", "data.num_clients=4"]
    simulate(run_config("quickstart.yaml", *base), run_dir=tmp_path / "run")

    changed = run_config("quickstart.yaml", *base, "client.lr=0.5")
    with pytest.raises(RunInputError, match=r"client.lr: 0.1 in the run folder, 0.5 now"):
        simulate(changed, run_dir=tmp_path / "run", resume=True)


def test_resume_of_finished_run_keeps_rows(run_config, tmp_path):
    config = run_config("quickstart.yaml", "backend.name=local", "run.progress=false", "run.rounds=2", "run.checkpoint_every=1", "data.num_clients=4")
    first = simulate(config, run_dir=tmp_path / "run")
    again = simulate(config, run_dir=tmp_path / "run", resume=True)
    assert again.status == "completed"
    assert strip_timing(again.rows) == strip_timing(first.rows)


def test_checkpoint_holds_no_pickle(run_config, tmp_path):
    config = run_config("quickstart.yaml", "backend.name=local", "run.progress=false", "run.rounds=2", "run.checkpoint_every=2", "data.num_clients=4")
    simulate(config, run_dir=tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "round-0002"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["arrays.safetensors", "state.json"]
    assert not (tmp_path / "run" / "checkpoints" / "round-0001").exists()


def test_resume_cli_rejects_non_run_folder(tmp_path):
    result = _fedsim("resume", str(tmp_path))
    assert result.returncode == 2
    assert "is not a run folder" in result.stderr


def test_resume_without_checkpoint_is_rejected(run_config, tmp_path):
    config = run_config("quickstart.yaml", "backend.name=local", "run.progress=false", "run.rounds=2", "data.num_clients=4")
    simulate(config, run_dir=tmp_path / "run")
    with pytest.raises(RunInputError, match=r"has no checkpoint \(run.checkpoint_every was 0\)"):
        simulate(config, run_dir=tmp_path / "run", resume=True)
    assert len(read_rows(tmp_path / "run")) == 2
