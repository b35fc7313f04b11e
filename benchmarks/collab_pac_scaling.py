"""Sample cost and worst-player error of collaborative PAC algorithms as the number of players grows.

Runs multiplicative weights (Chen, Zhang, Zhou, NeurIPS 2018, arXiv:1805.09217), Blum et al.'s
personalized algorithm (NeurIPS 2017) and the naive baseline on synthetic Gaussian players
labelled by one linear separator, at the same ε and δ. The learner is a consistent linear
separator (hard-margin SVM with a linear-program fallback).

For each k it prints the mean total samples over seeds, the overhead against the measured
single-distribution need m̂_single(ε, δ), the cost relative to the naive baseline and the
worst-player error. It plots total samples against k. Last, it checks that every algorithm's
worst-player error is ≤ ε in at least a fraction 1 − δ of the seeds (exit status 1 if not).

With the ``practical`` preset the learners' sample sizes are measured learning curves
m̂(ε′) over the players (20 trials per size by default), and the draws spent measuring them
are printed apart. To bound the run time only the first ``--calibration-players`` players are
measured, and larger k reuse the maximum over them. The naive baseline then uses m̂(ε) per player, because 20 trials cannot
resolve a confidence of δ/k.

Example:
    python benchmarks/collab_pac_scaling.py --seeds 10 --plot collab_pac_scaling.png
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedsim.pac import (  # noqa: E402
    LinearSeparatorLearner,
    make_gaussian_players,
    measure_sample_need,
    plan_blum,
    plan_mw,
    plan_naive,
    run_blum_personalized,
    run_mw,
    run_naive,
    vc_sample_bound,
)

ALGORITHMS = ("mw", "blum-personalized", "naive")


@dataclass
class Cell:
    """Results of one algorithm at one k, over seeds."""

    totals: list[int]
    worst_errors: list[float]
    rounds: list[int]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=[2, 4, 8, 16, 32, 64],
        help="numbers of players k to sweep",
    )

    # Accuracy target and repetitions.
    parser.add_argument("--eps", type=float, default=0.1, help="target error ε of every player")
    parser.add_argument("--delta", type=float, default=0.05, help="failure probability δ")
    parser.add_argument("--seeds", type=int, default=10, help="seeded runs per (algorithm, k)")
    parser.add_argument("--first-seed", type=int, default=0, help="root seed of the first run")

    # The players and the constants.
    parser.add_argument("--dim", type=int, default=10, help="feature dimension d of the players")
    parser.add_argument(
        "--player-seed",
        type=int,
        default=0,
        help="seed of the players' means, covariances and the target separator",
    )
    parser.add_argument(
        "--preset",
        choices=["practical", "theory"],
        default="practical",
        help="constant set; theory uses VC bounds with dimension d + 1",
    )
    parser.add_argument(
        "--calibration-players",
        type=int,
        default=16,
        help="measure learning curves on the first N players only; larger k reuse their maximum",
    )
    parser.add_argument(
        "--calibration-trials",
        type=int,
        default=20,
        help="trials per sample size when measuring learning curves (practical)",
    )

    # Measurement and output.
    parser.add_argument(
        "--evaluation-samples",
        type=int,
        default=20_000,
        help="fresh samples per player to estimate final errors (not in the cost)",
    )
    parser.add_argument(
        "--plot",
        default="collab_pac_scaling.png",
        help="path of the PNG plot of total samples against k",
    )
    parser.add_argument("--verbose", action="store_true", help="log progress at INFO level")
    return parser.parse_args(argv)


def measure_needs(args: argparse.Namespace, players, learner) -> dict[str, list[int]]:
    """Measure per-player learning-curve needs at the targets each algorithm's learner uses."""
    targets = {
        "mw": args.eps / 6 / 16,
        "blum-personalized": args.eps / 4,
        "naive": args.eps,
    }
    needs = {}
    for name, target in targets.items():
        start = time.perf_counter()
        need = measure_sample_need(
            players[: args.calibration_players],
            learner,
            target,
            args.delta,
            seed=args.first_seed,
            repeats=args.calibration_trials,
        )
        needs[name] = list(need.per_player)
        print(
            f"calibration {name}: m̂({target:.6g}) per player from {min(need.per_player)} to "
            f"{need.samples}, {need.calibration_draws:,} draws, {time.perf_counter() - start:.1f} s"
        )
    return needs


