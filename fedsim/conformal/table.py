"""Pattern → threshold lookup table that the GC-FCP server sends to clients.

In GC-FCP (Wen, Simeone, Xing, arXiv 2603.14198) the threshold τ(x) depends on x only through
its membership pattern Φ(x), so one threshold per pattern describes the whole calibrated
predictor. A pattern missing from the table gets τ = +inf (the full label set or an unbounded
interval), which keeps coverage valid for inputs that the server never calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["ThresholdTable"]


@dataclass(frozen=True)
class ThresholdTable:
    """Thresholds per membership pattern.

    ``patterns`` has shape (P, d) with entries 0 or 1, ``thresholds`` shape (P,) in score units
    (+inf allowed, NaN not).
    """

    patterns: NDArray[np.uint8]
    thresholds: NDArray[np.float64]

    def __post_init__(self) -> None:
        patterns = np.asarray(self.patterns)
        thresholds = np.asarray(self.thresholds, dtype=np.float64).reshape(-1)
        if patterns.ndim != 2:
            raise ValueError(f"patterns must have shape (P, d), got {patterns.shape}")
        if patterns.shape[0] != thresholds.size:
            raise ValueError(f"{patterns.shape[0]} patterns but {thresholds.size} thresholds")
        if np.any((patterns != 0) & (patterns != 1)):
            raise ValueError("patterns must contain only 0 and 1")
        if np.isnan(thresholds).any():
            raise ValueError("thresholds must not be NaN")
        patterns = patterns.astype(np.uint8)
        if np.unique(patterns, axis=0).shape[0] != patterns.shape[0]:
            raise ValueError("patterns must be distinct")
        object.__setattr__(self, "patterns", patterns)
        object.__setattr__(self, "thresholds", thresholds)

    @property
    def num_groups(self) -> int:
        """Number of groups d."""
        return int(self.patterns.shape[1])

    def lookup(self, memberships: ArrayLike) -> NDArray[np.float64]:
        """Return τ for every row of ``memberships`` (shape (n, d)); missing patterns get +inf."""
        memberships = np.asarray(memberships, dtype=np.uint8)
        if memberships.ndim != 2 or memberships.shape[1] != self.num_groups:
            raise ValueError(f"memberships must have shape (n, {self.num_groups}), got {memberships.shape}")

        index = {row.tobytes(): position for position, row in enumerate(self.patterns)}
        unique_rows, inverse = np.unique(memberships, axis=0, return_inverse=True)
        unique_thresholds = np.array([
            self.thresholds[index[row.tobytes()]] if row.tobytes() in index else np.inf
            for row in unique_rows
        ], dtype=np.float64)
        return unique_thresholds[inverse.reshape(-1)] if memberships.shape[0] else np.zeros(0)

    def to_arrays(self) -> dict[str, NDArray]:
        """Return {"patterns": uint8 (P, d), "tau": float64 (P,)} for a Flower ArrayRecord."""
        return {"patterns": self.patterns.copy(), "tau": self.thresholds.copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, ArrayLike]) -> ThresholdTable:
        """Rebuild a table from the output of ``to_arrays``."""
        missing = {"patterns", "tau"} - set(arrays)
        if missing:
            raise KeyError(f"threshold table arrays lack {sorted(missing)}")
        return cls(np.asarray(arrays["patterns"]), np.asarray(arrays["tau"]))
