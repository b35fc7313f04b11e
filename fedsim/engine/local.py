"""The local engine: a ``ServerApp`` and a ``ClientApp`` in one process, with no Ray.

:class:`LocalGrid` implements Flower's ``Grid`` interface by calling the ``ClientApp`` directly,
one message after another, with real Flower ``Message`` objects carrying the same records as
under Flower's simulation engine. Each node has one ``Context`` that persists across rounds,
with ``partition-id`` and ``num-partitions`` in its node config, as Flower's simulation assigns
them (node ``i`` of ``n`` gets partition ``i``).

Client calls run in the calling thread, so a ``breakpoint()`` in a client handler stops in the
terminal like in any script. When that thread is the main thread, a call that exceeds the
round timeout is interrupted by a ``SIGALRM`` timer and reported as timed out (raise
``strategy.round_timeout_s`` while you sit in the debugger). Elsewhere, where signals cannot be
used, calls run in one worker thread instead: Python cannot stop a thread, so a hung call is
abandoned there and keeps running in the background while the round goes on. The thread hand-off
costs about a millisecond per call, which is why it is not the default.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from copy import copy
from uuid import uuid4

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsim.seeding import derive_seed

__all__ = ["LocalGrid", "run_local"]

logger = logging.getLogger("flwr")


class _ClientTimeout(BaseException):
    """A client call ran past its timeout. A ``BaseException``, so client code cannot catch it."""


def _copy_content(content: RecordDict) -> RecordDict:
    # Arrays contain immutable bytes, so copying the containers is enough to keep a client from
    # changing the records the server still uses, as serialization does under Ray.
    copied = RecordDict()
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            copied[name] = ArrayRecord({key: array for key, array in record.items()})
        elif isinstance(record, ConfigRecord):
            copied[name] = ConfigRecord(dict(record))
        elif isinstance(record, MetricRecord):
            copied[name] = MetricRecord(dict(record))
        else:
            copied[name] = record
    return copied


class LocalGrid(Grid):
    """An in-process ``Grid`` over ``num_nodes`` nodes that each run ``client_app``.

    Node ids are stable 63-bit integers derived from ``seed`` and the partition id, so logs are
    comparable between runs; strategies must not assume any order of the ids themselves.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, seed: int = 0, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._node_ids = [derive_seed(seed, "node-id", pid) or 1 for pid in range(num_nodes)]
        self._partition_of = {node_id: pid for pid, node_id in enumerate(self._node_ids)}
        self._contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node_id, pid in self._partition_of.items()
        }
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsim-client")

    # Grid interface.
    def set_run(self, run: Run) -> None:
        """Set the run this grid operates in."""
        self._run = run

    @property
    def run(self) -> Run:
        """Run information."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        """Create a message (Flower deprecates this in favour of the ``Message`` constructor)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """Return the node ids in partition order."""
        return list(self._node_ids)

    def node_ids_in_partition_order(self) -> list[int]:
        """Return the node ids sorted by partition id."""
        return list(self._node_ids)

    def partition_mapping(self) -> dict[int, int]:
        """Return ``{node id: partition id}``."""
        return dict(self._partition_of)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue ``messages``; they run when their replies are pulled."""
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"message addressed to unknown node {message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self._pending[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the queued messages among ``message_ids`` and return their replies."""
        wanted = list(message_ids)
        for message_id in wanted:
            if message_id in self._pending:
                message = self._pending.pop(message_id)
                self._replies[message_id] = self._execute(message, timeout=None)
        return [self._replies.pop(i) for i in wanted if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run each message on its node in turn; a call past ``timeout`` gets no reply.

        ``timeout`` bounds the whole exchange, as in Flower's grid: once it has passed, the
        remaining messages are not run and get no reply.
        """
        ids = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies = []
        for message_id in ids:
            message = self._pending.pop(message_id)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                continue
            reply = self._execute(message, remaining)
            if reply is not None:
                replies.append(reply)
        return replies

    # Execution.
    def _call_client(self, message: Message, context: Context) -> Message:
        try:
            return self.client_app(message, context)
        except _ClientTimeout:
            raise
        except Exception as error:
            # Flower's Ray workers wrap ClientApp errors the same way.
            raise ClientAppException(str(error)) from error

    def _call_in_thread(self, message: Message, context: Context, timeout: float | None) -> Message:
        future = self._executor.submit(self._call_client, message, context)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            self._executor.shutdown(wait=False)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsim-client")
            raise _ClientTimeout from None

    def _call_with_alarm(self, message: Message, context: Context, timeout: float) -> Message:
        def interrupt(signum: int, frame: object) -> None:
            raise _ClientTimeout

        previous = signal.signal(signal.SIGALRM, interrupt)
        signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-3))
        try:
            return self._call_client(message, context)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def _execute(self, message: Message, timeout: float | None) -> Message | None:
        node_id = message.metadata.dst_node_id
        context = self._contexts[node_id]
        delivered = Message(content=_copy_content(message.content), metadata=copy(message.metadata))
        try:
            if timeout is None:
                reply = self._call_client(delivered, context)
            elif threading.current_thread() is threading.main_thread():
                reply = self._call_with_alarm(delivered, context, timeout)
            else:
                reply = self._call_in_thread(delivered, context, timeout)
        except _ClientTimeout:
            logger.error(
                "client of partition %d (node %d) exceeded the timeout of %.1f s and was abandoned",
                self._partition_of[node_id], node_id, timeout,
            )
            return None
        except ClientAppException as error:
            logger.error(error)
            logger.error("".join(traceback.format_exception(error.__cause__ or error)))
            reason = str(type(error)) + ":<'" + str(error) + "'>"
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    def close(self) -> None:
        """Stop the worker thread (a hung client call is left running)."""
        self._executor.shutdown(wait=False)


def run_local(server_app: ServerApp, client_app: ClientApp, num_nodes: int, seed: int = 0) -> LocalGrid:
    """Run ``server_app`` against ``num_nodes`` in-process nodes running ``client_app``.

    Exceptions of the ``ServerApp`` reach the caller; those of the ``ClientApp`` become error
    replies, as under Flower's simulation engine. Returns the grid used.
    """
    run_id = 1
    grid = LocalGrid(client_app, num_nodes, seed=seed, run_id=run_id)
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    server_context = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config={})
    try:
        server_app(grid=grid, context=server_context)
    finally:
        grid.close()
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous
    return grid
