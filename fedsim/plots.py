"""PNG plots of one or more runs' ``metrics.jsonl``: accuracy, loss, cumulative bytes, extras."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedsim.results import TIMING_COLUMNS  # noqa: E402

__all__ = ["plot_runs"]

_SKIP = TIMING_COLUMNS | {"round", "clients_ok", "clients_failed", "eval_clients_ok", "eval_clients_failed", "train_examples", "eval_examples"}


def _series(rows: list[dict[str, Any]], column: str) -> tuple[list[int], list[float]]:
    rounds, values = [], []
    for row in rows:
        value = row.get(column)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            rounds.append(int(row["round"]))
            values.append(float(value))
    return rounds, values


def _columns(runs: Sequence[tuple[str, list[dict[str, Any]]]], predicate: Any) -> list[str]:
    found: list[str] = []
    for _, rows in runs:
        for row in rows:
            for key, value in row.items():
                if key not in found and key not in _SKIP and isinstance(value, (int, float)) and not isinstance(value, bool) and predicate(key):
                    found.append(key)
    return found


def _figure(runs: Sequence[tuple[str, list[dict[str, Any]]]], columns: list[str], ylabel: str, path: Path, cumulative: bool = False) -> Path | None:
    if not columns:
        return None
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for label, rows in runs:
        for column in columns:
            rounds, values = _series(rows, column)
            if not rounds:
                continue
            if cumulative:
                total, running = 0.0, []
                for value in values:
                    total += value
                    running.append(total)
                values = running
            name = column if len(runs) == 1 else f"{label}: {column}"
            axes.plot(rounds, values, marker="o" if len(rounds) < 30 else None, markersize=3, label=name)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_runs(runs: Sequence[tuple[str, list[dict[str, Any]]]], out_dir: str | Path, extra_columns: Sequence[str] = ()) -> list[Path]:
    """Write accuracy, loss, cumulative-bytes and extra-column plots of ``runs`` to ``out_dir``.

    ``runs`` is a list of ``(label, rows)``; several runs are overlaid on the same axes.
    Returns the files written.
    """
    out = Path(out_dir)
    written = [
        _figure(runs, _columns(runs, lambda k: k.endswith("accuracy")), "accuracy", out / "accuracy.png"),
        _figure(runs, _columns(runs, lambda k: k.endswith("loss")), "loss", out / "loss.png"),
        _figure(runs, [c for c in ("bytes_up", "bytes_down") if _columns(runs, lambda k, c=c: k == c)], "cumulative bytes (payload)", out / "bytes.png", cumulative=True),
    ]
    for column in extra_columns:
        if _columns(runs, lambda k, c=column: k == c):
            written.append(_figure(runs, [column], column, out / f"{column}.png"))
    return [path for path in written if path is not None]
