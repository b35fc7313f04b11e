"""Federated averaging with seeded client sampling and a fixed aggregation order.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, arXiv 1602.05629. This is Flower's own ``FedAvg`` with three changes: nodes are
sampled from ``(seed, round)`` instead of Python's global ``random``; replies are aggregated in
partition order; replies with NaN or infinite values are rejected instead of averaged in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from fedsim.strategies.common import (
    nonfinite_reason,
    ordered_node_ids,
    sample_node_ids,
    sample_size,
    sort_replies,
    split_replies,
    unweighted_mean,
    weighted_metrics,
)
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.supercore import log

from fedsim.records import array_record_from_numpy, to_numpy_dict

__all__ = ["FedAvg"]


def _weight(content: RecordDict, key: str) -> float | None:
    for record in content.metric_records.values():
        if key in record:
            return float(record[key])  # type: ignore[arg-type]
    return None


class FedAvg(FlowerFedAvg):
    """Federated averaging with reproducible sampling.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training each round.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes sampled for federated evaluation each round.
    min_train_nodes, min_evaluate_nodes : int (default: 1)
        Minimum number of nodes sampled, capped at the number of connected nodes.
    seed : int (default: 0)
        Root seed of the sampling streams.
    weighted_by_key : str (default: "num-examples")
        Metric whose value weights each reply's arrays and metrics.

    Federated evaluation adds ``personalized_accuracy``: the unweighted mean over evaluated
    clients of each client's accuracy on its own test split.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        seed: int = 0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        for name, fraction in (("fraction_train", fraction_train), ("fraction_evaluate", fraction_evaluate)):
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {fraction}")
        for name, minimum in (("min_train_nodes", min_train_nodes), ("min_evaluate_nodes", min_evaluate_nodes)):
            if minimum < 0:
                raise ValueError(f"{name} must be >= 0, got {minimum}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=1,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=weighted_metrics,
            evaluate_metrics_aggr_fn=weighted_metrics,
        )
        self.seed = seed
        self._partition_of: Callable[[int], int] | None = None

    def _sample(self, grid: Grid, fraction: float, minimum: int, purpose: str, server_round: int) -> list[int]:
        self._partition_of = getattr(grid, "partition_of", None)
        node_ids = ordered_node_ids(grid)
        count = sample_size(len(node_ids), fraction, minimum)
        sampled = sample_node_ids(node_ids, count, self.seed, purpose, server_round)
        log(INFO, "%s: sampled %d of %d nodes", purpose, len(sampled), len(node_ids))
        return sampled

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global arrays to a seeded sample of ``fraction_train`` of the nodes."""
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, "sample-train", server_round)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global arrays to a seeded sample of ``fraction_evaluate`` of the nodes."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "sample-evaluate", server_round)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def _finite_in_order(self, replies: Iterable[Message], caller: str) -> list[Message]:
        kept = []
        for message in sort_replies(replies, self._partition_of):
            reason = None if message.has_error() else nonfinite_reason(message.content)
            if reason is not None:
                log(WARNING, "%s: rejected the reply of node %d: %s", caller, message.metadata.src_node_id, reason)
                continue
            kept.append(message)
        return kept

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the arrays of valid replies weighted by ``weighted_by_key``, in partition order.

        The average is a running float64 sum, so memory does not grow with the number of
        replies, and it is cast back to each array's dtype. A reply whose arrays differ in names
        or shapes from the first valid reply is rejected with a warning.
        """
        valid, failed = split_replies(self._finite_in_order(replies, "aggregate_train"), "aggregate_train")
        log(INFO, "aggregate_train: received %d results and %d failures", len(valid), len(failed))
        sums: dict[str, np.ndarray] = {}
        layout: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        total = 0.0
        kept = []
        for message in valid:
            content = message.content
            arrays = to_numpy_dict(content.array_records[self.arrayrecord_key]) if self.arrayrecord_key in content.array_records else None
            weight = _weight(content, self.weighted_by_key)
            if arrays is None or weight is None:
                log(WARNING, "aggregate_train: node %d sent no '%s' arrays or no '%s' metric", message.metadata.src_node_id, self.arrayrecord_key, self.weighted_by_key)
                continue
            if not layout:
                layout = {key: (values.dtype, values.shape) for key, values in arrays.items()}
                sums = {key: np.zeros(shape, dtype=np.float64) for key, (_, shape) in layout.items()}
            if {key: (values.dtype, values.shape) for key, values in arrays.items()} != layout:
                log(WARNING, "aggregate_train: rejected node %d: its arrays differ in names or shapes", message.metadata.src_node_id)
                continue
            for key, values in arrays.items():
                sums[key] += weight * values
            total += weight
            kept.append(content)
        if not kept or total <= 0:
            return None, None
        averaged = {key: (sums[key] / total).astype(dtype) for key, (dtype, _) in layout.items()}
        return array_record_from_numpy(averaged), weighted_metrics(kept, self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average evaluation metrics weighted by examples, plus the unweighted personalized accuracy."""
        valid = self._finite_in_order(replies, "aggregate_evaluate")
        metrics = super().aggregate_evaluate(server_round, valid)
        if metrics is not None:
            contents = [m.content for m in valid if not m.has_error()]
            metrics["personalized_accuracy"] = unweighted_mean(contents, "eval_accuracy")
        return metrics
