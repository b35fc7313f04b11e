"""Runs attached to an existing Ray cluster on loopback: one started with ``ray start --head``,
and one with a second node process, as a multi-machine cluster would have."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from conftest import strip_timing

from fedsim.runner import RunInputError, simulate

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COMMON = ["run.rounds=2", "run.progress=false", "data.num_clients=4", "strategy.fraction_train=1.0", "model.hidden=[32]"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _loopback_environment() -> dict[str, str]:
    # "0" makes Ray bind its servers to 127.0.0.1 only; it also makes Ray refuse a second
    # node started with `ray start`, which is why the two-node test uses ray.cluster_utils.
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture
def ray_head():
    ray_cli = shutil.which("ray")
    if ray_cli is None:
        pytest.fail("the 'ray' command is missing; it comes with 'pip install ray'")
    port = _free_port()
    start = [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, env=_loopback_environment(), timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=_loopback_environment(), timeout=120)


def test_run_on_ray_start_head_cluster(run_config, tmp_path, ray_head):
    on_cluster = simulate(run_config("quickstart.yaml", *COMMON, f"backend.address={ray_head}"), run_dir=tmp_path / "cluster")
    on_local = simulate(run_config("quickstart.yaml", *COMMON, "backend.name=local"), run_dir=tmp_path / "local")

    assert on_cluster.status == "completed", on_cluster.error
    assert strip_timing(on_cluster.rows) == strip_timing(on_local.rows)


def test_cluster_without_gpu_fails_before_round_one(run_config, tmp_path, ray_head):
    config = run_config("quickstart.yaml", *COMMON, f"backend.address={ray_head}", "backend.client_resources.num_gpus=0.5")
    with pytest.raises(RunInputError, match=r"the Ray cluster has CPU=2, GPU=0"):
        simulate(config, run_dir=tmp_path / "run")


def test_run_on_two_node_cluster(run_config, tmp_path, monkeypatch):
    for key, value in _loopback_environment().items():
        monkeypatch.setenv(key, value)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        outcome = simulate(run_config("quickstart.yaml", *COMMON, f"backend.address={cluster.address}"), run_dir=tmp_path / "run")
    finally:
        cluster.shutdown()

    assert outcome.status == "completed", outcome.error
    assert [row["clients_ok"] for row in outcome.rows] == [4, 4]


def test_unreachable_cluster_is_input_error(run_config, tmp_path):
    # A bound socket that never listens keeps the port closed and out of other processes' hands.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        config = run_config("quickstart.yaml", *COMMON, f"backend.address=127.0.0.1:{port}")
        with pytest.raises(RunInputError, match="cannot connect to the Ray cluster"):
            simulate(config, run_dir=tmp_path / "run")
