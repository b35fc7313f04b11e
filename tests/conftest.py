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
