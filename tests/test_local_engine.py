"""The local engine's Grid: Flower messages in one process, errors and timeouts as under Ray."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from fedsim.engine.local import LocalGrid


@pytest.fixture(autouse=True)
def task_identity():
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous


def _app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        mode = message.content.config_records["config"]["mode"]
        if mode == "raise":
            raise ValueError("client broke")
        if mode == "sleep":
            time.sleep(5)
        if mode == "mutate":
            message.content.config_records["config"]["mode"] = "changed"
        calls = int(context.state.config_records.get("calls", ConfigRecord({"n": 0}))["n"]) + 1
        context.state.config_records["calls"] = ConfigRecord({"n": calls})
        metrics = MetricRecord({"partition": int(context.node_config["partition-id"]), "calls": calls})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return app


def _message(node_id: int, mode: str = "ok") -> Message:
    return Message(RecordDict({"config": ConfigRecord({"mode": mode})}), dst_node_id=node_id, message_type=MessageType.TRAIN)


def test_nodes_hold_partitions_in_order():
    grid = LocalGrid(_app(), num_nodes=4, seed=0)
    nodes = list(grid.get_node_ids())
    assert len(set(nodes)) == 4
    assert [grid.partition_mapping()[n] for n in nodes] == [0, 1, 2, 3]
    replies = grid.send_and_receive([_message(n) for n in nodes])
    assert [r.content.metric_records["metrics"]["partition"] for r in replies] == [0, 1, 2, 3]


def test_node_ids_depend_on_seed_only():
    assert list(LocalGrid(_app(), 3, seed=5).get_node_ids()) == list(LocalGrid(_app(), 3, seed=5).get_node_ids())
    assert list(LocalGrid(_app(), 3, seed=5).get_node_ids()) != list(LocalGrid(_app(), 3, seed=6).get_node_ids())


def test_context_state_persists_across_rounds():
    grid = LocalGrid(_app(), num_nodes=1)
    node = next(iter(grid.get_node_ids()))
    grid.send_and_receive([_message(node)])
    second = list(grid.send_and_receive([_message(node)]))[0]
    assert second.content.metric_records["metrics"]["calls"] == 2


def test_raising_client_becomes_error_reply():
    grid = LocalGrid(_app(), num_nodes=1)
    node = next(iter(grid.get_node_ids()))
    reply = list(grid.send_and_receive([_message(node, "raise")]))[0]
    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "client broke" in reply.error.reason
    assert reply.metadata.src_node_id == node


def test_client_past_timeout_gets_no_reply():
    grid = LocalGrid(_app(), num_nodes=2)
    slow, fast = list(grid.get_node_ids())
    started = time.monotonic()
    replies = list(grid.send_and_receive([_message(slow, "sleep"), _message(fast)], timeout=1.0))
    assert time.monotonic() - started < 4
    assert [r.metadata.src_node_id for r in replies] == []  # the deadline covers the whole exchange


def test_client_cannot_change_server_records():
    grid = LocalGrid(_app(), num_nodes=1)
    node = next(iter(grid.get_node_ids()))
    message = _message(node, "mutate")
    grid.send_and_receive([message])
    assert message.content.config_records["config"]["mode"] == "mutate"


def test_breakpoint_in_client_stops_in_terminal(tmp_path):
    script = tmp_path / "debug_run.py"
    script.write_text(textwrap.dedent(f"""
        import fedsim.clients.fedavg as fedavg_client
        from fedsim.config import load_config
        from fedsim.runner import simulate

        original = fedavg_client.app._registered_funcs["train.default"]

        def train_with_breakpoint(message, context):
            breakpoint()
            return original(message, context)

        fedavg_client.app._registered_funcs["train.default"] = train_with_breakpoint
        config = load_config(None, ["backend.name=local", "run.rounds=1", "run.progress=false",
                                    "data.num_clients=2", "run.output_dir={tmp_path / 'runs'}"])
        print("status", simulate(config).status)
    """))
    result = subprocess.run([sys.executable, str(script)], input="p 'inside the client'\nc\nc\nc\n",
                            capture_output=True, text=True, timeout=180, env={**__import__("os").environ, "PYTHONBREAKPOINT": "pdb.set_trace"})
    assert "(Pdb)" in result.stdout
    assert "'inside the client'" in result.stdout
    assert "status completed" in result.stdout
