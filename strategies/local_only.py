"""Local-only training: every client trains its own model and nothing is aggregated.

The baseline that personalised methods must beat: no communication of model arrays at all.
Each message carries only the round number, and each client keeps its weights between rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO

from fedsim.strategies.common import (
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
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

__all__ = ["LocalOnly"]


class LocalOnly(Strategy):
    """Train each client on its own data only; report personalised accuracy.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of nodes that train each round.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes evaluated each round.
    min_train_nodes, min_evaluate_nodes : int (default: 1)
        Minimum number of nodes sampled.
    seed : int (default: 0)
        Root seed of the sampling streams.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.seed = seed
        self._partition_of: Callable[[int], int] | None = None

    def summary(self) -> None:
        """Log the sampling settings."""
        log(INFO, "\t├──> Local-only training, no aggregation")
        log(INFO, "\t└──> Fraction: train %.2f | evaluate %.2f", self.fraction_train, self.fraction_evaluate)

    def _messages(self, grid: Grid, fraction: float, minimum: int, purpose: str, server_round: int, kind: str) -> list[Message]:
        self._partition_of = getattr(grid, "partition_of", None)
        node_ids = ordered_node_ids(grid)
        sampled = sample_node_ids(node_ids, sample_size(len(node_ids), fraction, minimum), self.seed, purpose, server_round)
        log(INFO, "%s: sampled %d of %d nodes", purpose, len(sampled), len(node_ids))
        return [
            Message(RecordDict({"config": ConfigRecord({"server-round": server_round})}), dst_node_id=node_id, message_type=kind)
            for node_id in sampled
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Ask the sampled nodes to train their own models for one round."""
        return self._messages(grid, self.fraction_train, self.min_train_nodes, "sample-train", server_round, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the training metrics; there are no arrays to aggregate."""
        valid, _ = split_replies(sort_replies(replies, self._partition_of), "aggregate_train")
        if not valid:
            return None, None
        return None, weighted_metrics([m.content for m in valid], "num-examples")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Ask the sampled nodes to evaluate their own models."""
        return self._messages(grid, self.fraction_evaluate, self.min_evaluate_nodes, "sample-evaluate", server_round, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average evaluation metrics; ``personalized_accuracy`` is the unweighted client mean."""
        valid, _ = split_replies(sort_replies(replies, self._partition_of), "aggregate_evaluate")
        if not valid:
            return None
        contents = [m.content for m in valid]
        metrics = weighted_metrics(contents, "num-examples")
        metrics["personalized_accuracy"] = unweighted_mean(contents, "eval_accuracy")
        return metrics
