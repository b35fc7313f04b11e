"""Compare SpaFL with FedAvg and local-only training on the same partitions.

SpaFL (Kim, Saad, Debbah and Hong, "SpaFL: Communication-Efficient Federated Learning with
Sparse Models and Low Computational Overhead", NeurIPS 2024, arXiv 2406.00431) exchanges only
per-unit pruning thresholds. This script runs ``configs/spafl_digits.yaml`` and its two
baselines (``spafl_digits_fedavg.yaml``, ``spafl_digits_local.yaml``), which share the seed,
partitions, model widths, sampling and local training, and prints one table:

- personalised accuracy: the unweighted mean over all clients of each client's test accuracy,
  final and averaged over the last 10 evaluations;
- density: the fraction of masked-layer weights in use (1 for the dense baselines);
- training FLOPs summed over all rounds and clients, with 1 MAC = 2 FLOPs and a training step
  = 3 × the forward MACs. SpaFL counts the active units of every step; the dense baselines
  count the full model (weights only, biases left out) for every example seen;
- payload bytes up and down (array values only, as counted by the runner's ledger).

Usage::

    python benchmarks/spafl_vs_fedavg.py [--rounds 30] [--seed 0] [--backend local]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsim.config import RunConfig, load_config
from fedsim.methods.base import DataInfo
from fedsim.methods.fedavg import build_run_model
from fedsim.partition import dataset_info
from fedsim.runner import RunOutcome, client_spec, simulate
from fedsim.sparse import TRAIN_MACS_FACTOR, dense_layer_macs, to_masked

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUNS = (
    ("SpaFL", "spafl_digits.yaml"),
    ("FedAvg", "spafl_digits_fedavg.yaml"),
    ("Local", "spafl_digits_local.yaml"),
)
FLOPS_PER_MAC = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="federated rounds per run (default: 30)")
    parser.add_argument("--seed", type=int, default=0, help="root seed shared by the three runs (default: 0)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local", help="engine (default: local)")
    parser.add_argument("--output-dir", type=Path, default=None, help="folder for the run folders (default: a temporary folder)")
    return parser.parse_args()


def dense_forward_macs(config: RunConfig) -> int:
    """Return the forward MACs per example of the full model's Linear and Conv2d layers."""
    spec = client_spec(config, Path("."))
    shape, classes, task = dataset_info(spec["data"], config.run.seed)
    model = to_masked(build_run_model(config, DataInfo(shape, classes, task)))
    return sum(dense_layer_macs(model, shape).values())


def train_flops(outcome: RunOutcome, config: RunConfig) -> int:
    """Return the run's training FLOPs: SpaFL's own count, or the dense count per example seen."""
    if "train_flops" in outcome.summary.get("totals", {}):
        return int(outcome.summary["totals"]["train_flops"])
    examples = sum(int(row.get("train_examples", 0)) for row in outcome.rows)
    return FLOPS_PER_MAC * TRAIN_MACS_FACTOR * dense_forward_macs(config) * examples


def row_of(label: str, outcome: RunOutcome, config: RunConfig, wall_s: float) -> dict[str, Any]:
    summary = outcome.summary
    return {
        "method": label,
        "acc_final": summary["final"].get("personalized_accuracy", float("nan")),
        "acc_last10": summary["last10_mean"].get("personalized_accuracy", float("nan")),
        "density": summary["final"].get("density", 1.0),
        "train_flops": train_flops(outcome, config),
        "bytes_up": int(summary["bytes_up"]),
        "bytes_down": int(summary["bytes_down"]),
        "wall_s": wall_s,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    fedavg_bytes = next(r["bytes_up"] + r["bytes_down"] for r in rows if r["method"] == "FedAvg")
    header = f"{'method':<8} {'acc final':>9} {'acc last10':>10} {'density':>8} {'train GFLOPs':>12} {'bytes up':>12} {'bytes down':>12} {'vs FedAvg':>9} {'wall s':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        total = r["bytes_up"] + r["bytes_down"]
        ratio = f"{100 * total / fedavg_bytes:.2f}%" if fedavg_bytes else "n/a"
        print(
            f"{r['method']:<8} {r['acc_final']:>9.4f} {r['acc_last10']:>10.4f} {r['density']:>8.4f} "
            f"{r['train_flops'] / 1e9:>12.2f} {r['bytes_up']:>12,} {r['bytes_down']:>12,} {ratio:>9} {r['wall_s']:>7.1f}"
        )


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    output = args.output_dir or Path(tempfile.mkdtemp(prefix="spafl-bench-"))
    overrides = [f"run.rounds={args.rounds}", f"run.seed={args.seed}", f"backend.name={args.backend}", "run.progress=false"]

    rows = []
    for label, file_name in RUNS:
        config = load_config(CONFIGS / file_name, overrides)
        started = time.perf_counter()
        outcome = simulate(config, run_dir=output / label.lower())
        wall_s = time.perf_counter() - started
        if outcome.status != "completed":
            raise SystemExit(f"{label} run failed: {outcome.error}")
        rows.append(row_of(label, outcome, config, wall_s))

    print(f"digits, {config.data.num_clients} clients, {args.rounds} rounds, seed {args.seed}, backend {args.backend}; runs in {output}")
    print_table(rows)


if __name__ == "__main__":
    main()
