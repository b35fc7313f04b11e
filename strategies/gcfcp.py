"""GC-FCP: federated conformal calibration with group-conditional coverage, as a Flower strategy.

Wen, Simeone, Xing, "Efficient Federated Conformal Prediction with Group-Conditional
Guarantees", arXiv 2603.14198, UAI 2026. A predictor is calibrated once, federatedly, so that its
prediction sets cover the label with probability at least 1 − α within each of d prespecified,
possibly overlapping groups, under a π-mixture of the client distributions.

Round structure. Rounds 1..``training_rounds`` are fedsim's FedAvg (train, then evaluate). Every
later round is one calibration with a fresh calibration/test split on the clients (``repeats`` of
them give standard errors):

1. ``train.calibrate``: every node gets the global arrays and the group spec. It computes its
   calibration scores, groups them by atom (membership pattern) and replies with one summary per
   atom: at most ``compression`` equal-mass pseudo-points (value, count) in ``gcfcp`` mode, every
   score in ``gcfcp_exact`` mode, or the pooled scores for the two marginal baselines.
2. The server weights client k's points by λ_k = π_k / (n_k + 1), merges the summaries per atom
   and solves the group-conditional dual LP once per pattern the groups can produce. The result
   is a pattern → threshold table.
3. ``evaluate.conformal``: every node gets the table, builds prediction sets or intervals on its
   test split and replies with counts per group. The server combines the counts with the
   weights π_k exactly.

The calibration round's aggregate returns no arrays, so the global model stays the model and
fedsim's centralized evaluation and checkpoints keep working. Flower's own ``Strategy.start``
runs all rounds, so ``evaluate_fn`` is called once per round as usual.

Weights. Clients summarise counts (weight 1 per score) and report n_k, and the server scales them by
λ_k. The equal-mass compression depends only on the weights' proportions, so this is the
client-side weighting of the paper, and it lets π depend on every client's n_k
(``pi="proportional"``) in a single round. Only clients whose reply is valid enter π.

Wire format of the calibration reply (array record ``summary``, float arrays in
``transport_dtype``):

- ``patterns``: uint8 (A, ⌈d/8⌉), the atoms' patterns packed little-endian (``pattern_key``'s bytes);
- ``atom/<i>/value`` (c_i,) and, for summaries, ``atom/<i>/weight`` (c_i,) counts, for atom row i;
- ``scores`` (n_k,) instead of both for the marginal baselines.

Payload per client is therefore A·⌈d/8⌉ + Σ_i 2·c_i·itemsize bytes for a summary, and
A·⌈d/8⌉ + n_k·itemsize for raw scores per atom. Counts, n_k and per-atom rank errors travel in the
metric record ``calibration``.

The threshold table travels in array record ``table``: ``patterns`` uint8 (P, d), ``tau``
float64 (P,) and ``tau_infinite`` uint8 (P,). An infinite threshold is sent as ``tau = 0`` with
``tau_infinite = 1``, so no array carries a non-finite value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from fedsim.strategies.common import nonfinite_reason, ordered_node_ids, sort_replies, split_replies
from fedsim.strategies.fedavg import FedAvg
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from fedsim.conformal import (
    ClientSummary,
    QuantileSketch,
    ThresholdTable,
    atoms,
    calibrate_from_sketches,
    interval_patterns,
    label_window_map,
    merge_summaries,
    mixture_proportions,
    pattern_key,
    split_conformal_threshold,
    weighted_quantile_threshold,
)
from fedsim.records import array_record_from_numpy, to_numpy_dict

__all__ = [
    "CALIBRATE_MESSAGE",
    "CALIBRATION_MODES",
    "EVALUATE_MESSAGE",
    "GCFCP",
    "SCORES",
    "GroupSpec",
    "table_from_record",
    "table_to_record",
]

CALIBRATE_MESSAGE = "train.calibrate"
"""Message type of the calibration request. Its category is ``train``, so fedsim counts its failures and injects its faults."""

EVALUATE_MESSAGE = "evaluate.conformal"
"""Message type of the request to evaluate the calibrated sets on the test split."""

CALIBRATION_MODES = ("gcfcp", "gcfcp_exact", "federated_cp", "centralized_cp")
SCORES = ("thr", "aps", "raps", "residual")
PI_RULES = ("uniform", "proportional")
TRANSPORT_DTYPES = ("float32", "float64")

_UPLOAD_OF_MODE = {"gcfcp": "sketch", "gcfcp_exact": "atoms", "federated_cp": "pooled", "centralized_cp": "pooled"}


@dataclass(frozen=True)
class GroupSpec:
    """The d groups, fixed before calibration.

    ``kind`` is "intervals" or "label_windows". Interval groups are half-open intervals
    [low, high) of one input feature, and ``feature`` indexes the flattened input. With label
    windows, x is in group j when its predicted label is in ``windows[j]``, which needs
    ``num_classes``.
    """

    kind: str
    intervals: tuple[tuple[float, float], ...] = ()
    windows: tuple[tuple[int, ...], ...] = ()
    feature: int = 0
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.kind == "intervals":
            if not self.intervals:
                raise ValueError("interval groups need at least one (low, high) interval")
            interval_patterns(self.intervals)  # validates low < high
        elif self.kind == "label_windows":
            if not self.windows:
                raise ValueError("label-window groups need at least one window of labels")
            label_window_map(self.num_classes, self.windows)  # validates the labels
        else:
            raise ValueError(f"unknown group kind {self.kind!r}; expected 'intervals' or 'label_windows'")

    @property
    def num_groups(self) -> int:
        """Number of groups d."""
        return len(self.intervals) if self.kind == "intervals" else len(self.windows)

    def patterns(self) -> np.ndarray:
        """Return every membership pattern an input can have, uint8 (P, d)."""
        if self.kind == "intervals":
            return interval_patterns(self.intervals)
        return atoms(label_window_map(self.num_classes, self.windows))[0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return the arrays clients need to compute memberships.

        ``intervals``: float64 (d, 2) with ``feature``: int64 (1,), or ``label_map``: uint8
        (num_classes, d) as built by ``label_window_map``.
        """
        if self.kind == "intervals":
            return {"intervals": np.asarray(self.intervals, dtype=np.float64),
                    "feature": np.array([self.feature], dtype=np.int64)}
        return {"label_map": label_window_map(self.num_classes, self.windows)}


