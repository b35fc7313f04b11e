"""End-to-end runs of GC-FCP (arXiv 2603.14198) through fedsim's runner.

Independent references: the calibration data of every client is drawn again here with the
same seeded streams, and the thresholds are recomputed in one process with
``fedsim.conformal`` (``gcfcp_exact``, ``federated_cp``, ``centralized_split_cp``), without any
Flower message. Byte counts are derived by hand: a client summary of atom a contains
min(n_{k,a}, K) pseudo-points of two float32 values (8 bytes), plus one pattern byte per atom
for d = 4 groups. Raw scores per atom cost one float per score plus the same pattern bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fedsim.clients.conformal import synthetic_client_data

from fedsim.config import load_config
from fedsim.conformal import (
    absolute_residual,
    atoms,
    centralized_split_cp,
    federated_cp,
    gcfcp_exact,
    interval_memberships,
    interval_patterns,
    raw_uplink_bytes,
)
from fedsim.methods.gcfcp import fit_synthetic_predictor
from fedsim.results import TIMING_COLUMNS
from fedsim.runner import simulate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SYNTHETIC = CONFIGS / "gcfcp_synthetic.yaml"
DIGITS = CONFIGS / "gcfcp_digits.yaml"

SIZES = [1000, 333, 333, 333]
INTERVALS = [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0)]
TEST_SIZE = 500
ONE_REPEAT = ["backend.name=local", "run.progress=false", "run.rounds=1", "strategy.repeats=1"]

CLOCK_COLUMNS = TIMING_COLUMNS | {"calibration_s"}
"""Columns that measure wall time, which differ between otherwise identical runs."""


def run(tmp_path: Path, name: str, config_file: Path, *overrides: str) -> Any:
    config = load_config(config_file, [f"run.output_dir={tmp_path}", *overrides])
    outcome = simulate(config, run_dir=tmp_path / name)
    assert outcome.status == "completed", outcome.error
    return outcome


def without_clock(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: value for key, value in row.items() if key not in CLOCK_COLUMNS} for row in rows]


def client_calibration(seed: int = 0, repeat: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Scores and memberships of every client's calibration draw, as the clients compute them."""
    coefficients = fit_synthetic_predictor(seed, SIZES, 4, True)
    scores, memberships = [], []
    for client in range(len(SIZES)):
        split = synthetic_client_data(seed, client, repeat, SIZES, TEST_SIZE)
        predictions = np.polynomial.polynomial.polyval(split.calibration_x, coefficients)
        scores.append(absolute_residual(split.calibration_y, predictions))
        memberships.append(interval_memberships(split.calibration_x, INTERVALS))
    return scores, memberships


def row_thresholds(row: dict[str, Any]) -> dict[tuple[int, ...], float]:
    """Map each pattern of the row's table to its threshold (JSON null means +inf)."""
    table = {}
    for pattern_id, tau in zip(row["threshold_patterns"], row["thresholds"], strict=True):
        pattern = tuple((pattern_id >> group) & 1 for group in range(len(INTERVALS)))
        table[pattern] = np.inf if tau is None else float(tau)
    return table


def test_synthetic_run_bytes_and_summary(tmp_path: Path) -> None:
    outcome = run(tmp_path, "sketch", SYNTHETIC, "backend.name=local", "run.progress=false",
                  "run.rounds=2", "strategy.repeats=2")
    compression = 50

    for repeat, row in enumerate(outcome.rows):
        _, memberships = client_calibration(repeat=repeat)
        expected = 0
        for client_memberships in memberships:
            _, atom_of_point = atoms(client_memberships)
            atom_sizes = np.bincount(atom_of_point)
            expected += atom_sizes.size * 1 + sum(8 * min(int(n), compression) for n in atom_sizes)
        raw = raw_uplink_bytes(memberships, np.float32)

        assert row["bytes_up"] == expected
        assert row["uplink_summary_bytes"] == expected
        assert row["raw_score_bytes"] == raw
        assert row["bytes_up"] < raw
        assert row["clients_ok"] == 4
        assert row["atoms"] == 5

    final = outcome.summary["final"]
    for key in ("coverage", "worst_group_coverage", "mean_size", "uplink_summary_bytes", "raw_score_bytes",
                "coverage_se", "coverage_g1", "coverage_g4", "calibration_s"):
        assert key in final, key
    assert final["coverage"] == pytest.approx(np.mean([row["coverage"] for row in outcome.rows]))
    groups = outcome.summary["groups"]
    assert [entry["group"] for entry in groups] == [1, 2, 3, 4]
    assert all(entry["repeats"] == 2 and entry["coverage_se"] is not None for entry in groups)
    assert (Path(outcome.folder.path) / "summary.json").is_file()


