"""SpaFL server strategy: average per-unit pruning thresholds, never weights.

SpaFL (Kim, Saad, Debbah and Hong, "SpaFL: Communication-Efficient Federated Learning with
Sparse Models and Low Computational Overhead", NeurIPS 2024, arXiv 2406.00431) gives every output
unit of a masked layer one trainable threshold. Clients keep their own weights and upload only
their thresholds; the server averages them, τ(t+1) = mean_k τ_k, and the clients turn the change
Δτ(t) = τ(t+1) − τ(t) into a weight step that shrinks the units the federation found unimportant.

One round on Flower's Message API (``t = server_round − 1``):

- ``configure_train`` sends the global thresholds (array record ``"tau"``, one float32 array of
  shape (C_out,) per masked layer, keyed by module name) and the round's settings (config record
  ``"config"``) to a seeded sample of the nodes. How Δτ reaches the clients depends on
  ``th_update``:

  - ``lazy`` (default): nothing extra is sent. A sampled client applies τ(t) − τ_seen, the change
    accumulated since it last received thresholds, before training.
  - ``eager_all``: Δτ(t−1) (array record ``"dtau"``) goes to every node, including those not
    sampled, which only apply it and acknowledge. This is the official CIFAR-10 code's timing,
    except that the code applies Δτ(t−1) at the end of round t−1 and here it arrives at the start
    of round t. So here the evaluation of round t−1 uses the weights before Δτ(t−1).
  - ``fmnist_code``: Δτ(t−1) goes to the sampled nodes only, so a client misses the changes of
    rounds it was not sampled in (the official FMNIST code).
  - ``off``: no weight step at all.

- ``aggregate_train`` checks the replies (same keys and shapes as the global thresholds, float32,
  finite), averages them in partition order (unweighted by default, or weighted by each client's
  number of training examples), and stores Δτ(t).
- ``configure_evaluate`` sends evaluation requests every ``eval_every`` rounds and in the last
  round, to all nodes by default. Each node tests its own sparse model on its own test split.
- ``aggregate_evaluate`` reports ``personalized_accuracy``, the unweighted mean over clients of
  each client's test accuracy, with its standard deviation and minimum.

Arrays in messages are always the thresholds (``"tau"``) or their change (``"dtau"``), so the
payload of one message is 4 · n_τ or 8 · n_τ bytes, with n_τ the number of thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from fedsim.strategies.common import (
    nonfinite_reason,
    ordered_node_ids,
    sample_node_ids,
    sample_size,
    sort_replies,
    split_replies,
)
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from fedsim.sparse import DIVISORS, SIGN_MODES, STE_MODES, mean_thresholds, threshold_delta

__all__ = ["AGG_WEIGHTINGS", "TH_UPDATE_MODES", "SpaFL", "thresholds_to_record"]

TH_UPDATE_MODES: tuple[str, ...] = ("lazy", "eager_all", "fmnist_code", "off")
"""Delivery modes of the global threshold change to the clients (see the module docstring)."""

AGG_WEIGHTINGS: tuple[str, ...] = ("uniform", "num_examples")
"""Weighting of the client thresholds in the average."""

TAU_KEY = "tau"
DELTA_KEY = "dtau"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

FLOPS_PER_MAC = 2
"""One multiply-accumulate counts as two floating-point operations (a multiply and an add)."""


def thresholds_to_record(thresholds: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Return ``{layer: (C_out,) array}`` as an ``ArrayRecord`` of float32 arrays, keys in order."""
    return ArrayRecord({name: Array(np.asarray(values, dtype=np.float32)) for name, values in thresholds.items()})


def _record_to_thresholds(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"invalid {name} {value!r}; expected one of {', '.join(allowed)}")


