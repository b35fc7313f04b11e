"""The example app ``examples/custom-app`` under Flower's deployment engine, on loopback.

One SuperLink and two SuperNodes run as separate processes on 127.0.0.1, and ``flwr run``
submits two rounds of FedAvg and then two rounds of SpaFL. ``flwr run --stream`` exits 0 even when the
run failed, so each run is judged by the status that ``flwr ls`` reports. Each ClientApp
message starts a fresh ``flwr-clientapp`` process that imports torch and fedsim, so the test
takes about two minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "custom-app"
CONNECTION = "fedsim-test"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 15.0

QUIET_ENVIRONMENT = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path.name} is missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Deployment:
    """A SuperLink and its SuperNodes started by this test, with their logs and ports."""

    root: Path
    environment: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, name: str, command: list[str], port: int, cwd: Path) -> None:
        """Start ``command`` in its own process group and wait until ``port`` accepts connections."""
        cwd.mkdir(parents=True, exist_ok=True)
        with (self.root / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(
                command, cwd=cwd, env=self.environment, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.processes[name] = process
        self.ports[name] = port
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts_connections(port):
            if process.poll() is not None:
                pytest.fail(f"{name} exited with code {process.returncode}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not listen on {LOOPBACK}:{port} within {START_TIMEOUT_S} s:\n{self.log(name)}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        """Return the end of the log of process ``name``."""
        return _log_tail(self.root / f"{name}.log")

    def process_tree(self) -> list[psutil.Process]:
        """Return the started processes and all their descendants that are still running."""
        tree = []
        for process in self.processes.values():
            try:
                parent = psutil.Process(process.pid)
                tree.append(parent)
                tree.extend(parent.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return tree

    def listening_addresses(self) -> dict[tuple[str, int], str]:
        """Return ``{(ip, port): process name}`` of every TCP socket the process tree listens on."""
        addresses = {}
        for process in self.process_tree():
            try:
                connections = process.net_connections(kind="inet")
                name = process.name()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
            for connection in connections:
                if connection.status == psutil.CONN_LISTEN:
                    addresses[(connection.laddr.ip, connection.laddr.port)] = name
        return addresses

    def stop(self) -> list[psutil.Process]:
        """Stop every started process group and every descendant, and return the survivors.

        Flower's SuperExec runs in a session of its own, so it and the apps it started are
        stopped by process id when their parent's shutdown leaves them running.
        """
        tree = self.process_tree()
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=STOP_TIMEOUT_S)
        for process in alive:
            _signal_quietly(process, signal.SIGTERM)
        _, alive = psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
        for process in alive:
            _signal_quietly(process, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
        for process in self.processes.values():
            if process.poll() is None:
                process.wait(timeout=STOP_TIMEOUT_S)
        return [process for process in tree if _is_running(process)]


def _signal_quietly(process: psutil.Process, signum: int) -> None:
    try:
        process.send_signal(signum)
    except psutil.NoSuchProcess:
        pass


def _is_running(process: psutil.Process) -> bool:
    # is_running() compares the creation time, so a reused process id does not count.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _write_flower_config(flwr_home: Path, port: int) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{LOOPBACK}:{port}"\n'
        "insecure = true\n"
    )


def _command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"the {name!r} command is missing; it comes with 'pip install flwr'")
    return path


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Start a SuperLink and two SuperNodes on 127.0.0.1 and stop all of them afterwards."""
    tmp_path = tmp_path_factory.mktemp("deployment")
    superlink_port = _free_port()
    environment = {**os.environ, **QUIET_ENVIRONMENT, "FLWR_HOME": str(tmp_path / "flwr-home")}
    _write_flower_config(tmp_path / "flwr-home", superlink_port)
    running = Deployment(tmp_path, environment)
    try:
        running.start(
            "superlink",
            [_command("flower-superlink"), "--insecure", "--host", LOOPBACK, "--port", str(superlink_port),
             "--disable-runtime-dependency-installation"],
            superlink_port,
            tmp_path / "superlink",
        )
        for partition in (0, 1):
            port = _free_port()
            running.start(
                f"supernode-{partition}",
                [_command("flower-supernode"), "--insecure", "--superlink", f"{LOOPBACK}:{superlink_port}",
                 "--host", LOOPBACK, "--port", str(port),
                 "--node-config", f"partition-id={partition} num-partitions=2"],
                port,
                tmp_path / f"supernode-{partition}",
            )
        yield running
    finally:
        survivors = running.stop()
        assert not survivors, f"processes still running after the deployment stopped: {survivors}"


