"""Runner glue for federated DoRA fine-tuning (``strategy.name: dora``): section, strategy, summary.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) with the
factored norm and fused kernels of Zelenin and Zhuravlyova, "Scaling DoRA: High-Rank Adaptation via
Factored Norms and Fused Kernels", arXiv 2603.22276.

A run has two phases:

1. Centralized pre-training, done identically in the driver and in every client process. A small
   transformer over pixel rows (:class:`fedsim.dora.backbone.RowTransformer`, sized by
   ``width``, ``depth`` and ``heads``) trains for ``pretrain_epochs`` on the source task, which
   is the data set unchanged. It uses the union of all clients' train splits, so no test example
   is seen.
2. Federated DoRA fine-tuning on the target task, the source task after ``shift``: ``rotate90``
   (default: every image turned a quarter turn counter-clockwise), ``flip`` (mirrored left to
   right), ``invert`` (pixel ``v`` becomes ``1 − v``), ``permute_labels`` (a seeded relabelling
   without fixed points) or ``none``. The linear layers whose names match ``target_modules`` are
   wrapped in DoRA adapters; only their ``A``, ``B`` and ``m`` are trained and exchanged
   (:class:`fedsim.strategies.DoRAFedAvg`).

The ``model`` section is not used: the backbone is set by this section. Local training uses the
``client`` section. Rows add ``full_model_bytes``, the bytes full-model FedAvg would have sent for
the same messages, and ``summary.json`` gets a ``dora`` block with the ratio.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.config import ConfigError, RunConfig, StrategySection, check_value, to_dict
from fedsim.methods.base import CentralEvaluation, DataInfo, Method, register_method

__all__ = ["DEVICES", "KERNELS", "DoRASection", "summarize_dora"]

KERNELS = ("auto", "triton", "torch")
DEVICES = ("auto", "cpu", "cuda")
PATTERN_SYNTAXES = ("regex", "glob")
IMAGE_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")
IMAGE_SHIFTS = ("rotate90", "flip", "invert")

DEFAULT_TARGETS = [r"blocks\.\d+\.attn\.(q|v)_proj", r"blocks\.\d+\.mlp\.(up|down)_proj", "head"]


def _require(condition: bool, key: str, value: object, expected: str) -> None:
    check_value(condition, f"strategy.{key}", value, expected)


@dataclass
class DoRASection(StrategySection):
    """Federated DoRA's keys under ``strategy:``; the common keys keep their meaning.

    ``rank`` and ``alpha`` set the adapters (scaling ``alpha / rank``, or ``alpha / sqrt(rank)``
    with ``use_rslora``). ``target_modules`` are expressions matched against whole module names
    (``pattern_syntax``: ``regex`` or ``glob``). ``kernel`` picks the DoRA epilogue (``auto``:
    Triton on CUDA when available). ``device`` is ``auto`` (CUDA when the client has a GPU
    share and a CUDA device is visible), ``cpu`` or ``cuda``. ``freeze_a`` keeps ``A`` at its seeded
    initialisation and sends only ``B`` and ``m``.
    """

    name: str = "dora"
    fraction_train: float = 0.5
    rank: int = 4
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    pattern_syntax: str = "regex"
    dropout: float = 0.0
    use_rslora: bool = False
    kernel: str = "auto"
    freeze_a: bool = False
    shift: str = "rotate90"
    width: int = 32
    depth: int = 2
    heads: int = 2
    pretrain_epochs: int = 20
    pretrain_lr: float = 0.003
    device: str = "auto"

    def validate(self, config: RunConfig) -> None:
        """Check the DoRA keys and their combination with the data and backend sections."""
        from fedsim.dora.backbone import SHIFTS

        _require(self.rank >= 1, "rank", self.rank, "an integer >= 1")
        _require(math.isfinite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a number > 0")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a probability in [0, 1)")
        _require(self.kernel in KERNELS, "kernel", self.kernel, f"one of {', '.join(KERNELS)}")
        _require(self.device in DEVICES, "device", self.device, f"one of {', '.join(DEVICES)}")
        _require(self.pattern_syntax in PATTERN_SYNTAXES, "pattern_syntax", self.pattern_syntax, f"one of {', '.join(PATTERN_SYNTAXES)}")
        _require(self.shift in SHIFTS, "shift", self.shift, f"one of {', '.join(SHIFTS)}")
        _require(len(self.target_modules) > 0, "target_modules", list(self.target_modules), "a non-empty list of module-name patterns")
        if self.pattern_syntax == "regex":
            for pattern in self.target_modules:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError(f"invalid value for 'strategy.target_modules': {pattern!r} is not a valid regular expression ({error})") from error
        _require(self.width >= 1, "width", self.width, "an integer >= 1")
        _require(self.depth >= 1, "depth", self.depth, "an integer >= 1")
        _require(self.heads >= 1 and self.width % self.heads == 0, "heads", self.heads, f"a divisor of strategy.width ({self.width})")
        _require(self.pretrain_epochs >= 0, "pretrain_epochs", self.pretrain_epochs, "an integer >= 0")
        _require(math.isfinite(self.pretrain_lr) and self.pretrain_lr > 0, "pretrain_lr", self.pretrain_lr, "a learning rate > 0")
        _require(self.fraction_train > 0, "fraction_train", self.fraction_train, "a number in (0, 1]; fine-tuning needs at least one client per round")

        data = config.data
        if data.dataset == "synthetic" and data.synthetic.task == "regression":
            raise ConfigError("DoRA fine-tuning needs a classification task; 'data.synthetic.task' is 'regression'")
        if self.shift in IMAGE_SHIFTS and data.dataset not in IMAGE_DATASETS:
            raise ConfigError(
                f"'strategy.shift' {self.shift!r} needs an image data set ({', '.join(IMAGE_DATASETS)}), "
                f"but 'data.dataset' is {data.dataset!r}; use shift permute_labels or none"
            )
        if self.device == "cuda" and config.backend.client_resources.num_gpus <= 0:
            raise ConfigError(
                "'strategy.device' is 'cuda' but 'backend.client_resources.num_gpus' is 0; "
                "give each client a GPU share (for example 0.5) or set strategy.device=auto"
            )


def dora_spec(config: RunConfig) -> dict[str, Any]:
    """Return the part of the client run spec that the DoRA model depends on."""
    return {"data": to_dict(config.data), "strategy": to_dict(config.strategy), "seed": config.run.seed}


def client_device(config: RunConfig) -> str:
    """Return the ``device`` sent to clients: ``cpu`` unless clients get a GPU share."""
    section = config.strategy
    assert isinstance(section, DoRASection)
    if section.device == "cpu" or config.backend.client_resources.num_gpus <= 0:
        return "cpu"
    return section.device


def _check_local_gpu(config: RunConfig) -> None:
    """Raise ``RunInputError`` when the local engine is asked for a GPU that this process lacks.

    Ray checks its own resources before round 1; the local engine runs clients in this process.
    """
    import torch

    from fedsim.runner import RunInputError

    wants_gpu = client_device(config) != "cpu"
    if config.backend.name == "local" and wants_gpu and not torch.cuda.is_available():
        raise RunInputError(
            f"backend.client_resources.num_gpus={config.backend.client_resources.num_gpus:g} asks for a GPU, "
            "but no CUDA device is available (torch.cuda.is_available() is False). "
            "Set backend.client_resources.num_gpus=0 or run where a GPU is available"
        )


def _server_model(config: RunConfig) -> Any:
    from fedsim.clients.dora import adapted_model
    from fedsim.runner import RunInputError

    try:
        return adapted_model(dora_spec(config), "cpu")
    except ValueError as error:
        raise RunInputError(f"cannot build the DoRA model: {error}. Fix strategy.target_modules or the backbone keys") from error


def _build_dora(config: RunConfig, info: DataInfo) -> Strategy:
    from fedsim.strategies import DoRAFedAvg

    _check_local_gpu(config)
    section = config.strategy
    assert isinstance(section, DoRASection)
    entry = _server_model(config)
    return DoRAFedAvg(
        rank=section.rank,
        alpha=section.alpha,
        base_hash=entry.base_hash,
        freeze_a=section.freeze_a,
        full_model_bytes_per_message=entry.full_model_bytes,
        fraction_train=section.fraction_train,
        fraction_evaluate=section.fraction_evaluate,
        min_train_nodes=section.min_train_nodes,
        min_evaluate_nodes=section.min_evaluate_nodes,
        seed=config.run.seed,
    )


def _initial_arrays(config: RunConfig, info: DataInfo) -> ArrayRecord:
    from fedsim.records import array_record_from_torch

    return array_record_from_torch(_server_model(config).initial_adapters)


def _central_evaluation(config: RunConfig, spec: dict[str, Any], info: DataInfo) -> CentralEvaluation | None:
    """Evaluate the global adapters on the union of all clients' shifted test splits."""
    if not config.strategy.centralized_evaluation:
        return None
    from fedsim.clients.dora import evaluate_adapted
    from fedsim.dora.backbone import apply_shift
    from fedsim.partition import pooled_test_data
    from fedsim.records import to_torch_state_dict
    from fedsim.seeding import derive_seed

    entry = _server_model(config)
    features, labels = pooled_test_data(spec["data"], config.run.seed)
    shift_seed = derive_seed(config.run.seed, "dora-label-permutation")
    features, labels = apply_shift(features, labels, entry.settings.shift, info.num_classes, shift_seed)

    def evaluate(server_round: int, arrays: ArrayRecord) -> dict[str, float] | None:
        entry.load_adapters(to_torch_state_dict(arrays))
        loss, accuracy, _ = evaluate_adapted(entry, features, labels)
        return {"centralized_loss": loss, "centralized_accuracy": accuracy}

    return evaluate


