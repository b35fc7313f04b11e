"""SpaFL client: personal sparse model on disk, trained weights and thresholds, thresholds uploaded.

SpaFL (Kim, Saad, Debbah and Hong, "SpaFL: Communication-Efficient Federated Learning with
Sparse Models and Low Computational Overhead", NeurIPS 2024, arXiv 2406.00431). Every client
keeps a copy of the run's model with each Linear and Conv2d replaced by its threshold-masked form
(``fedsim.sparse.to_masked``). All clients start from the same seeded initialisation with zero
thresholds. Weights, batch norm state, local thresholds and the last global thresholds seen are
stored per partition under ``<run folder>/clients/<partition id>.safetensors``, never sent.

Training request (array record ``"tau"``: global thresholds, ``"config"``: round settings from
``fedsim.strategies.SpaFL``):

1. Apply the pending threshold change as a weight step w ← w − Δτ · sign / d: with ``lazy``,
   Δτ = τ_global − τ_seen (everything accumulated since this client last received thresholds);
   with ``eager_all`` or ``fmnist_code``, the ``"dtau"`` record when present; with ``off``, none.
2. Set the thresholds to the global ones and train weights, thresholds and batch norm together
   with SGD for E epochs on CE + α · c(t) · Σ exp(−τ), with the collapse reset before every
   forward pass and optional gradient and threshold clipping.
3. Store the state and reply with the thresholds only (array record ``"tau"``) and metrics.

A request whose config has ``threshold-update-only`` (``eager_all`` for clients not sampled)
only applies ``"dtau"`` and acknowledges. An evaluation request tests the stored model, masked
by the client's own thresholds, on the client's own test split.

Cost convention: ``train_macs`` counts 3 × forward MACs per example for every step, with the
layer densities of that step (see ``fedsim.sparse.cost``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from fedsim.clients.common import get_client_data, new_client_app, read_spec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedsim.client_state import load_client_state, save_client_state
from fedsim.models import build_model
from fedsim.partition import ClientData
from fedsim.seeding import torch_generator
from fedsim.sparse import (
    TRAIN_MACS_FACTOR,
    Divisor,
    SignMode,
    SteMode,
    all_param_density,
    apply_threshold_update,
    clip_thresholds_,
    dense_layer_macs,
    forward_macs,
    get_thresholds,
    masked_layers,
    mean_layer_density,
    param_density,
    reset_collapsed_thresholds,
    set_ste,
    set_thresholds,
    sign_changes,
    threshold_delta,
    threshold_penalty,
    to_masked,
)
from fedsim.training import evaluate_model, train_model

__all__ = ["MaskedReference", "SpaFLClientState", "app", "masked_client_model"]

logger = logging.getLogger(__name__)

app = new_client_app()

TAU_KEY = "tau"
DELTA_KEY = "dtau"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
SEEN_PREFIX = "spafl.tau_seen."
MOMENTUM_PREFIX = "spafl.momentum."


@dataclass
class MaskedReference:
    """A masked model reused across messages, its shared initial state and dense MACs per layer."""

    model: nn.Module
    initial_state: dict[str, torch.Tensor]
    layer_macs: dict[str, int]


_MODELS = threading.local()


def masked_client_model(spec: dict[str, Any], data: ClientData) -> MaskedReference:
    """Return the masked model of ``spec`` for ``data``, built once per thread.

    The initial state is the run's seeded initialisation (``spec["seed"]``) converted with
    ``to_masked`` (biases dropped, thresholds zero), identical on every client. The caller must
    load the state it needs: the model keeps whatever the previous message left in it.
    """
    model_spec = dict(spec["model"])
    name = model_spec.pop("name")
    options = {"hidden": list(model_spec["hidden"])} if name == "mlp" else {}
    seed = int(spec["seed"])
    key = json.dumps([name, options, data.input_shape, data.num_classes, seed], sort_keys=True)

    cache: dict[str, MaskedReference] = getattr(_MODELS, "cache", None) or {}
    if key not in cache:
        cache.clear()
        model = to_masked(build_model(name, data.input_shape, data.num_classes, seed=seed, **options))
        initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
        cache[key] = MaskedReference(model, initial, dense_layer_macs(model, data.input_shape))
        _MODELS.cache = cache
    return cache[key]


@dataclass
class SpaFLClientState:
    """What a client keeps besides its model: the last global thresholds it received.

    ``momentum`` contains the SGD momentum buffers by parameter name when the optimizer persists.
    ``rounds_trained`` counts the rounds this client trained in.
    """

    tau_seen: dict[str, np.ndarray]
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    rounds_trained: int = 0


def _restore(spec: dict[str, Any], data: ClientData, reference: MaskedReference) -> SpaFLClientState:
    """Load this client's stored state into ``reference.model``, or the shared initial state."""
    model = reference.model
    stored = load_client_state(spec["run_dir"], data.partition_id)
    if stored is None:
        model.load_state_dict(reference.initial_state)
        zeros = {name: np.zeros_like(values) for name, values in get_thresholds(model).items()}
        return SpaFLClientState(tau_seen=zeros)

    tensors, metadata = stored
    weights = {k: v for k, v in tensors.items() if not k.startswith(("spafl.",))}
    model.load_state_dict(weights, strict=True)
    tau_seen = {k[len(SEEN_PREFIX):]: v.numpy() for k, v in tensors.items() if k.startswith(SEEN_PREFIX)}
    momentum = {k[len(MOMENTUM_PREFIX):]: v for k, v in tensors.items() if k.startswith(MOMENTUM_PREFIX)}
    return SpaFLClientState(tau_seen, momentum, int(cast(int, metadata.get("rounds_trained", 0))))


