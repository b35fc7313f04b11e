"""Helpers shared by fedsim's strategies: seeded node sampling, reply order and metric means.

Flower's own strategies sample nodes with Python's global ``random``; fedsim's derive every
sample from ``(seed, purpose, round)`` so a run and its resumed copy pick the same nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsim.records import to_numpy
from fedsim.seeding import numpy_rng

__all__ = [
    "ordered_node_ids",
    "sample_node_ids",
    "sort_replies",
    "split_replies",
    "unweighted_mean",
]


def ordered_node_ids(grid: Grid) -> list[int]:
    """Return the grid's node ids in partition order when the grid provides it, else sorted.

    fedsim's grids expose ``node_ids_in_partition_order()``; any other Flower grid gives node ids
    without a stable order, so they are sorted to make sampling reproducible.
    """
    in_order = getattr(grid, "node_ids_in_partition_order", None)
    if callable(in_order):
        return list(in_order())
    return sorted(int(n) for n in grid.get_node_ids())


def sample_node_ids(
    node_ids: Sequence[int], count: int, seed: int, purpose: str, server_round: int
) -> list[int]:
    """Sample ``count`` of ``node_ids`` without replacement, keeping their order.

    The sample depends only on ``(seed, purpose, server_round)`` and the order of ``node_ids``.
    Raises ``ValueError`` when ``count`` exceeds the number of nodes.
    """
    if count > len(node_ids):
        raise ValueError(
            f"cannot sample {count} nodes from {len(node_ids)} connected nodes; "
            "lower the minimum number of nodes or the sampled fraction"
        )
    rng = numpy_rng(seed, purpose, server_round)
    positions = np.sort(rng.choice(len(node_ids), size=count, replace=False))
    return [int(node_ids[i]) for i in positions]


def sample_size(num_nodes: int, fraction: float, minimum: int) -> int:
    """Return how many of ``num_nodes`` to sample: ``fraction`` of them, at least ``minimum``."""
    if fraction <= 0.0:
        return 0
    return min(num_nodes, max(int(num_nodes * fraction), minimum, 1))


def sort_replies(replies: Iterable[Message], partition_of: Callable[[int], int] | None) -> list[Message]:
    """Sort replies by the partition id of their sender (node id without a mapping).

    Aggregating in a fixed order makes the floating-point sums independent of arrival order.
    """
    def key(message: Message) -> int:
        node_id = int(message.metadata.src_node_id)
        return partition_of(node_id) if partition_of is not None else node_id

    return sorted(replies, key=key)


def split_replies(replies: Iterable[Message], caller: str) -> tuple[list[Message], list[Message]]:
    """Split replies into valid ones and ones carrying an error, logging each error."""
    valid: list[Message] = []
    failed: list[Message] = []
    for message in replies:
        (failed if message.has_error() else valid).append(message)
    for message in failed:
        log(WARNING, "%s: node %d failed: %s", caller, message.metadata.src_node_id, message.error.reason)
    return valid, failed


def unweighted_mean(contents: Sequence[RecordDict], metric: str) -> float:
    """Return the plain mean of ``metric`` over the replies that report it (NaN if none)."""
    values = []
    for content in contents:
        for record in content.metric_records.values():
            if metric in record:
                values.append(float(record[metric]))  # type: ignore[arg-type]
    return float(np.mean(values)) if values else math.nan


def weighted_metrics(contents: Sequence[RecordDict], weight_key: str) -> MetricRecord:
    """Average every scalar metric over replies, weighted by ``weight_key``.

    Unlike Flower's ``aggregate_metricrecords`` this skips the weight key itself and ignores
    list-valued metrics; a metric missing from some replies is averaged over the others.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for content in contents:
        for record in content.metric_records.values():
            weight = float(record.get(weight_key, 0.0))  # type: ignore[arg-type]
            for key, value in record.items():
                if key == weight_key or isinstance(value, list):
                    continue
                sums[key] = sums.get(key, 0.0) + weight * float(value)
                weights[key] = weights.get(key, 0.0) + weight
    merged = MetricRecord({k: sums[k] / weights[k] for k in sums if weights[k] > 0})
    merged[weight_key] = sum(
        float(r.get(weight_key, 0.0)) for c in contents for r in c.metric_records.values()  # type: ignore[arg-type]
    )
    return merged


def nonfinite_reason(content: RecordDict) -> str | None:
    """Return why ``content`` contains a NaN or infinite array value or metric, or None if it does not."""
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            values = to_numpy(array)
            if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
                bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
                return f"array '{record_name}/{key}' has {bad} NaN or infinite values"
    for record_name, record in content.metric_records.items():
        for key, value in record.items():
            scalars = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in scalars):
                return f"metric '{record_name}/{key}' is {value}"
    return None
