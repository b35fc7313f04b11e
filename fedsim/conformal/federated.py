"""Client and server steps of GC-FCP, and the baselines it is compared with.

GC-FCP (Wen, Simeone, Xing, arXiv 2603.14198) calibrates in one uplink round. Each client k
weights its calibration scores by λ_k = π_k/(n_k + 1), groups them by atom (membership pattern)
and sends one weighted quantile summary per atom. The server merges the summaries per atom,
treats every pseudo-point as a calibration point with that atom's pattern, and solves the
group-conditional dual LP once per test pattern with w_test = Σ_k λ_k.

The functions here take per-client lists of arrays and run both sides in one process, which is
what the benchmarks and the Flower adapters build on.

Baselines: centralized split CP (pooled scores, ignores π), federated CP (Lu et al., arXiv
2305.17564: one group with the weights λ_k), exact GC-FCP (the same LP on all raw scores) and
GC-FCP with summaries of a given size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike

from fedsim.conformal.calibration import (
    calibrate_table,
    split_conformal_threshold,
    weighted_quantile_threshold,
)
from fedsim.conformal.groups import atoms, pattern_from_key, pattern_key
from fedsim.conformal.sketch import QuantileSketch
from fedsim.conformal.table import ThresholdTable
from fedsim.conformal.weights import calibration_weights

__all__ = [
    "ClientSummary",
    "SketchedCalibration",
    "summarize_client",
    "merge_summaries",
    "calibrate_from_sketches",
    "raw_uplink_bytes",
    "centralized_split_cp",
    "federated_cp",
    "gcfcp_exact",
    "gcfcp_sketched",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSummary:
    """One client's upload: a summary per atom key, its point weight λ_k and its size n_k."""

    sketches: dict[str, QuantileSketch]
    num_groups: int
    point_weight: float
    num_points: int

    def nbytes(self, dtype: DTypeLike = np.float32) -> int:
        """Payload bytes: two floats per pseudo-point plus ⌈d/8⌉ pattern bytes per atom."""
        pattern_bytes = (self.num_groups + 7) // 8
        return sum(sketch.nbytes(dtype) + pattern_bytes for sketch in self.sketches.values())


@dataclass(frozen=True)
class SketchedCalibration:
    """Result of ``gcfcp_sketched``.

    ``uplink_bytes`` sums the clients' payloads at float32. ``pseudo_points`` counts the
    server's pseudo-points after merging. ``max_relative_rank_error`` is the largest certified
    rank error of a merged atom summary, as a fraction of the atom's weight.
    ``server_seconds`` is the wall time of merging and the LPs.
    """

    table: ThresholdTable
    uplink_bytes: int
    pseudo_points: int
    max_relative_rank_error: float
    server_seconds: float


def summarize_client(
    scores: ArrayLike, memberships: ArrayLike, point_weight: float, compression: int | None
) -> ClientSummary:
    """Build one client's upload from its scores (n,) and memberships (n, d).

    ``compression`` is the maximum number of pseudo-points per atom; None sends every score.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    memberships = np.asarray(memberships)
    if memberships.ndim != 2 or memberships.shape[0] != scores.size:
        raise ValueError(f"memberships must have shape ({scores.size}, d), got {memberships.shape}")
    if not (np.isfinite(point_weight) and point_weight > 0):
        raise ValueError(f"point_weight must be finite and positive, got {point_weight}")

    patterns, inverse = atoms(memberships)
    sketches = {
        pattern_key(pattern): QuantileSketch.from_scores(scores[inverse == index], point_weight, compression)
        for index, pattern in enumerate(patterns)
    }
    return ClientSummary(sketches, int(memberships.shape[1]), float(point_weight), int(scores.size))


def merge_summaries(
    summaries: Sequence[ClientSummary], compression: int | None
) -> dict[str, QuantileSketch]:
    """Merge the clients' summaries per atom key and compress each merge to ``compression``.

    A summary sorts its pseudo-points by (value, weight), so the result does not depend on the
    order of ``summaries``. ``compression=None`` keeps every pseudo-point.
    """
    widths = {summary.num_groups for summary in summaries}
    if len(widths) > 1:
        raise ValueError(f"client summaries disagree on the number of groups: {sorted(widths)}")

    per_atom: dict[str, list[QuantileSketch]] = {}
    for summary in summaries:
        for key, sketch in summary.sketches.items():
            per_atom.setdefault(key, []).append(sketch)

    merged = {}
    for key in sorted(per_atom):
        union = QuantileSketch.merge(per_atom[key])
        merged[key] = union if compression is None else union.compress(compression)
    return merged


def calibrate_from_sketches(
    merged: dict[str, QuantileSketch],
    num_groups: int,
    w_test: float,
    alpha: float,
    patterns: ArrayLike,
    *,
    conservative: bool = False,
    **threshold_options,
) -> ThresholdTable:
    """Solve the calibration LP on merged summaries for every pattern in ``patterns`` (P, d).

    With ``conservative=True`` the LP runs at α' = α − ε, where ε is the largest relative rank
    error of an atom summary, so a group's coverage bound 1 − α' − ε_G stays at or above 1 − α.
    If α' <= 0, every threshold is +inf.
    """
    patterns = np.asarray(patterns, dtype=np.uint8)
    keys = sorted(merged)
    if not keys:
        return ThresholdTable(patterns, np.full(patterns.shape[0], np.inf))

    values = np.concatenate([merged[key].values for key in keys])
    weights = np.concatenate([merged[key].weights for key in keys])
    memberships = np.concatenate([
        np.repeat(pattern_from_key(key, num_groups)[None, :], merged[key].size, axis=0) for key in keys
    ])

    level = alpha
    if conservative:
        level = alpha - max(merged[key].relative_rank_error() for key in keys)
        if level <= 0:
            logger.warning("summary rank error leaves no room below alpha=%g; every threshold is +inf", alpha)
            return ThresholdTable(patterns, np.full(patterns.shape[0], np.inf))
    return calibrate_table(values, weights, memberships, w_test, level, patterns, **threshold_options)


def raw_uplink_bytes(client_memberships: Sequence[ArrayLike], dtype: DTypeLike = np.float32) -> int:
    """Payload bytes of sending every raw score, grouped by atom, in the format of ``ClientSummary``.

    One float per score plus ⌈d/8⌉ pattern bytes per atom and client.
    """
    total = 0
    for memberships in client_memberships:
        memberships = np.asarray(memberships)
        num_atoms = atoms(memberships)[0].shape[0]
        total += memberships.shape[0] * np.dtype(dtype).itemsize + num_atoms * ((memberships.shape[1] + 7) // 8)
    return total


def centralized_split_cp(client_scores: Sequence[ArrayLike], alpha: float) -> float:
    """Pool every client's scores and return the split-CP threshold (π is ignored)."""
    return split_conformal_threshold(np.concatenate([np.ravel(scores) for scores in client_scores]), alpha)


