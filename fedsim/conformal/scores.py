"""Conformity scores for split conformal prediction.

Used by GC-FCP (Wen, Simeone, Xing, "Efficient Federated Conformal Prediction with
Group-Conditional Guarantees", arXiv 2603.14198). A larger score means a worse fit, and a
prediction set keeps every label whose score is at most the threshold τ(x).

Classification scores take softmax vectors of shape (n, C). Every score function returns the
score of the given labels, shape (n,), or, with ``labels=None``, the score of every label,
shape (n, C), which is what a prediction set needs.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "absolute_residual",
    "thr_scores",
    "aps_scores",
    "raps_scores",
    "classification_scores",
]


def absolute_residual(y_true: ArrayLike, y_pred: ArrayLike) -> NDArray[np.float64]:
    """Return |y − f(x)|, shape (n,), in the units of y."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    return np.abs(y_true - y_pred)


def _check_probs(probs: ArrayLike) -> NDArray[np.float64]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (n, C), got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or infinite values")
    return probs


def _select(all_scores: NDArray[np.float64], labels: ArrayLike | None) -> NDArray[np.float64]:
    if labels is None:
        return all_scores
    labels = np.asarray(labels)
    if labels.shape != (all_scores.shape[0],):
        raise ValueError(f"labels must have shape ({all_scores.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= all_scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {all_scores.shape[1]}), got range "
                         f"[{labels.min()}, {labels.max()}]")
    return all_scores[np.arange(all_scores.shape[0]), labels]


def thr_scores(probs: ArrayLike, labels: ArrayLike | None = None) -> NDArray[np.float64]:
    """Compute the THR (also called LAC) score 1 − p_y(x).

    Shape (n,) with labels, (n, C) without.
    """
    probs = _check_probs(probs)
    return _select(1.0 - probs, labels)


def _sorted_mass_and_rank(probs: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Return, for every label, the mass of labels ranked before it and including it, and its 1-based rank.

    Labels are ranked by decreasing probability, and ties keep the smaller class index first,
    so the result is deterministic.
    """
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)

    mass = np.empty_like(probs)
    np.put_along_axis(mass, order, cumulative, axis=1)

    ranks = np.empty(probs.shape, dtype=np.int64)
    positions = np.broadcast_to(np.arange(1, probs.shape[1] + 1), probs.shape)
    np.put_along_axis(ranks, order, positions, axis=1)
    return mass, ranks


def aps_scores(probs: ArrayLike, labels: ArrayLike | None = None) -> NDArray[np.float64]:
    """Compute the non-randomised APS score: the sorted softmax mass up to and including y.

    Shape (n,) with labels, (n, C) without.
    """
    probs = _check_probs(probs)
    mass, _ = _sorted_mass_and_rank(probs)
    return _select(mass, labels)


def raps_scores(
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    lambda_reg: float = 0.01,
    k_reg: int = 5,
) -> NDArray[np.float64]:
    """Compute the non-randomised RAPS score APS + lambda_reg · max(rank(y) − k_reg, 0).

    The rank is 1-based. Shape (n,) with labels, (n, C) without.
    """
    if lambda_reg < 0 or k_reg < 0:
        raise ValueError(f"lambda_reg and k_reg must be >= 0, got {lambda_reg} and {k_reg}")
    probs = _check_probs(probs)
    mass, ranks = _sorted_mass_and_rank(probs)
    penalty = lambda_reg * np.maximum(ranks - k_reg, 0)
    return _select(mass + penalty, labels)


def classification_scores(
    probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    kind: str = "thr",
    lambda_reg: float = 0.01,
    k_reg: int = 5,
) -> NDArray[np.float64]:
    """Dispatch to the score named by ``kind``: "thr", "aps" or "raps"."""
    if kind == "thr":
        return thr_scores(probs, labels)
    if kind == "aps":
        return aps_scores(probs, labels)
    if kind == "raps":
        return raps_scores(probs, labels, lambda_reg=lambda_reg, k_reg=k_reg)
    raise ValueError(f"unknown score kind {kind!r}; expected 'thr', 'aps' or 'raps'")
