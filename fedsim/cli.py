"""Command line: ``python -m fedsim {simulate,resume,validate,list,plot}``.

Exit status: 0 on success, 2 on invalid input (one line on standard error, no traceback),
1 when a run started but failed (the reason is printed and recorded in ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """An argument parser that exits with status 2 and one line, as for any invalid input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog if self.prog.startswith("fedsim") else f"fedsim {self.prog}"
        self.exit(EXIT_INVALID, f"fedsim: error: {message} (see '{command} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedsim", description="Simulate federated learning on Flower.")
    parser.add_argument("--verbose", "-v", action="store_true", help="show Flower's and Ray's INFO logs")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    simulate = commands.add_parser("simulate", help="run a config and write its run folder")
    simulate.add_argument("config", help="YAML run config")
    simulate.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. run.rounds=5 backend.name=local")
    simulate.add_argument("--output-dir", help="run folder to write (default: run.output_dir/<name>-<timestamp>)")
    simulate.add_argument("--resume", metavar="RUN_DIR", help="continue this run folder after its last checkpoint (the config must match)")

    resume = commands.add_parser("resume", help="continue a run folder after its last checkpoint")
    resume.add_argument("run_dir", help="run folder written by 'fedsim simulate'")

    validate = commands.add_parser("validate", help="check a config without running it")
    validate.add_argument("config", help="YAML run config")
    validate.add_argument("overrides", nargs="*", default=[], help="key=value overrides")

    listing = commands.add_parser("list", help="list data sets, partitioners, models and strategies")
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")

    plot = commands.add_parser("plot", help="overlay the curves of one or more run folders")
    plot.add_argument("run_dirs", nargs="+", help="run folders holding metrics.jsonl")
    plot.add_argument("--out", default="plots-compare", help="folder for the PNG files (default: plots-compare)")
    return parser


def _configure_logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    import flwr.supercore  # noqa: F401  (Flower sets up its logger on import; adjust it after)

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    flower = logging.getLogger("flwr")
    flower.setLevel(level)
    flower.propagate = False  # Flower's logger has its own console handler
    for noisy in ("ray", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _fail(message: str) -> int:
    print(f"fedsim: error: {message}", file=sys.stderr)
    return EXIT_INVALID


def _load(config_path: str, overrides: Sequence[str]) -> Any:
    from fedsim.config import load_config

    return load_config(config_path, overrides)


def _progress_hook(total_rounds: int) -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]round"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metric]}"),
        console=Console(stderr=True),
        transient=False,
    )
    task = progress.add_task("rounds", total=total_rounds, metric="")

    def hook(server_round: int, arrays: Any, row: dict[str, Any]) -> None:
        shown = []
        for key in ("centralized_accuracy", "personalized_accuracy", "eval_accuracy", "coverage", "train_loss"):
            value = row.get(key)
            if isinstance(value, (int, float)):
                shown.append(f"{key}={value:.4f}")
                if len(shown) == 2:
                    break
        failed = row.get("clients_failed", 0)
        if failed:
            shown.append(f"[red]{failed} failed[/red]")
        progress.update(task, completed=server_round, metric="  ".join(shown))

    return progress, hook


def _resume(args: argparse.Namespace) -> int:
    config_path = Path(args.run_dir) / "config.yaml"
    if not config_path.is_file():
        return _fail(f"{args.run_dir!r} is not a run folder (no config.yaml); pass the folder 'fedsim simulate' wrote")
    args.config, args.overrides, args.output_dir = str(config_path), [], None
    args.resume = args.run_dir
    return _simulate(args)


