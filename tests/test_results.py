"""Tests of the run folder: JSON-safe rows, the summary, torn lines and atomic writes."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedsim import results
from fedsim.results import RunFolder, json_safe, summarize

# --- json_safe --------------------------------------------------------------------------------


def test_json_safe_nan_is_none() -> None:
    assert json_safe(math.nan) is None


def test_json_safe_infinity_is_none() -> None:
    assert json_safe(-math.inf) is None


def test_json_safe_nested() -> None:
    value = {"loss": math.nan, "per_client": [1.5, math.inf], "pair": (2, math.nan)}

    assert json_safe(value) == {"loss": None, "per_client": [1.5, None], "pair": [2, None]}


def test_json_safe_numpy_scalars() -> None:
    value = json_safe({"accuracy": np.float32(0.5), "count": np.int64(3), "bad": np.float64("nan")})

    assert value == {"accuracy": 0.5, "count": 3, "bad": None}
    assert type(value["count"]) is int


def test_json_safe_output_is_standard_json() -> None:
    text = json.dumps(json_safe({"loss": math.nan}), allow_nan=False)

    assert text == '{"loss": null}'


# --- summarize ----------------------------------------------------------------------------------


def rows_for_summary() -> list[dict[str, object]]:
    """Return 12 rounds: accuracy 0.10, 0.15, ..., 0.65, loss 12, 11, ..., 1, 100 bytes up each."""
    return [
        {
            "round": r,
            "wall_s": 0.5 * r,
            "centralized_accuracy": 0.05 + 0.05 * r,
            "train_loss": 13.0 - r,
            "bytes_up": 100,
            "clients_ok": 4,
        }
        for r in range(1, 13)
    ]


def test_summarize_final() -> None:
    summary = summarize(rows_for_summary())

    # Round 12: accuracy 0.05 + 0.60 = 0.65, loss 13 - 12 = 1.
    assert summary["final"]["centralized_accuracy"] == pytest.approx(0.65)
    assert summary["final"]["train_loss"] == 1.0


def test_summarize_last10_mean() -> None:
    summary = summarize(rows_for_summary())

    # Rounds 3-12 have accuracy 0.20 ... 0.65 with mean (0.20 + 0.65) / 2 = 0.425.
    # Their loss runs 10 ... 1 with mean 5.5.
    assert summary["last10_mean"]["centralized_accuracy"] == pytest.approx(0.425)
    assert summary["last10_mean"]["train_loss"] == pytest.approx(5.5)


def test_summarize_best_accuracy_is_max() -> None:
    rows = rows_for_summary()
    rows[4]["centralized_accuracy"] = 0.9  # round 5 is the peak

    summary = summarize(rows)

    assert summary["best"]["centralized_accuracy"] == {"value": 0.9, "round": 5}


def test_summarize_best_loss_is_min() -> None:
    rows = rows_for_summary()
    rows[2]["train_loss"] = 0.25  # round 3 is the lowest

    summary = summarize(rows)

    assert summary["best"]["train_loss"] == {"value": 0.25, "round": 3}


def test_summarize_byte_totals() -> None:
    summary = summarize(rows_for_summary())

    # 12 rounds of 100 bytes.
    assert summary["totals"] == {"bytes_up": 1200.0}


def test_summarize_skips_timing_and_round() -> None:
    summary = summarize(rows_for_summary())

    assert "wall_s" not in summary["final"]
    assert "round" not in summary["final"]


def test_summarize_skips_non_finite() -> None:
    rows = rows_for_summary()
    rows[-1]["train_loss"] = None  # stored NaN reads back as null
    rows[-2]["train_loss"] = math.nan

    summary = summarize(rows)

    # The last finite loss is round 10's: 13 - 10 = 3.
    assert summary["final"]["train_loss"] == 3.0


def test_summarize_no_rows() -> None:
    assert summarize([]) == {"final": {}, "last10_mean": {}, "best": {}, "totals": {}}


# --- RunFolder --------------------------------------------------------------------------------


def test_append_and_read_rows(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)

    folder.append_row({"round": 1, "loss": math.nan})
    folder.append_row({"round": 2, "loss": 0.5})

    assert folder.read_rows() == [{"round": 1, "loss": None}, {"round": 2, "loss": 0.5}]


def test_read_rows_skips_torn_line(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append_row({"round": 1, "loss": 0.9})
    folder.append_row({"round": 2, "loss": 0.8})
    with open(folder.metrics_path, "a", encoding="utf-8") as stream:
        stream.write('{"round": 3, "lo')  # a run killed in the middle of a write

    assert folder.read_rows() == [{"round": 1, "loss": 0.9}, {"round": 2, "loss": 0.8}]


def test_read_rows_without_file(tmp_path: Path) -> None:
    assert RunFolder(tmp_path).read_rows() == []


def test_truncate_rows(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    for round_ in range(1, 6):
        folder.append_row({"round": round_})

    folder.truncate_rows(3)

    assert folder.read_rows() == [{"round": 1}, {"round": 2}, {"round": 3}]


def test_truncate_rows_drops_torn_line(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.append_row({"round": 1})
    with open(folder.metrics_path, "a", encoding="utf-8") as stream:
        stream.write('{"round": 2')

    folder.truncate_rows(5)

    assert folder.metrics_path.read_text(encoding="utf-8") == '{"round": 1}\n'


def test_write_summary_round_trip(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)

    folder.write_summary({"status": "completed", "final": {"loss": math.nan}})

    assert json.loads(folder.summary_path.read_text()) == {"status": "completed", "final": {"loss": None}}


def test_write_summary_leaves_no_temp_files(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)

    folder.write_summary({"status": "running"})
    folder.write_summary({"status": "completed"})

    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_summary_failed_replace_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = RunFolder(tmp_path)
    folder.write_summary({"status": "running"})

    def fail_replace(source: object, target: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        folder.write_summary({"status": "completed"})

    assert json.loads(folder.summary_path.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_write_summary_file_mode(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")

    folder.write_summary({"status": "completed"})

    # A results file must be as readable as any other file the user creates.
    assert stat.S_IMODE(folder.summary_path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_create_names_folder(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path, "quick")

    assert folder.path.parent == tmp_path
    assert folder.path.name.startswith("quick-")
    assert folder.path.is_dir()


def test_create_never_reuses_folder(tmp_path: Path) -> None:
    first = RunFolder.create(tmp_path, "quick")
    second = RunFolder.create(tmp_path, "quick")

    assert first.path != second.path


def test_create_explicit_path(tmp_path: Path) -> None:
    folder = RunFolder.create(tmp_path / "ignored", "quick", explicit=tmp_path / "mine")

    assert folder.path == tmp_path / "mine"
    assert not (tmp_path / "ignored").exists()


def test_write_config_text(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)

    folder.write_config("run:\n  rounds: 3\n")

    assert folder.config_path.read_text() == "run:\n  rounds: 3\n"
    assert os.listdir(tmp_path) == ["config.yaml"]
