"""End-to-end runs of collaborative PAC learning through the runner, the strategy and the clients.

Multiplicative weights follow Chen, Zhang, Zhou (NeurIPS 2018, arXiv 1805.09217) and the
personalized baseline Blum, Haghtalab, Procaccia, Qiao (NeurIPS 2017). Expected sample counts
come from the algorithm's constants, worked out here with ``math``: with k = 4 players,
T = ⌈5·log2 4⌉ = 10 rounds, ε1 = ε/6 and tests of ⌈(8/ε1)·ln(2kT/δ)⌉ samples (practical
preset). Byte counts use 8 bytes per float64 feature and int64 label.
"""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import fedsim.clients.pac as pac_client
import numpy as np
import pytest
from conftest import strip_timing

from fedsim.config import load_config
from fedsim.pac import LinearSeparatorLearner, make_gaussian_players, plan_mw, run_mw
from fedsim.runner import simulate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SYNTHETIC = CONFIGS / "collab_pac_synthetic.yaml"

K = 4
ROUNDS = 10
M_T = 200
DIM = 10
EPS, DELTA = 0.1, 0.05
N_TEST = math.ceil(8 / (EPS / 6) * math.log(2 * K * ROUNDS / DELTA))
SMALL = [
    "backend.name=local",
    "run.progress=false",
    f"data.num_clients={K}",
    f"run.rounds={ROUNDS}",
    f"strategy.round_samples={M_T}",
    "strategy.evaluation_samples=500",
    "strategy.single_need=100",
    "strategy.naive_need=150",
]


def run(tmp_path: Path, name: str, *overrides: str, config_file: Path = SYNTHETIC) -> Any:
    config = load_config(config_file, [f"run.output_dir={tmp_path}", *overrides])
    outcome = simulate(config, run_dir=tmp_path / name)
    assert outcome.status == "completed", outcome.error
    return outcome


def test_mw_sample_ledgers_agree(tmp_path: Path) -> None:
    outcome = run(tmp_path, "mw", *SMALL)
    rows, summary = outcome.rows, outcome.summary

    assert len(rows) == ROUNDS
    for row in rows:
        assert row["client_counted_samples"] == row["total_samples"]
        assert row["round_samples"] == M_T
        assert row["test_samples"] == K * N_TEST
        # Pooled learners ship every training sample: DIM float64 features and one int64 label.
        assert row["bytes_up"] == 8 * (DIM + 1) * M_T

    expected_total = ROUNDS * M_T + K * ROUNDS * N_TEST
    assert summary["total_samples"] == expected_total
    assert summary["collab_pac"]["train_samples_total"] == ROUNDS * M_T
    assert summary["collab_pac"]["overhead_vs_single"] == pytest.approx(expected_total / 100)
    assert summary["collab_pac"]["overhead_vs_naive"] == pytest.approx(expected_total / (K * 150))
    assert 0.0 <= summary["worst_client_error"] <= 1.0

    clients = summary["clients"]
    assert len(clients) == K
    for client in clients:
        assert client["counted_train_samples"] == client["train_samples"]
        assert client["counted_test_samples"] == client["test_samples"] == ROUNDS * N_TEST
        assert client["counted_evaluation_samples"] == client["evaluation_samples"] == 500
        assert client["final_weight"] == 2 ** client["failures"]
    assert sum(client["train_samples"] for client in clients) == ROUNDS * M_T


def test_mw_matches_pure_driver(tmp_path: Path) -> None:
    outcome = run(tmp_path, "mw", *SMALL)

    # The same streams in one process, without Flower: fedsim.pac.run_mw.
    players = make_gaussian_players(K, DIM, seed=0, spread=2.0)
    plan = plan_mw(K, EPS, DELTA, round_samples=M_T)
    reference = run_mw(players, LinearSeparatorLearner(), plan, seed=0, evaluation_samples=500)

    assert [row["failed"] for row in outcome.rows] == [[int(f) for f in record.failed] for record in reference.history]
    assert outcome.rows[-1]["client_errors"] == list(reference.errors)
    assert outcome.summary["total_samples"] == reference.total_samples


def test_same_seed_same_rows(tmp_path: Path) -> None:
    first = run(tmp_path, "first", *SMALL)
    second = run(tmp_path, "second", *SMALL)
    assert strip_timing(first.rows) == strip_timing(second.rows)


