"""Shared fixtures: a factory for small run configs, and the engine environment."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedsim.engine.environment import prepare_environment
from fedsim.results import TIMING_COLUMNS

prepare_environment()

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


@pytest.fixture
def small_overrides() -> list[str]:
    """Overrides that make any config a few-second run on the local engine."""
    return ["backend.name=local", "run.progress=false", "run.rounds=2"]


def strip_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return ``rows`` without the columns that measure time."""
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` of ``run_dir``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def run_config(tmp_path: Path) -> Callable[..., Any]:
    """Build a run config from a YAML file in ``configs/`` (or None) plus overrides."""
    from fedsim.config import load_config

    def build(name: str | None, *overrides: str) -> Any:
        path = CONFIGS / name if name is not None else None
        return load_config(path, [f"run.output_dir={tmp_path / 'runs'}", *overrides])

    return build


@pytest.fixture
def message_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``Message`` be built outside a running Flower process, as strategy unit tests need."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class StandInGrid:
    """Nodes 101..(100+n) holding partitions 0..n-1: the grid methods a strategy calls.

    ``get_node_ids`` returns them in reverse, so a strategy that ignores the partition order
    fedsim's grids provide samples differently and fails its test.
    """

    def __init__(self, num_nodes: int) -> None:
        self.nodes = [101 + pid for pid in range(num_nodes)]

    def get_node_ids(self) -> list[int]:
        return list(reversed(self.nodes))

    def node_ids_in_partition_order(self) -> list[int]:
        return list(self.nodes)

    def partition_of(self, node_id: int) -> int:
        return int(node_id) - 101