def table_to_record(table: ThresholdTable) -> ArrayRecord:
    """Encode a threshold table for transport, sending +inf as ``tau = 0`` with ``tau_infinite = 1``."""
    infinite = np.isinf(table.thresholds)
    return array_record_from_numpy({
        "patterns": table.patterns,
        "tau": np.where(infinite, 0.0, table.thresholds).astype(np.float64),
        "tau_infinite": infinite.astype(np.uint8),
    })


def table_from_record(record: ArrayRecord) -> ThresholdTable:
    """Decode the output of ``table_to_record``. Raises ``KeyError`` when an array is missing."""
    arrays = to_numpy_dict(record)
    missing = {"patterns", "tau", "tau_infinite"} - set(arrays)
    if missing:
        raise KeyError(f"threshold table record lacks {sorted(missing)}")
    thresholds = np.where(arrays["tau_infinite"].astype(bool), np.inf, arrays["tau"].astype(np.float64))
    return ThresholdTable(np.asarray(arrays["patterns"]), thresholds)


def _pattern_id(pattern: np.ndarray) -> int:
    """Return Σ_j 2^j·pattern_j, the integer that names a pattern in the metric rows."""
    return int(sum(int(bit) << group for group, bit in enumerate(pattern)))


@dataclass(frozen=True)
class _ClientUpload:
    """One valid calibration reply, decoded."""

    partition_id: int
    num_points: int
    patterns: np.ndarray  # uint8 (A, d)
    values: list[np.ndarray]  # per atom, float64
    counts: list[np.ndarray]  # per atom, float64 (ones for raw scores)
    rank_errors: list[float]  # per atom, in count units
    payload_bytes: int


