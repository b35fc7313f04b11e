"""ClientApp that hands each message to fedsim's FedAvg or SpaFL client app.

Flower loads one ClientApp per app, before any run config is known, so this app chooses
``fedsim.clients.fedavg.app`` or ``fedsim.clients.spafl.app`` per message from the run
config's ``strategy``. Before it does, it checks that the spec's ``data.num_clients`` equals
the SuperNode's ``num-partitions`` and makes the spec's ``run_dir`` absolute. fedsim's clients
keep each run's state in ``run-<run id>`` inside it. SpaFL clients keep their personal models there, so a new run never starts from the models
that an earlier run left behind.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

from fedsim.clients.common import SPEC_RUN_CONFIG_KEY
from fedsim.clients.fedavg import app as fedavg_app
from fedsim.clients.spafl import app as spafl_app
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

__all__ = ["METHODS", "app"]

METHODS: dict[str, ClientApp] = {"fedavg": fedavg_app, "spafl": spafl_app}
"""fedsim's client app of each method that the run config's ``strategy`` can name."""

app = ClientApp()

_RUN_SPECS: dict[tuple[int, str], str] = {}
_RUN_SPECS_LOCK = threading.Lock()


def _spec_for_run(context: Context) -> str:
    """Return the run config's spec with ``run_dir`` made absolute (clients add ``run-<run id>``).

    The result is cached, so a ClientApp process that handles many messages of one run
    rewrites the spec once.
    """
    if SPEC_RUN_CONFIG_KEY not in context.run_config:
        raise KeyError(f"the run config has no {SPEC_RUN_CONFIG_KEY!r} key. Set it in [tool.flwr.app.config]")
    text = str(context.run_config[SPEC_RUN_CONFIG_KEY])
    key = (context.run_id, text)
    with _RUN_SPECS_LOCK:
        if key in _RUN_SPECS:
            return _RUN_SPECS[key]

    spec = json.loads(text)
    num_clients = int(spec["data"]["num_clients"])
    num_partitions = context.node_config.get("num-partitions")
    if num_partitions is not None and int(num_partitions) != num_clients:
        raise ValueError(
            f"the run spec splits the data into data.num_clients={num_clients} partitions, but "
            f"this SuperNode's node config has num-partitions={num_partitions}. Make them equal"
        )
    base = Path(str(spec.get("run_dir") or "fedsim-client-state")).expanduser().resolve()
    spec["run_dir"] = str(base)  # fedsim's clients add run-<run id> to it
    run_text = json.dumps(spec, sort_keys=True)

    with _RUN_SPECS_LOCK:
        if len(_RUN_SPECS) >= 4:
            _RUN_SPECS.clear()
        _RUN_SPECS[key] = run_text
    return run_text


def _method_app(context: Context) -> ClientApp:
    method = str(context.run_config.get("strategy", "fedavg"))
    if method not in METHODS:
        raise ValueError(f"invalid strategy {method!r} in the run config. Expected one of: {', '.join(METHODS)}")
    return METHODS[method]


def _dispatch(message: Message, context: Context) -> Message:
    run_config = {**context.run_config, SPEC_RUN_CONFIG_KEY: _spec_for_run(context)}
    return _method_app(context)(message, dataclasses.replace(context, run_config=run_config))


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train with the chosen method's client app."""
    return _dispatch(message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate with the chosen method's client app."""
    return _dispatch(message, context)
