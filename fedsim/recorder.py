"""Per-round recording: one metrics row per round, written as soon as the round ends.

Flower's ``Strategy.start`` keeps its history in a local object until the run ends, so fedsim
records from the outside: :meth:`RoundRecorder.attach` wraps the strategy instance's
``aggregate_train`` and ``aggregate_evaluate`` to capture their metrics, and
:meth:`RoundRecorder.evaluate_fn` is passed as ``start``'s ``evaluate_fn``, which Flower calls once
at the end of every round. Strategies that override ``start`` must do the same.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedsim.accounting import AccountingGrid
from fedsim.results import RunFolder

__all__ = ["RoundRecorder"]

logger = logging.getLogger(__name__)

CentralEvaluation = Callable[[int, ArrayRecord], dict[str, float] | None]
RoundHook = Callable[[int, ArrayRecord, dict[str, Any]], None]


def _metric_dict(record: MetricRecord | None, weight_name: str) -> dict[str, Any]:
    if record is None:
        return {}
    values: dict[str, Any] = {}
    for key, value in record.items():
        name = weight_name if key == "num-examples" else key.replace("-", "_")
        values[name] = value
    return values


class RoundRecorder:
    """Collects each round's metrics and byte tally into one row of ``metrics.jsonl``.

    ``central_evaluation(round, arrays)`` returns centralized metrics (or None);
    ``on_round_end(round, arrays, row)`` runs after the row is written (progress display,
    checkpoints). Rows before ``first_round`` are never written (a resumed run starts later).
    """

    def __init__(
        self,
        folder: RunFolder,
        grid_ref: Callable[[], AccountingGrid | None],
        central_evaluation: CentralEvaluation | None = None,
        on_round_end: list[RoundHook] | None = None,
        first_round: int = 1,
        round_offset: int = 0,
        elapsed_before: float = 0.0,
    ) -> None:
        self.folder = folder
        self.grid_ref = grid_ref
        self.central_evaluation = central_evaluation
        self.on_round_end = list(on_round_end or [])
        self.first_round = first_round
        self.round_offset = round_offset
        self.started = time.perf_counter() - elapsed_before
        self.round_started = time.perf_counter()
        self.rows_written = 0
        self._train: MetricRecord | None = None
        self._evaluate: MetricRecord | None = None

    def attach(self, strategy: Strategy) -> None:
        """Wrap ``strategy``'s round methods on the instance to capture their metrics.

        On a resumed run ``Strategy.start`` counts rounds from 1 again, so the wrappers also add
        ``round_offset``: the strategy sees the same round numbers, and so draws the same
        samples, as in the uninterrupted run.
        """
        offset = self.round_offset
        configure_train, configure_evaluate = strategy.configure_train, strategy.configure_evaluate
        aggregate_train, aggregate_evaluate = strategy.aggregate_train, strategy.aggregate_evaluate

        def shifted_configure_train(server_round: int, *args: Any, **kwargs: Any) -> Any:
            return configure_train(server_round + offset, *args, **kwargs)

        def shifted_configure_evaluate(server_round: int, *args: Any, **kwargs: Any) -> Any:
            return configure_evaluate(server_round + offset, *args, **kwargs)

        def recorded_aggregate_train(server_round: int, replies: Any) -> Any:
            arrays, metrics = aggregate_train(server_round + offset, replies)
            self._train = metrics
            return arrays, metrics

        def recorded_aggregate_evaluate(server_round: int, replies: Any) -> Any:
            metrics = aggregate_evaluate(server_round + offset, replies)
            self._evaluate = metrics
            return metrics

        strategy.configure_train = shifted_configure_train  # type: ignore[method-assign]
        strategy.configure_evaluate = shifted_configure_evaluate  # type: ignore[method-assign]
        strategy.aggregate_train = recorded_aggregate_train  # type: ignore[method-assign]
        strategy.aggregate_evaluate = recorded_aggregate_evaluate  # type: ignore[method-assign]

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """End round ``server_round``: evaluate centrally, write the row, run the hooks."""
        if server_round == 0:
            return None
        absolute_round = server_round + self.round_offset
        central = self.central_evaluation(absolute_round, arrays) if self.central_evaluation else None
        row = self._build_row(absolute_round, central)
        self.folder.append_row(row)
        self.rows_written += 1
        for hook in self.on_round_end:
            hook(absolute_round, arrays, row)
        grid = self.grid_ref()
        if grid is not None:
            grid.current_round = absolute_round + 1
        self.round_started = time.perf_counter()
        self._train = self._evaluate = None
        return MetricRecord({k: float(v) for k, v in central.items()}) if central else None

    def _build_row(self, server_round: int, central: dict[str, float] | None) -> dict[str, Any]:
        now = time.perf_counter()
        row: dict[str, Any] = {"round": server_round, "wall_s": now - self.started, "round_s": now - self.round_started}
        row.update(_metric_dict(self._train, "train_examples"))
        row.update(_metric_dict(self._evaluate, "eval_examples"))
        if central:
            row.update(central)
        grid = self.grid_ref()
        if grid is not None:
            tally = grid.take_tally()
            row["bytes_up"] = tally.bytes_up
            row["bytes_down"] = tally.bytes_down
            row["wire_bytes_up"] = tally.wire_bytes_up
            row["wire_bytes_down"] = tally.wire_bytes_down
            row["clients_ok"] = tally.ok.get("train", 0)
            row["clients_failed"] = tally.failed.get("train", 0)
            row["eval_clients_ok"] = tally.ok.get("evaluate", 0)
            row["eval_clients_failed"] = tally.failed.get("evaluate", 0)
            if tally.failures:
                row["failures"] = tally.failures
        for key, value in list(row.items()):
            if isinstance(value, float) and not math.isfinite(value):
                logger.warning("round %d: metric %s is %s", server_round, key, value)
        return row
