"""Federated DoRA fine-tuning end to end: runs, byte counts, adapter-only uploads, rejections.

Expected byte counts come from the backbone's layer sizes (width 32, feed-forward 64, 10
classes) and the formula r·(d_in + d_out) + d_out float32 numbers per adapted layer, worked out
by hand below, not from a run's output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import strip_timing
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from fedsim.config import ConfigError
from fedsim.runner import RunInputError, client_spec, simulate

FAST = ["backend.name=local", "run.progress=false", "run.rounds=3"]
RANK = 4

# Adapted layers of the default targets in the default backbone, as (d_in, d_out): per block
# q_proj and v_proj (32 -> 32), up_proj (32 -> 64) and down_proj (64 -> 32), two blocks, then
# the head (32 -> 10).
ADAPTED = [(32, 32), (32, 32), (32, 64), (64, 32)] * 2 + [(32, 10)]
ADAPTER_BYTES = 4 * sum(RANK * (d_in + d_out) + d_out for d_in, d_out in ADAPTED)
ADAPTER_BYTES_WITHOUT_A = 4 * sum(RANK * d_out + d_out for _, d_out in ADAPTED)

# The whole backbone's state dict: embed 8·32 + 32 and position 8·32. Each block has two layer
# norms (2·2·32), four 32x32 attention projections with biases and the feed-forward pair
# (32·64 + 64 + 64·32 + 32). Then come the final layer norm (2·32) and the head (32·10 + 10).
BLOCK_FLOATS = 2 * 2 * 32 + 4 * (32 * 32 + 32) + (32 * 64 + 64 + 64 * 32 + 32)
FULL_MODEL_BYTES = 4 * ((8 * 32 + 32) + 8 * 32 + 2 * BLOCK_FLOATS + 2 * 32 + (32 * 10 + 10))


def test_hand_sizes_are_consistent() -> None:
    assert ADAPTER_BYTES == 12232
    assert FULL_MODEL_BYTES == 72104


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``Message`` be built outside a running Flower process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _initial_adapters(config: Any) -> ArrayRecord:
    """Return the run's initial global adapters, as the runner builds them."""
    from fedsim.methods import get_method
    from fedsim.methods.base import DataInfo

    return get_method("dora").initial_arrays(config, DataInfo((1, 8, 8), 10, "classification"))


# End-to-end runs on the local engine.


def test_local_run_learns_shifted_task(run_config, tmp_path: Path) -> None:
    outcome = simulate(run_config("dora_digits.yaml", *FAST), run_dir=tmp_path / "run")

    assert outcome.status == "completed", outcome.error
    assert len(outcome.rows) == 3
    accuracies = [row["centralized_accuracy"] for row in outcome.rows]
    # Ten classes: chance is 0.1, and the upright base does little better on rotated digits.
    assert accuracies[0] < 0.4
    assert accuracies[-1] > 0.5
    assert accuracies[-1] > accuracies[0]
    assert all(row["clients_failed"] == 0 for row in outcome.rows)
    assert outcome.rows[-1]["b_norm"] > 0


def test_bytes_are_adapter_tensors_only(run_config, tmp_path: Path) -> None:
    outcome = simulate(run_config("dora_digits.yaml", *FAST), run_dir=tmp_path / "run")
    assert outcome.status == "completed", outcome.error

    train_clients, eval_clients = 5, 10  # fraction_train 0.5 and fraction_evaluate 1.0 of 10
    for row in outcome.rows:
        assert row["clients_ok"] == train_clients
        assert row["bytes_up"] == ADAPTER_BYTES * train_clients
        assert row["bytes_down"] == ADAPTER_BYTES * (train_clients + eval_clients)
        assert row["full_model_bytes_up"] == FULL_MODEL_BYTES * train_clients
        assert row["full_model_bytes_down"] == FULL_MODEL_BYTES * (train_clients + eval_clients)
        assert row["full_model_bytes"] == FULL_MODEL_BYTES * (2 * train_clients + eval_clients)

    block = outcome.summary["dora"]
    assert block["bytes_up"] == 3 * ADAPTER_BYTES * train_clients
    assert block["full_model_bytes"] == 3 * FULL_MODEL_BYTES * (2 * train_clients + eval_clients)
    assert block["adapter_bytes_ratio"] == pytest.approx(ADAPTER_BYTES / FULL_MODEL_BYTES)
    assert (tmp_path / "run" / "summary.json").is_file()