def _store(spec: dict[str, Any], data: ClientData, model: nn.Module, state: SpaFLClientState, server_round: int) -> None:
    tensors = {k: v for k, v in model.state_dict().items()}
    tensors.update({SEEN_PREFIX + k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.tau_seen.items()})
    tensors.update({MOMENTUM_PREFIX + k: v for k, v in state.momentum.items()})
    metadata: dict[str, object] = {"round": server_round, "rounds_trained": state.rounds_trained}
    save_client_state(spec["run_dir"], data.partition_id, tensors, metadata)


def _thresholds(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: np.array(array.numpy(), dtype=np.float32) for name, array in record.items()}


def _apply_pending(model: nn.Module, state: SpaFLClientState, content: RecordDict, config: ConfigRecord) -> int:
    """Apply the pending threshold change to the weights; return the number of sign changes.

    A sign change is a weight whose sign factor in the update (its own sign, or its row sum's
    sign under ``rowsum``) differs before and after the step. Where none occurs, applying the
    accumulated change at once equals applying each round's change in turn.
    """
    mode = str(config.get("th-update", "lazy"))
    sign_mode = cast(SignMode, str(config.get("sign-mode", "elementwise")))
    divisor = cast(Divisor, str(config.get("divisor", "fan_in")))
    global_tau = _thresholds(content.array_records[TAU_KEY]) if TAU_KEY in content.array_records else None

    delta: dict[str, np.ndarray] | None = None
    if mode == "lazy" and global_tau is not None:
        delta = threshold_delta(global_tau, state.tau_seen)
    elif mode in ("eager_all", "fmnist_code") and DELTA_KEY in content.array_records:
        delta = _thresholds(content.array_records[DELTA_KEY])
    if global_tau is not None:
        state.tau_seen = global_tau
    if delta is None:
        return 0

    flips = 0
    for name, layer in masked_layers(model).items():
        step = torch.as_tensor(delta[name])
        flips += int(sign_changes(layer.weight.detach(), step, sign_mode, divisor).sum())
    apply_threshold_update(model, delta, sign_mode, divisor)
    return flips


@dataclass(frozen=True)
class _TrainSettings:
    server_round: int
    round_index: int
    lr: float
    epochs: int
    batch_size: int
    momentum: float
    weight_decay: float
    optimizer_persist: bool
    alpha: float
    warmup: bool
    warmup_period: float
    ste: str
    collapse_reset: bool
    collapse_density: float
    grad_clip: float | None
    tau_clip: float | None

    @classmethod
    def parse(cls, config: ConfigRecord, client: Mapping[str, Any]) -> _TrainSettings:
        """Read the round's settings from ``config``, falling back to the spec's client section."""
        server_round = int(cast(int, config.get("server-round", 1)))
        grad_clip = config.get("grad-clip")
        tau_clip = config.get("tau-clip")
        return cls(
            server_round=server_round,
            round_index=int(cast(int, config.get("round-index", server_round - 1))),
            lr=float(cast(float, config.get("lr", client["lr"]))),
            epochs=int(cast(int, config.get("local-epochs", client["local_epochs"]))),
            batch_size=int(cast(int, config.get("batch-size", client["batch_size"]))),
            momentum=float(cast(float, config.get("momentum", client["momentum"]))),
            weight_decay=float(cast(float, config.get("weight-decay", client["weight_decay"]))),
            optimizer_persist=bool(config.get("optimizer-persist", False)),
            alpha=float(cast(float, config.get("alpha", 0.0))),
            warmup=bool(config.get("warmup", True)),
            warmup_period=float(cast(float, config.get("warmup-period", 1.0))),
            ste=str(config.get("ste", "identity")),
            collapse_reset=bool(config.get("collapse-reset", True)),
            collapse_density=float(cast(float, config.get("collapse-density", 0.01))),
            grad_clip=None if grad_clip is None else float(cast(float, grad_clip)),
            tau_clip=None if tau_clip is None else float(cast(float, tau_clip)),
        )


