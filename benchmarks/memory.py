"""Driver memory over a long run: resident set size after rounds 10, 100 and 200.

Runs a small FedAvg (logistic regression on digits, 20 clients, half of them per round) and
reads the driver's RSS with psutil after each round. Memory must stay flat in the number of
rounds: aggregation keeps running sums and rows go to disk, so growth from round 10 to round
200 should stay under 5%.

Usage::

    python benchmarks/memory.py                       # local engine, 200 rounds
    python benchmarks/memory.py --engine ray --rounds 200
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile

import psutil

from fedsim.config import load_config
from fedsim.runner import simulate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="local", choices=["local", "ray"])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--model", default="logreg", choices=["logreg", "mlp"])
    args = parser.parse_args()
    import flwr.supercore  # noqa: F401  (Flower configures its logger on import)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    process = psutil.Process()
    checkpoints = {10, 100, args.rounds} | {r for r in (50, 150) if r < args.rounds}
    rss: dict[int, float] = {}

    def measure(server_round: int, arrays: object, row: dict) -> None:
        if server_round in checkpoints:
            gc.collect()
            rss[server_round] = process.memory_info().rss / 2**20

    with tempfile.TemporaryDirectory() as scratch:
        config = load_config(None, [
            f"model.name={args.model}", "data.num_clients=20", "strategy.fraction_train=0.5",
            "strategy.fraction_evaluate=0.25", f"run.rounds={args.rounds}", "run.progress=false",
            f"backend.name={args.engine}", f"run.output_dir={scratch}",
        ])
        outcome = simulate(config, hooks=[measure])
    if outcome.status != "completed":
        print(f"run failed: {outcome.error}")
        return 1

    print(f"engine {args.engine}, model {args.model}, {args.rounds} rounds, 20 clients (10 per round)")
    for server_round in sorted(rss):
        print(f"round {server_round:>4}: driver RSS {rss[server_round]:8.1f} MiB")
    growth = (rss[args.rounds] - rss[10]) / rss[10] * 100
    print(f"growth from round 10 to round {args.rounds}: {growth:+.2f}% (target: under 5%)")
    return 0 if growth < 5 else 1


if __name__ == "__main__":
    sys.exit(main())
