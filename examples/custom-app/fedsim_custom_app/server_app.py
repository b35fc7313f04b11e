"""ServerApp that runs fedsim's FedAvg or SpaFL strategy on the SuperNodes of a federation.

Every setting comes from the run config, which is ``[tool.flwr.app.config]`` in
``pyproject.toml`` with the overrides of ``flwr run --run-config``. ``strategy`` picks the
method, and ``fedsim-spec`` describes the data, model and local training that the clients use.
The server reads the same spec to build the initial model, so the arrays it sends fit the
clients' models.
"""

from __future__ import annotations

import json
import time
from logging import INFO
from typing import Any

from fedsim.clients.common import SPEC_RUN_CONFIG_KEY
from fedsim.models import build_model
from fedsim.partition import dataset_info
from fedsim.sparse import get_thresholds, to_masked
from fedsim.strategies import FedAvg, SpaFL
from fedsim.strategies.spafl import thresholds_to_record
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

app = ServerApp()


def _run_model(spec: dict[str, Any]) -> Any:
    """Build the spec's model with the run's seeded initialisation, as fedsim's clients do."""
    input_shape, num_classes, _ = dataset_info(spec["data"], int(spec["seed"]))
    model_spec = dict(spec["model"])
    name = model_spec.pop("name")
    options = {"hidden": list(model_spec["hidden"])} if name == "mlp" else {}
    return build_model(name, input_shape, num_classes, seed=int(spec["seed"]), **options)


def _fedavg(config: dict[str, Any], spec: dict[str, Any]) -> tuple[Strategy, ArrayRecord]:
    strategy = FedAvg(
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=float(config["fraction-evaluate"]),
        seed=int(spec["seed"]),
    )
    return strategy, ArrayRecord(_run_model(spec).state_dict())


def _spafl(config: dict[str, Any], spec: dict[str, Any]) -> tuple[Strategy, ArrayRecord]:
    # SpaFL sends the local training settings with every request, so they come from the
    # spec's client section here. The other SpaFL settings keep the strategy's defaults.
    client = spec["client"]
    strategy = SpaFL(
        fraction_train=float(config["fraction-train"]),
        fraction_evaluate=float(config["fraction-evaluate"]),
        seed=int(spec["seed"]),
        lr=float(client["lr"]),
        local_epochs=int(client["local_epochs"]),
        batch_size=int(client["batch_size"]),
        momentum=float(client["momentum"]),
        weight_decay=float(client["weight_decay"]),
    )
    # SpaFL's global model is one threshold per output unit of each masked layer. to_masked
    # starts them at zero, as it does in every client's copy of the model.
    return strategy, thresholds_to_record(get_thresholds(to_masked(_run_model(spec))))


BUILDERS = {"fedavg": _fedavg, "spafl": _spafl}


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= count:
            log(INFO, "%d SuperNodes connected", connected)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {connected} of min-nodes={count} SuperNodes connected within "
                f"node-wait-s={timeout_s} seconds. Start more SuperNodes or lower min-nodes"
            )
        time.sleep(1.0)


def _report(result: Result, num_rounds: int) -> None:
    """Log the last round's federated evaluation, or raise when no client evaluated."""
    metrics = result.evaluate_metrics_clientapp.get(num_rounds)
    if metrics is None:
        raise RuntimeError(
            f"no client returned evaluation metrics in round {num_rounds}. "
            "The SuperNode logs show the clients' errors"
        )
    log(INFO, "final evaluation after round %d: %s", num_rounds, json.dumps(dict(metrics), sort_keys=True))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the strategy that ``strategy`` names and run ``num-server-rounds`` rounds."""
    config = dict(context.run_config)
    method = str(config.get("strategy", "fedavg"))
    if method not in BUILDERS:
        raise ValueError(f"invalid strategy {method!r} in the run config. Expected one of: {', '.join(BUILDERS)}")
    spec = json.loads(str(config[SPEC_RUN_CONFIG_KEY]))
    strategy, initial_arrays = BUILDERS[method](config, spec)

    num_rounds = int(config["num-server-rounds"])
    _wait_for_nodes(grid, int(config["min-nodes"]), float(config["node-wait-s"]))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=num_rounds,
        timeout=float(config["round-timeout-s"]),
    )
    _report(result, num_rounds)