def federated_cp(client_scores: Sequence[ArrayLike], alpha: float, pi: str | ArrayLike = "uniform") -> float:
    """Return the federated CP threshold: the λ-weighted quantile with one group."""
    sizes = [np.size(scores) for scores in client_scores]
    point_weights, w_test = calibration_weights(sizes, pi)
    scores = np.concatenate([np.ravel(scores) for scores in client_scores])
    weights = np.repeat(point_weights, sizes)
    return weighted_quantile_threshold(scores, weights, w_test, alpha)


def gcfcp_exact(
    client_scores: Sequence[ArrayLike],
    client_memberships: Sequence[ArrayLike],
    alpha: float,
    pi: str | ArrayLike = "uniform",
    patterns: ArrayLike | None = None,
    **threshold_options,
) -> ThresholdTable:
    """Solve the GC-FCP LP on every raw score (the uncompressed reference).

    ``patterns`` defaults to the atoms seen in calibration.
    """
    sizes = [np.size(scores) for scores in client_scores]
    point_weights, w_test = calibration_weights(sizes, pi)
    scores = np.concatenate([np.ravel(scores) for scores in client_scores])
    weights = np.repeat(point_weights, sizes)
    memberships = np.concatenate([np.asarray(rows) for rows in client_memberships])
    return calibrate_table(scores, weights, memberships, w_test, alpha, patterns, **threshold_options)


def gcfcp_sketched(
    client_scores: Sequence[ArrayLike],
    client_memberships: Sequence[ArrayLike],
    alpha: float,
    compression: int,
    pi: str | ArrayLike = "uniform",
    *,
    server_compression: int | None | str = "same",
    patterns: ArrayLike | None = None,
    conservative: bool = False,
    **threshold_options,
) -> SketchedCalibration:
    """Run GC-FCP with per-atom summaries of at most ``compression`` pseudo-points per client.

    ``server_compression`` re-compresses each merged atom: "same" uses ``compression``, None
    keeps the union. ``patterns`` defaults to the atoms seen in calibration.
    """
    sizes = [np.size(scores) for scores in client_scores]
    point_weights, w_test = calibration_weights(sizes, pi)
    summaries = [
        summarize_client(scores, memberships, weight, compression)
        for scores, memberships, weight in zip(client_scores, client_memberships, point_weights, strict=True)
    ]
    num_groups = summaries[0].num_groups
    if patterns is None:
        patterns = atoms(np.concatenate([np.asarray(rows) for rows in client_memberships]))[0]

    started = time.perf_counter()
    server_level = compression if server_compression == "same" else server_compression
    merged = merge_summaries(summaries, server_level)
    table = calibrate_from_sketches(merged, num_groups, w_test, alpha, patterns,
                                    conservative=conservative, **threshold_options)
    elapsed = time.perf_counter() - started

    return SketchedCalibration(
        table=table,
        uplink_bytes=sum(summary.nbytes(np.float32) for summary in summaries),
        pseudo_points=sum(sketch.size for sketch in merged.values()),
        max_relative_rank_error=max((sketch.relative_rank_error() for sketch in merged.values()), default=0.0),
        server_seconds=elapsed,
    )
