"""The main job: build the ``ServerApp`` and ``ClientApp`` of a run config and run them.

:func:`simulate` writes the run folder (config, one metrics row per round, summary, plots) and
returns a :class:`RunOutcome`. Bad input (an invalid data set setting, missing files, a model that
does not fit the data) raises :class:`RunInputError` before anything starts; a run that fails
later (too many client failures, a ServerApp error, Ray resources) is recorded as failed in
``summary.json`` with its reason, keeping every round already written.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsim.accounting import AccountingGrid, TooManyFailuresError
from fedsim.config import RunConfig, to_dict, to_yaml
from fedsim.datasets import DataFileError
from fedsim.engine.environment import prepare_environment
from fedsim.engine.ray_engine import RayResourceError
from fedsim.methods import DataInfo, get_method
from fedsim.partition import PartitionError, dataset_info
from fedsim.plots import plot_runs
from fedsim.recorder import RoundHook, RoundRecorder
from fedsim.results import RunFolder, summarize, versions

__all__ = ["RunInputError", "RunOutcome", "client_spec", "simulate"]

logger = logging.getLogger(__name__)


class RunInputError(ValueError):
    """The run cannot start with this config and data; the message names the fix."""


@dataclass
class RunOutcome:
    """What a run left behind: its folder, status, summary and rows."""

    folder: RunFolder
    status: str
    summary: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def client_spec(config: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Return the run spec every client receives: data, model, client and strategy settings."""
    return {
        "data": to_dict(config.data),
        "model": to_dict(config.model),
        "client": to_dict(config.client),
        "strategy": to_dict(config.strategy),
        "seed": config.run.seed,
        "run_dir": str(run_dir.resolve()),
        "threads": max(1, int(config.backend.client_resources.num_cpus)),
        "faults": [to_dict(fault) for fault in config.faults],
    }


def _data_info(config: RunConfig, spec: dict[str, Any]) -> DataInfo:
    try:
        shape, classes, task = dataset_info(spec["data"], config.run.seed)
    except (DataFileError, PartitionError) as error:
        raise RunInputError(str(error)) from error
    return DataInfo(shape, classes, task)


def _check_model(config: RunConfig, info: DataInfo) -> None:
    from fedsim.methods.fedavg import build_run_model

    try:
        build_run_model(config, info)
    except ValueError as error:
        raise RunInputError(f"model.name={config.model.name!r} does not fit data.dataset={config.data.dataset!r}: {error}") from error


def _run_engine(config: RunConfig, server_app: ServerApp, client_app: Any) -> None:
    if config.backend.name == "local":
        from fedsim.engine.local import run_local

        run_local(server_app, client_app, config.data.num_clients, seed=config.run.seed)
        return
    from fedsim.engine.ray_engine import RaySettings, run_ray

    backend = config.backend
    settings = RaySettings(
        address=backend.address,
        num_cpus=backend.num_cpus,
        num_gpus=backend.num_gpus,
        client_cpus=float(backend.client_resources.num_cpus),
        client_gpus=float(backend.client_resources.num_gpus),
    )
    run_ray(server_app, client_app, config.data.num_clients, settings)


def simulate(
    config: RunConfig,
    run_dir: str | Path | None = None,
    hooks: list[RoundHook] | None = None,
    on_start: Callable[[], None] | None = None,
) -> RunOutcome:
    """Run ``config`` to the end and write its run folder.

    ``run_dir`` overrides ``run.output_dir/<name>-<timestamp>``. ``hooks`` run after each
    round's row is written, with ``(round, arrays, row)``; ``on_start`` runs once the input is
    checked, just before the engine starts. Raises :class:`RunInputError` for bad
    input found before round 1; any later failure is returned as ``status == "failed"``.
    """
    prepare_environment()
    method = get_method(config.strategy.name)
    info = _data_info(config, {"data": to_dict(config.data)})
    _check_model(config, info)

    folder = RunFolder.create(config.run.output_dir, config.run.name, run_dir)
    folder.write_config(to_yaml(config))
    spec = client_spec(config, folder.path)

    strategy = method.build_strategy(config, info)
    initial_arrays = method.initial_arrays(config, info)
    central = method.central_evaluation(config, spec, info) if method.central_evaluation else None
    holder: dict[str, AccountingGrid] = {}
    recorder = RoundRecorder(folder, lambda: holder.get("grid"), central, hooks)
    recorder.attach(strategy)
    spec_json = json.dumps(spec, sort_keys=True)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        mapping = grid.partition_mapping() if hasattr(grid, "partition_mapping") else None
        accounting = AccountingGrid(
            grid,
            spec_json,
            config.strategy.max_failure_fraction,
            partition_of=mapping,
            expected_nodes=config.data.num_clients,
        )
        holder["grid"] = accounting
        strategy.start(
            grid=accounting,
            initial_arrays=initial_arrays,
            num_rounds=config.run.rounds,
            timeout=config.strategy.round_timeout_s,
            train_config=ConfigRecord(method.train_config(config)),
            evaluate_config=ConfigRecord(method.evaluate_config(config)),
            evaluate_fn=recorder.evaluate_fn,
        )

    if on_start is not None:
        on_start()
    started = time.perf_counter()
    status, error = "completed", None
    try:
        _run_engine(config, server_app, method.load_client_app())
    except RayResourceError as error:
        raise RunInputError(str(error)) from error
    except TooManyFailuresError as failure:
        status, error = "failed", str(failure)
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by the user (Ctrl-C); finished rounds are kept"
    except Exception as failure:  # the run failed after it started: record it, keep the rows
        logger.exception("run failed")
        status, error = "failed", f"{type(failure).__name__}: {failure}"
    wall_s = time.perf_counter() - started

    rows = folder.read_rows()
    summary = _summary(config, method, rows, status, error, wall_s, folder)
    folder.write_summary(summary)
    try:
        plot_runs([(config.run.name, rows)], folder.path / "plots", extra_columns=method.plot_columns)
    except Exception:  # a plot must never lose a finished run's results
        logger.exception("plotting failed; the metrics and summary are written")
    return RunOutcome(folder, status, summary, rows, error)


def _summary(config: RunConfig, method: Any, rows: list[dict[str, Any]], status: str, error: str | None, wall_s: float, folder: RunFolder) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "status": status,
        "error": error,
        "name": config.run.name,
        "strategy": config.strategy.name,
        "dataset": config.data.dataset,
        "model": config.model.name,
        "backend": config.backend.name,
        "rounds_planned": config.run.rounds,
        "rounds_completed": len(rows),
        **summarize(rows),
        "wall_s": wall_s,
        "run_dir": str(folder.path),
        "versions": versions(),
    }
    summary["bytes_up"] = summary["totals"].get("bytes_up", 0)
    summary["bytes_down"] = summary["totals"].get("bytes_down", 0)
    if method.summarize is not None:
        method.summarize(rows, summary)
    return summary
