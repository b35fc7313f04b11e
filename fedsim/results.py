"""The run folder: resolved config, one metrics row per round, a summary, plots.

Layout::

    config.yaml      the resolved config, every key written out
    metrics.jsonl    one JSON object per finished round, flushed and synced as it is written
    summary.json     final, last-10-mean and best metrics, totals, status, versions
    plots/*.png      curves per round
    clients/         per-client state of personalised methods

A killed run keeps every finished round in ``metrics.jsonl``; ``summary.json`` is written
atomically, so it is either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["TIMING_COLUMNS", "RunFolder", "json_safe", "summarize", "versions"]

TIMING_COLUMNS = frozenset({"wall_s", "round_s", "calibration_s"})
"""Columns that measure time and so differ between otherwise identical runs."""


def json_safe(value: Any) -> Any:
    """Return ``value`` with non-finite floats replaced by None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return json_safe(value.item())
    return value


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename.

    The file gets the permissions a plain ``open`` would give it (``mkstemp`` makes it 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(temporary, _default_mode())
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class RunFolder:
    """One run's results folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, output_dir: str | Path, name: str, explicit: str | Path | None = None) -> RunFolder:
        """Create ``output_dir/<name>-<UTC timestamp>/`` (or ``explicit``) and return it."""
        if explicit is not None:
            path = Path(explicit)
        else:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            path = Path(output_dir) / f"{name}-{stamp}"
            suffix = 1
            while path.exists():
                suffix += 1
                path = Path(output_dir) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def write_config(self, yaml_text: str) -> None:
        """Write the resolved config."""
        write_atomic(self.config_path, yaml_text)

    def append_row(self, row: dict[str, Any]) -> None:
        """Append one round's row to ``metrics.jsonl``, flushed and synced to disk."""
        line = json.dumps(json_safe(row), sort_keys=False)
        with open(self.metrics_path, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def read_rows(self) -> list[dict[str, Any]]:
        """Read every complete row of ``metrics.jsonl`` (a torn last line is skipped)."""
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return rows

    def truncate_rows(self, last_round: int) -> None:
        """Keep only rows with ``round <= last_round`` (used when resuming from a checkpoint)."""
        kept = [row for row in self.read_rows() if int(row.get("round", 0)) <= last_round]
        write_atomic(self.metrics_path, "".join(json.dumps(row) + "\n" for row in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json`` atomically."""
        write_atomic(self.summary_path, json.dumps(json_safe(summary), indent=2) + "\n")


def versions() -> dict[str, str]:
    """Return the versions of fedsim, Python and the main libraries."""
    import flwr
    import numpy
    import torch

    import fedsim

    found = {
        "fedsim": fedsim.__version__,
        "python": platform.python_version(),
        "flwr": flwr.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import ray

        found["ray"] = ray.__version__
    except ImportError:
        pass
    return found


def _numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and key != "round" and key not in TIMING_COLUMNS and isinstance(value, (int, float)) and not isinstance(value, bool):
                columns.append(key)
    return columns


def summarize(rows: list[dict[str, Any]], last: int = 10) -> dict[str, Any]:
    """Summarise metric rows: final values, the mean of the last ``last`` values, best values.

    ``final`` is the last finite value of each column; ``last10_mean`` averages its last
    ``last`` finite values; ``best`` gives the maximum of accuracy columns and the minimum of
    loss columns, labelled with their round (best-over-rounds is optimistic: report
    ``final`` or ``last10_mean``). Byte columns are also summed into ``totals``.
    """
    final: dict[str, Any] = {}
    last_mean: dict[str, Any] = {}
    best: dict[str, Any] = {}
    totals: dict[str, Any] = {}
    for column in _numeric_columns(rows):
        series = [(int(r["round"]), float(r[column])) for r in rows if isinstance(r.get(column), (int, float)) and math.isfinite(float(r[column]))]
        if not series:
            continue
        final[column] = series[-1][1]
        tail = [v for _, v in series[-last:]]
        last_mean[column] = sum(tail) / len(tail)
        if column.endswith("accuracy"):
            round_, value = max(series, key=lambda item: item[1])
            best[column] = {"value": value, "round": round_}
        elif column.endswith("loss"):
            round_, value = min(series, key=lambda item: item[1])
            best[column] = {"value": value, "round": round_}
        if "bytes" in column:
            totals[column] = sum(v for _, v in series)
    return {"final": final, "last10_mean": last_mean, "best": best, "totals": totals}
