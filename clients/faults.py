"""Fault injection for robustness studies: a Flower client mod driven by the run config.

The ``faults`` section of a run config lists faults, each applied to the given partitions in
the given rounds and phase (``train`` or ``evaluate``):

- ``raise``: the handler raises ``RuntimeError`` (a client that crashes in software);
- ``nan``: every float array of the reply is replaced by NaN (a diverged client);
- ``wrong_shape``: every array of the reply gets one extra element (a buggy client);
- ``hang``: the handler sleeps ``seconds`` before running (a straggler);
- ``exit``: the client process exits at once, as when it is killed (Ray engine only).

The round comes from the ``round`` entry that fedsim's grid puts in each message's ``fedsim``
config record, so faults work with every strategy.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

__all__ = ["FAULT_KINDS", "inject_faults"]

logger = logging.getLogger(__name__)

FAULT_KINDS = ("raise", "nan", "wrong_shape", "hang", "exit")


def _active_faults(message: Message, context: Context) -> list[dict[str, Any]]:
    record = message.content.config_records.get("fedsim") if message.has_content() else None
    if record is None or "spec" not in record:
        return []
    faults = json.loads(str(record["spec"])).get("faults") or []
    if not faults:
        return []
    server_round = int(record.get("round", 0))  # type: ignore[arg-type]
    phase = message.metadata.message_type.split(".", 1)[0]
    partition = int(context.node_config.get("partition-id", -1))
    return [
        fault for fault in faults
        if server_round in fault["rounds"] and partition in fault["partitions"] and fault["phase"] == phase
    ]


def _corrupt(reply: Message, kind: str) -> None:
    content = RecordDict()
    for name, record in reply.content.items():
        if not isinstance(record, ArrayRecord):
            content[name] = record
            continue
        changed = ArrayRecord()
        for key, array in record.items():
            values = array.numpy()
            if kind == "nan" and values.dtype.kind == "f":
                values = np.full_like(values, np.nan)
            elif kind == "wrong_shape":
                values = np.zeros(values.size + 1, dtype=values.dtype)
            changed[key] = Array(values)
        content[name] = changed
    reply.content = content


def inject_faults(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the faults configured for this partition, round and phase around the handler."""
    faults = _active_faults(message, context)
    for fault in faults:
        partition = context.node_config.get("partition-id")
        logger.warning("injecting fault %r into partition %s", fault["kind"], partition)
        if fault["kind"] == "raise":
            raise RuntimeError(f"injected fault: partition {partition} raises")
        if fault["kind"] == "exit":
            os._exit(1)
        if fault["kind"] == "hang":
            time.sleep(float(fault["seconds"]))

    reply = call_next(message, context)
    for fault in faults:
        if fault["kind"] in ("nan", "wrong_shape") and reply.has_content():
            _corrupt(reply, fault["kind"])
    return reply
