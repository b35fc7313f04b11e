"""Flower's simulation engine on its Ray backend, behind one small adapter.

``flwr.simulation.run_simulation`` is deprecated in Flower 1.42 in favour of the ``flwr run``
command; this module is the one place that calls it, so it can be replaced in one place.
Ray is started here (or attached to ``address``) before the simulation, so the resources a run
asks for are checked before round 1.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedsim.engine.environment import prepare_environment

__all__ = ["RayResourceError", "RaySettings", "run_ray"]

logger = logging.getLogger(__name__)


class RayResourceError(RuntimeError):
    """The Ray cluster cannot provide the resources one client asks for."""


@dataclass(frozen=True)
class RaySettings:
    """Ray start-up and per-client resources."""

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    client_cpus: float = 1.0
    client_gpus: float = 0.0


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    # ray.init keeps retrying an unreachable address for minutes; a plain connect fails at once.
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as error:
        raise RayResourceError(
            f"cannot connect to the Ray cluster at backend.address={address!r}: {error}. "
            "Start it with 'ray start --head' or fix the address"
        ) from error


def _start_ray(settings: RaySettings) -> bool:
    """Start or attach to Ray; return True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    environment = prepare_environment()
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    runtime_env = {"env_vars": {**environment, "PYTHONPATH": pythonpath}}
    arguments: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "runtime_env": runtime_env,
        "configure_logging": True,
    }
    if settings.address is not None:
        _check_reachable(settings.address)
        arguments["address"] = settings.address
    else:
        arguments["num_cpus"] = settings.num_cpus if settings.num_cpus is not None else os.cpu_count()
        if settings.num_gpus is not None:
            arguments["num_gpus"] = settings.num_gpus
    try:
        ray.init(**arguments)
    except ConnectionError as error:
        raise RayResourceError(
            f"cannot connect to the Ray cluster at backend.address={settings.address!r}: {error}. "
            "Start it with 'ray start --head' or fix the address"
        ) from error
    return True


def check_resources(settings: RaySettings) -> dict[str, float]:
    """Raise :class:`RayResourceError` when no Ray node could run one client; return the totals."""
    import ray

    totals = {key: float(value) for key, value in ray.cluster_resources().items() if key in ("CPU", "GPU", "memory")}
    cpus, gpus = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    have = f"the Ray cluster has CPU={cpus:g}, GPU={gpus:g}"
    if settings.client_gpus > gpus:
        raise RayResourceError(
            f"backend.client_resources.num_gpus={settings.client_gpus:g} asks for more GPUs per client than exist: "
            f"{have}. Set backend.client_resources.num_gpus=0 or run where a GPU is available"
        )
    if settings.client_cpus > cpus:
        raise RayResourceError(
            f"backend.client_resources.num_cpus={settings.client_cpus:g} asks for more CPUs per client than exist: "
            f"{have}. Lower backend.client_resources.num_cpus"
        )
    return totals


def _actor_died(future: Any) -> bool:
    import ray
    from ray.exceptions import RayActorError

    ready, _ = ray.wait([future], timeout=0)
    if not ready:
        return False
    try:
        ray.get(future, timeout=0)
    except RayActorError:
        return True
    except Exception:  # the client raised: its actor is alive and goes back to the pool
        return False
    return False


def _replace_dead_actors() -> None:
    """Make Flower's actor pool replace an actor whose process died instead of reusing it.

    In Flower 1.42 ``BasicActorPool.add_actor_back_to_pool`` puts the actor of a finished job
    back into the pool even when its worker process died (killed, out of memory, ``os._exit``),
    so every later job sent to it fails and one dead client turns into failures of all later
    clients. This wraps that method once per process to start a fresh actor in its place.
    """
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    if getattr(BasicActorPool.add_actor_back_to_pool, "_fedsim_replaces_dead", False):
        return

    def add_actor_back_to_pool(self: Any, future: Any) -> None:
        actor = self._future_to_actor.pop(future)
        if _actor_died(future):
            logger.warning("a client's Ray worker process died; starting a new actor in its place")
            actor = self.create_actor_fn()
        self.pool.append(actor)

    add_actor_back_to_pool._fedsim_replaces_dead = True  # type: ignore[attr-defined]
    BasicActorPool.add_actor_back_to_pool = add_actor_back_to_pool  # type: ignore[method-assign]


class _DropDeprecationBanner(logging.Filter):
    """Drop Flower's deprecation banner for ``run_simulation``, which fedsim calls on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


def run_ray(server_app: ServerApp, client_app: ClientApp, num_nodes: int, settings: RaySettings) -> None:
    """Run ``server_app`` against ``num_nodes`` Ray-simulated nodes running ``client_app``.

    Raises :class:`RayResourceError` before any round when the resources cannot be met.
    Exceptions of the ``ServerApp`` reach the caller.
    """
    prepare_environment()
    import ray
    from flwr.simulation import run_simulation

    _replace_dead_actors()
    banner_filter = _DropDeprecationBanner()
    logging.getLogger("flwr").addFilter(banner_filter)
    started = _start_ray(settings)
    try:
        totals = check_resources(settings)
        concurrency = totals.get("CPU", 1.0) / settings.client_cpus
        if settings.client_gpus > 0:
            concurrency = min(concurrency, totals.get("GPU", 0.0) / settings.client_gpus)
        logger.info("Ray: %s; up to %d clients run at once", totals, int(concurrency))
        backend_config = {"client_resources": {"num_cpus": settings.client_cpus, "num_gpus": settings.client_gpus}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_nodes,
                backend_name="ray",
                backend_config=backend_config,
            )
    finally:
        logging.getLogger("flwr").removeFilter(banner_filter)
        if started:
            ray.shutdown()
