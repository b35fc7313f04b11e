"""The one place every message passes: byte ledger, reply checks and the failure budget.

:class:`AccountingGrid` wraps the ``Grid`` that Flower hands the ``ServerApp`` (or fedsim's local
grid), so strategies run unchanged while fedsim

- attaches the run spec to every outgoing message (clients have no other way to learn it);
- counts the array bytes of every message per direction (payload bytes, ``numel * itemsize``,
  and serialized bytes as Flower encodes them);
- turns a reply with NaN or infinite values, or with arrays whose names, shapes or dtypes differ
  from what was sent, into an error reply, and a missing reply into a timeout error reply;
- returns replies in partition order, and stops the run when more than
  ``max_failure_fraction`` of one exchange failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp import Grid

from fedsim.strategies.common import nonfinite_reason

__all__ = ["AccountingGrid", "RoundTally", "TooManyFailuresError", "PARTITION_QUERY"]

logger = logging.getLogger("flwr")

PARTITION_QUERY = "query.partition"
SPEC_RECORD = "fedsim"

REJECTED_REPLY = 1001
"""Error code of a reply that fedsim rejected (non-finite values, wrong shapes or dtypes)."""

TIMED_OUT = 1002
"""Error code of a message that got no reply within the round timeout."""


class TooManyFailuresError(RuntimeError):
    """More clients failed in one exchange than ``max_failure_fraction`` allows."""


@dataclass
class RoundTally:
    """Bytes and reply outcomes counted since the last :meth:`AccountingGrid.take_tally`."""

    bytes_down: int = 0
    bytes_up: int = 0
    wire_bytes_down: int = 0
    wire_bytes_up: int = 0
    ok: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)


def array_bytes(content: RecordDict) -> tuple[int, int]:
    """Return ``(payload, serialized)`` bytes of all arrays in ``content``.

    Payload bytes are ``numel * itemsize`` summed over arrays; serialized bytes are the length
    of each array's encoded buffer as Flower sends it (payload plus a small header).
    """
    payload = serialized = 0
    for record in content.array_records.values():
        for array in record.values():
            count = 1
            for dim in array.shape:
                count *= int(dim)
            payload += count * _itemsize(array.dtype)
            serialized += len(array.data)
    return payload, serialized


_ITEMSIZES: dict[str, int] = {}


def _itemsize(dtype: str) -> int:
    if dtype not in _ITEMSIZES:
        import numpy as np

        _ITEMSIZES[dtype] = np.dtype(dtype).itemsize
    return _ITEMSIZES[dtype]


def short_reason(reason: str) -> str:
    """Shorten an error reason to the client's own message on one line.

    Flower wraps a client's exception as ``<class '...ClientAppException'>:<'\nException
    ClientAppException occurred. Message: <text>'>``, and Ray adds multi-line actor details when
    a worker process dies; logs and rows keep only the part a user needs.
    """
    text = reason
    marker = "Message: "
    if "ClientAppException" in text and marker in text:
        text = text.split(marker, 1)[1]
        if text.endswith("'>"):
            text = text[:-2]
    if "ActorDiedError" in text or "RayActorError" in text:
        return "the client's Ray worker process died (killed, out of memory or crashed)"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else reason


def _category(message_type: str) -> str:
    return message_type.split(".", 1)[0]


def _array_layout(record: ArrayRecord) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {key: (array.dtype, tuple(array.shape)) for key, array in record.items()}


def layout_mismatch(sent: RecordDict, reply: RecordDict) -> str | None:
    """Describe how the arrays of ``reply`` differ from same-named array records in ``sent``.

    Only array records present in both are compared, so a reply may carry new records.
    """
    for name, reply_record in reply.array_records.items():
        if name not in sent.array_records:
            continue
        expected, received = _array_layout(sent.array_records[name]), _array_layout(reply_record)
        if expected.keys() != received.keys():
            missing = sorted(set(expected) - set(received))
            extra = sorted(set(received) - set(expected))
            return f"array record '{name}' has missing keys {missing} and unexpected keys {extra}"
        for key, (dtype, shape) in expected.items():
            if received[key] != (dtype, shape):
                got_dtype, got_shape = received[key]
                return f"array '{name}/{key}' has dtype {got_dtype} and shape {got_shape}, expected {dtype} and {shape}"
    return None


class AccountingGrid(Grid):
    """A ``Grid`` that wraps another, with fedsim's byte ledger and reply checks.

    ``spec_json`` is attached to every outgoing message as config record ``fedsim``.
    ``partition_of`` maps node ids to partition ids where the engine provides it; otherwise the
    grid asks every node once (message type ``query.partition``) before the first exchange.
    """

    def __init__(
        self,
        inner: Grid,
        spec_json: str,
        max_failure_fraction: float = 1.0,
        partition_of: dict[int, int] | None = None,
        probe_timeout: float = 600.0,
        expected_nodes: int | None = None,
    ) -> None:
        self.inner = inner
        self.spec_json = spec_json
        self.max_failure_fraction = max_failure_fraction
        self.probe_timeout = probe_timeout
        self.expected_nodes = expected_nodes
        self._partitions: dict[int, int] | None = dict(partition_of) if partition_of is not None else None
        self.current_round = 1
        self._tally = RoundTally()

    # Delegated parts of the Grid interface.
    def set_run(self, run: Any) -> None:
        """Set the run on the wrapped grid."""
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        """Run information of the wrapped grid."""
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        """Create a message through the wrapped grid."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Return the node ids of the wrapped grid, once all expected nodes are connected."""
        if self._partitions is not None:
            return list(self._partitions)
        return self._wait_for_nodes()

    # Partition order.
    def _ensure_partitions(self) -> dict[int, int]:
        if self._partitions is None:
            self._partitions = self._probe_partitions()
        return self._partitions

    def _wait_for_nodes(self) -> list[int]:
        # Flower's simulation registers its nodes while the ServerApp is already running.
        deadline = time.monotonic() + self.probe_timeout
        node_ids = list(self.inner.get_node_ids())
        while self.expected_nodes is not None and len(node_ids) < self.expected_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} of {self.expected_nodes} nodes connected within {self.probe_timeout} s"
                )
            time.sleep(0.02)
            node_ids = list(self.inner.get_node_ids())
        return node_ids

    def _probe_partitions(self) -> dict[int, int]:
        node_ids = self._wait_for_nodes()
        queries = [Message(RecordDict(), dst_node_id=n, message_type=PARTITION_QUERY) for n in node_ids]
        replies = list(self.inner.send_and_receive(queries, timeout=self.probe_timeout))
        mapping: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(
                    f"node {reply.metadata.src_node_id} failed to report its partition id: {reply.error.reason}"
                )
            mapping[int(reply.metadata.src_node_id)] = int(reply.content.metric_records["partition"]["partition-id"])  # type: ignore[arg-type]
        missing = sorted(set(node_ids) - set(mapping))
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(node_ids)} nodes did not report their partition id within {self.probe_timeout} s")
        return mapping

    def node_ids_in_partition_order(self) -> list[int]:
        """Return the node ids sorted by partition id."""
        partitions = self._ensure_partitions()
        return sorted(partitions, key=partitions.__getitem__)

    def partition_of(self, node_id: int) -> int:
        """Return the partition id of ``node_id`` (-1 when unknown)."""
        return self._ensure_partitions().get(int(node_id), -1)

    # Exchanges.
    def _attach_spec(self, message: Message) -> None:
        if message.has_content():
            record = ConfigRecord({"spec": self.spec_json, "round": self.current_round})
            message.content.config_records[SPEC_RECORD] = record

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Attach the spec, count the bytes and push ``messages``."""
        batch = list(messages)
        for message in batch:
            self._count_down(message)
        return self.inner.push_messages(batch)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull replies and count their bytes (checks need the sent messages: use send_and_receive)."""
        replies = list(self.inner.pull_messages(message_ids))
        for reply in replies:
            if reply.has_content():
                self._count_up(reply.content)
        return replies

    def _count_down(self, message: Message) -> None:
        self._attach_spec(message)
        payload, serialized = array_bytes(message.content)
        self._tally.bytes_down += payload
        self._tally.wire_bytes_down += serialized

    def _count_up(self, content: RecordDict) -> None:
        payload, serialized = array_bytes(content)
        self._tally.bytes_up += payload
        self._tally.wire_bytes_up += serialized

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send ``messages``, check every reply, and return one reply per message in partition order.

        Raises :class:`TooManyFailuresError` when more than ``max_failure_fraction`` of them failed.
        """
        batch = list(messages)
        if not batch:
            return []
        self._ensure_partitions()
        for message in batch:
            self._count_down(message)

        started = time.monotonic()
        replies = list(self.inner.send_and_receive(batch, timeout=timeout))
        by_request = {reply.metadata.reply_to_message_id: reply for reply in replies}

        checked = []
        for message in batch:
            reply = by_request.get(message.metadata.message_id)
            if reply is None:
                waited = time.monotonic() - started
                reply = Message(Error(code=TIMED_OUT, reason=f"no reply within the round timeout ({waited:.1f} s; strategy.round_timeout_s)"), reply_to=message)
            else:
                if reply.has_content():
                    self._count_up(reply.content)
                reply = self._check_reply(message, reply)
            checked.append(reply)

        self._record_outcomes(batch, checked)
        return sorted(checked, key=lambda reply: self.partition_of(reply.metadata.src_node_id))

    def _check_reply(self, message: Message, reply: Message) -> Message:
        if reply.has_error():
            return reply
        reason = nonfinite_reason(reply.content)
        if reason is None and _category(message.metadata.message_type) == "train":
            reason = layout_mismatch(message.content, reply.content)
        if reason is None:
            return reply
        return Message(Error(code=REJECTED_REPLY, reason=f"reply rejected: {reason}"), reply_to=message)

    def _record_outcomes(self, batch: list[Message], replies: list[Message]) -> None:
        category = _category(batch[0].metadata.message_type)
        failed = []
        for reply in replies:
            node_id = int(reply.metadata.src_node_id)
            if reply.has_error():
                entry = {
                    "round": self.current_round,
                    "phase": category,
                    "partition_id": self.partition_of(node_id),
                    "node_id": node_id,
                    "reason": short_reason(reply.error.reason or ""),
                }
                failed.append(entry)
                logger.warning(
                    "round %d %s: client of partition %d (node %d) failed: %s",
                    self.current_round, category, entry["partition_id"], node_id, entry["reason"],
                )
        self._tally.ok[category] = self._tally.ok.get(category, 0) + len(replies) - len(failed)
        self._tally.failed[category] = self._tally.failed.get(category, 0) + len(failed)
        self._tally.failures.extend(failed)

        if len(failed) > self.max_failure_fraction * len(replies):
            details = "; ".join(f"partition {f['partition_id']}: {f['reason']}" for f in failed[:5])
            raise TooManyFailuresError(
                f"round {self.current_round} ({category}): {len(failed)} of {len(replies)} clients failed, "
                f"more than strategy.max_failure_fraction={self.max_failure_fraction} allows. {details}. "
                "Fix the failing clients or raise strategy.max_failure_fraction."
            )

    def take_tally(self) -> RoundTally:
        """Return what crossed the grid since the last call, and start a new tally."""
        tally, self._tally = self._tally, RoundTally()
        return tally

    def peek_tally(self) -> RoundTally:
        """Return the running tally without resetting it."""
        return self._tally
