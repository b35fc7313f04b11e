"""Tests of the SpaFL strategy (arXiv 2406.00431) on its own, with a stand-in grid.

The strategy takes plain values and talks to any object with Flower's node-id methods, so these
tests build its messages and replies directly. Expected values are worked out by hand in each
test (means of small arrays, learning-rate schedules, byte counts).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import StandInGrid
from fedsim.strategies import SpaFL
from fedsim.strategies.spafl import thresholds_to_record
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedsim.config import ConfigError, load_config
from fedsim.methods.spafl import SpaFLSection

LAYERS = {"0": 3, "2": 2}
"""A stand-in model: two masked layers with 3 and 2 units, so n_τ = 5."""


pytestmark = pytest.mark.usefixtures("message_identity")


def zeros() -> ArrayRecord:
    return thresholds_to_record({name: np.zeros(units, np.float32) for name, units in LAYERS.items()})


def reply(request: Message, tau: dict[str, list[float]] | None, examples: int = 10, **metrics: float) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": examples, **metrics})})
    if tau is not None:
        content["tau"] = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in tau.items()})
    return Message(content, reply_to=request)


def train_messages(strategy: SpaFL, grid: StandInGrid, server_round: int, arrays: ArrayRecord) -> list[Message]:
    return list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))


def test_train_messages_carry_thresholds_and_settings() -> None:
    strategy = SpaFL(fraction_train=0.5, seed=3, lr=0.1, local_epochs=2, batch_size=8, alpha=0.01)
    messages = train_messages(strategy, StandInGrid(6), 1, zeros())

    assert len(messages) == 3
    for message in messages:
        assert message.metadata.message_type == MessageType.TRAIN
        assert list(message.content.array_records) == ["tau"]
        record = message.content.array_records["tau"]
        assert list(record.keys()) == ["0", "2"]
        assert [record[k].shape for k in record] == [(3,), (2,)]
        config = message.content.config_records["config"]
        assert config["server-round"] == 1
        assert config["round-index"] == 0
        assert config["lr"] == 0.1
        assert config["local-epochs"] == 2
        assert config["batch-size"] == 8
        assert config["alpha"] == 0.01
        assert config["th-update"] == "lazy"


def test_sampling_is_seeded_and_sorted() -> None:
    grid = StandInGrid(10)
    first = [m.metadata.dst_node_id for m in train_messages(SpaFL(fraction_train=0.3, seed=5), grid, 4, zeros())]
    again = [m.metadata.dst_node_id for m in train_messages(SpaFL(fraction_train=0.3, seed=5), grid, 4, zeros())]
    other_rounds = {
        tuple(m.metadata.dst_node_id for m in train_messages(SpaFL(fraction_train=0.3, seed=5), grid, r, zeros()))
        for r in range(1, 9)
    }

    assert first == again
    assert first == sorted(first)
    assert len(set(first)) == 3
    assert len(other_rounds) > 1


def test_learning_rate_schedule() -> None:
    strategy = SpaFL(lr=0.1, lr_decay=0.5, lr_min=0.02)

    assert strategy.round_lr(1) == pytest.approx(0.1)
    assert strategy.round_lr(2) == pytest.approx(0.05)
    assert strategy.round_lr(3) == pytest.approx(0.025)
    assert strategy.round_lr(4) == pytest.approx(0.02)
    assert strategy.round_lr(10) == pytest.approx(0.02)


def test_uniform_mean_and_delta() -> None:
    strategy = SpaFL(fraction_train=1.0)
    grid = StandInGrid(3)
    messages = train_messages(strategy, grid, 1, zeros())
    taus = [
        {"0": [0.1, 0.2, 0.3], "2": [1.0, -1.0]},
        {"0": [0.3, 0.2, 0.0], "2": [2.0, 1.0]},
        {"0": [0.2, 0.2, 0.0], "2": [0.0, 3.0]},
    ]
    replies = [reply(m, t, examples=n) for m, t, n in zip(messages, taus, (10, 20, 70), strict=True)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["0"].numpy(), [0.2, 0.2, 0.1], rtol=1e-6)
    np.testing.assert_allclose(arrays["2"].numpy(), [1.0, 1.0], rtol=1e-6)
    assert strategy.last_delta is not None
    np.testing.assert_allclose(strategy.last_delta["0"], [0.2, 0.2, 0.1], rtol=1e-6)
    assert metrics["train_clients"] == 3
    assert metrics["num-examples"] == 100
    # All thresholds: 0.2, 0.2, 0.1, 1.0, 1.0 → mean 0.5.
    assert metrics["tau_mean"] == pytest.approx(0.5, rel=1e-6)
    expected_std = math.sqrt((0.09 + 0.09 + 0.16 + 0.25 + 0.25) / 5)
    assert metrics["tau_std"] == pytest.approx(expected_std, rel=1e-6)


def test_weighted_mean_by_examples() -> None:
    strategy = SpaFL(fraction_train=1.0, agg_weighting="num_examples")
    messages = train_messages(strategy, StandInGrid(2), 1, zeros())
    replies = [
        reply(messages[0], {"0": [1.0, 0.0, 0.0], "2": [0.0, 0.0]}, examples=30),
        reply(messages[1], {"0": [0.0, 0.0, 1.0], "2": [4.0, 0.0]}, examples=10),
    ]

    arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    np.testing.assert_allclose(arrays["0"].numpy(), [0.75, 0.0, 0.25], rtol=1e-6)
    np.testing.assert_allclose(arrays["2"].numpy(), [1.0, 0.0], rtol=1e-6)


def test_aggregation_ignores_reply_order() -> None:
    rng = np.random.default_rng(0)
    taus = [{"0": rng.normal(size=3).tolist(), "2": rng.normal(size=2).tolist()} for _ in range(5)]
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1]):
        strategy = SpaFL(fraction_train=1.0)
        messages = train_messages(strategy, StandInGrid(5), 1, zeros())
        replies = [reply(messages[i], taus[i]) for i in order]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        results.append({k: arrays[k].numpy().tobytes() for k in arrays})

    assert results[0] == results[1]


def test_single_client_gets_its_own_thresholds() -> None:
    strategy = SpaFL(fraction_train=0.2)
    messages = train_messages(strategy, StandInGrid(5), 1, zeros())
    tau = {"0": [0.125, -0.5, 3.0], "2": [1e-3, 7.0]}

    arrays, _ = strategy.aggregate_train(1, [reply(messages[0], tau)])

    assert arrays is not None
    assert arrays["0"].numpy().tolist() == tau["0"]
    assert arrays["2"].numpy().tolist() == pytest.approx(tau["2"])


def test_invalid_replies_are_left_out() -> None:
    strategy = SpaFL(fraction_train=1.0)
    messages = train_messages(strategy, StandInGrid(3), 1, zeros())
    replies = [
        reply(messages[0], {"0": [0.3, 0.3, 0.3], "2": [0.3, 0.3]}),
        reply(messages[1], {"0": [math.nan, 0.0, 0.0], "2": [0.0, 0.0]}),
        reply(messages[2], {"0": [0.0, 0.0], "2": [0.0, 0.0]}),
    ]

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    assert metrics["train_clients"] == 1
    np.testing.assert_allclose(arrays["0"].numpy(), [0.3, 0.3, 0.3], rtol=1e-6)


def test_no_usable_reply_keeps_thresholds() -> None:
    strategy = SpaFL(fraction_train=1.0, th_update="eager_all")
    messages = train_messages(strategy, StandInGrid(2), 1, zeros())

    arrays, metrics = strategy.aggregate_train(1, [reply(messages[0], None)])

    assert arrays is None
    assert metrics is None
    assert strategy.last_delta is not None
    assert all(not np.any(values) for values in strategy.last_delta.values())


def test_costs_are_summed_and_densities_averaged() -> None:
    strategy = SpaFL(fraction_train=1.0)
    messages = train_messages(strategy, StandInGrid(2), 1, zeros())
    replies = [
        reply(messages[0], {"0": [0, 0, 0], "2": [0, 0]}, examples=10, train_loss=1.0, density=0.5, train_macs=100, resets=1),
        reply(messages[1], {"0": [0, 0, 0], "2": [0, 0]}, examples=30, train_loss=2.0, density=0.9, train_macs=300, resets=0),
    ]

    _, metrics = strategy.aggregate_train(1, replies)

    assert metrics is not None
    assert metrics["train_loss"] == pytest.approx((1.0 * 10 + 2.0 * 30) / 40)
    assert metrics["density"] == pytest.approx(0.7)
    assert metrics["train_macs"] == 400
    assert metrics["train_flops"] == 800
    assert metrics["resets"] == 1


def run_round(strategy: SpaFL, grid: StandInGrid, server_round: int, arrays: ArrayRecord, value: float) -> tuple[list[Message], ArrayRecord]:
    """Configure one round and reply to every threshold request with thresholds equal to ``value``."""
    messages = train_messages(strategy, grid, server_round, arrays)
    replies = [
        reply(m, {"0": [value] * 3, "2": [value] * 2}) if "tau" in m.content.array_records else reply(m, None)
        for m in messages
    ]
    new, _ = strategy.aggregate_train(server_round, replies)
    assert new is not None
    return messages, new


def payload_floats(message: Message) -> int:
    return sum(int(np.prod(a.shape)) for record in message.content.array_records.values() for a in record.values())


def test_eager_all_sends_delta_to_every_node() -> None:
    strategy = SpaFL(fraction_train=0.5, th_update="eager_all")
    grid = StandInGrid(4)
    first, arrays = run_round(strategy, grid, 1, zeros(), 0.25)
    second, _ = run_round(strategy, grid, 2, arrays, 0.5)

    assert len(first) == 2
    assert all("dtau" not in m.content.array_records for m in first)
    assert sorted(m.metadata.dst_node_id for m in second) == grid.nodes
    with_tau = [m for m in second if "tau" in m.content.array_records]
    update_only = [m for m in second if "tau" not in m.content.array_records]
    assert len(with_tau) == 2
    assert len(update_only) == 2
    for message in second:
        assert message.content.array_records["dtau"]["0"].numpy().tolist() == [0.25] * 3
    for message in update_only:
        assert message.content.config_records["config"]["threshold-update-only"] is True
    # Payload: 2 sampled × (τ + Δτ) + 2 others × Δτ, 5 thresholds each.
    assert sum(payload_floats(m) for m in second) == 5 * (2 * 2 + 2)


def test_fmnist_code_sends_delta_to_sampled_only() -> None:
    strategy = SpaFL(fraction_train=0.5, th_update="fmnist_code")
    grid = StandInGrid(4)
    _, arrays = run_round(strategy, grid, 1, zeros(), 0.25)
    second, _ = run_round(strategy, grid, 2, arrays, 0.5)

    assert len(second) == 2
    assert all(set(m.content.array_records) == {"tau", "dtau"} for m in second)


def test_lazy_sends_thresholds_only() -> None:
    strategy = SpaFL(fraction_train=0.5)
    grid = StandInGrid(4)
    _, arrays = run_round(strategy, grid, 1, zeros(), 0.25)
    second, _ = run_round(strategy, grid, 2, arrays, 0.5)

    assert all(list(m.content.array_records) == ["tau"] for m in second)
    assert second[0].content.array_records["tau"]["2"].numpy().tolist() == [0.25, 0.25]


def test_evaluation_rounds_and_recipients() -> None:
    strategy = SpaFL(eval_every=3)
    strategy.num_rounds = 7
    grid = StandInGrid(5)

    due = [r for r in range(1, 8) if list(strategy.configure_evaluate(r, zeros(), ConfigRecord(), grid))]
    messages = list(strategy.configure_evaluate(3, zeros(), ConfigRecord(), grid))

    assert due == [3, 6, 7]
    assert sorted(m.metadata.dst_node_id for m in messages) == grid.nodes
    assert all(len(m.content.array_records) == 0 for m in messages)


def test_apply_pending_on_eval_sends_thresholds() -> None:
    strategy = SpaFL(apply_pending_on_eval=True)
    messages = list(strategy.configure_evaluate(1, zeros(), ConfigRecord(), StandInGrid(3)))

    assert len(messages) == 3
    assert all(list(m.content.array_records) == ["tau"] for m in messages)
    assert all(m.content.config_records["config"]["apply-pending"] is True for m in messages)


def test_personalized_accuracy_over_clients() -> None:
    strategy = SpaFL()
    messages = list(strategy.configure_evaluate(1, zeros(), ConfigRecord(), StandInGrid(3)))
    results = [(0.5, 10, 0.4), (1.0, 30, 0.6), (0.9, 60, 0.8)]
    replies = [
        Message(RecordDict({"metrics": MetricRecord({"eval_accuracy": acc, "eval_loss": 1.0, "num-examples": n, "eval_density": d})}), reply_to=m)
        for m, (acc, n, d) in zip(messages, results, strict=True)
    ]

    metrics = strategy.aggregate_evaluate(1, replies)

    assert metrics is not None
    assert metrics["personalized_accuracy"] == pytest.approx(0.8)
    assert metrics["personalized_accuracy_std"] == pytest.approx(math.sqrt((0.09 + 0.04 + 0.01) / 3))
    assert metrics["personalized_accuracy_min"] == pytest.approx(0.5)
    assert metrics["eval_accuracy"] == pytest.approx((5 + 30 + 54) / 100)
    assert metrics["eval_density"] == pytest.approx(0.6)
    assert metrics["eval_clients"] == 3


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("th_update", "sometimes"),
        ("ste", "sigmoid"),
        ("sign_mode", "rows"),
        ("divisor", "k2"),
        ("agg_weighting", "by_size"),
        ("eval_every", 0),
        ("alpha", -1.0),
        ("warmup_period", 0.0),
        ("collapse_density", 1.0),
        ("grad_clip", 0.0),
        ("tau_clip", -5.0),
        ("lr_decay", 1.5),
        ("lr_min", 10.0),
        ("momentum", 1.0),
        ("centralized_evaluation", True),
        ("fraction_train", 0.0),
    ],
)
def test_section_rejects_invalid_values(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"strategy.{key}"):
        load_config(None, ["strategy.name=spafl", f"strategy.{key}={value}"])


def test_section_rejects_adam_and_eager_pending() -> None:
    with pytest.raises(ConfigError, match="client.optimizer"):
        load_config(None, ["strategy.name=spafl", "client.optimizer=adam"])
    with pytest.raises(ConfigError, match="apply_pending_on_eval"):
        load_config(None, ["strategy.name=spafl", "strategy.apply_pending_on_eval=true", "strategy.th_update=eager_all"])


def test_section_reads_unquoted_off() -> None:
    config = load_config(None, ["strategy.name=spafl", "strategy.th_update=off"])

    assert isinstance(config.strategy, SpaFLSection)
    assert config.strategy.th_update == "off"


def test_constructor_rejects_unknown_modes() -> None:
    with pytest.raises(ValueError, match="th_update"):
        SpaFL(th_update="later")
    with pytest.raises(ValueError, match="fraction_train"):
        SpaFL(fraction_train=0.0)