class SpaFL(Strategy):
    """SpaFL: clients train sparse personal models, the server averages their thresholds.

    The ``initial_arrays`` given to ``start`` are the initial global thresholds (zeros in SpaFL):
    an ``ArrayRecord`` with one float32 array of shape (C_out,) per masked layer, keyed by the
    layer's module name, in the order of the client model's masked layers.

    Parameters
    ----------
    fraction_train : float (default: 0.1)
        Fraction of nodes sampled for training each round (K = 10 of N = 100 in the paper).
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes evaluated in an evaluation round; personalised accuracy is defined
        over all clients, so keep 1.0 unless evaluation is too slow.
    min_train_nodes, min_evaluate_nodes : int (default: 1)
        Minimum number of nodes sampled, capped at the number of connected nodes.
    seed : int (default: 0)
        Root seed of the sampling streams.
    lr : float (default: 0.001)
        Learning rate lr0 of the local SGD steps, shared by weights and thresholds.
    lr_decay, lr_min : float (default: 1.0, 0.0)
        The learning rate of round t = server_round − 1 is max(lr0 · lr_decay^t, lr_min).
    local_epochs : int (default: 5)
        Local epochs E per round.
    batch_size : int (default: 64)
        Local mini-batch size.
    momentum, weight_decay : float (default: 0.9, 0.0)
        SGD momentum and weight decay, applied to weights, thresholds and batch norm alike.
    optimizer_persist : bool (default: False)
        Keep each client's momentum buffers across its rounds (the official FMNIST code) instead
        of starting every round with a fresh optimizer.
    alpha : float (default: 0.002)
        Coefficient α of the threshold regulariser α · c(t) · Σ exp(−τ).
    warmup, warmup_period : bool, float (default: True, 1.0)
        Scale the regulariser by c(t) = 1 / (1 + exp(5 − 10 t / P)) with P = ``warmup_period``;
        with ``warmup=False``, c(t) = 1.
    ste : str (default: "identity")
        Surrogate gradient of the unit step: ``identity``, ``cifar_code`` or ``clipped``.
    sign_mode, divisor : str (default: "elementwise", "fan_in")
        Form of the threshold-change weight step w ← w − Δτ · sign / d. The values ``rowsum``
        and ``official`` select the official code's variants.
    th_update : str (default: "lazy")
        How Δτ reaches the clients: ``lazy``, ``eager_all``, ``fmnist_code`` or ``off``.
    agg_weighting : str (default: "uniform")
        ``uniform`` averages client thresholds with equal weights (SpaFL); ``num_examples``
        weights them by each client's number of training examples.
    eval_every : int (default: 1)
        Evaluate in rounds that are multiples of ``eval_every`` and in the last round.
    collapse_reset, collapse_density : bool, float (default: True, 0.01)
        Before each forward pass, set a layer's thresholds to zero when its density is at or
        below ``collapse_density``.
    grad_clip : float or None (default: None)
        Clip the gradient norm of all local parameters to this value.
    tau_clip : float or None (default: None)
        Clamp thresholds to [−tau_clip, tau_clip] after each local step.
    apply_pending_on_eval : bool (default: False)
        With ``lazy``, also send the global thresholds with evaluation requests, so that every
        evaluated client applies its pending change before testing (4 · n_τ bytes per client).
        Without it, evaluation messages carry no arrays and do not change any client.
    """

    def __init__(
        self,
        fraction_train: float = 0.1,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        seed: int = 0,
        lr: float = 0.001,
        lr_decay: float = 1.0,
        lr_min: float = 0.0,
        local_epochs: int = 5,
        batch_size: int = 64,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        optimizer_persist: bool = False,
        alpha: float = 0.002,
        warmup: bool = True,
        warmup_period: float = 1.0,
        ste: str = "identity",
        sign_mode: str = "elementwise",
        divisor: str = "fan_in",
        th_update: str = "lazy",
        agg_weighting: str = "uniform",
        eval_every: int = 1,
        collapse_reset: bool = True,
        collapse_density: float = 0.01,
        grad_clip: float | None = None,
        tau_clip: float | None = None,
        apply_pending_on_eval: bool = False,
    ) -> None:
        _check_choice("ste", ste, STE_MODES)
        _check_choice("sign_mode", sign_mode, SIGN_MODES)
        _check_choice("divisor", divisor, DIVISORS)
        _check_choice("th_update", th_update, TH_UPDATE_MODES)
        _check_choice("agg_weighting", agg_weighting, AGG_WEIGHTINGS)
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if not 0.0 <= fraction_evaluate <= 1.0:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        if eval_every < 1:
            raise ValueError(f"eval_every must be an integer >= 1, got {eval_every}")

        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.seed = seed
        self.lr = lr
        self.lr_decay = lr_decay
        self.lr_min = lr_min
        self.local_epochs = local_epochs
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.optimizer_persist = optimizer_persist
        self.alpha = alpha
        self.warmup = warmup
        self.warmup_period = warmup_period
        self.ste = ste
        self.sign_mode = sign_mode
        self.divisor = divisor
        self.th_update = th_update
        self.agg_weighting = agg_weighting
        self.eval_every = eval_every
        self.collapse_reset = collapse_reset
        self.collapse_density = collapse_density
        self.grad_clip = grad_clip
        self.tau_clip = tau_clip
        self.apply_pending_on_eval = apply_pending_on_eval

        self.num_rounds: int | None = None
        self.current: dict[str, np.ndarray] | None = None
        self.last_delta: dict[str, np.ndarray] | None = None
        self.last_round = 0
        self._resumed = False
        self._partition_of: Callable[[int], int] | None = None

    # Settings.
    def round_lr(self, server_round: int) -> float:
        """Return the learning rate of ``server_round``: max(lr0 · lr_decay^t, lr_min), t = round − 1."""
        return max(self.lr * self.lr_decay ** (server_round - 1), self.lr_min)

    def train_settings(self, server_round: int) -> dict[str, Any]:
        """Return the config values every sampled client receives in ``server_round``."""
        settings: dict[str, Any] = {
            "server-round": server_round,
            "round-index": server_round - 1,
            "lr": self.round_lr(server_round),
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "momentum": self.momentum,
            "weight-decay": self.weight_decay,
            "optimizer-persist": self.optimizer_persist,
            "alpha": self.alpha,
            "warmup": self.warmup,
            "warmup-period": self.warmup_period,
            "ste": self.ste,
            "collapse-reset": self.collapse_reset,
            "collapse-density": self.collapse_density,
        }
        settings.update(self._update_settings())
        if self.grad_clip is not None:
            settings["grad-clip"] = self.grad_clip
        if self.tau_clip is not None:
            settings["tau-clip"] = self.tau_clip
        return settings

    def _update_settings(self) -> dict[str, Any]:
        return {"th-update": self.th_update, "sign-mode": self.sign_mode, "divisor": self.divisor}

    def summary(self) -> None:
        """Log the strategy's settings."""
        log(INFO, "\t├──> SpaFL: thresholds only, th_update=%s, aggregation %s", self.th_update, self.agg_weighting)
        log(INFO, "\t├──> Fraction: train %.2f | evaluate %.2f every %d rounds", self.fraction_train, self.fraction_evaluate, self.eval_every)
        log(INFO, "\t├──> Local: lr %g (decay %g, floor %g), %d epochs, batch %d, momentum %g", self.lr, self.lr_decay, self.lr_min, self.local_epochs, self.batch_size, self.momentum)
        log(INFO, "\t└──> Mask: alpha %g, warm-up %s, ste %s, update %s/%s, collapse reset %s", self.alpha, self.warmup, self.ste, self.sign_mode, self.divisor, self.collapse_reset)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run Flower's round loop, remembering the last round so that it is evaluated.

        After :meth:`restore_state` the rounds continue from the restored one, so ``num_rounds``
        counts the remaining rounds, as when a runner resumes a run.
        """
        if self._resumed:
            self._resumed = False
        else:
            self.current = None
            self.last_delta = None
            self.last_round = 0
        self.num_rounds = self.last_round + num_rounds
        return super().start(
            grid=grid,
            initial_arrays=initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def checkpoint_state(self) -> dict[str, Any]:
        """Return the state a resumed run needs, as JSON values: the last round and Δτ of it."""
        delta = None
        if self.last_delta is not None:
            delta = {name: values.astype(np.float32).tolist() for name, values in self.last_delta.items()}
        return {"last_round": self.last_round, "last_delta": delta}

    def restore_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`checkpoint_state`; the next ``start`` continues after it."""
        self.last_round = int(state.get("last_round", 0))
        delta = state.get("last_delta")
        self.last_delta = None if delta is None else {name: np.asarray(values, dtype=np.float32) for name, values in delta.items()}
        self._resumed = True

    # Training.
    def _sample(self, grid: Grid, fraction: float, minimum: int, purpose: str, server_round: int) -> tuple[list[int], list[int]]:
        self._partition_of = getattr(grid, "partition_of", None)
        node_ids = ordered_node_ids(grid)
        count = sample_size(len(node_ids), fraction, minimum)
        sampled = sample_node_ids(node_ids, count, self.seed, purpose, server_round)
        log(INFO, "%s: sampled %d of %d nodes", purpose, len(sampled), len(node_ids))
        return node_ids, sampled

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global thresholds (and Δτ(t−1) in the eager modes) to the sampled nodes.

        ``arrays`` are the current global thresholds. Entries of ``config`` are sent too, but the
        strategy's own settings take precedence. Under ``eager_all`` every node that is not
        sampled receives Δτ(t−1) alone, with ``threshold-update-only`` set in its config.
        """
        if len(arrays) == 0:
            raise ValueError("SpaFL needs the initial thresholds as initial_arrays (one array per masked layer)")
        self.current = _record_to_thresholds(arrays)
        node_ids, sampled = self._sample(grid, self.fraction_train, self.min_train_nodes, "sample-train", server_round)

        settings = {**dict(config), **self.train_settings(server_round)}
        delta = self._delta_to_send()

        messages = []
        for node_id in sampled:
            content = RecordDict({TAU_KEY: arrays, CONFIG_KEY: ConfigRecord(dict(settings))})
            if delta is not None:
                content[DELTA_KEY] = delta
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))

        if self.th_update == "eager_all" and delta is not None:
            update_only = {"server-round": server_round, "threshold-update-only": True, **self._update_settings()}
            chosen = set(sampled)
            for node_id in node_ids:
                if node_id in chosen:
                    continue
                content = RecordDict({DELTA_KEY: delta, CONFIG_KEY: ConfigRecord(dict(update_only))})
                messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        return messages

    def _delta_to_send(self) -> ArrayRecord | None:
        if self.th_update not in ("eager_all", "fmnist_code") or self.last_delta is None:
            return None
        return thresholds_to_record(self.last_delta)

    def _check_reply(self, content: RecordDict) -> str | None:
        """Return why a training reply cannot be averaged, or None when it can."""
        reason = nonfinite_reason(content)
        if reason is not None:
            return reason
        assert self.current is not None
        record = content.array_records[TAU_KEY]
        if list(record.keys()) != list(self.current.keys()):
            return f"threshold keys {sorted(record.keys())} differ from the global ones {sorted(self.current)}"
        for name, array in record.items():
            expected = self.current[name].shape
            if array.dtype != "float32" or tuple(array.shape) != expected:
                return f"threshold {name!r} has dtype {array.dtype} and shape {tuple(array.shape)}, expected float32 and {expected}"
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the clients' thresholds in partition order and store Δτ(t).

        Replies without thresholds (acknowledgements of ``eager_all`` updates) count in
        ``threshold_update_acks`` and ``sign_changes`` only. Invalid replies are logged and left out. When no reply is
        usable, the global thresholds stay as they are and Δτ(t) is zero.
        """
        valid, _ = split_replies(sort_replies(replies, self._partition_of), "aggregate_train")
        if self.current is None:
            raise RuntimeError("aggregate_train called before configure_train")
        self.last_round = server_round

        acks = 0
        ack_sign_changes = 0
        kept: list[RecordDict] = []
        for message in valid:
            content = message.content
            if TAU_KEY not in content.array_records:
                acks += 1
                ack_sign_changes += int(_client_metrics(content).get("sign_changes", 0))
                continue
            reason = self._check_reply(content)
            if reason is not None:
                log(WARNING, "aggregate_train: rejected the reply of node %d: %s", message.metadata.src_node_id, reason)
                continue
            kept.append(content)

        if not kept:
            self.last_delta = {name: np.zeros_like(values) for name, values in self.current.items()}
            log(WARNING, "aggregate_train: no usable thresholds in round %d; the global thresholds are unchanged", server_round)
            return None, None

        thresholds = [_record_to_thresholds(content.array_records[TAU_KEY]) for content in kept]
        examples = [float(_client_metrics(content).get("num-examples", 0)) for content in kept]
        weights = examples if self.agg_weighting == "num_examples" else None
        new = mean_thresholds(thresholds, weights)
        self.last_delta = threshold_delta(new, self.current)

        metrics = _train_metrics(kept, examples)
        metrics.update(_threshold_statistics(new, self.last_delta))
        metrics["sign_changes"] += ack_sign_changes
        metrics["train_clients"] = len(kept)
        metrics["threshold_update_acks"] = acks
        return thresholds_to_record(new), MetricRecord(metrics)

    # Evaluation.
    def _evaluation_due(self, server_round: int) -> bool:
        return server_round % self.eval_every == 0 or server_round == self.num_rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask the evaluated nodes to test their own models, in evaluation rounds only.

        Messages carry the global thresholds only with ``apply_pending_on_eval`` under ``lazy``.
        """
        if self.fraction_evaluate == 0.0 or not self._evaluation_due(server_round):
            return []
        _, sampled = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "sample-evaluate", server_round)
        apply_pending = self.apply_pending_on_eval and self.th_update == "lazy"
        settings = {**dict(config), "server-round": server_round, "apply-pending": apply_pending, "ste": self.ste, **self._update_settings()}

        messages = []
        for node_id in sampled:
            content = RecordDict({CONFIG_KEY: ConfigRecord(dict(settings))})
            if apply_pending:
                content[TAU_KEY] = arrays
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Return personalised accuracy (unweighted mean, std, min over clients) and densities."""
        valid, _ = split_replies(sort_replies(replies, self._partition_of), "aggregate_evaluate")
        kept = []
        for message in valid:
            reason = nonfinite_reason(message.content)
            if reason is not None:
                log(WARNING, "aggregate_evaluate: rejected the reply of node %d: %s", message.metadata.src_node_id, reason)
                continue
            kept.append(_client_metrics(message.content))
        if not kept:
            return None
        return MetricRecord(_evaluate_metrics(kept))