def _simulate(args: argparse.Namespace) -> int:
    from fedsim.config import ConfigError
    from fedsim.runner import RunInputError, simulate

    try:
        config = _load(args.config, args.overrides)
    except ConfigError as error:
        return _fail(str(error))
    if args.resume is not None and args.output_dir is not None:
        return _fail("pass either --resume RUN_DIR or --output-dir DIR, not both")

    progress, hook = _progress_hook(config.run.rounds) if config.run.progress else (None, None)
    started: list[bool] = []

    def start_progress() -> None:
        progress.start()
        started.append(True)

    try:
        outcome = simulate(
            config,
            run_dir=args.resume if args.resume is not None else args.output_dir,
            hooks=[hook] if hook else None,
            on_start=start_progress if progress is not None else None,
            resume=args.resume is not None,
        )
    except RunInputError as error:
        return _fail(str(error))
    finally:
        if started:
            progress.stop()

    final = outcome.summary.get("final", {})
    headline_keys = ("centralized_accuracy", "personalized_accuracy", "density", "worst_group_coverage", "worst_error", "worst_client_error")
    headline = {k: final[k] for k in headline_keys if isinstance(final.get(k), (int, float))}
    for key in ("worst_client_error", "total_samples"):
        if key not in headline and isinstance(outcome.summary.get(key), (int, float)):
            headline[key] = outcome.summary[key]
    print(f"run folder: {outcome.folder.path}")
    print(f"status: {outcome.status}; rounds: {outcome.summary['rounds_completed']}/{config.run.rounds}; "
          + "; ".join(f"{k}: {v:.4f}" for k, v in headline.items()))
    if outcome.status != "completed":
        print(f"fedsim: run {outcome.status}: {outcome.error}", file=sys.stderr)
        if outcome.status == "interrupted":
            # Everything is written; Flower's and Ray's threads may still wait on each other.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_FAILED)
        return EXIT_FAILED
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from fedsim.config import ConfigError

    try:
        config = _load(args.config, args.overrides)
    except ConfigError as error:
        return _fail(str(error))
    print(f"{args.config}: valid ({config.strategy.name} on {config.data.dataset}, {config.data.num_clients} clients, "
          f"{config.run.rounds} rounds, backend {config.backend.name})")
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    from fedsim.config import (
        PARTITIONERS,
        BackendSection,
        ClientSection,
        DataSection,
        ModelSection,
        RunSection,
        section_fields,
    )
    from fedsim.datasets import DATASET_SUMMARIES
    from fedsim.methods import methods
    from fedsim.models import MODELS

    catalogue = {
        "datasets": DATASET_SUMMARIES,
        "partitioners": {
            "iid": "uniform random split (flwr-datasets IidPartitioner over a seeded shuffle)",
            "dirichlet": "per-class Dirichlet(alpha) label skew; keys: alpha, min_partition_size",
            "shards": "each client holds classes_per_client classes (flwr-datasets PathologicalPartitioner)",
        },
        "models": {name: spec.summary for name, spec in MODELS.items()},
        "strategies": {
            name: {"summary": method.summary, "parameters": {k: v for k, v in section_fields(method.section)}}
            for name, method in sorted(methods().items())
        },
    }
    catalogue["sections"] = {
        name: {key: default for key, default in section_fields(section)}
        for name, section in (("run", RunSection), ("data", DataSection), ("model", ModelSection), ("client", ClientSection), ("backend", BackendSection))
    }
    assert set(catalogue["partitioners"]) == set(PARTITIONERS)
    if args.json:
        print(json.dumps(catalogue, indent=2, default=str))
        return EXIT_OK
    for heading in ("datasets", "partitioners", "models"):
        print(f"{heading}:")
        for name, text in catalogue[heading].items():
            print(f"  {name:<15} {text}")
    print("config sections (keys with their defaults):")
    for name, keys in catalogue["sections"].items():
        print(f"  {name}: " + ", ".join(f"{key}={default!r}" for key, default in keys.items()))
    print("strategies (keys under 'strategy:' with their defaults):")
    for name, entry in catalogue["strategies"].items():
        print(f"  {name:<15} {entry['summary']}")
        for key, default in entry["parameters"].items():
            if key != "name":
                print(f"      {key} = {default!r}")
    return EXIT_OK


def _plot(args: argparse.Namespace) -> int:
    from fedsim.plots import plot_runs
    from fedsim.results import RunFolder

    runs = []
    for run_dir in args.run_dirs:
        folder = RunFolder(run_dir)
        if not folder.metrics_path.is_file():
            return _fail(f"{run_dir!r} has no metrics.jsonl; pass run folders written by 'fedsim simulate'")
        runs.append((Path(run_dir).name, folder.read_rows()))
    for path in plot_runs(runs, args.out):
        print(path)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    from fedsim.engine.environment import prepare_environment

    prepare_environment()
    args = _build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    handlers = {"simulate": _simulate, "resume": _resume, "validate": _validate, "list": _list, "plot": _plot}
    try:
        return handlers[args.command](args)
    except BrokenPipeError:  # output piped into e.g. head, which stopped reading
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
