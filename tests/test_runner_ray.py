"""Runs on Flower's Ray simulation engine: same rows as the local engine, resource checks."""

from __future__ import annotations

import pytest
from conftest import strip_timing

from fedsim.runner import RunInputError, simulate

pytestmark = pytest.mark.ray

FAULTS = "faults=[{kind: raise, rounds: [2], partitions: [3]}, {kind: nan, rounds: [3], partitions: [5]}]"


def _comparable(rows):
    # Error texts name the engine's own exception wrappers; which client failed, and when, must match.
    cleaned = strip_timing(rows)
    for row in cleaned:
        for failure in row.get("failures", []):
            failure.pop("reason")
            failure.pop("node_id")
    return cleaned


def test_ray_and_local_give_identical_rows(run_config, tmp_path):
    common = ["run.rounds=3", "run.progress=false", "data.num_clients=8", "strategy.fraction_train=1.0", "strategy.max_failure_fraction=0.5", FAULTS]
    on_ray = simulate(run_config("quickstart.yaml", *common, "backend.name=ray"), run_dir=tmp_path / "ray")
    on_local = simulate(run_config("quickstart.yaml", *common, "backend.name=local"), run_dir=tmp_path / "local")

    assert on_ray.status == "completed", on_ray.error
    assert on_local.status == "completed", on_local.error
    assert len(on_ray.rows) == 3
    assert _comparable(on_ray.rows) == _comparable(on_local.rows)
    assert on_ray.rows[1]["clients_failed"] == 1
    assert on_ray.rows[2]["clients_failed"] == 1


def test_missing_gpu_fails_before_round_one(run_config, tmp_path):
    config = run_config("quickstart.yaml", "run.progress=false", "backend.client_resources.num_gpus=1")
    with pytest.raises(RunInputError, match=r"num_gpus=1 asks for more GPUs per client than exist"):
        simulate(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_killed_client_process_is_a_counted_failure(run_config, tmp_path):
    # "exit" ends the Ray worker process in the middle of the round, as a killed process would.
    config = run_config(
        "quickstart.yaml", "run.rounds=3", "run.progress=false", "data.num_clients=4", "strategy.fraction_train=1.0",
        "strategy.max_failure_fraction=0.5", "strategy.round_timeout_s=120", "backend.name=ray",
        "faults=[{kind: exit, rounds: [2], partitions: [1]}]",
    )
    outcome = simulate(config, run_dir=tmp_path / "run")

    assert outcome.status == "completed", outcome.error
    assert [row["clients_failed"] for row in outcome.rows] == [0, 1, 0]
    assert outcome.rows[1]["failures"][0]["partition_id"] == 1
    assert outcome.rows[2]["clients_ok"] == 4