def _client_metrics(content: RecordDict) -> Mapping[str, Any]:
    if METRICS_KEY in content.metric_records:
        return content.metric_records[METRICS_KEY]
    return {}


def _unweighted(records: list[Mapping[str, Any]], key: str) -> list[float]:
    return [float(record[key]) for record in records if key in record]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _train_metrics(contents: list[RecordDict], examples: list[float]) -> dict[str, Any]:
    """Combine the clients' training metrics.

    ``train_loss`` is weighted by training examples, densities are unweighted client means, and
    costs (MACs, FLOPs, resets, sign changes) are sums over the clients.
    """
    records = [_client_metrics(content) for content in contents]
    losses = _unweighted(records, "train_loss")
    total_examples = sum(examples)
    metrics: dict[str, Any] = {"num-examples": int(total_examples)}
    if losses and total_examples > 0:
        metrics["train_loss"] = float(sum(loss * n for loss, n in zip(losses, examples, strict=True)) / total_examples)
    elif losses:
        metrics["train_loss"] = _mean(losses)

    for key in ("density", "density_layer_mean", "density_all_param"):
        values = _unweighted(records, key)
        if values:
            metrics[key] = _mean(values)

    train_macs = int(sum(_unweighted(records, "train_macs")))
    metrics["train_macs"] = train_macs
    metrics["train_flops"] = FLOPS_PER_MAC * train_macs
    metrics["resets"] = int(sum(_unweighted(records, "resets")))
    metrics["sign_changes"] = int(sum(_unweighted(records, "sign_changes")))
    return metrics