def test_freeze_a_keeps_a_identical(run_config, tmp_path: Path) -> None:
    seen: list[ArrayRecord] = []
    config = run_config("dora_digits.yaml", *FAST, "strategy.freeze_a=true")

    outcome = simulate(config, run_dir=tmp_path / "run", hooks=[lambda r, arrays, row: seen.append(arrays)])

    assert outcome.status == "completed", outcome.error
    assert len(seen) == 3
    initial = _initial_adapters(config)
    a_keys = [key for key in initial if key.endswith("lora_A.weight")]
    b_keys = [key for key in initial if key.endswith("lora_B.weight")]
    assert len(a_keys) == len(ADAPTED)
    for arrays in seen:
        assert list(arrays) == list(initial)
        for key in a_keys:
            assert arrays[key].data == initial[key].data, key
    assert any(np.any(seen[-1][key].numpy() != 0) for key in b_keys)

    for row in outcome.rows:
        assert row["bytes_up"] == ADAPTER_BYTES_WITHOUT_A * 5
        assert row["bytes_down"] == ADAPTER_BYTES_WITHOUT_A * 15


def test_same_seed_gives_identical_rows(run_config, tmp_path: Path) -> None:
    first = simulate(run_config("dora_digits.yaml", *FAST, "run.rounds=2"), run_dir=tmp_path / "a")
    second = simulate(run_config("dora_digits.yaml", *FAST, "run.rounds=2"), run_dir=tmp_path / "b")
    other_seed = simulate(run_config("dora_digits.yaml", *FAST, "run.rounds=2", "run.seed=1"), run_dir=tmp_path / "c")

    assert first.status == second.status == other_seed.status == "completed"
    assert strip_timing(first.rows) == strip_timing(second.rows)
    assert strip_timing(first.rows) != strip_timing(other_seed.rows)


@pytest.mark.ray
def test_ray_and_local_give_identical_rows(run_config, tmp_path: Path) -> None:
    common = ["run.progress=false", "run.rounds=2"]
    on_ray = simulate(run_config("dora_digits.yaml", *common, "backend.name=ray"), run_dir=tmp_path / "ray")
    on_local = simulate(run_config("dora_digits.yaml", *common, "backend.name=local"), run_dir=tmp_path / "local")

    assert on_ray.status == "completed", on_ray.error
    assert on_local.status == "completed", on_local.error
    assert len(on_ray.rows) == 2
    assert strip_timing(on_ray.rows) == strip_timing(on_local.rows)


def test_gpu_config_fails_before_round_one(run_config, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device exists here, so the GPU config runs (see the gpu-marked test)")
    config = run_config("dora_gpu.yaml", "backend.name=local", "run.progress=false")

    with pytest.raises(RunInputError, match=r"num_gpus=0.5 asks for a GPU, but no CUDA device is available"):
        simulate(config, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.gpu
def test_gpu_config_runs_on_cuda(run_config, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    outcome = simulate(run_config("dora_gpu.yaml", *FAST), run_dir=tmp_path / "run")

    assert outcome.status == "completed", outcome.error
    assert outcome.rows[-1]["bytes_up"] == ADAPTER_BYTES * 5
    assert outcome.rows[-1]["centralized_accuracy"] > outcome.rows[0]["centralized_accuracy"]


# The client handlers, called directly.


def _client_request(spec: dict[str, Any], arrays: ArrayRecord, config: dict[str, Any], kind: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config), "fedsim": ConfigRecord({"spec": json.dumps(spec)})})
    return Message(content, dst_node_id=7, message_type=kind)


@pytest.fixture
def client_setup(run_config, tmp_path: Path, task_identity: None) -> tuple[Any, dict[str, Any], Context, ArrayRecord]:
    """The config, run spec, node context of partition 0 and the initial adapters."""
    config = run_config("dora_digits.yaml", *FAST)
    spec = client_spec(config, tmp_path / "run")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 10}, state=RecordDict(), run_config={})
    return config, spec, context, _initial_adapters(config)


