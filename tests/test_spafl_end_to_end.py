"""End-to-end tests of SpaFL (arXiv 2406.00431): client handlers, runs, bytes and learning.

Byte counts are derived by hand from the model's layer widths: the masked MLP 64-256-128-10 of
``configs/spafl_digits.yaml`` has one threshold per output unit, n_τ = 256 + 128 + 10 = 394,
and each float32 threshold is 4 bytes.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fedsim.clients.spafl import app as spafl_app
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedsim.client_state import client_state_path, load_client_state
from fedsim.config import load_config
from fedsim.results import TIMING_COLUMNS
from fedsim.runner import client_spec, simulate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DIGITS = CONFIGS / "spafl_digits.yaml"

N_TAU = 256 + 128 + 10
TAU_BYTES = 4 * N_TAU
MLP_LAYERS = {"1": 256, "3": 128, "5": 10}
"""Masked layers of the MLP by module name (Flatten is module 0, ReLUs are 2 and 4)."""

FAST = ["backend.name=local", "run.progress=false", "client.local_epochs=1"]
SMALL = [*FAST, "data.num_clients=6", "strategy.fraction_train=0.5", "run.rounds=2"]
"""Six clients, three sampled per round, two rounds."""


def run(tmp_path: Path, name: str, config_file: Path, *overrides: str) -> Any:
    config = load_config(config_file, [f"run.output_dir={tmp_path}", *overrides])
    outcome = simulate(config, run_dir=tmp_path / name)
    assert outcome.status == "completed", outcome.error
    return outcome


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


# Bytes.

@pytest.mark.parametrize(
    ("mode", "extra", "messages_down"),
    [
        # Per round: (threshold arrays sent in round 1, in later rounds), with K = 3 of N = 6.
        ("lazy", [], (3, 3)),
        ("eager_all", ["strategy.th_update=eager_all"], (3, 3 + 6)),
        ("fmnist_code", ["strategy.th_update=fmnist_code"], (3, 3 + 3)),
        ("pending_on_eval", ["strategy.apply_pending_on_eval=true"], (3 + 6, 3 + 6)),
    ],
)
def test_bytes_per_round_are_thresholds_only(tmp_path: Path, mode: str, extra: list[str], messages_down: tuple[int, int]) -> None:
    outcome = run(tmp_path, mode, DIGITS, *SMALL, *extra)

    first, later = messages_down
    assert [row["bytes_up"] for row in outcome.rows] == [TAU_BYTES * 3, TAU_BYTES * 3]
    assert [row["bytes_down"] for row in outcome.rows] == [TAU_BYTES * first, TAU_BYTES * later]
    assert outcome.summary["bytes_up"] == 2 * TAU_BYTES * 3
    assert outcome.summary["bytes_down"] == TAU_BYTES * (first + later)


def test_bytes_are_below_one_percent_of_fedavg(tmp_path: Path) -> None:
    spafl = run(tmp_path, "spafl", DIGITS, *SMALL)
    fedavg = run(tmp_path, "fedavg", CONFIGS / "spafl_digits_fedavg.yaml", *SMALL)

    # The dense MLP has weights and biases: 64·256 + 256 + 256·128 + 128 + 128·10 + 10.
    fedavg_floats = 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert fedavg.rows[0]["bytes_up"] == 4 * fedavg_floats * 3
    assert spafl.summary["bytes_up"] * 100 <= fedavg.summary["bytes_up"]
    spafl_total = spafl.summary["bytes_up"] + spafl.summary["bytes_down"]
    fedavg_total = fedavg.summary["bytes_up"] + fedavg.summary["bytes_down"]
    assert spafl_total * 100 <= fedavg_total


# Client handlers, called directly.

@pytest.fixture
def client_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], Context]:
    """The run spec of the digits config and the context of the node holding partition 0."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    config = load_config(DIGITS, [*FAST, f"run.output_dir={tmp_path}"])
    spec = client_spec(config, tmp_path / "run")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 10}, state=RecordDict(), run_config={})
    return spec, context


def thresholds(value_of: Any) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value_of(name, units), np.float32)) for name, units in MLP_LAYERS.items()})


def request(spec: dict[str, Any], kind: str, arrays: dict[str, ArrayRecord], config: dict[str, Any]) -> Message:
    content = RecordDict({**arrays, "config": ConfigRecord(config), "fedsim": ConfigRecord({"spec": json.dumps(spec)})})
    return Message(content, dst_node_id=7, message_type=kind)


