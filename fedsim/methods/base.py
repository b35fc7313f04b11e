"""The method registry: how the runner builds each strategy and its client from a run config.

A :class:`Method` ties a strategy name (``strategy.name`` in the config) to its config section,
its Flower strategy, its ``ClientApp`` and its optional centralized evaluation. This glue is
runner-side: the strategies themselves take plain values and know nothing of fedsim's config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import Strategy

from fedsim.config import RunConfig, StrategySection, register_strategy_section

__all__ = ["DataInfo", "Method", "get_method", "methods", "register_method"]


@dataclass(frozen=True)
class DataInfo:
    """Shape of one example, number of classes and task of the configured data set."""

    input_shape: tuple[int, ...]
    num_classes: int
    task: str


CentralEvaluation = Callable[[int, ArrayRecord], dict[str, float] | None]


@dataclass(frozen=True)
class Method:
    """One strategy the runner can build.

    ``client_app`` is the import path ``module:attribute`` of the ``ClientApp``, so Ray workers
    import it by name. ``initial_arrays`` gives the arrays ``Strategy.start`` begins with.
    ``train_config`` and ``evaluate_config`` give the config records sent with each round.
    ``summarize`` adds method-specific keys to ``summary.json`` from the metric rows.
    """

    name: str
    section: type[StrategySection]
    summary: str
    client_app: str
    build_strategy: Callable[[RunConfig, DataInfo], Strategy]
    initial_arrays: Callable[[RunConfig, DataInfo], ArrayRecord]
    central_evaluation: Callable[[RunConfig, dict[str, Any], DataInfo], CentralEvaluation | None] | None = None
    train_config: Callable[[RunConfig], dict[str, Any]] = field(default=lambda config: {})
    evaluate_config: Callable[[RunConfig], dict[str, Any]] = field(default=lambda config: {})
    summarize: Callable[[list[dict[str, Any]], dict[str, Any]], None] | None = None
    plot_columns: tuple[str, ...] = ()

    def load_client_app(self) -> ClientApp:
        """Import and return the ``ClientApp``."""
        module_name, _, attribute = self.client_app.partition(":")
        return getattr(importlib.import_module(module_name), attribute)


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register ``method`` and its config section under ``method.name``."""
    _METHODS[method.name] = method
    register_strategy_section(method.name, method.section)
    return method


def methods() -> dict[str, Method]:
    """Return every registered method by name."""
    import fedsim.methods  # noqa: F401  (registers the built-in methods)

    return dict(_METHODS)


def get_method(name: str) -> Method:
    """Return the method registered as ``name``; raises ``KeyError`` listing the known names."""
    registered = methods()
    if name not in registered:
        raise KeyError(f"unknown strategy {name!r}; available: {', '.join(sorted(registered))}")
    return registered[name]
