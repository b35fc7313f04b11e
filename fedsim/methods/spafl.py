"""Runner glue for SpaFL (``strategy.name: spafl``): config section, strategy, summary.

SpaFL (Kim, Saad, Debbah and Hong, "SpaFL: Communication-Efficient Federated Learning with
Sparse Models and Low Computational Overhead", NeurIPS 2024, arXiv 2406.00431) masks every
Linear and Conv2d layer of the configured model with one trainable threshold per output unit.
Clients keep personal weights and exchange only thresholds. Local training uses the ``client``
section's ``lr``, ``local_epochs``, ``batch_size``, ``momentum`` and ``weight_decay`` with SGD.

The defaults are the method's own choices, not the official code's bugs. Each official-code
behaviour kept for reproduction is a switch: ``ste: cifar_code``, ``sign_mode: rowsum``,
``divisor: official``, ``th_update: eager_all | fmnist_code``, ``optimizer_persist: true``,
``warmup: false`` (CIFAR-10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.config import ConfigError, RunConfig, StrategySection, check_choice, check_value
from fedsim.methods.base import DataInfo, Method, register_method
from fedsim.methods.fedavg import build_run_model
from fedsim.sparse import DIVISORS, SIGN_MODES, STE_MODES, get_thresholds, to_masked

__all__ = ["SpaFLSection", "initial_thresholds", "summarize_spafl"]

TH_UPDATE_MODES = ("lazy", "eager_all", "fmnist_code", "off")
AGG_WEIGHTINGS = ("uniform", "num_examples")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    check_choice(f"strategy.{key}", value, allowed)


def _require(condition: bool, key: str, value: object, expected: str) -> None:
    check_value(condition, f"strategy.{key}", value, expected)


@dataclass
class SpaFLSection(StrategySection):
    """SpaFL's keys under ``strategy:``; the common keys keep their meaning.

    ``fraction_train`` defaults to 0.1 (10 of 100 clients) and ``centralized_evaluation`` to
    false, because SpaFL has no global model to evaluate. ``momentum`` null means
    ``client.momentum``.
    """

    name: str = "spafl"
    fraction_train: float = 0.1
    centralized_evaluation: bool = False
    alpha: float = 0.002
    warmup: bool = True
    warmup_period: float = 1.0
    ste: str = "identity"
    sign_mode: str = "elementwise"
    divisor: str = "fan_in"
    th_update: str = "lazy"
    agg_weighting: str = "uniform"
    eval_every: int = 1
    collapse_reset: bool = True
    collapse_density: float = 0.01
    grad_clip: float | None = None
    tau_clip: float | None = None
    lr_decay: float = 1.0
    lr_min: float = 0.0
    momentum: float | None = None
    optimizer_persist: bool = False
    apply_pending_on_eval: bool = False

    def __post_init__(self) -> None:
        # YAML 1.1 reads an unquoted `off` as the boolean false, which OmegaConf stores as "False".
        if self.th_update in ("False", "false"):
            self.th_update = "off"

    def validate(self, config: RunConfig) -> None:
        """Check SpaFL's keys and their combination with the rest of ``config``."""
        _choice("ste", self.ste, STE_MODES)
        _choice("sign_mode", self.sign_mode, SIGN_MODES)
        _choice("divisor", self.divisor, DIVISORS)
        _choice("th_update", self.th_update, TH_UPDATE_MODES)
        _choice("agg_weighting", self.agg_weighting, AGG_WEIGHTINGS)

        _require(self.fraction_train > 0, "fraction_train", self.fraction_train, "a number in (0, 1]; SpaFL must sample at least one client")
        _require(math.isfinite(self.alpha) and self.alpha >= 0, "alpha", self.alpha, "a number >= 0")
        _require(math.isfinite(self.warmup_period) and self.warmup_period > 0, "warmup_period", self.warmup_period, "a number of rounds > 0")
        _require(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
        _require(0.0 <= self.collapse_density < 1.0, "collapse_density", self.collapse_density, "a layer density in [0, 1)")
        if self.grad_clip is not None:
            _require(self.grad_clip > 0, "grad_clip", self.grad_clip, "null or a gradient norm > 0")
        if self.tau_clip is not None:
            _require(self.tau_clip > 0, "tau_clip", self.tau_clip, "null or a bound > 0")
        _require(0.0 < self.lr_decay <= 1.0, "lr_decay", self.lr_decay, "a factor per round in (0, 1]")
        _require(0.0 <= self.lr_min <= config.client.lr, "lr_min", self.lr_min, f"a learning rate in [0, client.lr = {config.client.lr}]")
        if self.momentum is not None:
            _require(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "null (use client.momentum) or a number in [0, 1)")

        if self.centralized_evaluation:
            raise ConfigError(
                "invalid value for 'strategy.centralized_evaluation': True; SpaFL has no global model "
                "to evaluate centrally. Set it to false; clients report personalized_accuracy instead"
            )
        if self.apply_pending_on_eval and self.th_update != "lazy":
            raise ConfigError(
                f"'strategy.apply_pending_on_eval' needs 'strategy.th_update' = 'lazy', got {self.th_update!r}; "
                "the eager modes apply every change when it is sent"
            )
        if config.client.optimizer != "sgd":
            raise ConfigError(f"invalid value for 'client.optimizer': {config.client.optimizer!r}; SpaFL trains with sgd")
        if config.data.dataset == "synthetic" and config.data.synthetic.task == "regression":
            raise ConfigError("SpaFL needs a classification task; 'data.synthetic.task' is 'regression'")


def initial_thresholds(config: RunConfig, info: DataInfo) -> dict[str, np.ndarray]:
    """Return the zero thresholds of the run's masked model: ``{layer: float32 (C_out,)}``."""
    model = to_masked(build_run_model(config, info))
    return {name: np.zeros_like(values) for name, values in get_thresholds(model).items()}


def _initial_arrays(config: RunConfig, info: DataInfo) -> ArrayRecord:
    from fedsim.strategies.spafl import thresholds_to_record

    return thresholds_to_record(initial_thresholds(config, info))


def _build_spafl(config: RunConfig, info: DataInfo) -> Strategy:
    from fedsim.strategies import SpaFL

    section = config.strategy
    assert isinstance(section, SpaFLSection)
    client = config.client
    momentum = client.momentum if section.momentum is None else section.momentum
    return SpaFL(
        fraction_train=section.fraction_train,
        fraction_evaluate=section.fraction_evaluate,
        min_train_nodes=section.min_train_nodes,
        min_evaluate_nodes=section.min_evaluate_nodes,
        seed=config.run.seed,
        lr=client.lr,
        lr_decay=section.lr_decay,
        lr_min=section.lr_min,
        local_epochs=client.local_epochs,
        batch_size=client.batch_size,
        momentum=momentum,
        weight_decay=client.weight_decay,
        optimizer_persist=section.optimizer_persist,
        alpha=section.alpha,
        warmup=section.warmup,
        warmup_period=section.warmup_period,
        ste=section.ste,
        sign_mode=section.sign_mode,
        divisor=section.divisor,
        th_update=section.th_update,
        agg_weighting=section.agg_weighting,
        eval_every=section.eval_every,
        collapse_reset=section.collapse_reset,
        collapse_density=section.collapse_density,
        grad_clip=section.grad_clip,
        tau_clip=section.tau_clip,
        apply_pending_on_eval=section.apply_pending_on_eval,
    )


def summarize_spafl(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Add SpaFL's headline numbers to ``summary`` under ``spafl`` and the totals.

    ``personalized_accuracy`` is reported as the final evaluation and the mean of the last 10
    evaluations (best-over-rounds stays under ``best``, labelled with its round). Training
    MACs and FLOPs are summed over all rounds into ``totals``.
    """
    final = summary.setdefault("final", {})
    last_mean = summary.setdefault("last10_mean", {})
    totals = summary.setdefault("totals", {})
    for column in ("train_macs", "train_flops", "resets"):
        totals[column] = sum(int(row.get(column, 0) or 0) for row in rows)

    evaluated = [row for row in rows if isinstance(row.get("personalized_accuracy"), (int, float))]
    summary["spafl"] = {
        "final_personalized_accuracy": final.get("personalized_accuracy"),
        "last10_personalized_accuracy": last_mean.get("personalized_accuracy"),
        "final_density": final.get("density"),
        "final_eval_density": final.get("eval_density"),
        "evaluations": len(evaluated),
        "bytes_up": summary.get("bytes_up", 0),
        "bytes_down": summary.get("bytes_down", 0),
        "train_flops": totals["train_flops"],
    }


register_method(
    Method(
        name="spafl",
        section=SpaFLSection,
        summary="SpaFL (Kim et al. 2024): personal sparse models, only per-unit pruning thresholds are exchanged",
        client_app="fedsim.clients.spafl:app",
        build_strategy=_build_spafl,
        initial_arrays=_initial_arrays,
        summarize=summarize_spafl,
        plot_columns=("density", "personalized_accuracy", "tau_mean", "train_flops"),
    )
)