def stored_weights(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    stored = load_client_state(spec["run_dir"], 0)
    assert stored is not None
    return {k: v for k, v in stored[0].items() if k.endswith(".weight")}


def test_upload_holds_thresholds_only(client_setup: tuple[dict[str, Any], Context]) -> None:
    spec, context = client_setup
    tau = thresholds(lambda name, units: np.zeros(units))
    message = request(spec, MessageType.TRAIN, {"tau": tau}, {"server-round": 1, "lr": 0.05, "local-epochs": 1, "alpha": 0.002})

    answer = spafl_app(message, context)

    assert not answer.has_error()
    assert list(answer.content.array_records) == ["tau"]
    record = answer.content.array_records["tau"]
    assert list(record.keys()) == list(MLP_LAYERS)
    assert all(array.dtype == "float32" for array in record.values())
    assert sum(int(np.prod(array.shape)) for array in record.values()) == N_TAU
    assert client_state_path(spec["run_dir"], 0).is_file()


def test_clients_start_from_one_initialisation(client_setup: tuple[dict[str, Any], Context]) -> None:
    spec, context = client_setup
    other = Context(run_id=1, node_id=8, node_config={"partition-id": 1, "num-partitions": 10}, state=RecordDict(), run_config={})
    config = {"server-round": 1, "apply-pending": True, "th-update": "lazy"}
    tau = thresholds(lambda name, units: np.zeros(units))

    for node_context in (context, other):
        spafl_app(request(spec, MessageType.EVALUATE, {"tau": tau}, config), node_context)

    first = load_client_state(spec["run_dir"], 0)
    second = load_client_state(spec["run_dir"], 1)
    assert first is not None and second is not None
    assert first[0].keys() == second[0].keys()
    for key in first[0]:
        assert torch.equal(first[0][key], second[0][key]), key


def test_lazy_catch_up_equals_per_round_steps(client_setup: tuple[dict[str, Any], Context], tmp_path: Path) -> None:
    spec, context = client_setup
    rng = np.random.default_rng(0)
    # Global thresholds after three rounds. Steps of 1e-4 over fan-ins of 64 or more move each
    # weight by at most 2e-6, far less than the typical weight size of 0.05.
    history = [{name: np.zeros(units, np.float32) for name, units in MLP_LAYERS.items()}]
    for _ in range(3):
        history.append({name: history[-1][name] + rng.uniform(-1e-4, 1e-4, units).astype(np.float32) for name, units in MLP_LAYERS.items()})

    # Per round: the eager_all path, one Δτ per round to a client that is not sampled.
    eager_spec = {**spec, "run_dir": str(tmp_path / "eager")}
    for before, after in zip(history, history[1:], strict=False):
        delta = thresholds(lambda name, units, a=after, b=before: a[name] - b[name])
        config = {"server-round": 2, "threshold-update-only": True, "th-update": "eager_all"}
        answer = spafl_app(request(eager_spec, MessageType.TRAIN, {"dtau": delta}, config), context)
        assert answer.content.metric_records["metrics"]["sign_changes"] == 0

    # Lazy: one catch-up to the latest global thresholds.
    lazy_spec = {**spec, "run_dir": str(tmp_path / "lazy")}
    latest = thresholds(lambda name, units: history[-1][name])
    answer = spafl_app(request(lazy_spec, MessageType.EVALUATE, {"tau": latest}, {"server-round": 4, "apply-pending": True, "th-update": "lazy"}), context)
    assert answer.content.metric_records["metrics"]["eval_sign_changes"] == 0

    eager, lazy = stored_weights(eager_spec), stored_weights(lazy_spec)
    assert eager.keys() == lazy.keys() == {f"{name}.weight" for name in MLP_LAYERS}
    for key in eager:
        torch.testing.assert_close(lazy[key], eager[key], rtol=0, atol=1e-6)
    initial_spec = {**spec, "run_dir": str(tmp_path / "initial")}
    zeros = thresholds(lambda name, units: np.zeros(units))
    spafl_app(request(initial_spec, MessageType.EVALUATE, {"tau": zeros}, {"server-round": 1, "apply-pending": True, "th-update": "lazy"}), context)
    initial = stored_weights(initial_spec)
    assert any(not torch.equal(initial[key], eager[key]) for key in initial)


def test_lazy_step_moves_weights_by_hand_count(client_setup: tuple[dict[str, Any], Context]) -> None:
    spec, context = client_setup
    config = {"server-round": 1, "apply-pending": True, "th-update": "lazy"}
    zeros = thresholds(lambda name, units: np.zeros(units))
    spafl_app(request(spec, MessageType.EVALUATE, {"tau": zeros}, config), context)
    before = stored_weights(spec)

    raised = thresholds(lambda name, units: np.full(units, 0.0064 if name == "1" else 0.0))
    spafl_app(request(spec, MessageType.EVALUATE, {"tau": raised}, config), context)
    after = stored_weights(spec)

    # Layer "1" has fan-in 64, so every weight moves 0.0064 / 64 = 1e-4 toward zero.
    expected = before["1.weight"] - 1e-4 * torch.sign(before["1.weight"])
    torch.testing.assert_close(after["1.weight"], expected, rtol=0, atol=1e-7)
    assert torch.equal(after["3.weight"], before["3.weight"])


# Whole runs.

def test_seeded_run_is_reproducible(tmp_path: Path) -> None:
    overrides = [*SMALL, "run.rounds=3", "strategy.eval_every=2"]
    first = run(tmp_path, "first", DIGITS, *overrides)
    second = run(tmp_path, "second", DIGITS, *overrides)

    assert without_timing(first.rows) == without_timing(second.rows)
    assert [("personalized_accuracy" in row) for row in first.rows] == [False, True, True]

    evaluated = [row["personalized_accuracy"] for row in first.rows if "personalized_accuracy" in row]
    assert first.summary["final"]["personalized_accuracy"] == evaluated[-1]
    assert first.summary["last10_mean"]["personalized_accuracy"] == pytest.approx(sum(evaluated) / len(evaluated))
    assert first.summary["final"]["density"] == first.rows[-1]["density"]
    assert first.summary["spafl"]["train_flops"] == sum(row["train_flops"] for row in first.rows)


def test_resume_after_checkpoint_matches_whole_run(tmp_path: Path) -> None:
    # eager_all carries Δτ of the previous round across the checkpoint. With eval_every=3, the
    # last round is evaluated only if the restored strategy has the run's last round number.
    overrides = [*SMALL, "run.rounds=4", "run.checkpoint_every=1", "strategy.th_update=eager_all", "strategy.eval_every=3"]
    whole = run(tmp_path, "whole", DIGITS, *overrides)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    for late in ("round-0003", "round-0004"):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / late)
    (tmp_path / "cut" / "summary.json").unlink()

    config = load_config(DIGITS, [f"run.output_dir={tmp_path}", *overrides])
    resumed = simulate(config, run_dir=tmp_path / "cut", resume=True)

    assert resumed.status == "completed", resumed.error
    assert [row["round"] for row in resumed.rows] == [1, 2, 3, 4]
    assert "personalized_accuracy" in resumed.rows[-1]
    assert without_timing(resumed.rows) == without_timing(whole.rows)