def _make_optimizer(model: nn.Module, settings: _TrainSettings, state: SpaFLClientState) -> torch.optim.SGD:
    """Build SGD over all parameters, with the stored momentum buffers when they persist."""
    named = list(model.named_parameters())
    optimizer = torch.optim.SGD(
        [parameter for _, parameter in named],
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    if settings.optimizer_persist:
        for name, parameter in named:
            if name in state.momentum:
                optimizer.state[parameter]["momentum_buffer"] = state.momentum[name].clone()
    return optimizer


def _keep_momentum(model: nn.Module, optimizer: torch.optim.SGD, settings: _TrainSettings, state: SpaFLClientState) -> None:
    state.momentum = {}
    if not settings.optimizer_persist:
        return
    for name, parameter in model.named_parameters():
        buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
        if buffer is not None:
            state.momentum[name] = buffer.detach().clone()


def _density_metrics(model: nn.Module, prefix: str = "") -> dict[str, float]:
    return {
        f"{prefix}density": param_density(model),
        f"{prefix}density_layer_mean": mean_layer_density(model),
        f"{prefix}density_all_param": all_param_density(model),
    }


def _thresholds_record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord({name: Array(values) for name, values in get_thresholds(model).items()})


@app.train()
def train(message: Message, context: Context) -> Message:
    """Apply the pending threshold change, train for one round, store the model, send τ."""
    spec = read_spec(message, context)
    data = get_client_data(spec, context)
    reference = masked_client_model(spec, data)
    model = reference.model
    config = message.content.config_records[CONFIG_KEY]
    state = _restore(spec, data, reference)
    flips = _apply_pending(model, state, message.content, config)

    server_round = int(cast(int, config.get("server-round", 1)))
    if bool(config.get("threshold-update-only", False)):
        _store(spec, data, model, state, server_round)
        acknowledgement = MetricRecord({"sign_changes": flips, "threshold_update_only": 1})
        return Message(RecordDict({METRICS_KEY: acknowledgement}), reply_to=message)

    settings = _TrainSettings.parse(config, spec["client"])
    set_ste(model, cast(SteMode, settings.ste))
    set_thresholds(model, _thresholds(message.content.array_records[TAU_KEY]))
    optimizer = _make_optimizer(model, settings, state)

    counters = {"resets": 0, "macs": 0, "step_macs": 0}

    def before_step() -> None:
        if settings.collapse_reset:
            counters["resets"] += reset_collapsed_thresholds(model, settings.collapse_density)
        counters["step_macs"] = forward_macs(model, reference.layer_macs)

    def after_step(batch_size: int) -> None:
        counters["macs"] += TRAIN_MACS_FACTOR * batch_size * counters["step_macs"]
        if settings.tau_clip is not None:
            clip_thresholds_(model, settings.tau_clip)

    def penalty() -> torch.Tensor:
        return threshold_penalty(model, settings.alpha, settings.round_index, settings.warmup, settings.warmup_period)

    generator = torch_generator(int(spec["seed"]), "client-shuffle", server_round, data.partition_id)
    result = train_model(
        model, data.train_x, data.train_y,
        epochs=settings.epochs, batch_size=settings.batch_size, optimizer=optimizer,
        generator=generator, task=data.task, extra_loss=penalty,
        before_step=before_step, after_step=after_step, grad_clip=settings.grad_clip,
    )

    _keep_momentum(model, optimizer, settings, state)
    state.rounds_trained += 1
    _store(spec, data, model, state, server_round)

    metrics: dict[str, Any] = {
        "num-examples": int(len(data.train_y)),
        "train_loss": result.loss,
        **_density_metrics(model),
        "train_macs": counters["macs"],
        "resets": counters["resets"],
        "sign_changes": flips,
    }
    content = RecordDict({TAU_KEY: _thresholds_record(model), METRICS_KEY: MetricRecord(metrics)})
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Test this client's stored model, masked by its own thresholds, on its own test split.

    With ``apply-pending`` in the config and global thresholds in the message, the pending
    threshold change is applied (and stored) first.
    """
    spec = read_spec(message, context)
    data = get_client_data(spec, context)
    reference = masked_client_model(spec, data)
    model = reference.model
    config = message.content.config_records.get(CONFIG_KEY, ConfigRecord())
    state = _restore(spec, data, reference)

    flips = 0
    if bool(config.get("apply-pending", False)) and TAU_KEY in message.content.array_records:
        flips = _apply_pending(model, state, message.content, config)
        _store(spec, data, model, state, int(cast(int, config.get("server-round", 0))))

    result = evaluate_model(model, data.test_x, data.test_y, task=data.task)
    metrics: dict[str, Any] = {
        "eval_loss": result.loss,
        "eval_accuracy": result.accuracy,
        "num-examples": result.num_examples,
        **_density_metrics(model, prefix="eval_"),
        "eval_sign_changes": flips,
    }
    return Message(RecordDict({METRICS_KEY: MetricRecord(metrics)}), reply_to=message)
