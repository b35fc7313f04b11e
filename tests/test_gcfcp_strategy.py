"""Tests of the GC-FCP strategy (arXiv 2603.14198) on hand-built messages, and of its config section.

Expected thresholds come from the disjoint-group closed form: with groups that do not overlap,
group g's threshold is the smallest calibration score s with Σ_{i∈G_g, S_i≤s} w_i ≥
(1−α)(W_g + w_test). Two clients with 9 points each and uniform π give λ_k = 0.5/10 = 0.05 and
w_test = 0.1. At α = 0.5 a group holding one client's 9 points needs 0.05·j ≥ 0.5·(0.45 + 0.1)
= 0.275, so j = 6: the 6th smallest score.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import StandInGrid
from fedsim.strategies import GCFCP
from fedsim.strategies.gcfcp import (
    CALIBRATE_MESSAGE,
    EVALUATE_MESSAGE,
    GroupSpec,
    table_from_record,
    table_to_record,
)
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedsim.config import ConfigError, load_config
from fedsim.conformal import ThresholdTable
from fedsim.records import to_numpy_dict

DISJOINT = GroupSpec(kind="intervals", intervals=((0.0, 1.0), (1.0, 2.0)))
"""Two disjoint groups: patterns (0,0), (1,0) and (0,1)."""


pytestmark = pytest.mark.usefixtures("message_identity")


def atoms_reply(request: Message, patterns: list[list[int]], values: list[list[float]], num_points: int | None = None) -> Message:
    """A ``gcfcp_exact`` reply: raw scores per atom, patterns packed little-endian."""
    packed = np.packbits(np.asarray(patterns, dtype=np.uint8), axis=1, bitorder="little")
    arrays = {"patterns": Array(packed)}
    for index, atom_values in enumerate(values):
        arrays[f"atom/{index}/value"] = Array(np.asarray(atom_values, dtype=np.float64))
    total = sum(len(v) for v in values) if num_points is None else num_points
    content = RecordDict({"summary": ArrayRecord(arrays),
                          "calibration": MetricRecord({"num-examples": total, "num-atoms": len(values)})})
    return Message(content, reply_to=request)


def coverage_reply(request: Message, examples: int, covered: int, size_sum: float, group_count: list[int],
                   group_covered: list[int], group_size_sum: list[float]) -> Message:
    record = MetricRecord({
        "num-examples": examples, "covered": covered, "size-sum": size_sum, "unbounded": 0,
        "group-count": group_count, "group-covered": group_covered,
        "group-size-sum": group_size_sum, "group-unbounded": [0] * len(group_count),
    })
    return Message(RecordDict({"coverage": record}), reply_to=request)


def calibrate(strategy: GCFCP, grid: StandInGrid, server_round: int = 1) -> list[Message]:
    return list(strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid))


def disjoint_replies(requests: list[Message]) -> list[Message]:
    """Build the replies: client 0 sends scores 1..9 in group 1, client 1 sends 10..90 in group 2."""
    return [
        atoms_reply(requests[0], [[1, 0]], [[float(s) for s in range(1, 10)]]),
        atoms_reply(requests[1], [[0, 1]], [[10.0 * s for s in range(1, 10)]]),
    ]


def thresholds_by_pattern(table: ThresholdTable) -> dict[tuple[int, ...], float]:
    return {tuple(int(b) for b in pattern): float(tau) for pattern, tau in zip(table.patterns, table.thresholds, strict=True)}


def test_table_record_round_trip_with_infinity() -> None:
    table = ThresholdTable(np.array([[0, 1], [1, 0], [1, 1]]), np.array([0.5, np.inf, 2.0]))
    record = table_to_record(table)
    arrays = to_numpy_dict(record)

    assert all(np.isfinite(values).all() for values in arrays.values())
    assert arrays["tau_infinite"].tolist() == [0, 1, 0]
    decoded = table_from_record(record)
    assert decoded.patterns.tolist() == table.patterns.tolist()
    assert decoded.thresholds.tolist() == [0.5, np.inf, 2.0]


def test_group_patterns_of_both_kinds() -> None:
    overlapping = GroupSpec(kind="intervals", intervals=((0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0)))
    windows = GroupSpec(kind="label_windows", windows=((0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 6, 7), (6, 7, 8, 9)), num_classes=10)

    # Pieces [0,1), [1,2), [2,3), [3,4), [4,5) plus "outside every interval".
    assert sorted(map(tuple, overlapping.patterns().tolist())) == sorted(
        [(0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 1), (0, 0, 0, 1)])
    # Labels {0,1}, {2,3}, {4,5}, {6,7}, {8,9}.
    assert sorted(map(tuple, windows.patterns().tolist())) == sorted(
        [(1, 0, 0, 0), (1, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 1), (0, 0, 0, 1)])


def test_training_rounds_use_fedavg_messages() -> None:
    strategy = GCFCP(DISJOINT, 0.5, training_rounds=2)
    grid = StandInGrid(3)

    training = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid))
    calibration = calibrate(strategy, grid, server_round=3)

    assert {m.metadata.message_type for m in training} == {"train"}
    assert [m.metadata.message_type for m in calibration] == [CALIBRATE_MESSAGE] * 3
    assert [m.metadata.dst_node_id for m in calibration] == [101, 102, 103]
    config = calibration[0].content.config_records["config"]
    assert config["repeat"] == 0
    assert config["upload"] == "sketch"
    assert "groups" in calibration[0].content.array_records


def test_calibration_matches_disjoint_closed_form() -> None:
    strategy = GCFCP(DISJOINT, 0.5, calibration="gcfcp_exact")
    grid = StandInGrid(2)
    requests = calibrate(strategy, grid)

    arrays, metrics = strategy.aggregate_train(1, disjoint_replies(requests))

    assert arrays is None
    table = thresholds_by_pattern(strategy.tables[1])
    assert table[(1, 0)] == pytest.approx(6.0, rel=1e-6)
    assert table[(0, 1)] == pytest.approx(60.0, rel=1e-6)
    assert table[(0, 0)] == 0.0
    assert metrics["calibration_clients"] == 2
    assert metrics["w_test"] == pytest.approx(0.1)
    # Payload: 9 float64 scores and one pattern byte per client.
    assert metrics["uplink_summary_bytes"] == 2 * (9 * 8 + 1)


def test_calibration_ignores_reply_order() -> None:
    strategy = GCFCP(DISJOINT, 0.5, calibration="gcfcp_exact")
    grid = StandInGrid(2)
    requests = calibrate(strategy, grid)
    strategy.aggregate_train(1, disjoint_replies(requests))
    strategy.aggregate_train(2, list(reversed(disjoint_replies(requests))))

    assert strategy.tables[1].thresholds.tolist() == strategy.tables[2].thresholds.tolist()


def test_unreachable_group_gets_infinite_threshold() -> None:
    # Alone, client 0 gives λ = 1/10 and w_test = 0.1. Group 2 has no mass, so (1−α)·w_test > α·0.
    strategy = GCFCP(DISJOINT, 0.5, calibration="gcfcp_exact")
    requests = calibrate(strategy, StandInGrid(1))
    strategy.aggregate_train(1, [atoms_reply(requests[0], [[1, 0]], [[float(s) for s in range(1, 10)]])])

    table = thresholds_by_pattern(strategy.tables[1])
    assert table[(0, 1)] == np.inf
    # Group 1: 0.1·j >= 0.5·(0.9 + 0.1) gives j = 5.
    assert table[(1, 0)] == pytest.approx(5.0, rel=1e-6)


def test_invalid_replies_are_left_out() -> None:
    strategy = GCFCP(DISJOINT, 0.5, calibration="gcfcp_exact")
    requests = calibrate(strategy, StandInGrid(3))
    good = atoms_reply(requests[0], [[1, 0]], [[float(s) for s in range(1, 10)]])
    beyond_width = atoms_reply(requests[1], [[1, 0, 1]], [[1.0, 2.0]])
    wrong_count = atoms_reply(requests[2], [[0, 1]], [[1.0, 2.0]], num_points=5)

    _, metrics = strategy.aggregate_train(1, [good, beyond_width, wrong_count])

    assert metrics["calibration_clients"] == 1
    assert thresholds_by_pattern(strategy.tables[1])[(1, 0)] == pytest.approx(5.0, rel=1e-6)


def test_marginal_baselines_use_one_threshold() -> None:
    # Pooled scores 1..9 and 10..90. Split CP at α = 0.5: rank ⌈19·0.5⌉ = 10, the score 10.
    strategy = GCFCP(DISJOINT, 0.5, calibration="centralized_cp")
    requests = calibrate(strategy, StandInGrid(2))
    replies = []
    for request, scores in zip(requests, ([float(s) for s in range(1, 10)], [10.0 * s for s in range(1, 10)]), strict=True):
        content = RecordDict({"summary": ArrayRecord({"scores": Array(np.asarray(scores))}),
                              "calibration": MetricRecord({"num-examples": 9, "num-atoms": 1})})
        replies.append(Message(content, reply_to=request))

    strategy.aggregate_train(1, replies)

    assert requests[0].content.config_records["config"]["upload"] == "pooled"
    assert strategy.tables[1].thresholds.tolist() == [10.0, 10.0, 10.0]


def test_coverage_is_weighted_by_pi() -> None:
    strategy = GCFCP(DISJOINT, 0.5, calibration="gcfcp_exact")
    grid = StandInGrid(2)
    strategy.aggregate_train(1, disjoint_replies(calibrate(strategy, grid)))
    requests = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))
    # π = (0.5, 0.5). Client 0: 10 test points, all in group 1, 9 covered, sizes 2 each.
    # Client 1: 20 test points, all in group 2, 10 covered, sizes 4 each.
    replies = [
        coverage_reply(requests[0], 10, 9, 20.0, [10, 0], [9, 0], [20.0, 0.0]),
        coverage_reply(requests[1], 20, 10, 80.0, [0, 20], [0, 10], [0.0, 80.0]),
    ]

    metrics = strategy.aggregate_evaluate(1, replies)

    assert [m.metadata.message_type for m in requests] == [EVALUATE_MESSAGE] * 2
    assert "table" in requests[0].content.array_records
    assert metrics["coverage"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.5)
    assert metrics["coverage_g1"] == pytest.approx(0.9)
    assert metrics["coverage_g2"] == pytest.approx(0.5)
    assert metrics["worst_group_coverage"] == pytest.approx(0.5)
    assert metrics["max_coverage_gap"] == pytest.approx(0.4)
    assert metrics["mean_size"] == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)


def test_strategy_rejects_invalid_settings() -> None:
    with pytest.raises(ValueError, match="alpha"):
        GCFCP(DISJOINT, 1.5)
    with pytest.raises(ValueError, match="calibration"):
        GCFCP(DISJOINT, 0.1, calibration="pooled")
    with pytest.raises(ValueError, match="label-window groups need a classifier"):
        GCFCP(GroupSpec(kind="label_windows", windows=((0,),), num_classes=2), 0.1, score="residual")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["run.rounds=3"], r"set run.rounds=10"),
        (["data.num_clients=5"], r"set data.num_clients=4"),
        (["strategy.score=thr"], r"'residual' with data_source=paper_synthetic"),
        (["strategy.alpha=0"], r"strategy.alpha"),
        (["strategy.calibration=exact"], r"Allowed: gcfcp, gcfcp_exact"),
        (["strategy.groups.intervals=[[2.0,1.0]]"], r"low < high"),
    ],
)
def test_section_rejects_invalid_synthetic_configs(overrides: list[str], message: str) -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "gcfcp_synthetic.yaml"
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_section_rejects_residual_on_digits() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "gcfcp_digits.yaml"
    with pytest.raises(ConfigError, match=r"'thr', 'aps' or 'raps'"):
        load_config(path, ["strategy.score=residual"])
