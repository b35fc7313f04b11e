"""FedAvg maths for a federated round hypothesis, and the certification rule that guards it.

Client i trains on its n_i fresh samples and FedAvg weights it by n_i. The weighted sum
Σ_i (n_i/m)·L̂_i(θ) is then the empirical risk on the round's mixture sample. So one full-batch
gradient step per client (FedSGD) equals one centralized gradient step on the pooled sample.
Several local steps on non-IID clients drift apart, so the round hypothesis needs
certification: it is accepted when its pooled error on fresh mixture draws is ≤ ε1/32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fedsim.pac.plan import CERTIFICATION_THRESHOLD_DIVISOR

__all__ = [
    "fedavg_average",
    "logistic_gradient",
    "local_gradient_descent",
    "fedavg_round",
    "certification_passes",
]


def fedavg_average(
    parameters: Sequence[NDArray[np.float64]], num_examples: Sequence[int]
) -> NDArray[np.float64]:
    """Average client parameter vectors weighted by their example counts: Σ n_i θ_i / Σ n_i."""
    if len(parameters) != len(num_examples) or not parameters:
        raise ValueError(
            f"need one example count per parameter vector, got {len(parameters)} vectors and "
            f"{len(num_examples)} counts"
        )
    counts = np.asarray(num_examples, dtype=np.float64)
    if np.any(counts < 0) or counts.sum() == 0:
        raise ValueError(f"example counts must be >= 0 with a positive sum, got {num_examples}")
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in parameters])
    return np.tensordot(counts / counts.sum(), stacked, axes=1)


def logistic_gradient(
    theta: NDArray[np.float64], X: NDArray[np.float64], y: NDArray
) -> NDArray[np.float64]:
    """Return the gradient of the mean logistic loss, shape (d + 1,).

    θ = (w, b) has shape (d + 1,), X shape (n, d), y labels in {0, 1} of shape (n,).
    """
    scores = X @ theta[:-1] + theta[-1]
    residual = 1.0 / (1.0 + np.exp(-scores)) - y
    return np.concatenate([X.T @ residual, [residual.sum()]]) / len(y)


def local_gradient_descent(
    theta: NDArray[np.float64], X: NDArray[np.float64], y: NDArray, lr: float, steps: int
) -> NDArray[np.float64]:
    """Run ``steps`` full-batch gradient steps of size ``lr`` on the logistic loss."""
    current = np.array(theta, dtype=np.float64)
    for _ in range(steps):
        current = current - lr * logistic_gradient(current, X, y)
    return current


def fedavg_round(
    theta: NDArray[np.float64],
    client_data: Sequence[tuple[NDArray[np.float64], NDArray]],
    lr: float,
    local_steps: int,
) -> NDArray[np.float64]:
    """Run one FedAvg round of logistic regression and return the weighted average of clients.

    Every client starts from θ, runs ``local_steps`` full-batch steps on its (X_i, y_i) and is
    weighted by n_i. Clients with no samples are skipped. With one local step this is FedSGD.
    """
    updates = []
    counts = []
    for X, y in client_data:
        if len(y) == 0:
            continue
        updates.append(local_gradient_descent(theta, X, y, lr, local_steps))
        counts.append(len(y))
    return fedavg_average(updates, counts)


def certification_passes(errors: int, samples: int, eps1: float) -> bool:
    """Return whether a round hypothesis is accepted: pooled error rate errors/samples ≤ ε1/32."""
    if samples < 1 or not 0 <= errors <= samples:
        raise ValueError(f"need 0 <= errors <= samples and samples >= 1, got {errors}, {samples}")
    return errors / samples <= eps1 / CERTIFICATION_THRESHOLD_DIVISOR