def _server_config(config: Any, freeze_a: bool = False) -> dict[str, Any]:
    from fedsim.clients.dora import adapted_model

    from fedsim.methods.dora import dora_spec

    entry = adapted_model(dora_spec(config), "cpu")
    return {
        "server-round": 1, "device": "cpu", "dora-rank": RANK, "dora-alpha": 8.0,
        "dora-base-hash": entry.base_hash, "dora-freeze-a": freeze_a,
    }


def test_upload_carries_only_adapter_keys(client_setup) -> None:
    from fedsim.clients.dora import train

    config, spec, context, initial = client_setup
    reply = train(_client_request(spec, initial, _server_config(config)), context)

    assert list(reply.content.array_records) == ["arrays"]
    uploaded = reply.content.array_records["arrays"]
    assert list(uploaded) == list(initial)
    suffixes = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    assert all(key.endswith(suffixes) for key in uploaded)
    assert not any("base_layer" in key for key in uploaded)
    assert sum(int(np.prod(array.shape)) * 4 for array in uploaded.values()) == ADAPTER_BYTES
    assert all(array.dtype == "float32" for array in uploaded.values())

    metadata = reply.content.config_records["dora"]
    assert metadata["rank"] == RANK
    assert metadata["alpha"] == 8.0
    assert metadata["base-hash"] == _server_config(config)["dora-base-hash"]
    assert reply.content.metric_records["metrics"]["num-examples"] > 0


def test_upload_without_a_under_freeze_a(client_setup) -> None:
    from fedsim.clients.dora import train

    config, spec, context, initial = client_setup
    without_a = ArrayRecord({key: array for key, array in initial.items() if not key.endswith("lora_A.weight")})
    reply = train(_client_request(spec, without_a, _server_config(config, freeze_a=True)), context)

    uploaded = reply.content.array_records["arrays"]
    assert list(uploaded) == list(without_a)
    assert sum(int(np.prod(array.shape)) * 4 for array in uploaded.values()) == ADAPTER_BYTES_WITHOUT_A


def test_client_rejects_other_base_hash(client_setup) -> None:
    from fedsim.clients.dora import train

    config, spec, context, initial = client_setup
    settings = {**_server_config(config), "dora-base-hash": "0" * 64}

    with pytest.raises(ValueError, match="base weights hash mismatch"):
        train(_client_request(spec, initial, settings), context)


# The strategy, with stand-in replies.


class StandInGrid:
    """Nodes 101..(100+n) holding partitions 0..n−1."""

    def __init__(self, num_nodes: int) -> None:
        self.nodes = [101 + pid for pid in range(num_nodes)]

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def node_ids_in_partition_order(self) -> list[int]:
        return list(self.nodes)

    def partition_of(self, node_id: int) -> int:
        return int(node_id) - 101


GLOBAL = {
    "layer.lora_A.weight": np.full((2, 3), 0.5, np.float32),
    "layer.lora_B.weight": np.zeros((4, 2), np.float32),
    "layer.lora_magnitude_vector": np.ones(4, np.float32),
}


def _adapter_reply(request: Message, value: float, examples: int, base_hash: str = "abc", rank: int = 2) -> Message:
    sent = request.content.array_records["arrays"]
    arrays = ArrayRecord({key: Array(np.full(tuple(array.shape), value, np.float32)) for key, array in sent.items()})
    content = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"num-examples": examples, "train_loss": value}),
        "dora": ConfigRecord({"rank": rank, "alpha": 4.0, "base-hash": base_hash}),
    })
    return Message(content, reply_to=request)