def _round_config(config: RunConfig) -> dict[str, Any]:
    return {"device": client_device(config)}


def summarize_dora(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Add a ``dora`` block to ``summary``: accuracies, bytes sent and the full-model comparison.

    ``adapter_bytes_ratio`` is (``bytes_up`` + ``bytes_down``) / ``full_model_bytes`` over the
    whole run, the fraction of full-model FedAvg's traffic that the adapters needed.
    """
    final = summary.get("final", {})
    totals = summary.get("totals", {})
    sent = int(totals.get("bytes_up", 0)) + int(totals.get("bytes_down", 0))
    full = int(totals.get("full_model_bytes", 0))
    summary["dora"] = {
        "final_centralized_accuracy": final.get("centralized_accuracy"),
        "final_eval_accuracy": final.get("eval_accuracy"),
        "first_round_centralized_accuracy": rows[0].get("centralized_accuracy") if rows else None,
        "bytes_up": int(totals.get("bytes_up", 0)),
        "bytes_down": int(totals.get("bytes_down", 0)),
        "full_model_bytes": full,
        "adapter_bytes_ratio": sent / full if full > 0 else None,
        "clients_rejected": sum(int(row.get("clients_rejected", 0) or 0) for row in rows),
    }


register_method(
    Method(
        name="dora",
        section=DoRASection,
        summary="federated DoRA fine-tuning (Liu et al. 2024): a frozen pre-trained base, only adapters A, B and m are exchanged",
        client_app="fedsim.clients.dora:app",
        build_strategy=_build_dora,
        initial_arrays=_initial_arrays,
        central_evaluation=_central_evaluation,
        train_config=_round_config,
        evaluate_config=_round_config,
        summarize=summarize_dora,
        plot_columns=("full_model_bytes", "b_norm"),
    )
)