def test_exact_mode_equals_pooled_lp(tmp_path: Path) -> None:
    outcome = run(tmp_path, "exact", SYNTHETIC, *ONE_REPEAT, "strategy.calibration=gcfcp_exact",
                  "strategy.transport_dtype=float64")
    row = outcome.rows[0]
    scores, memberships = client_calibration()
    patterns = interval_patterns(INTERVALS)

    reference = gcfcp_exact(scores, memberships, 0.1, "uniform", patterns)

    table = row_thresholds(row)
    assert len(table) == patterns.shape[0]
    for pattern, tau in zip(reference.patterns, reference.thresholds, strict=True):
        assert table[tuple(int(b) for b in pattern)] == pytest.approx(tau, rel=1e-7, abs=1e-9)
    assert row["bytes_up"] == raw_uplink_bytes(memberships, np.float64)

    # Coverage of the reference table on the same test draws, every client weighted by π_k = 1/4.
    coefficients = fit_synthetic_predictor(0, SIZES, 4, True)
    per_client = []
    for client in range(len(SIZES)):
        split = synthetic_client_data(0, client, 0, SIZES, TEST_SIZE)
        residuals = absolute_residual(split.test_y, np.polynomial.polynomial.polyval(split.test_x, coefficients))
        per_client.append(np.mean(residuals <= reference.lookup(interval_memberships(split.test_x, INTERVALS))))
    assert row["coverage"] == pytest.approx(np.mean(per_client), abs=1e-12)


@pytest.mark.parametrize("mode", ["federated_cp", "centralized_cp"])
def test_marginal_baselines_match_references(tmp_path: Path, mode: str) -> None:
    outcome = run(tmp_path, mode, SYNTHETIC, *ONE_REPEAT, f"strategy.calibration={mode}",
                  "strategy.transport_dtype=float64")
    scores, _ = client_calibration()

    expected = federated_cp(scores, 0.1, "uniform") if mode == "federated_cp" else centralized_split_cp(scores, 0.1)

    thresholds = list(row_thresholds(outcome.rows[0]).values())
    assert len(thresholds) == 6
    assert thresholds == [pytest.approx(expected, rel=1e-12)] * 6
    assert outcome.rows[0]["bytes_up"] == 8 * sum(SIZES)


def test_same_seed_gives_identical_rows(tmp_path: Path) -> None:
    first = run(tmp_path, "first", SYNTHETIC, *ONE_REPEAT)
    second = run(tmp_path, "second", SYNTHETIC, *ONE_REPEAT)
    other_seed = run(tmp_path, "other", SYNTHETIC, *ONE_REPEAT, "run.seed=1")

    assert without_clock(first.rows) == without_clock(second.rows)
    assert without_clock(first.rows) != without_clock(other_seed.rows)


def test_digits_run_trains_then_calibrates(tmp_path: Path) -> None:
    outcome = run(tmp_path, "digits", DIGITS, "backend.name=local", "run.progress=false",
                  "run.rounds=4", "strategy.training_rounds=3", "strategy.repeats=1")
    training, calibration = outcome.rows[:3], outcome.rows[3]

    # MLP 64-128-64-10 in float32: (64·128 + 128 + 128·64 + 64 + 64·10 + 10) · 4 bytes.
    model_bytes = (64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10) * 4
    assert all(row["bytes_down"] == 5 * 2 * model_bytes for row in training)
    assert all("calibration_clients" not in row for row in training)

    # Each of 5 clients gets the model and the (10, 4) uint8 label map twice, and a table of the
    # 5 label-window patterns: 5·4 pattern bytes, 5 float64 thresholds and 5 infinity flags.
    table_bytes = 5 * 4 + 5 * 8 + 5
    assert calibration["bytes_down"] == 5 * (2 * model_bytes + 2 * 40 + table_bytes)
    assert calibration["bytes_up"] == calibration["uplink_summary_bytes"]
    assert calibration["clients_ok"] == 5
    # Pattern ids Σ_j 2^j·bit_j of labels {0,1}, {2,3}, {4,5}, {6,7}, {8,9}.
    assert sorted(calibration["threshold_patterns"]) == [1, 3, 6, 8, 12]
    group_coverage = [calibration[f"coverage_g{group}"] for group in range(1, 5)]
    assert calibration["worst_group_coverage"] == min(group_coverage)

    final = outcome.summary["final"]
    for key in ("coverage", "worst_group_coverage", "mean_size", "uplink_summary_bytes", "centralized_accuracy"):
        assert key in final, key
    assert len(outcome.summary["groups"]) == 4


@pytest.mark.ray
def test_ray_and_local_rows_match(tmp_path: Path) -> None:
    common = ["run.progress=false", "run.rounds=1", "strategy.repeats=1"]
    on_ray = run(tmp_path, "ray", SYNTHETIC, *common, "backend.name=ray")
    on_local = run(tmp_path, "local", SYNTHETIC, *common, "backend.name=local")

    assert len(on_ray.rows) == 1
    assert without_clock(on_ray.rows) == without_clock(on_local.rows)