def test_strategy_rejects_other_base_hash_and_rank(task_identity: None) -> None:
    from fedsim.strategies import DoRAFedAvg

    strategy = DoRAFedAvg(rank=2, alpha=4.0, base_hash="abc", full_model_bytes_per_message=100)
    arrays = ArrayRecord({key: Array(values) for key, values in GLOBAL.items()})
    requests = list(strategy.configure_train(1, arrays, ConfigRecord(), StandInGrid(4)))
    assert len(requests) == 4
    assert requests[0].content.config_records["config"]["dora-base-hash"] == "abc"

    replies = [
        _adapter_reply(requests[0], 1.0, examples=10),
        _adapter_reply(requests[1], 3.0, examples=30),
        _adapter_reply(requests[2], 50.0, examples=10, base_hash="other"),
        _adapter_reply(requests[3], 70.0, examples=10, rank=3),
    ]
    averaged, metrics = strategy.aggregate_train(1, replies)

    assert averaged is not None and metrics is not None
    # Weighted mean of the two accepted replies: (10·1 + 30·3) / 40 = 2.5.
    for key in GLOBAL:
        np.testing.assert_array_equal(averaged[key].numpy(), np.full(GLOBAL[key].shape, 2.5, np.float32))
    assert metrics["clients_rejected"] == 2
    assert metrics["train_loss"] == pytest.approx(2.5)
    assert metrics["full_model_bytes_up"] == 4 * 100
    assert metrics["full_model_bytes_down"] == 4 * 100
    assert metrics["b_norm"] == pytest.approx(math.sqrt(8 * 2.5**2))


def test_strategy_freeze_a_keeps_a_and_skips_it(task_identity: None) -> None:
    from fedsim.strategies import DoRAFedAvg

    strategy = DoRAFedAvg(rank=2, alpha=4.0, base_hash="abc", freeze_a=True)
    arrays = ArrayRecord({key: Array(values) for key, values in GLOBAL.items()})
    requests = list(strategy.configure_train(1, arrays, ConfigRecord(), StandInGrid(2)))
    assert list(requests[0].content.array_records["arrays"]) == ["layer.lora_B.weight", "layer.lora_magnitude_vector"]

    averaged, _ = strategy.aggregate_train(1, [_adapter_reply(requests[0], 2.0, 5), _adapter_reply(requests[1], 4.0, 5)])

    assert averaged is not None
    assert list(averaged) == list(GLOBAL)
    assert averaged["layer.lora_A.weight"].data == arrays["layer.lora_A.weight"].data
    np.testing.assert_array_equal(averaged["layer.lora_B.weight"].numpy(), np.full((4, 2), 3.0, np.float32))


def test_strategy_rejects_non_adapter_global_keys(task_identity: None) -> None:
    from fedsim.strategies import DoRAFedAvg

    strategy = DoRAFedAvg(rank=2, alpha=4.0, base_hash="abc")
    arrays = ArrayRecord({"layer.base_layer.weight": Array(np.zeros((4, 3), np.float32))})

    with pytest.raises(ValueError, match="only DoRA adapter tensors"):
        strategy.configure_train(1, arrays, ConfigRecord(), StandInGrid(2))


# Config validation.


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy.rank=0", "strategy.rank"),
        ("strategy.kernel=cuda", "strategy.kernel"),
        ("strategy.shift=rotate180", "strategy.shift"),
        ("strategy.heads=3", "strategy.heads"),
        ("strategy.device=cuda", "strategy.device"),
        ("data.dataset=wine", "needs an image data set"),
    ],
)
def test_config_rejects_invalid_keys(run_config, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_config("dora_digits.yaml", override)


def test_unmatched_target_modules_fail_before_round_one(run_config, tmp_path: Path) -> None:
    config = run_config("dora_digits.yaml", *FAST, "strategy.target_modules=[nothing]")

    with pytest.raises(RunInputError, match="matched no nn.Linear module"):
        simulate(config, run_dir=tmp_path / "run")
