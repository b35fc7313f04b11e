"""Mixture weights of federated conformal calibration.

Following FCP (Lu et al., arXiv 2305.17564) and GC-FCP (Wen, Simeone, Xing, arXiv 2603.14198),
the test point comes from the mixture Σ_k π_k P_k of the client distributions. Every
calibration point of client k gets the weight λ_k = π_k / (n_k + 1) and the imputed test point
gets w_test = Σ_k λ_k, so that Σ_k λ_k n_k + w_test = Σ_k π_k = 1.

With π_k ∝ n_k + 1 every point weighs 1/(N + K) and w_test = K/(N + K).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["mixture_proportions", "calibration_weights"]


def _check_counts(client_sizes: ArrayLike) -> NDArray[np.float64]:
    sizes = np.asarray(client_sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0:
        raise ValueError(f"client_sizes must be a non-empty 1-D array, got shape {sizes.shape}")
    if np.any(sizes < 0) or np.any(sizes != np.round(sizes)):
        raise ValueError(f"client_sizes must be non-negative integers, got {sizes.tolist()}")
    return sizes


def mixture_proportions(client_sizes: ArrayLike, rule: str | ArrayLike = "uniform") -> NDArray[np.float64]:
    """Return π, shape (K,), summing to 1.

    ``rule`` is "uniform" (π_k = 1/K), "proportional" (π_k ∝ n_k + 1) or an explicit array of
    non-negative values, which is normalised.
    """
    sizes = _check_counts(client_sizes)
    if isinstance(rule, str):
        if rule == "uniform":
            return np.full(sizes.size, 1.0 / sizes.size)
        if rule == "proportional":
            return (sizes + 1.0) / np.sum(sizes + 1.0)
        raise ValueError(f"unknown mixture rule {rule!r}; expected 'uniform', 'proportional' or an array")

    proportions = np.asarray(rule, dtype=np.float64)
    if proportions.shape != sizes.shape:
        raise ValueError(f"pi has shape {proportions.shape}, expected {sizes.shape}")
    if np.any(proportions < 0) or not np.isfinite(proportions).all() or proportions.sum() <= 0:
        raise ValueError(f"pi must be finite, non-negative and not all zero, got {proportions.tolist()}")
    return proportions / proportions.sum()


def calibration_weights(
    client_sizes: ArrayLike, rule: str | ArrayLike = "uniform"
) -> tuple[NDArray[np.float64], float]:
    """Return (λ, w_test): per-client point weights λ_k = π_k/(n_k + 1), shape (K,), and Σ_k λ_k."""
    sizes = _check_counts(client_sizes)
    proportions = mixture_proportions(sizes, rule)
    point_weights = proportions / (sizes + 1.0)
    return point_weights, float(point_weights.sum())