def run_sweep(args: argparse.Namespace) -> int:
    learner = LinearSeparatorLearner()
    vc_dim = args.dim + 1
    all_players = make_gaussian_players(max(args.ks), args.dim, seed=args.player_seed)

    needs: dict[str, list[int]] = {}
    if args.preset == "practical":
        needs = measure_needs(args, all_players, learner)

    cells: dict[tuple[str, int], Cell] = {}
    single_need: dict[int, int] = {}
    for k in sorted(args.ks):
        players = all_players[:k]

        def practical(name: str, k: int = k) -> int | None:
            # Players beyond the measured ones are assumed to need at most the measured maximum.
            return max(needs[name][:k]) if needs else None

        mw_plan = plan_mw(
            k,
            args.eps,
            args.delta,
            preset=args.preset,
            vc_dim=None if needs else vc_dim,
            round_samples=practical("mw"),
        )
        blum_plan = plan_blum(
            k,
            args.eps,
            args.delta,
            preset=args.preset,
            vc_dim=None if needs else vc_dim,
            round_samples=practical("blum-personalized"),
        )
        naive_plan = plan_naive(
            k,
            args.eps,
            args.delta,
            preset=args.preset,
            vc_dim=None if needs else vc_dim,
            player_samples=practical("naive"),
        )
        # m_single(ε, δ): measured m̂(ε) for practical, the VC bound at (ε, δ) for theory.
        single_need[k] = practical("naive") or vc_sample_bound(vc_dim, args.eps, args.delta)
        for plan in (mw_plan, blum_plan, naive_plan):
            print(plan.describe())

        for name in ALGORITHMS:
            cells[(name, k)] = Cell([], [], [])
        start = time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            results = {
                "mw": run_mw(
                    players, learner, mw_plan, seed=seed, evaluation_samples=args.evaluation_samples
                ),
                "blum-personalized": run_blum_personalized(
                    players,
                    learner,
                    blum_plan,
                    seed=seed,
                    evaluation_samples=args.evaluation_samples,
                ),
                "naive": run_naive(
                    players,
                    learner,
                    naive_plan,
                    seed=seed,
                    evaluation_samples=args.evaluation_samples,
                ),
            }
            for name, result in results.items():
                cells[(name, k)].totals.append(result.total_samples)
                cells[(name, k)].worst_errors.append(result.worst_error)
                cells[(name, k)].rounds.append(result.rounds)
        print(f"k={k}: {args.seeds} seeds in {time.perf_counter() - start:.1f} s")

    return report(args, cells, single_need)


def report(
    args: argparse.Namespace, cells: dict[tuple[str, int], Cell], single_need: dict[int, int]
) -> int:
    ks = sorted(args.ks)
    required = math.ceil((1 - args.delta) * args.seeds)
    print()
    print(
        f"preset={args.preset} eps={args.eps} delta={args.delta} d={args.dim} "
        f"seeds={args.seeds} (each cell needs >= {required} seeds with worst error <= eps)"
    )
    header = (
        f"{'k':>3} {'algorithm':<18} {'rounds':>6} {'total samples':>14} "
        f"{'/ m_single':>10} {'/ naive':>8} {'worst err mean':>14} {'max':>7} "
        f"{'ok seeds':>8}"
    )
    print(header)
    print("-" * len(header))

    all_ok = True
    for k in ks:
        naive_total = float(np.mean(cells[("naive", k)].totals))
        for name in ALGORITHMS:
            cell = cells[(name, k)]
            total = float(np.mean(cell.totals))
            passed = sum(error <= args.eps for error in cell.worst_errors)
            ok = passed >= required
            all_ok &= ok
            print(
                f"{k:>3} {name:<18} {np.mean(cell.rounds):>6.1f} {total:>14,.0f} "
                f"{total / single_need[k]:>10.1f} {total / naive_total:>8.2f} "
                f"{np.mean(cell.worst_errors):>14.4f} {max(cell.worst_errors):>7.4f} "
                f"{passed:>4}/{args.seeds:<3}{'' if ok else ' FAIL'}"
            )
    print()
    print(
        "check: worst-player error <= eps in >= 1 - delta of seeds for every algorithm and k: "
        + ("passed" if all_ok else "FAILED")
    )

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in ALGORITHMS:
        axes.plot(ks, [np.mean(cells[(name, k)].totals) for k in ks], marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("players k")
    axes.set_ylabel("total samples (train + test)")
    axes.set_title(f"{args.preset} preset, eps={args.eps}, delta={args.delta}, d={args.dim}")
    axes.legend()
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    print(f"plot written to {args.plot}")
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    # Line buffering shows progress when the output goes to a file or a pipe.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    start = time.perf_counter()
    status = run_sweep(args)
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
