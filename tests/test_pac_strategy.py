"""Tests of the collaborative PAC strategy on its own: weights, reply checks, hypothesis arrays, config.

The strategy (Chen, Zhang, Zhou, NeurIPS 2018, arXiv 1805.09217; Blum, Haghtalab, Procaccia,
Qiao, NeurIPS 2017) talks to any object with Flower's node-id methods, so these tests build its
messages and replies directly. Weights and probabilities are worked out by hand: after c_i
failures a weight is 2^{c_i}, and p_i = 2^{c_i} / Σ_j 2^{c_j}.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from conftest import StandInGrid
from fedsim.strategies import CollaborativePAC
from fedsim.strategies.collab_pac import (
    PlayerReplyError,
    hypotheses_from_record,
    hypotheses_to_record,
    majority_of,
)
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsim.config import ConfigError, load_config
from fedsim.pac import ConstantClassifier, LinearClassifier, LinearSeparatorLearner, MLPLearner

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


pytestmark = pytest.mark.usefixtures("message_identity")


def reply_with(message: Message, record: str, **metrics: int) -> Message:
    return Message(RecordDict({record: MetricRecord(metrics)}), reply_to=message)


def exchange_tests(strategy: CollaborativePAC, grid: StandInGrid, server_round: int, errors: dict[int, int]) -> MetricRecord:
    """Send one test exchange; player i reports ``errors.get(i, 0)`` errors."""
    hypothesis = hypotheses_to_record([ConstantClassifier(0)])
    strategy.hypotheses.append(hypothesis)
    messages = list(strategy.configure_evaluate(server_round, hypothesis, ConfigRecord({"mode": "test"}), grid))
    replies = []
    for player, message in enumerate(messages):
        samples = int(message.content.config_records["config"]["samples"])
        replies.append(reply_with(message, "test", **{"partition-id": player, "drawn": samples, "errors": errors.get(player, 0)}))
    metrics = strategy.aggregate_evaluate(server_round, replies)
    assert metrics is not None
    return metrics


def mw_strategy(k: int = 4) -> CollaborativePAC:
    return CollaborativePAC(num_players=k, round_samples=100, players={"kind": "gaussian", "k": k})


def test_failing_player_weight_doubles() -> None:
    strategy = mw_strategy()
    grid = StandInGrid(4)
    n_test = strategy.plan.test_samples

    # All errors on player 2's test: its rate 1 exceeds (3/4)·ε1, so its weight goes 1 -> 2.
    first = exchange_tests(strategy, grid, 1, {2: n_test})
    assert strategy.weights == [1, 1, 2, 1]
    assert first["failed"] == [0, 0, 1, 0]
    assert first["max-weight-log2"] == 1
    np.testing.assert_allclose(strategy.probabilities(), [1 / 5, 1 / 5, 2 / 5, 1 / 5], rtol=0, atol=1e-15)

    second = exchange_tests(strategy, grid, 2, {2: n_test})
    assert strategy.weights == [1, 1, 4, 1]
    assert second["failures"] == 1
    np.testing.assert_allclose(strategy.probabilities(), [1 / 7, 1 / 7, 4 / 7, 1 / 7], rtol=0, atol=1e-15)


def test_pass_threshold_is_strict() -> None:
    strategy = mw_strategy()
    grid = StandInGrid(4)
    n_test = strategy.plan.test_samples
    threshold = 0.75 * (0.1 / 6)
    at_threshold = math.floor(threshold * n_test)  # rate ≤ threshold passes
    above = at_threshold + 1

    exchange_tests(strategy, grid, 1, {0: at_threshold, 3: above})
    assert strategy.failures == [0, 0, 0, 1]


def test_test_samples_counted_per_player() -> None:
    strategy = mw_strategy()
    grid = StandInGrid(4)
    metrics = exchange_tests(strategy, grid, 1, {})
    assert metrics["test-samples"] == 4 * strategy.plan.test_samples
    assert metrics["total-samples"] == 4 * strategy.plan.test_samples
    assert strategy.ledger.counts["test"] == [strategy.plan.test_samples] * 4


def test_wrong_partition_id_rejected() -> None:
    strategy = mw_strategy()
    grid = StandInGrid(4)
    hypothesis = hypotheses_to_record([ConstantClassifier(0)])
    messages = list(strategy.configure_evaluate(1, hypothesis, ConfigRecord({"mode": "test"}), grid))
    n_test = strategy.plan.test_samples
    replies = [reply_with(m, "test", **{"partition-id": 0, "drawn": n_test, "errors": 0}) for m in messages]
    with pytest.raises(PlayerReplyError, match="reported partition id 0"):
        strategy.aggregate_evaluate(1, replies)


def test_wrong_sample_count_rejected() -> None:
    strategy = mw_strategy()
    grid = StandInGrid(4)
    messages = list(strategy.configure_train(1, hypotheses_to_record([]), ConfigRecord({}), grid))
    replies = []
    for message in messages:
        player = int(message.metadata.dst_node_id) - 101
        requested = int(message.content.config_records["config"]["samples"])
        replies.append(reply_with(message, "train", **{"partition-id": player, "drawn": requested + 1}))
    with pytest.raises(PlayerReplyError, match="were requested"):
        strategy.aggregate_train(1, replies)


def test_split_sums_to_round_samples() -> None:
    strategy = mw_strategy()
    grid = StandInGrid(4)
    messages = list(strategy.configure_train(1, hypotheses_to_record([]), ConfigRecord({}), grid))
    requested = [int(m.content.config_records["config"]["samples"]) for m in messages]
    assert sum(requested) == 100


def test_hypotheses_round_trip() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 5))
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64)
    linear = LinearSeparatorLearner().fit(X, y, rng)
    network = MLPLearner(hidden_layer_sizes=(8,), max_iter=50).fit(X, y, rng)
    three_class = MLPLearner(hidden_layer_sizes=(8,), max_iter=50).fit(X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 1), rng)
    constant = ConstantClassifier(1)

    decoded = hypotheses_from_record(hypotheses_to_record([linear, network, three_class, constant]))
    probe = rng.standard_normal((500, 5))
    for original, copy in zip([linear, network, three_class, constant], decoded, strict=True):
        np.testing.assert_array_equal(copy.predict(probe), original.predict(probe))


def test_vote_of_three_hypotheses() -> None:
    # Three one-feature separators at 0, 1 and 2: the vote predicts 1 where x > 1 (two of three agree).
    classifiers = [LinearClassifier(np.array([1.0]), np.array(-t), np.array([0, 1])) for t in (0.0, 1.0, 2.0)]
    vote = majority_of(hypotheses_to_record(classifiers))
    X = np.array([[-1.0], [0.5], [1.5], [2.5]])
    np.testing.assert_array_equal(vote.predict(X), [0, 0, 1, 1])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.rounds=5"], "needs 20 rounds for 16 players"),
        (["strategy.players=digits", "data.dataset=digits"], "fits two classes"),
        (["data.dataset=digits"], "needs data.dataset='synthetic'"),
        (["run.checkpoint_every=5"], "cannot resume"),
        (["strategy.learner=fedavg", "strategy.algorithm=naive", "run.rounds=1"], "needs 'strategy.algorithm' = 'mw'"),
        (["strategy.preset=theory"], "must be null with preset 'theory'"),
        (["strategy.eps=1.5"], "target error in"),
    ],
)
def test_config_rejects_invalid(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "collab_pac_synthetic.yaml", overrides)


def test_fewer_rounds_allowed_on_request() -> None:
    config = load_config(CONFIGS / "collab_pac_synthetic.yaml", ["run.rounds=3", "strategy.allow_fewer_rounds=true"])
    assert config.run.rounds == 3