def _threshold_statistics(thresholds: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, float]:
    values = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in thresholds.values()])
    changes = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in delta.values()])
    return {
        "tau_mean": float(values.mean()),
        "tau_std": float(values.std()),
        "tau_delta_max": float(np.abs(changes).max()),
    }


def _evaluate_metrics(records: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Combine evaluation metrics: personalised accuracy over clients and example-weighted means."""
    accuracies = _unweighted(records, "eval_accuracy")
    examples = [float(record.get("num-examples", 0)) for record in records]
    total = sum(examples)
    metrics: dict[str, Any] = {"num-examples": int(total), "eval_clients": len(records)}

    if accuracies:
        metrics["personalized_accuracy"] = _mean(accuracies)
        metrics["personalized_accuracy_std"] = float(np.std(accuracies))
        metrics["personalized_accuracy_min"] = float(np.min(accuracies))
    if total > 0:
        for key in ("eval_accuracy", "eval_loss"):
            pairs = [(float(record[key]), n) for record, n in zip(records, examples, strict=True) if key in record]
            if pairs:
                metrics[key] = sum(value * n for value, n in pairs) / sum(n for _, n in pairs)

    for key in ("eval_density", "eval_density_layer_mean", "eval_density_all_param"):
        values = _unweighted(records, key)
        if values:
            metrics[key] = _mean(values)
    return metrics
