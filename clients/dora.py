"""Client of federated DoRA fine-tuning: a shared frozen base, local adapters, adapters-only replies.

DoRA is Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353. The adapters
are :class:`fedsim.dora.DoRALinear` layers, whose row norm is computed from rank-sized factors as
in Zelenin and Zhuravlyova, "Scaling DoRA: High-Rank Adaptation via Factored Norms and Fused
Kernels", arXiv 2603.22276, with fused Triton kernels on CUDA (``kernel: auto``).

Every process builds the same base model without receiving it: a
:class:`fedsim.dora.backbone.RowTransformer` seeded from the run seed and pre-trained (seeded, one
thread) on the union of all clients' train splits of the source task, which is the data set as it
is. The result is cached per process, keyed by its settings. The target task is the source task
after the configured shift (``fedsim.dora.backbone.apply_shift``), applied to each client's own
train and test split.

The DoRA settings (``rank``, ``alpha``, ``target_modules``, ``dropout``, ``kernel``, backbone and
pre-training keys) come from the ``strategy`` section of the run spec. Local training uses the
``client`` section (``optimizer``, ``lr``, ``momentum``, ``weight_decay``, ``local_epochs``,
``batch_size``). ``lr``, ``local-epochs`` and ``device`` entries in a message's ``config`` record
override them for that message.

Training request (array record ``"arrays"``: global adapters, ``"config"`` from
:class:`fedsim.strategies.DoRAFedAvg`):

1. Check that the server's ``dora-base-hash``, ``dora-rank`` and ``dora-alpha`` match this
   client's model, and raise ``ValueError`` otherwise (the reply becomes an error reply).
2. Load the received adapters. Keys the message lacks (``lora_A.weight`` under ``dora-freeze-a``)
   take their seeded initial values, which are the same on every client.
3. Train only the adapter tensors (not ``A`` under ``dora-freeze-a``) on the shifted train split.
4. Reply with the adapter tensors under the received keys (array record ``"arrays"``), the
   metrics ``train_loss`` and ``num-examples``, and the config record ``"dora"`` with ``rank``,
   ``alpha`` and ``base-hash``.

An evaluation request loads the adapters and tests them on the client's shifted test split.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedsim.clients.common import get_client_data, new_client_app, read_spec
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn
from torch.nn import functional

from fedsim.dora import (
    adapter_state_dict,
    base_weights_hash,
    freeze_non_adapter_parameters,
    load_adapter_state_dict,
    wrap_linear_modules,
)
from fedsim.dora.backbone import apply_shift, build_dora_backbone, pretrain, state_bytes
from fedsim.partition import ClientData, client_data
from fedsim.records import array_record_from_torch, to_torch_state_dict
from fedsim.seeding import derive_seed, torch_generator
from fedsim.training import make_optimizer

__all__ = [
    "AdaptedModel",
    "DoRASettings",
    "adapted_model",
    "app",
    "evaluate_adapted",
    "pretrained_base_state",
    "resolve_device",
    "shifted_split",
]

logger = logging.getLogger(__name__)

app = new_client_app()

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
METADATA_KEY = "dora"
LORA_A_SUFFIX = "lora_A.weight"


@dataclass(frozen=True)
class DoRASettings:
    """DoRA and backbone settings, read from the ``strategy`` section of the run spec.

    ``target_modules`` are regular expressions (or glob patterns with ``pattern_syntax: glob``)
    matched against the whole qualified name of each ``nn.Linear``. ``pretrain_epochs`` passes of
    Adam at ``pretrain_lr`` train the base on the unshifted data.
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    pattern_syntax: str
    dropout: float
    use_rslora: bool
    kernel: str
    freeze_a: bool
    shift: str
    width: int
    depth: int
    heads: int
    pretrain_epochs: int
    pretrain_lr: float

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> DoRASettings:
        """Read the settings from the strategy section (a plain dict)."""
        return cls(
            rank=int(section["rank"]),
            alpha=float(section["alpha"]),
            target_modules=tuple(str(pattern) for pattern in section["target_modules"]),
            pattern_syntax=str(section["pattern_syntax"]),
            dropout=float(section["dropout"]),
            use_rslora=bool(section["use_rslora"]),
            kernel=str(section["kernel"]),
            freeze_a=bool(section["freeze_a"]),
            shift=str(section["shift"]),
            width=int(section["width"]),
            depth=int(section["depth"]),
            heads=int(section["heads"]),
            pretrain_epochs=int(section["pretrain_epochs"]),
            pretrain_lr=float(section["pretrain_lr"]),
        )

    def backbone_key(self, data_spec: Mapping[str, Any], seed: int) -> str:
        """Return the cache key of the pre-trained base: everything its weights depend on."""
        return json.dumps(
            {
                "data": data_spec,
                "seed": seed,
                "width": self.width,
                "depth": self.depth,
                "heads": self.heads,
                "pretrain_epochs": self.pretrain_epochs,
                "pretrain_lr": self.pretrain_lr,
            },
            sort_keys=True,
        )


