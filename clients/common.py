"""Client helpers shared by every method: the run spec, the data partition and the model.

The run spec is a plain dict with the ``data``, ``model`` and ``client`` sections of the run
config plus ``seed``, ``run_dir`` and ``threads``. fedsim's engines put it, as JSON, into the
``fedsim`` config record of every message, because Flower's simulation gives clients an empty
run config and only ``partition-id`` and ``num-partitions`` as node config. Under ``flwr run``
it comes from the run config key ``fedsim-spec`` instead.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsim.models import build_model
from fedsim.partition import ClientData, client_data
from fedsim.records import to_torch_state_dict

__all__ = [
    "SPEC_RECORD",
    "build_client_model",
    "get_client_data",
    "load_arrays",
    "new_client_app",
    "partition_id",
    "read_spec",
]

SPEC_RECORD = "fedsim"
"""Name of the config record that carries the run spec in each message."""

SPEC_RUN_CONFIG_KEY = "fedsim-spec"
"""Run-config key that carries the run spec as JSON under Flower's deployment engine."""


_SPECS: dict[str, dict[str, Any]] = {}
_SPECS_LOCK = threading.Lock()


def _parse_spec(text: str, run_id: int | None = None) -> dict[str, Any]:
    # Every message of a run carries the same spec, so parse it once per process.
    key = text if run_id is None else f"{run_id}:{text}"
    with _SPECS_LOCK:
        spec = _SPECS.get(key)
        if spec is None:
            if len(_SPECS) >= 4:
                _SPECS.clear()
                _CLIENT_DATA.clear()
            spec = json.loads(text)
            if run_id is not None and spec.get("run_dir"):
                # A run config is shared by every run of an app, so per-client state goes
                # into a folder of its own run.
                spec["run_dir"] = str(Path(spec["run_dir"]) / f"run-{run_id}")
            _SPECS[key] = spec
        return spec


def read_spec(message: Message, context: Context) -> dict[str, Any]:
    """Return the run spec from ``message`` or, failing that, from the run config.

    The dict is shared between calls: read it, do not change it. A spec from the run config
    gets ``run-<run id>`` appended to its ``run_dir``, because every run of a deployed app
    shares that config. Raises ``KeyError`` naming both places when neither carries the spec.
    """
    if SPEC_RECORD in message.content.config_records:
        return _parse_spec(str(message.content.config_records[SPEC_RECORD]["spec"]))
    if SPEC_RUN_CONFIG_KEY in context.run_config:
        return _parse_spec(str(context.run_config[SPEC_RUN_CONFIG_KEY]), run_id=int(context.run_id))
    raise KeyError(
        f"no run spec: the message has no {SPEC_RECORD!r} config record and the run config has "
        f"no {SPEC_RUN_CONFIG_KEY!r} key; set {SPEC_RUN_CONFIG_KEY} in the app's run config"
    )


def partition_id(context: Context) -> int:
    """Return this node's partition id from its node config."""
    if "partition-id" not in context.node_config:
        raise KeyError(
            "node config has no 'partition-id'; start the SuperNode with "
            "--node-config 'partition-id=<id> num-partitions=<n>'"
        )
    return int(context.node_config["partition-id"])


_THREADS_SET = threading.local()


def _set_threads(spec: dict[str, Any]) -> None:
    threads = int(spec.get("threads", 0))
    if threads > 0 and getattr(_THREADS_SET, "value", None) != threads:
        torch.set_num_threads(threads)
        _THREADS_SET.value = threads


_CLIENT_DATA: dict[tuple[int, int], ClientData] = {}


def get_client_data(spec: dict[str, Any], context: Context) -> ClientData:
    """Return this node's train and test split (built once per process and cached)."""
    _set_threads(spec)
    key = (id(spec), partition_id(context))
    data = _CLIENT_DATA.get(key)
    if data is None:
        data = client_data(spec["data"], int(spec["seed"]), key[1])
        if any(s is spec for s in _SPECS.values()):  # only specs held by the cache have stable ids
            _CLIENT_DATA[key] = data
    return data


_MODELS = threading.local()


def build_client_model(spec: dict[str, Any], data: ClientData) -> nn.Module:
    """Return a model for ``spec`` and ``data``, reused across calls in this thread.

    The caller must load the weights it needs: the instance keeps whatever the previous call
    left in it. Reuse avoids rebuilding and re-initialising the model for every message.
    """
    model_spec = dict(spec["model"])
    name = model_spec.pop("name")
    options = {"hidden": model_spec["hidden"]} if name == "mlp" else {}
    key = json.dumps([name, options, data.input_shape, data.num_classes], sort_keys=True)
    cache: dict[str, nn.Module] = getattr(_MODELS, "cache", None) or {}
    if key not in cache:
        cache.clear()
        cache[key] = build_model(name, data.input_shape, data.num_classes, seed=int(spec["seed"]), **options)
        _MODELS.cache = cache
    return cache[key]


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    """Load ``arrays`` into ``model``; raises ``ValueError`` naming the keys that do not match."""
    state = to_torch_state_dict(arrays)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"received arrays do not fit the model: missing {missing}, unexpected {unexpected}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"received array {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state)


def new_client_app() -> ClientApp:
    """Create a ``ClientApp`` with fedsim's ``query.partition`` handler registered.

    The handler replies with the node's partition id, which fedsim's grid uses to order nodes
    and replies by partition under Flower's simulation engine.
    """
    from fedsim.clients.faults import inject_faults

    app = ClientApp(mods=[inject_faults])

    @app.query("partition")
    def report_partition(message: Message, context: Context) -> Message:
        record = MetricRecord({"partition-id": partition_id(context)})
        return Message(RecordDict({"partition": record}), reply_to=message)

    return app
