"""Building blocks shared by the collaborative PAC drivers.

Failure counts stay Python integers, so a weight 2^c is exact for any c, and sampling
probabilities are computed with a max-shift, p_i = 2^{c_i − max c} / Σ_j 2^{c_j − max c}.
Every random draw comes from a stream keyed by (root seed, round, player, phase).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import IntEnum

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "Phase",
    "derive_rng",
    "weights_from_failures",
    "probabilities_from_failures",
    "split_budget",
    "count_errors",
    "fails_test",
    "plurality_vote",
]


class Phase(IntEnum):
    """Purpose of a random stream; part of the key that :func:`derive_rng` hashes."""

    TRAIN = 0
    TEST = 1
    CERTIFY = 2
    EVALUATE = 3
    SPLIT = 4
    LEARNER = 5


# Player index in the key of streams that belong to a whole round, not to one player.
ALL_PLAYERS = 2**31 - 1


def derive_rng(
    root_seed: int, round_index: int, player: int, phase: Phase, attempt: int = 0
) -> np.random.Generator:
    """Return the generator of one (root seed, round, player, phase, attempt) stream.

    The streams are independent of each other and of the order in which they are created,
    so runs are reproducible whatever the execution order. ``attempt`` numbers the retries
    of a certified round.
    """
    if min(root_seed, round_index, player, attempt) < 0:
        raise ValueError(
            f"seed, round, player and attempt must be >= 0, got {root_seed}, {round_index}, "
            f"{player}, {attempt}"
        )
    key = (round_index, player, int(phase), attempt)
    sequence = np.random.SeedSequence(root_seed, spawn_key=key)
    return np.random.default_rng(sequence)


def _check_failures(failures: Sequence[int]) -> list[int]:
    counts = [int(c) for c in failures]
    if not counts:
        raise ValueError("failure counts must name at least one player")
    if min(counts) < 0:
        raise ValueError(f"failure counts must be >= 0, got {counts}")
    return counts


def weights_from_failures(failures: Sequence[int]) -> list[int]:
    """Return the exact weights w_i = 2^{c_i} as Python integers."""
    return [2**c for c in _check_failures(failures)]


def probabilities_from_failures(failures: Sequence[int]) -> NDArray[np.float64]:
    """Return p_i = 2^{c_i − max c} / Σ_j 2^{c_j − max c}, shape (k,), float64.

    The shifted powers are exact in float64 down to 2^-1074. A player more than 1074
    failures behind the leader gets probability 0, which is its exact value rounded.
    """
    counts = _check_failures(failures)
    top = max(counts)
    shifted = np.array([math.ldexp(1.0, c - top) for c in counts], dtype=np.float64)
    return shifted / shifted.sum()


def split_budget(
    budget: int, probabilities: ArrayLike, rng: np.random.Generator
) -> NDArray[np.int64]:
    """Draw (n_1, …, n_k) ~ Multinomial(budget, p), shape (k,), summing exactly to ``budget``.

    This is the number of draws from each player when ``budget`` i.i.d. samples are taken from
    the mixture Σ_i p_i D_i.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget!r}")
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probabilities must be a non-empty 1-d array, got shape {p.shape}")
    if np.any(p < 0) or not np.isfinite(p).all() or not math.isclose(p.sum(), 1.0, abs_tol=1e-9):
        raise ValueError(f"probabilities must be finite, >= 0 and sum to 1, got {p}")

    counts = rng.multinomial(int(budget), p / p.sum()).astype(np.int64)
    assert int(counts.sum()) == budget
    return counts


def count_errors(predictions: ArrayLike, labels: ArrayLike) -> int:
    """Return how many of the predictions, shape (n,), differ from the labels, shape (n,)."""
    predicted = np.asarray(predictions)
    truth = np.asarray(labels)
    if predicted.shape != truth.shape:
        raise ValueError(
            f"predictions and labels must have the same shape, got {predicted.shape} "
            f"and {truth.shape}"
        )
    return int(np.count_nonzero(predicted != truth))


def fails_test(errors: int, test_samples: int, threshold: float) -> bool:
    """Return whether a test fails: its empirical error rate errors/test_samples exceeds threshold.

    With ``threshold`` = (3/4)·ε1 a player with true error ≤ ε1/2 passes, and one with true
    error > ε1 fails, each with high probability when ``test_samples`` comes from
    :func:`fedsim.pac.plan.required_test_samples`.
    """
    if test_samples < 1:
        raise ValueError(f"test_samples must be >= 1, got {test_samples!r}")
    if not 0 <= errors <= test_samples:
        raise ValueError(f"errors must lie in [0, {test_samples}], got {errors!r}")
    return errors / test_samples > threshold


def _sorted_labels(table: NDArray[np.integer]) -> NDArray[np.integer]:
    """Return the distinct labels of an integer array in increasing order."""
    low = int(table.min())
    high = int(table.max())

    # A bincount over a small label range avoids sorting all T·n predictions.
    if high - low < 4096:
        present = np.flatnonzero(np.bincount((table - low).ravel(), minlength=high - low + 1))
        return (present + low).astype(table.dtype)
    return np.unique(table)


def plurality_vote(predictions: ArrayLike) -> NDArray[np.int64]:
    """Return the plurality label of each column of ``predictions``, shape (T, n) -> (n,).

    Row t contains the integer labels that hypothesis t predicts for n points. The vote is
    unweighted; for two labels it is the majority vote. A tie goes to the smallest tied
    label, a fixed rule, so with even T a 0/1 tie predicts 0. The majority bound counts ties
    as errors, so any fixed rule keeps it.
    """
    table = np.asarray(predictions)
    if table.ndim != 2 or table.shape[0] == 0:
        raise ValueError(f"predictions must have shape (T, n) with T >= 1, got {table.shape}")
    if not np.issubdtype(table.dtype, np.integer):
        raise ValueError(f"predictions must be integer labels, got dtype {table.dtype}")

    labels = _sorted_labels(table)
    num_points = table.shape[1]

    # votes[j, x] counts the hypotheses that give point x the j-th smallest label.
    votes = np.empty((labels.size, num_points), dtype=np.int64)
    for j, label in enumerate(labels):
        votes[j] = np.count_nonzero(table == label, axis=0)

    # argmax returns the first maximum, which is the smallest label because np.unique sorts.
    return labels[np.argmax(votes, axis=0)].astype(np.int64)
