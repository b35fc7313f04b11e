"""Prediction sets, intervals and group-conditional coverage metrics for GC-FCP.

GC-FCP (Wen, Simeone, Xing, arXiv 2603.14198) predicts C(x) = {y : S(x, y) <= τ(Φ(x))}. For the
absolute residual this is the interval f(x) ± τ, and for classification the labels whose score
is at most τ. Coverage is reported per group, marginally and for the worst group, because the
method's guarantee is P(Y ∈ C(X) | X ∈ G) >= 1 − α for every group G.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["regression_intervals", "prediction_sets", "CoverageReport", "coverage_report"]


def regression_intervals(
    predictions: ArrayLike, thresholds: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return the bounds f(x) − τ and f(x) + τ, each of shape (n,); τ = +inf gives (−inf, +inf)."""
    predictions = np.asarray(predictions, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if predictions.shape != thresholds.shape:
        raise ValueError(f"predictions {predictions.shape} and thresholds {thresholds.shape} differ in shape")
    return predictions - thresholds, predictions + thresholds


def prediction_sets(score_matrix: ArrayLike, thresholds: ArrayLike) -> NDArray[np.bool_]:
    """Return the set membership of every label, shape (n, C), from scores (n, C) and τ (n,)."""
    score_matrix = np.asarray(score_matrix, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if score_matrix.ndim != 2 or score_matrix.shape[0] != thresholds.size:
        raise ValueError(f"score_matrix must have shape ({thresholds.size}, C), got {score_matrix.shape}")
    return score_matrix <= thresholds[:, None]


@dataclass(frozen=True)
class CoverageReport:
    """Coverage and set size (or interval width) marginally and per group.

    Group arrays have shape (d,). A group without test points has NaN entries, and the worst
    group is taken over the others. Sizes are +inf when any set in the group is unbounded.
    """

    marginal_coverage: float
    group_coverage: NDArray[np.float64]
    worst_group_coverage: float
    mean_size: float
    group_mean_size: NDArray[np.float64]
    group_counts: NDArray[np.int64]
    infinite_fraction: float


def coverage_report(covered: ArrayLike, sizes: ArrayLike, memberships: ArrayLike) -> CoverageReport:
    """Summarise test results: ``covered`` (n,) bool, ``sizes`` (n,), ``memberships`` (n, d)."""
    covered = np.asarray(covered, dtype=bool).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
    memberships = np.asarray(memberships).astype(bool)
    if memberships.ndim != 2 or memberships.shape[0] != covered.size or sizes.size != covered.size:
        raise ValueError("covered, sizes and memberships must describe the same number of test points")

    counts = memberships.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        group_coverage = (covered[:, None] & memberships).sum(axis=0) / counts
        group_size = np.where(
            counts > 0,
            np.array([sizes[memberships[:, g]].mean() if counts[g] else np.nan
                      for g in range(memberships.shape[1])]),
            np.nan,
        )
    observed = counts > 0
    return CoverageReport(
        marginal_coverage=float(covered.mean()) if covered.size else float("nan"),
        group_coverage=group_coverage.astype(np.float64),
        worst_group_coverage=float(group_coverage[observed].min()) if observed.any() else float("nan"),
        mean_size=float(sizes.mean()) if sizes.size else float("nan"),
        group_mean_size=group_size.astype(np.float64),
        group_counts=counts.astype(np.int64),
        infinite_fraction=float(np.isinf(sizes).mean()) if sizes.size else 0.0,
    )