# Pre-trained base weights, per process.

_BASES: dict[str, dict[str, torch.Tensor]] = {}
_BASES_LOCK = threading.Lock()


def _source_train_data(data_spec: Mapping[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the union of all clients' train splits in partition order (no test example)."""
    parts = [client_data(dict(data_spec), seed, pid) for pid in range(int(data_spec["num_clients"]))]
    return np.concatenate([part.train_x for part in parts]), np.concatenate([part.train_y for part in parts])


def pretrained_base_state(spec: Mapping[str, Any], settings: DoRASettings) -> dict[str, torch.Tensor]:
    """Return the pre-trained base weights of the run (a CPU state dict), built once per process.

    The weights depend only on the data settings, the run seed and the backbone and pre-training
    settings, so every process builds the same ones. Callers must not modify the tensors.
    """
    seed = int(spec["seed"])
    key = settings.backbone_key(spec["data"], seed)
    with _BASES_LOCK:
        state = _BASES.get(key)
        if state is not None:
            return state

        features, labels = _source_train_data(spec["data"], seed)
        probe = client_data(dict(spec["data"]), seed, 0)
        model = build_dora_backbone(
            probe.input_shape, probe.num_classes,
            seed=derive_seed(seed, "dora-backbone"),
            width=settings.width, depth=settings.depth, heads=settings.heads,
        )
        loss = pretrain(
            model, features, labels,
            epochs=settings.pretrain_epochs, seed=derive_seed(seed, "dora-pretrain"), lr=settings.pretrain_lr,
        )
        logger.info("pre-trained the DoRA base on %d source examples for %d epochs (last loss %.4f)", len(labels), settings.pretrain_epochs, loss)

        if len(_BASES) >= 4:
            _BASES.clear()
        state = _BASES[key] = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        return state


# The adapted model, per thread.


@dataclass
class AdaptedModel:
    """The base model with DoRA adapters, plus what clients and the server compare and send.

    ``initial_adapters`` are the adapters right after wrapping (``A`` seeded, ``B = 0``,
    ``m = ‖W‖_row``). ``base_hash`` is the SHA-256 of the frozen base weights, and
    ``full_model_bytes`` the payload bytes of the unwrapped base's state dict. ``wrapped`` lists
    the names of the adapted linear layers in module order.
    """

    model: nn.Module
    settings: DoRASettings
    initial_adapters: dict[str, torch.Tensor]
    base_hash: str
    full_model_bytes: int
    wrapped: list[str]
    device: torch.device

    def load_adapters(self, received: Mapping[str, torch.Tensor]) -> None:
        """Load ``received`` adapters; keys it lacks get their initial values.

        Raises:
            KeyError: for a key that is not an adapter of this model.
            ValueError: for a wrong shape or a non-finite value.
        """
        unexpected = sorted(set(received) - set(self.initial_adapters))
        if unexpected:
            raise KeyError(f"received arrays that are not adapters of this model: {unexpected[:5]}")
        state = {key: received.get(key, initial) for key, initial in self.initial_adapters.items()}
        load_adapter_state_dict(self.model, state)


_MODELS = threading.local()


def adapted_model(spec: Mapping[str, Any], device: torch.device | str = "cpu") -> AdaptedModel:
    """Return the run's base model wrapped with DoRA adapters on ``device``, reused in this thread.

    The caller must load the adapters it needs: the instance keeps whatever the previous call
    left in it.

    Raises:
        ValueError: if no linear layer matches ``target_modules``.
    """
    settings = DoRASettings.from_section(spec["strategy"])
    device = torch.device(device)
    key = json.dumps([settings.backbone_key(spec["data"], int(spec["seed"])), repr(settings), str(device)])
    cache: dict[str, AdaptedModel] = getattr(_MODELS, "cache", None) or {}
    if key in cache:
        return cache[key]

    seed = int(spec["seed"])
    base_state = pretrained_base_state(spec, settings)
    probe = client_data(dict(spec["data"]), seed, 0)
    model = build_dora_backbone(
        probe.input_shape, probe.num_classes, seed=derive_seed(seed, "dora-backbone"),
        width=settings.width, depth=settings.depth, heads=settings.heads,
    )
    model.load_state_dict(base_state)
    full_model_bytes = state_bytes(model)
    model.requires_grad_(False)

    wrapped = wrap_linear_modules(
        model, list(settings.target_modules), settings.rank, settings.alpha,
        syntax=settings.pattern_syntax,  # type: ignore[arg-type]
        seed=derive_seed(seed, "dora-adapters"),
        dropout=settings.dropout, use_rslora=settings.use_rslora, kernel=settings.kernel,
    )
    freeze_non_adapter_parameters(model)
    model.to(device)
    initial = {name: tensor.detach().clone() for name, tensor in adapter_state_dict(model).items()}
    entry = AdaptedModel(model, settings, initial, base_weights_hash(model), full_model_bytes, wrapped, device)

    if len(cache) >= 4:
        cache.clear()
    cache[key] = entry
    _MODELS.cache = cache
    return entry


def resolve_device(requested: str) -> torch.device:
    """Return the device for ``requested`` (``cpu``, ``cuda`` or ``auto``) in this process.

    ``auto`` is CUDA when a CUDA device is visible to this process, else the CPU.

    Raises:
        RuntimeError: for ``cuda`` when no CUDA device is visible to this process.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device 'cuda' was requested but this client process sees no CUDA device; "
            "set backend.client_resources.num_gpus > 0 on a machine with a GPU, or strategy.device=cpu"
        )
    if requested in ("cuda", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(f"unknown device {requested!r}; expected cpu, cuda or auto")


def shifted_split(data: ClientData, settings: DoRASettings, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return this client's target-task ``(train_x, train_y, test_x, test_y)``."""
    shift_seed = derive_seed(seed, "dora-label-permutation")
    train_x, train_y = apply_shift(data.train_x, data.train_y, settings.shift, data.num_classes, shift_seed)
    test_x, test_y = apply_shift(data.test_x, data.test_y, settings.shift, data.num_classes, shift_seed)
    return train_x, train_y, test_x, test_y


# Message handlers.


def _config(message: Message) -> ConfigRecord:
    return message.content.config_records.get(CONFIG_KEY) or ConfigRecord()


def _check_server_settings(config: ConfigRecord, entry: AdaptedModel) -> None:
    """Raise ``ValueError`` when the server's base hash, rank or alpha differ from this client's."""
    server_hash = config.get("dora-base-hash")
    if server_hash is not None and str(server_hash) != entry.base_hash:
        raise ValueError(
            f"base weights hash mismatch: this client's base is {entry.base_hash[:12]}..., the server's "
            f"{str(server_hash)[:12]}...; clients and server must build the base with the same data, "
            "seed, backbone and pre-training settings"
        )
    settings = entry.settings
    if "dora-rank" in config and int(config["dora-rank"]) != settings.rank:  # type: ignore[arg-type]
        raise ValueError(f"rank mismatch: the server uses rank {config['dora-rank']!r}, this client {settings.rank}")
    if "dora-alpha" in config and float(config["dora-alpha"]) != settings.alpha:  # type: ignore[arg-type]
        raise ValueError(f"alpha mismatch: the server uses alpha {config['dora-alpha']!r}, this client {settings.alpha:g}")


def _prepare(message: Message, context: Context) -> tuple[dict[str, Any], ClientData, AdaptedModel, ConfigRecord, list[str]]:
    """Build or reuse the model, check the server's settings and load the received adapters."""
    spec = read_spec(message, context)
    data = get_client_data(spec, context)
    config = _config(message)
    device = resolve_device(str(config.get("device", spec["strategy"].get("device", "auto"))))
    entry = adapted_model(spec, device)
    _check_server_settings(config, entry)

    received = to_torch_state_dict(message.content.array_records[ARRAYS_KEY])
    entry.load_adapters(received)
    return spec, data, entry, config, list(received)


def _batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(labels), generator=generator).to(features.device)
    for start in range(0, len(labels), batch_size):
        batch = order[start : start + batch_size]
        yield features[batch], labels[batch]


@app.train()
def train(message: Message, context: Context) -> Message:
    """Fine-tune the received adapters on this client's shifted train split; reply with the adapters."""
    spec, data, entry, config, received_keys = _prepare(message, context)
    client = spec["client"]
    settings = entry.settings
    model = entry.model
    freeze_a = bool(config.get("dora-freeze-a", settings.freeze_a))
    lr = float(config.get("lr", client["lr"]))  # type: ignore[arg-type]
    epochs = int(config.get("local-epochs", client["local_epochs"]))  # type: ignore[arg-type]
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]

    trainable = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or name.endswith(LORA_A_SUFFIX):
            is_frozen_a = freeze_a and name.endswith(LORA_A_SUFFIX)
            parameter.requires_grad_(not is_frozen_a)
            if not is_frozen_a:
                trainable.append(parameter)
    optimizer = make_optimizer(trainable, client["optimizer"], lr, client["momentum"], client["weight_decay"])

    train_x, train_y, _, _ = shifted_split(data, settings, int(spec["seed"]))
    features = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)).to(entry.device)
    labels = torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.int64)).to(entry.device)
    generator = torch_generator(int(spec["seed"]), "client-shuffle", server_round, data.partition_id)

    model.train()
    total_loss, seen = 0.0, 0
    for _ in range(epochs):
        for batch_x, batch_y in _batches(features, labels, int(client["batch_size"]), generator):
            loss = functional.cross_entropy(model(batch_x), batch_y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch_y)
            seen += len(batch_y)
    model.eval()

    adapters = adapter_state_dict(model)
    reply_arrays = array_record_from_torch({key: adapters[key] for key in received_keys})
    metrics = MetricRecord({"train_loss": total_loss / seen if seen else float("nan"), "num-examples": len(labels)})
    metadata = ConfigRecord({"rank": settings.rank, "alpha": settings.alpha, "base-hash": entry.base_hash})
    content = RecordDict({ARRAYS_KEY: reply_arrays, METRICS_KEY: metrics, METADATA_KEY: metadata})
    return Message(content, reply_to=message)


@torch.no_grad()
def evaluate_adapted(entry: AdaptedModel, features: np.ndarray, labels: np.ndarray, batch_size: int = 1024) -> tuple[float, float, int]:
    """Return the mean cross-entropy, the accuracy and the example count of ``entry.model`` on a split.

    Loss and accuracy are NaN for an empty split.
    """
    model = entry.model
    model.eval()
    count = len(labels)
    if count == 0:
        return float("nan"), float("nan"), 0
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(entry.device)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(entry.device)
    total_loss, correct = 0.0, 0
    for start in range(0, count, batch_size):
        logits = model(x[start : start + batch_size])
        targets = y[start : start + batch_size]
        total_loss += float(functional.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(dim=1) == targets).sum())
    return total_loss / count, correct / count, count


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Test the received adapters on this client's shifted test split."""
    spec, data, entry, _, _ = _prepare(message, context)
    _, _, test_x, test_y = shifted_split(data, entry.settings, int(spec["seed"]))
    loss, accuracy, count = evaluate_adapted(entry, test_x, test_y)
    metrics = MetricRecord({"eval_loss": loss, "eval_accuracy": accuracy, "num-examples": count})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)
