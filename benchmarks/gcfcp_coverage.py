"""Coverage, width, uplink bytes and server time of GC-FCP on the synthetic regression.

Repeats the synthetic experiment of Wen, Simeone, Xing (arXiv 2603.14198): K = 4 clients with
n_k = (1000, 333, 333, 333) calibration points (times --scale), four overlapping feature groups
[0,2), [1,3), [2,4), [3,5), π uniform, α = 0.1. For every seed it calibrates centralized split
CP, federated CP, exact GC-FCP and GC-FCP with per-atom summaries of several sizes, and prints
mean ± standard error over seeds.

Uplink bytes count a float32 payload: raw scores cost 4 bytes each (plus one pattern byte per
atom and client for the group-aware methods), and a summary 8 bytes per pseudo-point plus one
pattern byte per atom. Server time is the wall time of merging and solving, per seed.

Example:
    python benchmarks/gcfcp_coverage.py --seeds 50
    python benchmarks/gcfcp_coverage.py --seeds 50 --scale 10
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from fedsim.conformal import (
    SYNTHETIC_CLIENT_SIZES,
    SYNTHETIC_INTERVALS,
    absolute_residual,
    centralized_split_cp,
    coverage_report,
    federated_cp,
    gcfcp_exact,
    gcfcp_sketched,
    interval_memberships,
    interval_patterns,
    make_synthetic_regression,
    raw_uplink_bytes,
    regression_intervals,
)

SEED_BASE = 114514


def run_seed(seed: int, client_sizes: tuple[int, ...], num_test: int, alpha: float,
             compressions: tuple[int, ...]) -> dict[str, dict[str, object]]:
    """Calibrate every method on one draw and return its metrics, keyed by method name."""
    rng = np.random.default_rng([SEED_BASE, seed])
    data = make_synthetic_regression(rng, client_sizes, num_test)
    scores = [absolute_residual(y, data.predict(x)) for x, y in zip(data.calibration_x, data.calibration_y, strict=True)]
    memberships = [interval_memberships(x, SYNTHETIC_INTERVALS) for x in data.calibration_x]
    patterns = interval_patterns(SYNTHETIC_INTERVALS)

    test_memberships = interval_memberships(data.test_x, SYNTHETIC_INTERVALS)
    predictions = data.predict(data.test_x)

    def evaluate(tau: np.ndarray, uplink: int, seconds: float) -> dict[str, object]:
        lower, upper = regression_intervals(predictions, tau)
        covered = (data.test_y >= lower) & (data.test_y <= upper)
        report = coverage_report(covered, upper - lower, test_memberships)
        return {"marginal": report.marginal_coverage, "groups": report.group_coverage,
                "width": report.mean_size, "bytes": uplink, "seconds": seconds}

    total = sum(client_sizes)
    results = {}

    started = time.perf_counter()
    tau = centralized_split_cp(scores, alpha)
    results["centralized CP"] = evaluate(np.full(num_test, tau), 4 * total, time.perf_counter() - started)

    started = time.perf_counter()
    tau = federated_cp(scores, alpha)
    results["federated CP"] = evaluate(np.full(num_test, tau), 4 * total, time.perf_counter() - started)

    started = time.perf_counter()
    table = gcfcp_exact(scores, memberships, alpha, patterns=patterns)
    results["GC-FCP exact"] = evaluate(table.lookup(test_memberships), raw_uplink_bytes(memberships),
                                       time.perf_counter() - started)

    for compression in compressions:
        sketched = gcfcp_sketched(scores, memberships, alpha, compression, patterns=patterns)
        metrics = evaluate(sketched.table.lookup(test_memberships), sketched.uplink_bytes,
                           sketched.server_seconds)
        metrics["rank_error"] = sketched.max_relative_rank_error
        results[f"GC-FCP K={compression}"] = metrics
    return results


def mean_and_error(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    return values.mean(axis=0), values.std(axis=0, ddof=1) / np.sqrt(values.shape[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50, help="number of independent draws (default 50)")
    parser.add_argument("--n-cal", type=int, nargs="+", default=list(SYNTHETIC_CLIENT_SIZES),
                        help="calibration points per client before --scale (default 1000 333 333 333)")
    parser.add_argument("--scale", type=int, default=1, help="multiply every client's calibration size")
    parser.add_argument("--n-test", type=int, default=2000, help="test points per draw (default 2000)")
    parser.add_argument("--alpha", type=float, default=0.1, help="miscoverage level (default 0.1)")
    parser.add_argument("--compressions", type=int, nargs="+", default=[10, 25, 50, 100, 200],
                        help="maximum pseudo-points per atom summary (default 10 25 50 100 200)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()

    client_sizes = tuple(size * args.scale for size in args.n_cal)
    compressions = tuple(args.compressions)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(run_seed, range(args.seeds), [client_sizes] * args.seeds,
                             [args.n_test] * args.seeds, [args.alpha] * args.seeds,
                             [compressions] * args.seeds))
    elapsed = time.perf_counter() - started

    print(f"GC-FCP synthetic benchmark: {args.seeds} seeds, n_k = {list(client_sizes)} "
          f"(N = {sum(client_sizes)}), {args.n_test} test points, alpha = {args.alpha}, wall {elapsed:.0f} s")
    group_names = [f"[{low:g},{high:g})" for low, high in SYNTHETIC_INTERVALS]
    header = (f"{'method':<16} {'marginal':>13} " + " ".join(f"{name:>13}" for name in group_names)
              + f" {'worst':>6} {'width':>6} {'uplink B':>9} {'% raw':>6} {'server s':>9} {'rank err':>8}")
    print(header)

    raw_bytes = np.mean([run["GC-FCP exact"]["bytes"] for run in runs])
    worst = {}
    for method in runs[0]:
        marginal, marginal_error = mean_and_error([run[method]["marginal"] for run in runs])
        groups, group_errors = mean_and_error([run[method]["groups"] for run in runs])
        width = np.mean([run[method]["width"] for run in runs])
        uplink = np.mean([run[method]["bytes"] for run in runs])
        seconds = np.mean([run[method]["seconds"] for run in runs])
        rank_error = np.mean([run[method].get("rank_error", 0.0) for run in runs])
        worst[method] = float(groups.min())
        cells = " ".join(f"{value:.3f}±{error:.3f}" for value, error in zip(groups, group_errors, strict=True))
        print(f"{method:<16} {marginal:.3f}±{marginal_error:.3f} {cells} {groups.min():6.3f} {width:6.2f} "
              f"{uplink:9.0f} {100 * uplink / raw_bytes:6.1f} {seconds:9.3f} {rank_error:8.4f}")

    groups, group_errors = mean_and_error([run["GC-FCP exact"]["groups"] for run in runs])
    valid = bool(np.all(groups >= 1 - args.alpha - 3 * group_errors))
    print(f"check: exact GC-FCP has every group >= 1 - alpha - 3 s.e.: {'yes' if valid else 'NO'}")
    for method in runs[0]:
        if method.startswith("GC-FCP K="):
            uplink = np.mean([run[method]["bytes"] for run in runs])
            gap = worst[method] - worst["GC-FCP exact"]
            print(f"check: {method}: uplink {100 * uplink / raw_bytes:.1f}% of raw, "
                  f"worst-group coverage {worst[method]:.3f} vs exact {worst['GC-FCP exact']:.3f} "
                  f"(difference {gap:+.3f}, within 0.02: {'yes' if abs(gap) <= 0.02 else 'NO'})")


if __name__ == "__main__":
    main()