def _flwr(deployment: Deployment, app: Path, *arguments: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_command("flwr"), *arguments], cwd=app, env=deployment.environment,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def _run_app(deployment: Deployment, app: Path, *overrides: str) -> tuple[int, str]:
    """Run the app with ``flwr run --stream`` and return the run id and the streamed output."""
    command = ["run", ".", CONNECTION, "--stream"]
    for override in overrides:
        command += ["--run-config", override]
    finished = _flwr(deployment, app, *command, timeout=RUN_TIMEOUT_S)
    output = finished.stdout + finished.stderr
    assert finished.returncode == 0, f"flwr run failed with code {finished.returncode}:\n{output}"
    match = re.search(r"Successfully started run (\d+)", output)
    assert match is not None, f"flwr run printed no run id:\n{output}"
    return int(match.group(1)), output


def _run_status(deployment: Deployment, app: Path, run_id: int) -> dict[str, str]:
    listed = _flwr(deployment, app, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
    assert listed.returncode == 0, f"flwr ls failed with code {listed.returncode}:\n{listed.stdout}{listed.stderr}"
    runs = json.loads(listed.stdout)["runs"]
    assert len(runs) == 1, f"flwr ls listed {len(runs)} runs for run id {run_id}: {runs}"
    return runs[0]


def _assert_completed(deployment: Deployment, app: Path, run_id: int, output: str) -> None:
    run = _run_status(deployment, app, run_id)
    details = (
        f"run {run_id} is {run['status']} ({run['status-details']})\n--- flwr run output:\n{output}\n"
        f"--- supernode-0 log:\n{deployment.log('supernode-0')}"
    )
    assert run["status"] == "finished:completed", details
    assert "final evaluation after round 2" in output, details


def test_example_app_on_superlink_and_supernodes(deployment: Deployment, tmp_path: Path):
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))

    listening = deployment.listening_addresses()
    for name, port in deployment.ports.items():
        assert (LOOPBACK, port) in listening, f"{name} does not listen on {LOOPBACK}:{port}: {listening}"
    not_loopback = {address: name for address, name in listening.items() if address[0] != LOOPBACK}
    assert not not_loopback, f"started processes listen beyond loopback: {not_loopback}"

    fedavg_run, fedavg_output = _run_app(deployment, app, "num-server-rounds=2", "strategy='fedavg'")
    _assert_completed(deployment, app, fedavg_run, fedavg_output)
    assert "Starting FedAvg strategy" in fedavg_output

    spafl_run, spafl_output = _run_app(deployment, app, "num-server-rounds=2", "strategy='spafl'")
    _assert_completed(deployment, app, spafl_run, spafl_output)
    assert "Starting SpaFL strategy" in spafl_output
    for partition in (0, 1):
        state = deployment.root / f"supernode-{partition}" / "fedsim-client-state" / f"run-{spafl_run}" / "clients" / f"{partition}.safetensors"
        assert state.is_file(), f"SpaFL client {partition} stored no state at {state}"

    not_loopback = {address: name for address, name in deployment.listening_addresses().items() if address[0] != LOOPBACK}
    assert not not_loopback, f"started processes listen beyond loopback after the runs: {not_loopback}"


def test_failed_run_is_reported_by_status(deployment: Deployment, tmp_path: Path):
    app = tmp_path / "app"
    shutil.copytree(EXAMPLE, app, ignore=shutil.ignore_patterns("__pycache__"))

    run_id, output = _run_app(deployment, app, "strategy='no-such-method'")
    run = _run_status(deployment, app, run_id)

    assert run["status"] == "finished:failed", output
    assert "invalid strategy 'no-such-method'" in run["status-details"]
