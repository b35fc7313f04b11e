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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedsim import __version__
from fedsim.accounting import AccountingGrid, TooManyFailuresError
from fedsim.checkpoint import (
    CheckpointError,
    check_compatible,
    describe_difference,
    latest_checkpoint,
    restore_client_state,
    write_checkpoint,
)
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
    """The outcome of a run: its folder, status, summary and metric rows."""

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
    resume: bool = False,
) -> RunOutcome:
    """Run ``config`` to the end and write its run folder.

    ``run_dir`` overrides ``run.output_dir/<name>-<timestamp>``. ``hooks`` run after each
    round's row is written, with ``(round, arrays, row)``; ``on_start`` runs once the input is
    checked, just before the engine starts. With ``resume`` the run continues in ``run_dir``
    after its last checkpoint and ends with the rows an uninterrupted run would have written.
    Raises :class:`RunInputError` for bad input found before round 1 (including a run folder
    written by another config or version); any later failure is returned as ``status == "failed"``.
    """
    prepare_environment()
    method = get_method(config.strategy.name)
    info = _data_info(config, {"data": to_dict(config.data)})
    _check_model(config, info)
    config_yaml = to_yaml(config)

    strategy = method.build_strategy(config, info)
    initial_arrays = method.initial_arrays(config, info)
    if resume:
        folder, start_round, elapsed_before, initial_arrays = _prepare_resume(config_yaml, run_dir, strategy, initial_arrays)
    else:
        if run_dir is not None and ((Path(run_dir) / "metrics.jsonl").exists() or (Path(run_dir) / "config.yaml").exists()):
            raise RunInputError(
                f"{str(run_dir)!r} already contains a run; continue it with 'fedsim resume {run_dir}' "
                "or pass a new folder to --output-dir"
            )
        folder = RunFolder.create(config.run.output_dir, config.run.name, run_dir)
        folder.write_config(config_yaml)
        start_round, elapsed_before = 0, 0.0
    spec = client_spec(config, folder.path)

    central = method.central_evaluation(config, spec, info) if method.central_evaluation else None
    holder: dict[str, AccountingGrid] = {}
    round_hooks = list(hooks or [])
    if config.run.checkpoint_every > 0:
        round_hooks.insert(0, _checkpoint_hook(config, folder, strategy, config_yaml))
    recorder = RoundRecorder(
        folder, lambda: holder.get("grid"), central, round_hooks, round_offset=start_round, elapsed_before=elapsed_before
    )
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
        accounting.current_round = start_round + 1
        holder["grid"] = accounting
        strategy.start(
            grid=accounting,
            initial_arrays=initial_arrays,
            num_rounds=config.run.rounds - start_round,
            timeout=config.strategy.round_timeout_s,
            train_config=ConfigRecord(method.train_config(config)),
            evaluate_config=ConfigRecord(method.evaluate_config(config)),
            evaluate_fn=recorder.evaluate_fn,
        )

    if on_start is not None:
        on_start()
    started = time.perf_counter() - elapsed_before
    status, error = "completed", None
    try:
        if start_round < config.run.rounds:
            _run_engine(config, server_app, method.load_client_app())
    except RayResourceError as resources:
        if not resume and not folder.read_rows():
            shutil.rmtree(folder.path, ignore_errors=True)  # nothing ran: leave no half-made folder
        raise RunInputError(str(resources)) from resources
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
    except Exception:  # a failed plot is logged, and the metrics and summary already written stay
        logger.exception("plotting failed; the metrics and summary are written")
    return RunOutcome(folder, status, summary, rows, error)


def _prepare_resume(
    config_yaml: str, run_dir: str | Path | None, strategy: Any, initial_arrays: ArrayRecord
) -> tuple[RunFolder, int, float, ArrayRecord]:
    """Check a run folder against the config, restore its last checkpoint, drop later rows."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        raise RunInputError(f"cannot resume {str(run_dir)!r}: it is not a run folder (no config.yaml); pass the folder 'fedsim simulate' wrote")
    folder = RunFolder(run_dir)
    stored_yaml = folder.config_path.read_text(encoding="utf-8")
    if stored_yaml != config_yaml:
        raise RunInputError(
            f"cannot resume {str(run_dir)!r}: it was written with a different config "
            f"({describe_difference(stored_yaml, config_yaml)}); start a new run instead"
        )
    checkpoint = latest_checkpoint(folder.path)
    try:
        if checkpoint is not None:
            check_compatible(checkpoint, config_yaml, __version__, stored_yaml)
    except CheckpointError as error:
        raise RunInputError(f"cannot resume {str(run_dir)!r}: {error}") from error

    if checkpoint is None and folder.read_rows():
        raise RunInputError(
            f"cannot resume {str(run_dir)!r}: it has no checkpoint (run.checkpoint_every was 0), so its "
            "rounds cannot be continued; start a new run with 'fedsim simulate', with run.checkpoint_every set"
        )
    start_round = checkpoint.round if checkpoint is not None else 0
    folder.truncate_rows(start_round)
    restore_client_state(folder.path, checkpoint)
    rows = folder.read_rows()
    elapsed_before = float(rows[-1].get("wall_s", 0.0)) if rows else 0.0
    if checkpoint is None:
        logger.warning("no checkpoint in %s: the run starts again from round 1", folder.path)
        return folder, 0, 0.0, initial_arrays
    restore = getattr(strategy, "restore_state", None)
    if callable(restore):
        restore(checkpoint.state.get("strategy", {}))
    logger.info("resuming %s after round %d", folder.path, start_round)
    return folder, start_round, elapsed_before, checkpoint.arrays


def _checkpoint_hook(config: RunConfig, folder: RunFolder, strategy: Any, config_yaml: str) -> RoundHook:
    every = config.run.checkpoint_every

    def checkpoint(server_round: int, arrays: ArrayRecord, row: dict[str, Any]) -> None:
        if server_round % every == 0 or server_round == config.run.rounds:
            state_of = getattr(strategy, "checkpoint_state", None)
            state = state_of() if callable(state_of) else {}
            write_checkpoint(folder.path, server_round, arrays, state, config_yaml, __version__)

    return checkpoint


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
