"""Partitioning a data set across clients, and each client's train and test split.

The partitioners are Flower Datasets' (``flwr-datasets``) over an in-memory
``datasets.Dataset`` holding the example index and the label: ``iid`` (``IidPartitioner`` over a
seeded shuffle), ``dirichlet`` (``DirichletPartitioner``: per-class Dirichlet(alpha) label skew
with a minimum partition size) and ``shards`` (``PathologicalPartitioner``: a fixed number of
classes per client). Each partition is then split into a client train and test split.

Partitions are computed from the data settings alone, so every process (a Ray worker, the driver
for centralized evaluation) builds the same ones; :func:`client_data` caches them per process.
"""

from __future__ import annotations

import json
import logging
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.datasets import DataArrays, load_dataset
from fedsim.seeding import derive_seed, numpy_rng

__all__ = ["ClientData", "PartitionError", "client_data", "partition_indices", "pooled_test_data"]

logger = logging.getLogger(__name__)


class PartitionError(ValueError):
    """The data cannot be split as configured; the message names the setting to change."""


@dataclass(frozen=True)
class ClientData:
    """One client's train and test split, plus the data set's shape and class count."""

    partition_id: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"


def _in_memory_dataset(labels: np.ndarray) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"index": np.arange(len(labels)), "label": labels})


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: dict[str, Any],
    seed: int,
) -> list[np.ndarray]:
    """Split example indices ``0..len(labels)-1`` into ``num_partitions`` partitions.

    ``partitioner`` holds ``name`` (``iid``, ``dirichlet``, ``shards``) and its options
    (``alpha``, ``min_partition_size``, ``classes_per_client``). Labels must be class ids for
    ``dirichlet`` and ``shards``. Returns one sorted int64 index array per partition.
    Raises :class:`PartitionError` when the split is impossible (too few examples, a Dirichlet
    split that misses the minimum size after Flower Datasets' 10 retries, more classes per
    client than classes).
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    name = partitioner["name"]
    if len(labels) < num_partitions:
        raise PartitionError(
            f"{len(labels)} examples cannot fill {num_partitions} partitions; "
            "lower data.num_clients or raise data.max_samples"
        )

    # IidPartitioner cuts contiguous shards, so the order is shuffled first with the run's seed.
    order = numpy_rng(seed, "partition-order").permutation(len(labels))
    shuffled_labels = labels[order]
    partition_seed = derive_seed(seed, "partition") % (2**32)

    if name == "iid":
        flwr_partitioner: Any = IidPartitioner(num_partitions)
    elif name == "dirichlet":
        flwr_partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(partitioner["alpha"]),
            min_partition_size=int(partitioner["min_partition_size"]),
            self_balancing=False,
            shuffle=True,
            seed=partition_seed,
        )
    elif name == "shards":
        num_classes = len(np.unique(labels))
        per_client = int(partitioner["classes_per_client"])
        if per_client > num_classes:
            raise PartitionError(
                f"data.partitioner.classes_per_client is {per_client} but the data set has only "
                f"{num_classes} classes; set it to at most {num_classes}"
            )
        flwr_partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=per_client,
            class_assignment_mode="random",
            shuffle=True,
            seed=partition_seed,
        )
    else:
        raise PartitionError(f"unknown partitioner {name!r}; available: iid, dirichlet, shards")

    flwr_partitioner.dataset = _in_memory_dataset(shuffled_labels)
    parts = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for partition_id in range(num_partitions):
                local = np.asarray(flwr_partitioner.load_partition(partition_id)["index"], dtype=np.int64)
                parts.append(np.sort(order[local]))
    except ValueError as error:
        raise PartitionError(
            f"partitioner {name!r} failed for {num_partitions} clients over {len(labels)} examples: "
            f"{error} Raise data.partitioner.alpha, lower data.partitioner.min_partition_size "
            "or lower data.num_clients"
        ) from error
    return parts


def _split_train_test(
    indices: np.ndarray, test_fraction: float, seed: int, partition_id: int
) -> tuple[np.ndarray, np.ndarray]:
    shuffled = numpy_rng(seed, "train-test-split", partition_id).permutation(indices)
    if len(shuffled) < 2:
        return shuffled, shuffled[:0]
    num_test = min(max(1, round(test_fraction * len(shuffled))), len(shuffled) - 1)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])


def _data_key(data_spec: dict[str, Any], seed: int) -> str:
    return json.dumps({"data": data_spec, "seed": seed}, sort_keys=True)


_CACHE: dict[str, tuple[DataArrays, list[np.ndarray]]] = {}
_CACHE_LOCK = threading.Lock()


def _load_partitioned(data_spec: dict[str, Any], seed: int) -> tuple[DataArrays, list[np.ndarray]]:
    key = _data_key(data_spec, seed)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        data = load_dataset(data_spec["dataset"], data_spec.get("root"), seed, data_spec.get("synthetic"))
        max_samples = data_spec.get("max_samples")
        if max_samples is not None and max_samples < len(data):
            keep = np.sort(numpy_rng(seed, "subsample").choice(len(data), int(max_samples), replace=False))
            data = DataArrays(data.features[keep], data.labels[keep], data.input_shape, data.num_classes, data.task)
        labels = data.labels
        partitioner = dict(data_spec["partitioner"])
        if data.task == "regression" and partitioner["name"] != "iid":
            raise PartitionError(
                f"partitioner {partitioner['name']!r} splits by class label, but data set "
                f"{data_spec['dataset']!r} is a regression task; use data.partitioner.name=iid"
            )
        parts = partition_indices(labels, int(data_spec["num_clients"]), partitioner, seed)
        sizes = [len(p) for p in parts]
        logger.debug("partitioned %d examples into %d clients (min %d, max %d)", len(labels), len(parts), min(sizes), max(sizes))
        _CACHE.clear()  # one run per process at a time: keep memory flat across runs
        _CACHE[key] = (data, parts)
        return data, parts


def client_data(data_spec: dict[str, Any], seed: int, partition_id: int) -> ClientData:
    """Return client ``partition_id``'s train and test split, built once per process.

    ``data_spec`` is the ``data`` section of the run config as a plain dict.
    """
    data, parts = _load_partitioned(data_spec, seed)
    if not 0 <= partition_id < len(parts):
        raise PartitionError(f"partition id {partition_id} is out of range for {len(parts)} clients")
    train, test = _split_train_test(parts[partition_id], float(data_spec["test_fraction"]), seed, partition_id)
    return ClientData(
        partition_id,
        data.features[train],
        data.labels[train],
        data.features[test],
        data.labels[test],
        data.input_shape,
        data.num_classes,
        data.task,
    )


def pooled_test_data(data_spec: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the union of all clients' test splits, in partition order (centralized evaluation)."""
    data, parts = _load_partitioned(data_spec, seed)
    tests = [
        _split_train_test(indices, float(data_spec["test_fraction"]), seed, pid)[1]
        for pid, indices in enumerate(parts)
    ]
    union = np.concatenate(tests) if tests else np.zeros(0, dtype=np.int64)
    return data.features[union], data.labels[union]


def dataset_info(data_spec: dict[str, Any], seed: int) -> tuple[tuple[int, ...], int, str]:
    """Return ``(input_shape, num_classes, task)`` of the configured data set."""
    data, _ = _load_partitioned(data_spec, seed)
    return data.input_shape, data.num_classes, data.task
