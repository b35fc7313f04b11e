"""Runner glue for federated averaging (``fedavg``) and local-only training (``local``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.config import RunConfig, StrategySection
from fedsim.methods.base import CentralEvaluation, DataInfo, Method, register_method
from fedsim.models import build_model

__all__ = ["FedAvgSection", "LocalSection", "build_run_model", "central_model_evaluation"]


@dataclass
class FedAvgSection(StrategySection):
    """Federated averaging; no keys beyond the common ones."""

    name: str = "fedavg"


@dataclass
class LocalSection(StrategySection):
    """Local-only training; no keys beyond the common ones."""

    name: str = "local"
    centralized_evaluation: bool = False


def build_run_model(config: RunConfig, info: DataInfo) -> Any:
    """Build the configured model with the run's seeded initialisation."""
    options = {"hidden": list(config.model.hidden)} if config.model.name == "mlp" else {}
    return build_model(config.model.name, info.input_shape, info.num_classes, seed=config.run.seed, **options)


def central_model_evaluation(config: RunConfig, spec: dict[str, Any], info: DataInfo) -> CentralEvaluation | None:
    """Evaluate the global model on the union of all clients' test splits after each round."""
    if not config.strategy.centralized_evaluation:
        return None
    from fedsim.partition import pooled_test_data
    from fedsim.training import evaluate_model

    features, labels = pooled_test_data(spec["data"], config.run.seed)
    model = build_run_model(config, info)

    def evaluate(server_round: int, arrays: ArrayRecord) -> dict[str, float] | None:
        model.load_state_dict(arrays.to_torch_state_dict())
        result = evaluate_model(model, features, labels, task=info.task)
        metrics = {"centralized_loss": result.loss}
        if info.task != "regression":
            metrics["centralized_accuracy"] = result.accuracy
        return metrics

    return evaluate


def _build_fedavg(config: RunConfig, info: DataInfo) -> Strategy:
    from fedsim.strategies import FedAvg

    section = config.strategy
    return FedAvg(
        fraction_train=section.fraction_train,
        fraction_evaluate=section.fraction_evaluate,
        min_train_nodes=section.min_train_nodes,
        min_evaluate_nodes=section.min_evaluate_nodes,
        seed=config.run.seed,
    )


def _build_local(config: RunConfig, info: DataInfo) -> Strategy:
    from fedsim.strategies import LocalOnly

    section = config.strategy
    return LocalOnly(
        fraction_train=section.fraction_train,
        fraction_evaluate=section.fraction_evaluate,
        min_train_nodes=section.min_train_nodes,
        min_evaluate_nodes=section.min_evaluate_nodes,
        seed=config.run.seed,
    )


register_method(
    Method(
        name="fedavg",
        section=FedAvgSection,
        summary="federated averaging of the whole model (McMahan et al. 2017), seeded sampling",
        client_app="fedsim.clients.fedavg:app",
        build_strategy=_build_fedavg,
        initial_arrays=lambda config, info: ArrayRecord(build_run_model(config, info).state_dict()),
        central_evaluation=central_model_evaluation,
    )
)

register_method(
    Method(
        name="local",
        section=LocalSection,
        summary="local-only training: each client trains its own model, nothing is exchanged",
        client_app="fedsim.clients.local_only:app",
        build_strategy=_build_local,
        initial_arrays=lambda config, info: ArrayRecord(),
    )
)
