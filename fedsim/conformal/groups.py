"""Group membership, atoms and pattern keys for GC-FCP.

GC-FCP (Wen, Simeone, Xing, arXiv 2603.14198) targets coverage 1 − α within each of d
prespecified groups, which may overlap. The membership vector Φ(x) ∈ {0,1}^d must be computable
at test time, so groups are defined from the features or from model outputs (such as the
predicted label), never from the label y.

An atom is a membership pattern that occurs in the data. The calibration linear program uses a
point only through (score, weight, pattern), so all per-point information beyond the score lives
in the atom's pattern. Patterns travel as hex keys (``pattern_key``) of their little-endian packed
bits, the form used inside Flower record keys such as ``atom/<key>/value``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "interval_memberships",
    "interval_patterns",
    "label_window_map",
    "label_window_memberships",
    "atoms",
    "pattern_key",
    "pattern_from_key",
]


def _check_intervals(intervals: Sequence[tuple[float, float]]) -> NDArray[np.float64]:
    bounds = np.asarray(intervals, dtype=np.float64)
    if bounds.ndim != 2 or bounds.shape[1] != 2 or bounds.shape[0] == 0:
        raise ValueError(f"intervals must be a non-empty list of (low, high) pairs, got {intervals!r}")
    if np.any(bounds[:, 0] >= bounds[:, 1]):
        raise ValueError(f"every interval needs low < high, got {intervals!r}")
    return bounds


def interval_memberships(x: ArrayLike, intervals: Sequence[tuple[float, float]]) -> NDArray[np.uint8]:
    """Compute Φ(x) for half-open feature intervals [low, high).

    ``x`` has shape (n,) and the result has shape (n, d) with entries 0 or 1.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"x must have shape (n,), got {x.shape}")
    bounds = _check_intervals(intervals)
    inside = (x[:, None] >= bounds[None, :, 0]) & (x[:, None] < bounds[None, :, 1])
    return inside.astype(np.uint8)


def interval_patterns(intervals: Sequence[tuple[float, float]]) -> NDArray[np.uint8]:
    """List every pattern that ``interval_memberships`` can produce, shape (P, d).

    The patterns are constant between consecutive interval end points, so one probe per piece
    (and one on either side of all intervals) finds them all.
    """
    bounds = _check_intervals(intervals)
    edges = np.unique(bounds.ravel())
    probes = np.concatenate([[edges[0] - 1.0], (edges[:-1] + edges[1:]) / 2.0, [edges[-1] + 1.0]])
    patterns, _ = atoms(interval_memberships(probes, intervals))
    return patterns


def label_window_map(num_classes: int, windows: Sequence[Sequence[int]]) -> NDArray[np.uint8]:
    """Build the membership map of predicted-label groups, shape (num_classes, d).

    Group j contains every x whose predicted label is in ``windows[j]``.
    """
    membership_map = np.zeros((num_classes, len(windows)), dtype=np.uint8)
    for group, labels in enumerate(windows):
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"window {group} has labels outside [0, {num_classes}): {labels.tolist()}")
        membership_map[labels, group] = 1
    return membership_map


def label_window_memberships(predicted_labels: ArrayLike, membership_map: ArrayLike) -> NDArray[np.uint8]:
    """Compute Φ(x) from predicted labels, shape (n, d).

    ``membership_map`` has shape (num_classes, d), as built by ``label_window_map``.
    """
    predicted_labels = np.asarray(predicted_labels, dtype=np.int64)
    membership_map = np.asarray(membership_map, dtype=np.uint8)
    if predicted_labels.size and (predicted_labels.min() < 0
                                  or predicted_labels.max() >= membership_map.shape[0]):
        raise ValueError(f"predicted labels must lie in [0, {membership_map.shape[0]})")
    return membership_map[predicted_labels]


def atoms(memberships: ArrayLike) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Find the atoms (distinct patterns) of a membership matrix of shape (n, d).

    Returns the patterns, shape (A, d) in lexicographic order, and the atom index of every row,
    shape (n,).
    """
    memberships = np.asarray(memberships)
    if memberships.ndim != 2:
        raise ValueError(f"memberships must have shape (n, d), got {memberships.shape}")
    if memberships.shape[0] == 0:
        return np.zeros((0, memberships.shape[1]), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    patterns, inverse = np.unique(memberships.astype(np.uint8), axis=0, return_inverse=True)
    return patterns, inverse.reshape(-1).astype(np.int64)


def pattern_key(pattern: ArrayLike) -> str:
    """Encode one pattern of d bits as a hex string of its little-endian packed bytes."""
    bits = np.asarray(pattern, dtype=np.uint8).reshape(-1)
    if np.any(bits > 1):
        raise ValueError(f"invalid pattern {bits.tolist()}: entries must be 0 or 1")
    return np.packbits(bits, bitorder="little").tobytes().hex()


def pattern_from_key(key: str, num_groups: int) -> NDArray[np.uint8]:
    """Decode a key written by ``pattern_key`` back to a pattern of shape (num_groups,)."""
    try:
        packed = np.frombuffer(bytes.fromhex(key), dtype=np.uint8)
    except ValueError as error:
        raise ValueError(f"pattern key {key!r} is not a hex string") from error
    if packed.size != (num_groups + 7) // 8:
        raise ValueError(f"pattern key {key!r} has {packed.size} bytes, but {num_groups} groups "
                         f"need {(num_groups + 7) // 8}")
    bits = np.unpackbits(packed, bitorder="little")
    if np.any(bits[num_groups:]):
        raise ValueError(f"pattern key {key!r} sets bits beyond group {num_groups}")
    return bits[:num_groups].astype(np.uint8)
