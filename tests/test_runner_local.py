"""End-to-end runs on the local engine: results folder, determinism, faults and failures."""

from __future__ import annotations

import json
import math

import pytest
from conftest import read_rows, strip_timing

from fedsim.runner import simulate

FAST = ["backend.name=local", "run.progress=false", "data.num_clients=6", "model.hidden=[32]"]


def test_quickstart_writes_every_file(run_config, tmp_path):
    config = run_config("quickstart.yaml", *FAST, "run.rounds=2")
    outcome = simulate(config, run_dir=tmp_path / "run")

    assert outcome.status == "completed"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots/accuracy.png", "plots/loss.png", "plots/bytes.png"):
        assert (tmp_path / "run" / name).is_file(), name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert 0.0 <= summary["final"]["centralized_accuracy"] <= 1.0
    assert summary["bytes_up"] == sum(row["bytes_up"] for row in outcome.rows)


def test_rows_hold_the_documented_columns(run_config, tmp_path):
    outcome = simulate(run_config("quickstart.yaml", *FAST, "run.rounds=1"), run_dir=tmp_path / "run")
    row = read_rows(tmp_path / "run")[0]
    for column in ("round", "wall_s", "train_loss", "eval_loss", "eval_accuracy", "centralized_accuracy",
                   "bytes_up", "bytes_down", "clients_ok", "clients_failed"):
        assert column in row, column
    assert outcome.rows[0]["round"] == 1


def test_bytes_match_model_size_times_clients(run_config, tmp_path):
    # mlp on digits with hidden [32]: 64*32 + 32 + 32*10 + 10 = 2,410 float32 values = 9,640 bytes.
    config = run_config("quickstart.yaml", *FAST, "run.rounds=1", "strategy.fraction_train=0.5", "strategy.fraction_evaluate=1.0")
    row = simulate(config, run_dir=tmp_path / "run").rows[0]
    model_bytes = 4 * (64 * 32 + 32 + 32 * 10 + 10)
    trained, evaluated = 3, 6  # half of 6 clients train; all 6 evaluate
    assert row["bytes_up"] == trained * model_bytes
    assert row["bytes_down"] == (trained + evaluated) * model_bytes


def test_same_seed_gives_identical_rows(run_config, tmp_path):
    first = simulate(run_config("quickstart.yaml", *FAST, "run.rounds=2"), run_dir=tmp_path / "a")
    second = simulate(run_config("quickstart.yaml", *FAST, "run.rounds=2"), run_dir=tmp_path / "b")
    assert strip_timing(first.rows) == strip_timing(second.rows)


def test_other_seed_gives_other_rows(run_config, tmp_path):
    first = simulate(run_config("quickstart.yaml", *FAST, "run.rounds=1"), run_dir=tmp_path / "a")
    second = simulate(run_config("quickstart.yaml", *FAST, "run.rounds=1", "run.seed=1"), run_dir=tmp_path / "b")
    assert strip_timing(first.rows) != strip_timing(second.rows)


def test_raising_and_nan_clients_are_counted_failures(run_config, tmp_path):
    config = run_config(
        "quickstart.yaml", *FAST, "run.rounds=2", "strategy.fraction_train=1.0", "strategy.max_failure_fraction=0.5",
        "faults=[{kind: raise, rounds: [2], partitions: [1]}, {kind: nan, rounds: [2], partitions: [4]}]",
    )
    outcome = simulate(config, run_dir=tmp_path / "run")

    assert outcome.status == "completed"
    first, second = outcome.rows
    assert (first["clients_ok"], first["clients_failed"]) == (6, 0)
    assert (second["clients_ok"], second["clients_failed"]) == (4, 2)
    failed = {f["partition_id"]: f["reason"] for f in second["failures"]}
    assert "injected fault" in failed[1]
    assert "NaN" in failed[4]
    assert math.isfinite(second["centralized_loss"])


def test_wrong_shape_reply_is_rejected(run_config, tmp_path):
    config = run_config(
        "quickstart.yaml", *FAST, "run.rounds=1", "strategy.fraction_train=1.0", "strategy.max_failure_fraction=0.5",
        "faults=[{kind: wrong_shape, rounds: [1], partitions: [0]}]",
    )
    row = simulate(config, run_dir=tmp_path / "run").rows[0]
    assert row["clients_failed"] == 1
    assert "shape" in row["failures"][0]["reason"]


def test_too_many_failures_stop_the_run_and_keep_rows(run_config, tmp_path):
    config = run_config(
        "quickstart.yaml", *FAST, "run.rounds=4", "strategy.fraction_train=1.0", "strategy.max_failure_fraction=0.2",
        "faults=[{kind: raise, rounds: [3], partitions: [0, 1, 2]}]",
    )
    outcome = simulate(config, run_dir=tmp_path / "run")

    assert outcome.status == "failed"
    assert "3 of 6 clients failed" in outcome.error
    assert "strategy.max_failure_fraction" in outcome.error
    assert [row["round"] for row in read_rows(tmp_path / "run")] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["rounds_completed"] == 2


def test_hanging_client_times_out(run_config, tmp_path):
    config = run_config(
        "quickstart.yaml", *FAST, "run.rounds=1", "strategy.fraction_train=1.0", "strategy.max_failure_fraction=0.5",
        "strategy.round_timeout_s=2", "faults=[{kind: hang, rounds: [1], partitions: [5], seconds: 4}]",
    )
    row = simulate(config, run_dir=tmp_path / "run").rows[0]
    assert row["clients_failed"] == 1
    assert row["failures"][0]["partition_id"] == 5
    assert "timeout" in row["failures"][0]["reason"]


def test_local_only_baseline_sends_no_arrays(run_config, tmp_path):
    config = run_config("quickstart.yaml", *FAST, "run.rounds=2", "strategy.name=local", "strategy.fraction_train=1.0")
    outcome = simulate(config, run_dir=tmp_path / "run")
    assert outcome.status == "completed"
    assert all(row["bytes_up"] == 0 and row["bytes_down"] == 0 for row in outcome.rows)
    assert len(list((tmp_path / "run" / "clients").glob("*.safetensors"))) == 6


@pytest.mark.parametrize("dataset", ["breast_cancer", "wine", "iris", "synthetic"])
def test_tabular_data_sets_run(run_config, tmp_path, dataset):
    config = run_config(None, *FAST, "run.rounds=1", f"data.dataset={dataset}", "data.partitioner.name=iid")
    assert simulate(config, run_dir=tmp_path / "run").status == "completed"


def test_existing_run_folder_is_rejected(run_config, tmp_path):
    from fedsim.runner import RunInputError

    config = run_config("quickstart.yaml", *FAST, "run.rounds=1")
    simulate(config, run_dir=tmp_path / "run")
    with pytest.raises(RunInputError, match="already contains a run; continue it with 'fedsim resume"):
        simulate(config, run_dir=tmp_path / "run")
    assert [row["round"] for row in read_rows(tmp_path / "run")] == [1]


def test_failure_reason_is_the_client_message(run_config, tmp_path):
    config = run_config(
        "quickstart.yaml", *FAST, "run.rounds=1", "strategy.fraction_train=1.0", "strategy.max_failure_fraction=0.5",
        "faults=[{kind: raise, rounds: [1], partitions: [2]}]",
    )
    row = simulate(config, run_dir=tmp_path / "run").rows[0]
    assert row["failures"][0]["reason"] == "injected fault: partition 2 raises"
