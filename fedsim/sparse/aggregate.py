"""Server-side threshold arithmetic of SpaFL: averaging, changes and their sums.

In SpaFL (Kim, Saad, Debbah and Hong, NeurIPS 2024, arXiv 2406.00431) the server averages the
sampled clients' thresholds, τ(t+1) = (1/K) Σ_k τ_k, and broadcasts Δτ(t) = τ(t+1) − τ(t).
All functions here take and return ``{layer_name: float32 array}`` dicts, the form produced by
``get_thresholds``, and never modify their inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["mean_thresholds", "sum_threshold_deltas", "threshold_delta"]

ThresholdDict = Mapping[str, np.ndarray]


def _check_same_layout(dicts: Sequence[ThresholdDict], what: str) -> list[str]:
    """Return the keys of the first dict after checking that all dicts share keys and shapes."""
    if len(dicts) == 0:
        raise ValueError(f"cannot combine an empty list of {what}")
    keys = list(dicts[0])
    shapes = {name: np.shape(dicts[0][name]) for name in keys}
    for index, entry in enumerate(dicts[1:], start=1):
        if set(entry) != set(keys):
            raise ValueError(
                f"{what} {index} has keys {sorted(entry)}, but {what} 0 has {sorted(keys)}"
            )
        for name in keys:
            if np.shape(entry[name]) != shapes[name]:
                raise ValueError(
                    f"{what} {index} has shape {np.shape(entry[name])} for {name!r}, "
                    f"but {what} 0 has {shapes[name]}"
                )
    return keys


def _exact_sums(rows: np.ndarray) -> np.ndarray:
    """Return the correctly rounded float64 sum of each column of a 2-D array.

    ``math.fsum`` rounds the exact sum once, so the result does not depend on the row order.
    """
    return np.array([math.fsum(column) for column in rows.T], dtype=np.float64)


def mean_thresholds(
    thresholds: Sequence[ThresholdDict], weights: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Return the per-layer mean of client thresholds as float32 arrays.

    Without ``weights`` this is the unweighted mean (1/K) Σ_k τ_k of SpaFL. With ``weights``
    (for example each client's number of training examples, all ≥ 0 with a positive sum) it is
    Σ_k n_k τ_k / Σ_k n_k. The sums are correctly rounded (``math.fsum``), so the result is
    bitwise the same for every order of the clients. A single client gets its own thresholds
    back. Raises ``ValueError`` on an empty list, mismatched keys or shapes, non-finite
    thresholds or invalid weights.
    """
    keys = _check_same_layout(thresholds, "threshold dict")

    factors: np.ndarray | None = None
    if weights is not None:
        factors = np.asarray(weights, dtype=np.float64)
        if factors.shape != (len(thresholds),):
            raise ValueError(f"expected {len(thresholds)} weights, got shape {factors.shape}")
        if not np.all(np.isfinite(factors)) or np.any(factors < 0) or factors.sum() <= 0:
            raise ValueError(
                f"weights must be finite, >= 0 and have a positive sum, got {factors.tolist()}"
            )

    result: dict[str, np.ndarray] = {}
    for name in keys:
        shape = np.shape(thresholds[0][name])
        rows = np.stack(
            [np.asarray(entry[name], dtype=np.float64).reshape(-1) for entry in thresholds]
        )
        if not np.all(np.isfinite(rows)):
            raise ValueError(f"thresholds of layer {name!r} contain NaN or infinite values")

        if factors is None:
            mean = _exact_sums(rows) / len(thresholds)
        else:
            mean = _exact_sums(factors[:, None] * rows) / math.fsum(factors)
        result[name] = mean.astype(np.float32).reshape(shape)
    return result


def threshold_delta(new: ThresholdDict, old: ThresholdDict) -> dict[str, np.ndarray]:
    """Return Δτ = new − old per layer as float32 arrays. Keys and shapes must match."""
    keys = _check_same_layout([new, old], "threshold dict")
    return {
        name: (np.asarray(new[name], dtype=np.float32) - np.asarray(old[name], dtype=np.float32))
        for name in keys
    }


def sum_threshold_deltas(deltas: Sequence[ThresholdDict]) -> dict[str, np.ndarray]:
    """Return Σ_t Δτ(t) per layer as float32 arrays, summed in float64.

    Applying the sum once equals applying each Δτ(t) in turn as long as no weight's sign
    factor changes in between (see ``sign_changes``), because the weight step is linear in Δτ.
    A client that missed rounds can therefore catch up with one step on the sum.
    """
    keys = _check_same_layout(deltas, "delta dict")
    return {
        name: np.sum(
            [np.asarray(entry[name], dtype=np.float64) for entry in deltas], axis=0
        ).astype(np.float32)
        for name in keys
    }