def test_easy_player_weight_never_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = make_gaussian_players

    def with_easy_player(k: int, dim: int = 10, **options: Any) -> list[Any]:
        players = original(k, dim, **options)
        # Player 1 sits 50 units along the separator's normal: every point is far on the positive side.
        players[1].mean = 50.0 * players[1].normal
        return players

    monkeypatch.setattr(pac_client, "make_gaussian_players", with_easy_player)
    monkeypatch.setattr(pac_client, "_DISTRIBUTIONS", {})
    # Few training samples make the other players fail some tests.
    outcome = run(tmp_path, "easy", *SMALL, "strategy.round_samples=60", "strategy.players_seed=7")

    assert all(row["failure_counts"][1] == 0 for row in outcome.rows)
    assert outcome.summary["clients"][1]["final_weight"] == 1
    assert sum(client["failures"] for client in outcome.summary["clients"]) > 0


def test_blum_personalized_end_to_end(tmp_path: Path) -> None:
    # m_r = 80 serves some players in round 1 and the rest later (seed 0).
    outcome = run(tmp_path, "blum", *SMALL, "strategy.algorithm=blum_personalized", "strategy.round_samples=80")
    rows = outcome.rows
    n_test = math.ceil(8 / EPS * math.log(2 * K * 3 / DELTA))  # R = ⌊log2 4⌋ + 1 = 3

    assert 2 <= len(rows) <= 3
    tested = [sum(1 for outcome_ in row["failed"] if outcome_ != -1) for row in rows]
    assert tested[0] == K
    assert tested[1] < K
    assert [row["test_samples"] for row in rows] == [count * n_test for count in tested]
    assert outcome.summary["total_samples"] == len(rows) * 80 + sum(tested) * n_test
    assert rows[-1]["client_counted_samples"] == rows[-1]["total_samples"]
    # Served players leave: each round tests only those that failed the round before.
    for before, after in pairwise(rows):
        assert [f == 1 for f in before["failed"]] == [f != -1 for f in after["failed"]]


def test_naive_end_to_end(tmp_path: Path) -> None:
    outcome = run(tmp_path, "naive", *SMALL, "strategy.algorithm=naive", "run.rounds=1")
    assert len(outcome.rows) == 1
    assert outcome.summary["total_samples"] == K * M_T
    assert [client["train_samples"] for client in outcome.summary["clients"]] == [M_T] * K
    assert outcome.rows[0]["bytes_up"] == 8 * (DIM + 1) * K * M_T


def test_fedavg_learner_counts_draws_once(tmp_path: Path) -> None:
    overrides = [
        *SMALL,
        "data.num_clients=2",
        "run.rounds=5",  # T = ⌈5·log2 2⌉ = 5
        "strategy.learner=fedavg",
        "strategy.fedavg_rounds=4",
        "strategy.certify_attempts=1",
        "strategy.eps=0.3",
    ]
    outcome = run(tmp_path, "fedavg", *overrides)
    eps1 = 0.3 / 6
    n_certify = math.ceil(128 / eps1 * math.log(2 * 5 * 1 / DELTA))
    n_test = math.ceil(8 / eps1 * math.log(2 * 2 * 5 / DELTA))

    assert len(outcome.rows) == 5
    for row in outcome.rows:
        # Four FedAvg rounds reuse one draw of m_t samples; it is counted once.
        assert row["round_samples"] == M_T
        assert row["certify_samples"] == n_certify
        assert row["client_counted_samples"] == row["total_samples"]
    assert outcome.summary["total_samples"] == 5 * (M_T + n_certify + 2 * n_test)


def test_digits_config_runs(tmp_path: Path) -> None:
    overrides = [
        "backend.name=local",
        "run.progress=false",
        "run.rounds=2",
        "strategy.allow_fewer_rounds=true",
        "strategy.round_samples=300",
        "strategy.single_need=100",
        "strategy.naive_need=100",
    ]
    outcome = run(tmp_path, "digits", *overrides, config_file=CONFIGS / "collab_pac_digits.yaml")
    summary = outcome.summary

    assert len(outcome.rows) == 2
    assert summary["collab_pac"]["rounds_run"] == 2
    assert len(summary["clients"]) == 20
    # The final error uses each player's held-out 20 % of its pool, not fresh draws.
    assert all(0 < client["evaluation_samples"] < 200 for client in summary["clients"])
    assert np.isfinite(summary["worst_client_error"])


@pytest.mark.ray
def test_ray_and_local_rows_match(tmp_path: Path) -> None:
    common = ["run.progress=false", "run.rounds=3", "strategy.allow_fewer_rounds=true", "strategy.single_need=100", "strategy.naive_need=150"]
    on_ray = run(tmp_path, "ray", *common, "backend.name=ray")
    on_local = run(tmp_path, "local", *common, "backend.name=local")

    assert len(on_ray.rows) == 3
    assert strip_timing(on_ray.rows) == strip_timing(on_local.rows)
    assert on_ray.summary["total_samples"] == on_local.summary["total_samples"]