def test_client_state_persists_on_disk(tmp_path: Path) -> None:
    outcome = run(tmp_path, "state", DIGITS, *SMALL, "run.rounds=1")

    files = sorted(p.name for p in (tmp_path / "state" / "clients").iterdir())
    assert len(files) == 3
    assert outcome.rows[0]["train_clients"] == 3


@pytest.mark.ray
@pytest.mark.slow
def test_ray_and_local_give_identical_rows(tmp_path: Path) -> None:
    overrides = ["run.progress=false", "run.rounds=2", "client.local_epochs=1"]
    local = run(tmp_path, "local", DIGITS, "backend.name=local", *overrides)
    ray = run(tmp_path, "ray", DIGITS, "backend.name=ray", "backend.num_cpus=2", *overrides)

    assert without_timing(ray.rows) == without_timing(local.rows)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spafl_learns_on_digits(tmp_path: Path, seed: int) -> None:
    outcome = run(tmp_path, f"seed{seed}", DIGITS, "backend.name=local", "run.progress=false", "run.rounds=30", f"run.seed={seed}")

    # Ten classes: chance is 0.1, and the test requires at least 20 points more.
    assert outcome.summary["final"]["personalized_accuracy"] >= 0.3
    assert outcome.summary["final"]["density"] < 1.0
    assert outcome.summary["final"]["eval_density"] < 1.0


# The paper's configs, on tiny files in the published formats.

def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, per_split: int) -> None:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (per_split, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(per_split) % 10)


def write_cifar10(root: Path, per_batch: int) -> None:
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8), b"labels": [i % 10 for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize(
    ("config_name", "writer", "n_tau"),
    [
        # LeNet-5: conv 20, conv 50, fc 500, fc 10. Conv4: convs 64, 64, 128, 128, fc 128, 128, 10.
        ("spafl_fmnist_lenet5.yaml", write_fashion_mnist, 20 + 50 + 500 + 10),
        ("spafl_cifar10_conv4.yaml", write_cifar10, 64 + 64 + 128 + 128 + 128 + 128 + 10),
    ],
)
def test_paper_configs_run_on_tiny_files(tmp_path: Path, config_name: str, writer: Any, n_tau: int) -> None:
    root = tmp_path / "data"
    root.mkdir()
    writer(root, 40)
    overrides = [
        f"data.root={root}", *FAST, "run.rounds=1", "data.num_clients=4",
        "strategy.fraction_train=0.5", "data.partitioner.name=iid", "client.batch_size=16",
    ]

    outcome = run(tmp_path, "paper", CONFIGS / config_name, *overrides)

    row = outcome.rows[0]
    assert row["bytes_up"] == 4 * n_tau * 2
    assert row["bytes_down"] == 4 * n_tau * 2
    assert math.isfinite(row["personalized_accuracy"])