class InvalidReplyError(ValueError):
    """A calibration or evaluation reply does not follow the wire format."""


class GCFCP(FedAvg):
    """FedAvg training, then GC-FCP calibration rounds.

    Parameters
    ----------
    groups : GroupSpec
        The d groups whose conditional coverage is targeted.
    alpha : float
        Miscoverage level in (0, 1). The target coverage is 1 − α in every group.
    training_rounds : int (default: 0)
        FedAvg rounds before the first calibration round. Every later round calibrates.
    score : str (default: "residual")
        "residual" (|y − f(x)|, regression) or "thr", "aps", "raps" (softmax classifiers).
    calibration : str (default: "gcfcp")
        "gcfcp" (per-atom summaries), "gcfcp_exact" (every score per atom), "federated_cp"
        (one group, weights λ_k) or "centralized_cp" (split CP on the pooled scores, π ignored).
    compression : int (default: 50)
        Maximum pseudo-points per atom in each client summary ("gcfcp" only).
    recompress : bool (default: True)
        Re-compress every merged atom to ``compression`` pseudo-points at the server.
    pi : str (default: "uniform")
        Mixture weights of the test distribution: "uniform" (1/K) or "proportional" (∝ n_k + 1).
    conservative : bool (default: False)
        Run the LP at α − ε, ε the largest certified relative rank error of a merged summary.
    unreachable, on_solver_failure, solver : str
        Passed to ``fedsim.conformal.gcc_threshold`` ("inf" | "bracket_end", "upper" | "raise",
        "active-set" | "full").
    transport_dtype : str (default: "float32")
        Float type of the uploaded scores and counts.

    The thresholds use the deterministic rule of the reference code. NOTE: the randomised
    GCC rule, which gives exact rather than conservative coverage, is not implemented.
    raps_lambda, raps_k : float, int
        RAPS regularisation λ_reg and k_reg.
    fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, seed
        As in fedsim's FedAvg, for the training rounds. Calibration rounds use every node.
    """

    def __init__(
        self,
        groups: GroupSpec,
        alpha: float,
        *,
        training_rounds: int = 0,
        score: str = "residual",
        calibration: str = "gcfcp",
        compression: int = 50,
        recompress: bool = True,
        pi: str = "uniform",
        conservative: bool = False,
        unreachable: str = "inf",
        on_solver_failure: str = "upper",
        solver: str = "active-set",
        transport_dtype: str = "float32",
        raps_lambda: float = 0.01,
        raps_k: int = 5,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            seed=seed,
        )
        for name, value, allowed in (
            ("score", score, SCORES),
            ("calibration", calibration, CALIBRATION_MODES),
            ("pi", pi, PI_RULES),
            ("transport_dtype", transport_dtype, TRANSPORT_DTYPES),
            ("unreachable", unreachable, ("inf", "bracket_end")),
            ("on_solver_failure", on_solver_failure, ("upper", "raise")),
            ("solver", solver, ("active-set", "full")),
        ):
            if value not in allowed:
                raise ValueError(f"invalid {name} {value!r}; expected one of {', '.join(allowed)}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        if int(compression) != compression or compression < 1:
            raise ValueError(f"compression must be a positive integer, got {compression}")
        if training_rounds < 0:
            raise ValueError(f"training_rounds must be >= 0, got {training_rounds}")
        if score == "residual" and groups.kind == "label_windows":
            raise ValueError("label-window groups need a classifier; score 'residual' is for regression")

        self.groups = groups
        self.alpha = float(alpha)
        self.training_rounds = int(training_rounds)
        self.score = score
        self.calibration = calibration
        self.compression = int(compression)
        self.recompress = bool(recompress)
        self.pi = pi
        self.conservative = bool(conservative)
        self.threshold_options = {"unreachable": unreachable, "on_solver_failure": on_solver_failure, "solver": solver}
        self.transport_dtype = transport_dtype
        self.raps_lambda = float(raps_lambda)
        self.raps_k = int(raps_k)

        self.table_patterns = groups.patterns()
        self._group_record = array_record_from_numpy(groups.to_arrays())
        self.tables: dict[int, ThresholdTable] = {}
        """Threshold table of every calibration round, by round."""
        self._mixture: dict[int, float] = {}

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> GC-FCP: %s, %d groups (%s), alpha %g, score %s, pi %s",
            self.calibration, self.groups.num_groups, self.groups.kind, self.alpha, self.score, self.pi)
        log(INFO, "\t└──> %d FedAvg rounds first; summaries of at most %d points per atom (%s)",
            self.training_rounds, self.compression, self.transport_dtype)

    def is_calibration_round(self, server_round: int) -> bool:
        """Return whether ``server_round`` (counted from 1) calibrates instead of training."""
        return server_round > self.training_rounds

    def _common_config(self, server_round: int) -> dict[str, Any]:
        return {
            "server-round": server_round,
            "repeat": server_round - self.training_rounds - 1,
            "score": self.score,
            "raps-lambda": self.raps_lambda,
            "raps-k": self.raps_k,
        }

    def _all_nodes(self, grid: Grid, message_type: str, content: dict[str, Any]) -> list[Message]:
        self._partition_of = getattr(grid, "partition_of", None)
        node_ids = ordered_node_ids(grid)
        log(INFO, "%s: sending to all %d nodes", message_type, len(node_ids))
        return [Message(content=RecordDict(dict(content)), message_type=message_type, dst_node_id=node_id)
                for node_id in node_ids]

    # Calibration.
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure a FedAvg round, or in a calibration round ask every node for its summaries."""
        if not self.is_calibration_round(server_round):
            return super().configure_train(server_round, arrays, config, grid)

        settings = self._common_config(server_round)
        settings.update({
            "upload": _UPLOAD_OF_MODE[self.calibration],
            "compression": self.compression,
            "transport-dtype": self.transport_dtype,
        })
        content = {"arrays": arrays, "groups": self._group_record, "config": ConfigRecord(settings)}
        return self._all_nodes(grid, CALIBRATE_MESSAGE, content)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average a FedAvg round, or merge the summaries and solve one LP per pattern.

        A calibration round returns no arrays (the model is unchanged) and the calibration
        metrics. Its threshold table is stored in ``tables[server_round]``.
        """
        if not self.is_calibration_round(server_round):
            return super().aggregate_train(server_round, replies)

        uploads = self._decode_uploads(replies)
        if not uploads:
            log(WARNING, "aggregate_train: no valid calibration reply in round %d; every threshold is +inf", server_round)
            self.tables[server_round] = ThresholdTable(self.table_patterns, np.full(len(self.table_patterns), np.inf))
            return None, MetricRecord({"calibration_clients": 0})

        sizes = np.array([upload.num_points for upload in uploads], dtype=np.float64)
        proportions = mixture_proportions(sizes, self.pi)
        point_weights = proportions / (sizes + 1.0)
        w_test = float(point_weights.sum())
        self._mixture = {upload.partition_id: float(p) for upload, p in zip(uploads, proportions, strict=True)}

        started = time.perf_counter()
        table, details = self._calibrate(uploads, point_weights, w_test)
        elapsed = time.perf_counter() - started
        self.tables[server_round] = table

        metrics = self._calibration_metrics(uploads, table, details, w_test, elapsed)
        log(INFO, "aggregate_train: calibrated %d patterns from %d clients in %.3f s",
            len(table.thresholds), len(uploads), elapsed)
        return None, metrics

    def _decode_uploads(self, replies: Iterable[Message]) -> list[_ClientUpload]:
        valid, _ = split_replies(sort_replies(replies, self._partition_of), "aggregate_train")
        uploads = []
        for message in valid:
            node_id = int(message.metadata.src_node_id)
            try:
                uploads.append(self._decode_upload(message, node_id))
            except (InvalidReplyError, KeyError, ValueError) as error:
                log(WARNING, "aggregate_train: rejected the calibration reply of node %d: %s", node_id, error)
        return uploads

    def _decode_upload(self, message: Message, node_id: int) -> _ClientUpload:
        content = message.content
        reason = nonfinite_reason(content)
        if reason is not None:
            raise InvalidReplyError(reason)
        if "summary" not in content.array_records or "calibration" not in content.metric_records:
            raise InvalidReplyError("missing array record 'summary' or metric record 'calibration'")
        metrics = content.metric_records["calibration"]
        arrays = to_numpy_dict(content.array_records["summary"])
        num_points = int(metrics["num-examples"])  # type: ignore[arg-type]
        num_groups = self.groups.num_groups
        payload = sum(int(values.nbytes) for values in arrays.values())
        partition = self._partition_of(node_id) if self._partition_of is not None else node_id

        upload = _UPLOAD_OF_MODE[self.calibration]
        if upload == "pooled":
            scores = np.asarray(arrays["scores"], dtype=np.float64).reshape(-1)
            if scores.size != num_points:
                raise InvalidReplyError(f"'scores' has {scores.size} entries but num-examples is {num_points}")
            return _ClientUpload(partition, num_points, np.zeros((0, num_groups), np.uint8), [scores],
                                 [np.ones(scores.size)], [0.0], payload)

        packed = np.asarray(arrays["patterns"], dtype=np.uint8)
        if packed.ndim != 2 or packed.shape[1] != (num_groups + 7) // 8:
            raise InvalidReplyError(f"'patterns' has shape {packed.shape}, expected (A, {(num_groups + 7) // 8}) for {num_groups} groups")
        bits = np.unpackbits(packed, axis=1, bitorder="little")
        if np.any(bits[:, num_groups:]):
            raise InvalidReplyError(f"'patterns' sets bits beyond group {num_groups}")
        patterns = bits[:, :num_groups].astype(np.uint8)
        if np.unique(patterns, axis=0).shape[0] != patterns.shape[0]:
            raise InvalidReplyError("'patterns' repeats an atom")

        rank_errors = [float(v) for v in metrics.get("rank-error", [])] if upload == "sketch" else []  # type: ignore[union-attr]
        values, counts = [], []
        for index in range(patterns.shape[0]):
            atom_values = np.asarray(arrays[f"atom/{index}/value"], dtype=np.float64).reshape(-1)
            if upload == "sketch":
                atom_counts = np.asarray(arrays[f"atom/{index}/weight"], dtype=np.float64).reshape(-1)
                if atom_counts.shape != atom_values.shape or np.any(atom_counts <= 0):
                    raise InvalidReplyError(f"atom {index}: weights must be positive, one per value")
            else:
                atom_counts = np.ones(atom_values.size)
            values.append(atom_values)
            counts.append(atom_counts)
        if upload == "sketch" and len(rank_errors) != patterns.shape[0]:
            raise InvalidReplyError(f"'rank-error' has {len(rank_errors)} entries for {patterns.shape[0]} atoms")
        total = sum(float(c.sum()) for c in counts)
        if not math.isclose(total, num_points, rel_tol=1e-6, abs_tol=1e-6):
            raise InvalidReplyError(f"the atom weights sum to {total}, but num-examples is {num_points}")
        return _ClientUpload(partition, num_points, patterns, values, counts,
                             rank_errors or [0.0] * patterns.shape[0], payload)

    def _calibrate(
        self, uploads: Sequence[_ClientUpload], point_weights: np.ndarray, w_test: float
    ) -> tuple[ThresholdTable, dict[str, float]]:
        patterns = self.table_patterns
        if self.calibration in ("federated_cp", "centralized_cp"):
            scores = np.concatenate([upload.values[0] for upload in uploads])
            if self.calibration == "centralized_cp":
                threshold = split_conformal_threshold(scores, self.alpha)
            else:
                weights = np.concatenate([np.full(upload.num_points, weight)
                                          for upload, weight in zip(uploads, point_weights, strict=True)])
                threshold = weighted_quantile_threshold(scores, weights, w_test, self.alpha)
            table = ThresholdTable(patterns, np.full(patterns.shape[0], threshold))
            return table, {"pseudo_points": float(scores.size), "max_rank_error": 0.0}

        summaries = []
        for upload, weight in zip(uploads, point_weights, strict=True):
            sketches = {
                pattern_key(pattern): QuantileSketch(values, counts * weight, rank_error * weight)
                for pattern, values, counts, rank_error in zip(
                    upload.patterns, upload.values, upload.counts, upload.rank_errors, strict=True)
            }
            summaries.append(ClientSummary(sketches, self.groups.num_groups, float(weight), upload.num_points))

        server_compression = self.compression if (self.calibration == "gcfcp" and self.recompress) else None
        merged = merge_summaries(summaries, server_compression)
        table = calibrate_from_sketches(
            merged, self.groups.num_groups, w_test, self.alpha, patterns,
            conservative=self.conservative, **self.threshold_options,
        )
        details = {
            "pseudo_points": float(sum(sketch.size for sketch in merged.values())),
            "max_rank_error": max((sketch.relative_rank_error() for sketch in merged.values()), default=0.0),
        }
        return table, details

    def _calibration_metrics(
        self,
        uploads: Sequence[_ClientUpload],
        table: ThresholdTable,
        details: dict[str, float],
        w_test: float,
        elapsed: float,
    ) -> MetricRecord:
        itemsize = np.dtype(self.transport_dtype).itemsize
        pattern_bytes = (self.groups.num_groups + 7) // 8
        summary_bytes = sum(upload.payload_bytes for upload in uploads)
        # Raw scores grouped by atom, as the exact mode sends them: one float per score plus the
        # atom patterns. The marginal baselines report their own pooled upload the same way.
        raw_bytes = sum(upload.num_points * itemsize + upload.patterns.shape[0] * pattern_bytes for upload in uploads)
        atom_keys = {pattern_key(pattern) for upload in uploads for pattern in upload.patterns}
        return MetricRecord({
            "num-examples": sum(upload.num_points for upload in uploads),
            "calibration_clients": len(uploads),
            "atoms": len(atom_keys),
            "uplink_summary_bytes": summary_bytes,
            "raw_score_bytes": raw_bytes,
            "summary_to_raw_ratio": summary_bytes / raw_bytes if raw_bytes else 0.0,
            "pseudo_points": details["pseudo_points"],
            "max_rank_error": details["max_rank_error"],
            "w_test": w_test,
            "infinite_thresholds": int(np.isinf(table.thresholds).sum()),
            "threshold_patterns": [_pattern_id(pattern) for pattern in table.patterns],
            "thresholds": [float(value) for value in table.thresholds],
            # NOTE: wall time, so it differs between otherwise identical runs like wall_s and
            # round_s, but fedsim.results.TIMING_COLUMNS does not list it.
            "calibration_s": elapsed,
        })

    # Evaluation of the calibrated sets.
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure FedAvg's evaluation, or send the threshold table to every node."""
        if not self.is_calibration_round(server_round):
            return super().configure_evaluate(server_round, arrays, config, grid)
        table = self.tables.get(server_round)
        if table is None:
            log(WARNING, "configure_evaluate: round %d has no threshold table, so its sets are not evaluated", server_round)
            return []
        content = {
            "arrays": arrays,
            "groups": self._group_record,
            "table": table_to_record(table),
            "config": ConfigRecord(self._common_config(server_round)),
        }
        return self._all_nodes(grid, EVALUATE_MESSAGE, content)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average FedAvg's evaluation, or combine the clients' coverage counts with weights π_k.

        Group g's coverage is Σ_k π_k hit_{k,g}/m_k / Σ_k π_k mem_{k,g}/m_k, with m_k test points
        on client k, so each client's test set stands for its distribution P_k. Sizes are
        averaged the same way over bounded sets only; ``unbounded_fraction`` counts the others.
        A group without test points gets no coverage column.
        """
        if not self.is_calibration_round(server_round):
            return super().aggregate_evaluate(server_round, replies)

        valid, _ = split_replies(sort_replies(replies, self._partition_of), "aggregate_evaluate")
        num_groups = self.groups.num_groups
        totals = {name: 0.0 for name in ("weight", "covered", "size", "bounded", "unbounded", "examples")}
        group_totals = {name: np.zeros(num_groups) for name in ("count", "covered", "size", "bounded")}
        evaluated = 0
        for message in valid:
            node_id = int(message.metadata.src_node_id)
            partition = self._partition_of(node_id) if self._partition_of is not None else node_id
            try:
                counts = _evaluation_counts(message.content, num_groups)
            except (InvalidReplyError, KeyError, ValueError) as error:
                log(WARNING, "aggregate_evaluate: rejected the reply of node %d: %s", node_id, error)
                continue
            if partition not in self._mixture or counts["examples"] == 0:
                continue
            weight = self._mixture[partition] / counts["examples"]
            evaluated += 1
            totals["weight"] += self._mixture[partition]
            totals["examples"] += counts["examples"]
            for name in ("covered", "size", "unbounded"):
                totals[name] += weight * counts[name]
            totals["bounded"] += weight * (counts["examples"] - counts["unbounded"])
            for name in ("count", "covered", "size"):
                group_totals[name] += weight * counts[f"group_{name}"]
            group_totals["bounded"] += weight * (counts["group_count"] - counts["group_unbounded"])

        if evaluated == 0:
            log(WARNING, "aggregate_evaluate: no client evaluated the calibrated sets in round %d", server_round)
            return None
        return self._coverage_metrics(totals, group_totals, evaluated)

    def _coverage_metrics(
        self, totals: dict[str, float], group_totals: dict[str, np.ndarray], evaluated: int
    ) -> MetricRecord:
        target = 1.0 - self.alpha
        metrics: dict[str, Any] = {
            "num-examples": int(totals["examples"]),
            "evaluated_clients": evaluated,
            "target_coverage": target,
            "coverage": totals["covered"] / totals["weight"],
            "unbounded_fraction": totals["unbounded"] / totals["weight"],
        }
        if totals["bounded"] > 0:
            metrics["mean_size"] = totals["size"] / totals["bounded"]

        group_coverage = []
        for group in range(self.groups.num_groups):
            if group_totals["count"][group] <= 0:
                continue
            coverage = float(group_totals["covered"][group] / group_totals["count"][group])
            group_coverage.append(coverage)
            metrics[f"coverage_g{group + 1}"] = coverage
            if group_totals["bounded"][group] > 0:
                metrics[f"size_g{group + 1}"] = float(group_totals["size"][group] / group_totals["bounded"][group])
        if group_coverage:
            metrics["worst_group_coverage"] = min(group_coverage)
            metrics["max_coverage_gap"] = max(abs(value - target) for value in group_coverage)
        return MetricRecord(metrics)


def _evaluation_counts(content: RecordDict, num_groups: int) -> dict[str, Any]:
    """Read one client's coverage counts from its ``coverage`` metric record."""
    if "coverage" not in content.metric_records:
        raise InvalidReplyError("missing metric record 'coverage'")
    record = content.metric_records["coverage"]
    counts: dict[str, Any] = {
        "examples": int(record["num-examples"]),  # type: ignore[arg-type]
        "covered": float(record["covered"]),  # type: ignore[arg-type]
        "size": float(record["size-sum"]),  # type: ignore[arg-type]
        "unbounded": float(record["unbounded"]),  # type: ignore[arg-type]
    }
    for name, key in (("count", "group-count"), ("covered", "group-covered"), ("size", "group-size-sum"),
                      ("unbounded", "group-unbounded")):
        values = np.asarray(record[key], dtype=np.float64)
        if values.shape != (num_groups,):
            raise InvalidReplyError(f"'{key}' has {values.size} entries, expected {num_groups}")
        if not np.isfinite(values).all():
            raise InvalidReplyError(f"'{key}' has non-finite values")
        counts[f"group_{name}"] = values
    return counts
