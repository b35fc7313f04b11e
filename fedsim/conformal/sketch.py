"""Mergeable weighted quantile summary for the client uplink of GC-FCP.

In GC-FCP (Wen, Simeone, Xing, arXiv 2603.14198) each client sends, per atom, a small weighted
summary of its calibration scores instead of the scores. The reference code uses a t-digest.
This module uses a deterministic equal-mass summary instead. Its rank error has a short proof
that a test can check. Compressing a multiset also gives the same output for any input order, so
merged results do not depend on the order in which client replies arrive.

Summary. A summary is a list of pseudo-points (value v_c, weight c_c), sorted by value. Its
weighted CDF is F̃(θ) = Σ_{c: v_c ≤ θ} c_c, and the data's is F(θ) = Σ_{i: s_i ≤ θ} w_i.

Compression to K. Sort the items by value, let W be their total weight and c = W/K. Item j goes to
bucket ⌊(weight of the items before j) / c⌋, which gives at most K buckets of consecutive items.
Every bucket is replaced by one pseudo-point that carries the bucket's weight at the bucket's
weighted median (the smallest value whose in-bucket cumulative weight reaches half).

Bound. Buckets cover disjoint value ranges, so at any θ at most one bucket is split by θ, and
its contribution to |F̃(θ) − F(θ)| is at most max(weight below its median, weight above it).
Without its last item a bucket weighs less than c. If the last item carries at least half of the
bucket, the median is that item and the error is the rest of the bucket, < c. Otherwise the
bucket weighs less than 2c and the error is at most half of it, < c. Hence one compression adds
a rank error below W/K, in weight units.

Merging is concatenation, and the errors of the parts add up: the union of summaries with errors
e_k of data with weight W_k has error at most Σ_k e_k. A client summary compressed to K and then
merged and compressed again to K at the server therefore has error below 2·W/K, that is, 2/K of
the atom's weight. Every summary carries ``rank_error``, a certified bound that is the sum of
the exact per-compression maxima (each below W/K), which is often much smaller than the a priori
bound.

Serialisation: ``to_arrays`` gives two float arrays (values, weights) that fit a Flower
``ArrayRecord``. A reply sent as float32 rounds both, which moves values by a relative 6e-8 and
is not included in ``rank_error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

__all__ = ["QuantileSketch"]


@dataclass(frozen=True)
class QuantileSketch:
    """Weighted pseudo-points with a certified rank-error bound.

    ``values`` and ``weights`` have shape (c,), values sorted ascending, weights positive.
    ``rank_error`` bounds sup_θ |F̃(θ) − F(θ)| in weight units, against the data summarised.
    """

    values: NDArray[np.float64]
    weights: NDArray[np.float64]
    rank_error: float = 0.0

    def __post_init__(self) -> None:
        values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        if values.shape != weights.shape:
            raise ValueError(f"values has {values.size} entries but weights has {weights.size}")
        if not (np.isfinite(values).all() and np.isfinite(weights).all()):
            raise ValueError("sketch values and weights must be finite")
        if np.any(weights <= 0):
            raise ValueError("sketch weights must be positive")
        if not np.isfinite(self.rank_error) or self.rank_error < 0:
            raise ValueError(f"rank_error must be finite and >= 0, got {self.rank_error}")

        order = np.lexsort((weights, values))
        object.__setattr__(self, "values", values[order])
        object.__setattr__(self, "weights", weights[order])
        object.__setattr__(self, "rank_error", float(self.rank_error))

    @classmethod
    def from_scores(
        cls, scores: ArrayLike, weights: float | ArrayLike, compression: int | None
    ) -> QuantileSketch:
        """Summarise scores, shape (n,), with a common weight or per-score weights, shape (n,).

        ``compression`` is K, the maximum number of pseudo-points; None keeps every score.
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        point_weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), scores.shape)
        raw = cls(scores, np.array(point_weights), 0.0)
        return raw if compression is None else raw.compress(compression)

    @classmethod
    def merge(cls, sketches: Sequence[QuantileSketch]) -> QuantileSketch:
        """Concatenate summaries. The result's rank error is the sum of theirs."""
        if not sketches:
            return cls(np.zeros(0), np.zeros(0), 0.0)
        return cls(
            np.concatenate([sketch.values for sketch in sketches]),
            np.concatenate([sketch.weights for sketch in sketches]),
            float(sum(sketch.rank_error for sketch in sketches)),
        )

    @classmethod
    def from_arrays(
        cls, values: ArrayLike, weights: ArrayLike, rank_error: float | None = None, *,
        compression: int | None = None,
    ) -> QuantileSketch:
        """Rebuild a summary from the arrays of ``to_arrays``.

        Pass the sender's ``rank_error``. Without it the bound is that of one compression of
        raw scores to ``compression`` pseudo-points (W/K), which holds for a client summary
        built by ``from_scores``, or 0 when ``compression`` is None too.
        """
        weights = np.asarray(weights, dtype=np.float64)
        if rank_error is None:
            rank_error = 0.0 if compression is None else float(weights.sum()) / compression
        return cls(np.asarray(values, dtype=np.float64), weights, rank_error)

    @property
    def size(self) -> int:
        """Number of pseudo-points."""
        return int(self.values.size)

    @property
    def total_weight(self) -> float:
        """Total weight W of the summarised data."""
        return float(self.weights.sum())

    def relative_rank_error(self) -> float:
        """Return ``rank_error`` / W, or 0 for an empty summary."""
        total = self.total_weight
        return self.rank_error / total if total > 0 else 0.0

    def cdf(self, thresholds: ArrayLike) -> NDArray[np.float64]:
        """Return F̃(θ), the summary weight at or below every θ; same shape as ``thresholds``."""
        cumulative = np.concatenate([[0.0], np.cumsum(self.weights)])
        positions = np.searchsorted(self.values, np.asarray(thresholds, dtype=np.float64), side="right")
        return cumulative[positions]

    def compress(self, compression: int) -> QuantileSketch:
        """Compress to at most K = ``compression`` pseudo-points, adding less than W/K rank error."""
        if int(compression) != compression or compression < 1:
            raise ValueError(f"compression must be a positive integer, got {compression}")
        if self.size <= compression:
            return self

        total = self.total_weight
        capacity = total / compression
        weight_before = np.cumsum(self.weights) - self.weights
        bucket_of_item = np.minimum(np.floor(weight_before / capacity), compression - 1).astype(np.int64)
        starts = np.flatnonzero(np.diff(bucket_of_item, prepend=-1))
        ends = np.append(starts[1:], self.size)

        values = np.empty(starts.size)
        weights = np.empty(starts.size)
        added_error = 0.0
        for bucket, (start, end) in enumerate(zip(starts, ends, strict=True)):
            bucket_values = self.values[start:end]
            bucket_weights = self.weights[start:end]
            cumulative = np.cumsum(bucket_weights)
            bucket_total = cumulative[-1]

            median_index = int(np.searchsorted(cumulative, bucket_total / 2.0, side="left"))
            median_index = min(median_index, bucket_values.size - 1)
            median = bucket_values[median_index]
            values[bucket] = median
            weights[bucket] = bucket_total

            below = bucket_weights[bucket_values < median].sum()
            above = bucket_weights[bucket_values > median].sum()
            added_error = max(added_error, below, above)

        return QuantileSketch(values, weights, self.rank_error + added_error)

    def to_arrays(self, dtype: DTypeLike = np.float32) -> tuple[NDArray, NDArray]:
        """Return (values, weights) as arrays of ``dtype`` for transport."""
        return self.values.astype(dtype), self.weights.astype(dtype)

    def nbytes(self, dtype: DTypeLike = np.float32) -> int:
        """Payload size of ``to_arrays(dtype)`` in bytes (two floats per pseudo-point)."""
        return 2 * self.size * np.dtype(dtype).itemsize
