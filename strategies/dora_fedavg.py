"""Federated averaging of DoRA adapters: only ``A``, ``B`` and ``m`` travel, the base stays frozen.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) adapts a frozen
linear weight ``W`` ``[d_out, d_in]`` as ``diag(m / ‖W + s·B·A‖_row)·(W + s·B·A)`` and trains
``A`` ``[r, d_in]``, ``B`` ``[d_out, r]`` and the magnitude ``m`` ``[d_out]``. The clients compute
the row norm from rank-sized factors (Zelenin and Zhuravlyova, "Scaling DoRA: High-Rank Adaptation
via Factored Norms and Fused Kernels", arXiv 2603.22276). The frozen base weights are the same on
every client, so a message carries ``r·(d_in + d_out) + d_out`` float32 numbers per adapted layer instead
of ``d_out·(d_in + 1)`` for the layer alone, and nothing for the rest of the model.

One round on Flower's Message API:

- ``configure_train`` sends the global adapters (array record ``"arrays"``, keys
  ``<module path>.lora_A.weight``, ``<module path>.lora_B.weight`` and
  ``<module path>.lora_magnitude_vector`` as in a PEFT adapter file) and the config record
  ``"config"`` with ``server-round``, ``dora-rank``, ``dora-alpha``, ``dora-base-hash`` (SHA-256
  of the frozen base weights) and ``dora-freeze-a`` to a seeded sample of the nodes.
- A client replies with its trained adapters under the same keys, the metric record
  ``"metrics"`` (``num-examples``, ``train_loss``) and the config record ``"dora"`` with the
  ``rank``, ``alpha`` and ``base-hash`` it trained with.
- ``aggregate_train`` rejects replies whose base hash, rank or alpha differ from the server's, or
  whose keys, shapes or dtypes differ from the global adapters, and averages each adapter tensor
  over the rest, weighted by ``num-examples``, in partition order, as a float64 running sum.

Averaging ``A`` and ``B`` separately is inexact: the product of the averages, mean(B)·mean(A), is
not the average of the clients' products B_k·A_k, and the row normalisation is nonlinear as well.
With ``freeze_a`` every ``A`` stays at its seeded initialisation (identical on every client), so
``B`` and ``m`` are the only trained and transmitted tensors, and the average of ``s·B_k·A`` is
exactly ``s·mean(B)·A``. The row norm and ``m`` are still averaged separately.

Each round's metrics add ``full_model_bytes_up``, ``full_model_bytes_down`` and
``full_model_bytes``: the payload bytes that full-model FedAvg would have sent for the same
messages (one full state dict per message that carries arrays, ``full_model_bytes_per_message``
each), to set beside the bytes actually sent. The train record counts the training exchange. The
evaluate record counts training and evaluation requests together, so where both records are merged
into one row (as fedsim's recorder does), the evaluate values are the round's totals.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from fedsim.strategies.common import split_replies, weighted_metrics
from fedsim.strategies.fedavg import FedAvg
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsim.records import array_record_from_numpy, to_numpy_dict

__all__ = [
    "ADAPTER_SUFFIXES",
    "DoRAFedAvg",
    "LORA_A_SUFFIX",
    "METADATA_KEY",
    "adapter_payload_bytes",
]

LORA_A_SUFFIX = "lora_A.weight"
ADAPTER_SUFFIXES = (LORA_A_SUFFIX, "lora_B.weight", "lora_magnitude_vector")
"""Key suffixes of the adapter tensors, as in a PEFT adapter file."""

METADATA_KEY = "dora"
"""Name of the config record in which a client reports the ``rank``, ``alpha`` and ``base-hash`` it used."""


def adapter_payload_bytes(record: ArrayRecord) -> int:
    """Return the payload bytes (``numel · itemsize``, summed) of the arrays in ``record``."""
    return sum(int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize for array in record.values())


class DoRAFedAvg(FedAvg):
    """Sample-weighted FedAvg over DoRA adapter tensors, with base-hash and rank checks.

    Parameters
    ----------
    rank : int
        LoRA rank ``r`` of every adapted layer; replies that report another rank are rejected.
    alpha : float
        LoRA alpha; replies that report another alpha are rejected.
    base_hash : str
        SHA-256 hex digest of the frozen base weights (``fedsim.dora.base_weights_hash``);
        replies that report another digest are rejected.
    freeze_a : bool (default: False)
        Keep every ``lora_A.weight`` at its initial value: it is never sent, trained or averaged,
        which makes the average of the low-rank products exact.
    full_model_bytes_per_message : int (default: 0)
        Payload bytes of one full-model message, for the ``full_model_bytes*`` metrics.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, seed
        As in :class:`fedsim.strategies.FedAvg`.

    Global arrays must contain every adapter tensor, ``lora_A.weight`` included, and nothing
    else: ``start`` raises ``ValueError`` for any other key.
    """

    def __init__(
        self,
        rank: int,
        alpha: float,
        base_hash: str,
        *,
        freeze_a: bool = False,
        full_model_bytes_per_message: int = 0,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if not base_hash:
            raise ValueError("base_hash must be the hex digest of the base weights, got an empty string")
        if full_model_bytes_per_message < 0:
            raise ValueError(f"full_model_bytes_per_message must be >= 0, got {full_model_bytes_per_message}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            seed=seed,
        )
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.base_hash = str(base_hash)
        self.freeze_a = bool(freeze_a)
        self.full_model_bytes_per_message = int(full_model_bytes_per_message)
        self._global: ArrayRecord | None = None
        self._full_down = 0
        self._full_up = 0

    def summary(self) -> None:
        """Log the strategy's settings."""
        super().summary()
        log(
            INFO,
            "DoRAFedAvg: rank %d, alpha %g, freeze_a %s, base weights %s...",
            self.rank, self.alpha, self.freeze_a, self.base_hash[:12],
        )

    # Outgoing messages.

    def _sent_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """Return the adapter tensors a message carries: all of them, or all but ``A`` with ``freeze_a``."""
        unexpected = [key for key in arrays if not key.endswith(ADAPTER_SUFFIXES)]
        if unexpected:
            raise ValueError(f"global arrays must hold only DoRA adapter tensors; unexpected keys: {unexpected[:5]}")
        if not self.freeze_a:
            return arrays
        return ArrayRecord({key: array for key, array in arrays.items() if not key.endswith(LORA_A_SUFFIX)})

    def _dora_config(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        record = ConfigRecord(dict(config))
        record["server-round"] = server_round
        record["dora-rank"] = self.rank
        record["dora-alpha"] = self.alpha
        record["dora-base-hash"] = self.base_hash
        record["dora-freeze-a"] = self.freeze_a
        return record

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapters (without ``A`` under ``freeze_a``) to a seeded sample of nodes."""
        self._global = arrays
        self._full_down = self._full_up = 0
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, "sample-train", server_round)
        record = RecordDict({
            self.arrayrecord_key: self._sent_arrays(arrays),
            self.configrecord_key: self._dora_config(config, server_round),
        })
        self._full_down += self.full_model_bytes_per_message * len(node_ids)
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapters (without ``A`` under ``freeze_a``) to a seeded sample of nodes."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "sample-evaluate", server_round)
        record = RecordDict({
            self.arrayrecord_key: self._sent_arrays(arrays),
            self.configrecord_key: self._dora_config(config, server_round),
        })
        self._full_down += self.full_model_bytes_per_message * len(node_ids)
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    # Replies.

    def rejection_reason(self, content: RecordDict, expected: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> str | None:
        """Return why a train reply cannot be averaged in, or None when it can.

        ``expected`` maps each key the reply must carry to its dtype and shape. The reply must
        report this strategy's rank, alpha and base hash in its ``"dora"`` config record.
        """
        metadata = content.config_records.get(METADATA_KEY)
        if metadata is None:
            return f"the reply has no '{METADATA_KEY}' config record with its rank, alpha and base hash"
        reported_hash = str(metadata.get("base-hash", ""))
        if reported_hash != self.base_hash:
            return (
                f"its base weights hash {reported_hash[:12] or '(missing)'}... differs from the server's "
                f"{self.base_hash[:12]}...: the client fine-tuned a different base model"
            )
        if "rank" not in metadata or int(metadata["rank"]) != self.rank:  # type: ignore[arg-type]
            return f"it reports rank {metadata.get('rank')!r}, the server expects rank {self.rank}"
        if "alpha" not in metadata or float(metadata["alpha"]) != self.alpha:  # type: ignore[arg-type]
            return f"it reports alpha {metadata.get('alpha')!r}, the server expects alpha {self.alpha:g}"

        if self.arrayrecord_key not in content.array_records:
            return f"the reply has no '{self.arrayrecord_key}' array record"
        record = content.array_records[self.arrayrecord_key]
        missing = sorted(set(expected) - set(record))
        unexpected = sorted(set(record) - set(expected))
        if missing or unexpected:
            return f"its adapter keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}"
        for key, array in record.items():
            dtype, shape = expected[key]
            if np.dtype(array.dtype) != dtype or tuple(array.shape) != shape:
                return f"adapter '{key}' has dtype {array.dtype} and shape {tuple(array.shape)}, expected {dtype} and {shape}"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the adapters of accepted replies, weighted by ``num-examples``, in partition order.

        Returns the new global adapters (``A`` copied unchanged under ``freeze_a``) and the
        example-weighted train metrics plus ``clients_rejected``, ``b_norm`` (Frobenius norm of all
        averaged ``B`` together) and the ``full_model_bytes*`` counts. Returns ``(None, metrics)``
        when no reply was accepted, so the global adapters stay as they were.
        """
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        expected = {key: (values.dtype, values.shape) for key, values in to_numpy_dict(self._sent_arrays(self._global)).items()}
        valid, failed = split_replies(self._finite_in_order(replies, "aggregate_train"), "aggregate_train")

        sums = {key: np.zeros(shape, dtype=np.float64) for key, (_, shape) in expected.items()}
        total = 0.0
        kept: list[RecordDict] = []
        rejected = 0
        for message in valid:
            content = message.content
            self._full_up += self.full_model_bytes_per_message
            reason = self.rejection_reason(content, expected)
            weight = self._reply_weight(content)
            if reason is None and (weight is None or weight <= 0):
                reason = f"its '{self.weighted_by_key}' metric is missing or not positive ({weight})"
            if reason is not None:
                rejected += 1
                partition = self._partition_of(int(message.metadata.src_node_id)) if self._partition_of else -1
                log(WARNING, "aggregate_train: rejected the reply of node %d (partition %d): %s", message.metadata.src_node_id, partition, reason)
                continue

            for key, values in to_numpy_dict(content.array_records[self.arrayrecord_key]).items():
                sums[key] += weight * values  # type: ignore[operator]
            total += weight  # type: ignore[operator]
            kept.append(content)
        log(INFO, "aggregate_train: averaged %d replies, rejected %d, %d failed", len(kept), rejected, len(failed))

        metrics = weighted_metrics(kept, self.weighted_by_key) if kept else MetricRecord()
        metrics["clients_rejected"] = rejected
        self._add_byte_metrics(metrics)
        if not kept:
            return None, metrics

        averaged = {key: (sums[key] / total).astype(dtype) for key, (dtype, _) in expected.items()}
        metrics["b_norm"] = float(np.sqrt(sum(float(np.sum(np.square(values, dtype=np.float64))) for key, values in averaged.items() if key.endswith("lora_B.weight"))))
        return self._with_frozen_a(averaged), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average evaluation metrics as FedAvg does and add the round's ``full_model_bytes*`` totals."""
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self._add_byte_metrics(metrics)
        return metrics

    # Helpers.

    def _reply_weight(self, content: RecordDict) -> float | None:
        for record in content.metric_records.values():
            if self.weighted_by_key in record:
                return float(record[self.weighted_by_key])  # type: ignore[arg-type]
        return None

    def _add_byte_metrics(self, metrics: MetricRecord) -> None:
        metrics["full_model_bytes_up"] = self._full_up
        metrics["full_model_bytes_down"] = self._full_down
        metrics["full_model_bytes"] = self._full_up + self._full_down

    def _with_frozen_a(self, averaged: dict[str, np.ndarray]) -> ArrayRecord:
        """Return the averaged tensors in the global key order, with ``A`` from the global arrays under ``freeze_a``."""
        assert self._global is not None
        if not self.freeze_a:
            return array_record_from_numpy({key: averaged[key] for key in self._global if key in averaged})
        merged = ArrayRecord()
        new_arrays = array_record_from_numpy(averaged)
        for key, array in self._global.items():
            merged[key] = array if key.endswith(LORA_A_SUFFIX) else new_arrays[key]
        return merged
