"""Measured sample needs for the practical preset, and the overhead ratios of a run.

m̂(ε′) is the smallest n in {start·2^j} such that the learner, trained on n samples of one
player, reaches error ≤ ε′ on that player in at least a fraction 1 − δ of ``repeats``
seeded trials, maximised over players. The draws spent measuring it are reported apart and
are not part of any algorithm's cost.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsim.pac.algorithms import Learner, Player
from fedsim.pac.core import count_errors

__all__ = ["SampleNeed", "measure_sample_need", "OverheadRatios", "overhead_ratios"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleNeed:
    """A measured sample need m̂: the maximum over players and each player's own value."""

    target_error: float
    delta: float
    samples: int
    per_player: tuple[int, ...]
    calibration_draws: int


def _player_need(
    player: Player,
    learner: Learner,
    target_error: float,
    required_successes: int,
    repeats: int,
    evaluation_samples: int,
    start: int,
    max_samples: int,
    seed: int,
    player_index: int,
) -> tuple[int, int]:
    """Return (m̂ for one player, draws spent) by doubling n from ``start``."""
    draws = 0
    n = start
    for size_index in range(64):
        if n > max_samples:
            break
        successes = 0
        for repeat in range(repeats):
            # Stop early once the required successes can no longer be reached.
            if successes + (repeats - repeat) < required_successes:
                break
            key = (player_index, size_index, repeat)
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
            X, y = player.draw(n, rng)
            hypothesis = learner.fit(X, y, rng)
            X_eval, y_eval = player.draw(evaluation_samples, rng)
            draws += n + evaluation_samples
            if (
                count_errors(hypothesis.predict(X_eval), y_eval) / evaluation_samples
                <= target_error
            ):
                successes += 1
        if successes >= required_successes:
            return n, draws
        n *= 2
    raise RuntimeError(
        f"the learner did not reach error {target_error} within {max_samples} samples; "
        "raise max_samples or lower the accuracy target"
    )


def measure_sample_need(
    players: Sequence[Player],
    learner: Learner,
    target_error: float,
    delta: float,
    *,
    seed: int,
    repeats: int = 20,
    evaluation_samples: int | None = None,
    start: int = 100,
    max_samples: int = 10_000_000,
) -> SampleNeed:
    """Measure m̂(target_error): the learning-curve sample need, maximised over players.

    Each trial draws its training and evaluation samples from a stream keyed by
    (seed, player, sample size, trial). ``evaluation_samples`` defaults to ⌈100/target_error⌉, about 100
    expected errors at the target, which makes the error estimate's relative standard error
    about 10 %.
    """
    if not 0.0 < target_error < 1.0 or not 0.0 <= delta < 1.0:
        raise ValueError(
            f"need 0 < target_error < 1 and 0 <= delta < 1, got {target_error}, {delta}"
        )
    if evaluation_samples is None:
        evaluation_samples = math.ceil(100.0 / target_error)
    required = math.ceil((1.0 - delta) * repeats)

    needs = []
    draws = 0
    for index, player in enumerate(players):
        need, spent = _player_need(
            player,
            learner,
            target_error,
            required,
            repeats,
            evaluation_samples,
            start,
            max_samples,
            seed,
            index,
        )
        needs.append(need)
        draws += spent
        logger.debug("player %d: m̂(%g) = %d", index, target_error, need)

    return SampleNeed(
        target_error=target_error,
        delta=delta,
        samples=max(needs),
        per_player=tuple(needs),
        calibration_draws=draws,
    )


@dataclass(frozen=True)
class OverheadRatios:
    """Sample overhead of a run: against one distribution's need and against the naive cost."""

    total_samples: int
    single_need: int
    naive_samples: int

    @property
    def versus_single(self) -> float:
        """total / m_single, the overhead of collaboration over learning one distribution."""
        return self.total_samples / self.single_need

    @property
    def versus_naive(self) -> float:
        """total / (naive baseline's total), below 1 when the run is cheaper than naive."""
        return self.total_samples / self.naive_samples


def overhead_ratios(total_samples: int, single_need: int, naive_samples: int) -> OverheadRatios:
    """Compute the overhead of a run of ``total_samples`` samples.

    ``single_need`` is m_{ε,δ} for one distribution, measured (m̂_single) or from the VC bound,
    and ``naive_samples`` is the naive baseline's cost, k·m_{ε,δ/k}.
    """
    if single_need < 1 or naive_samples < 1 or total_samples < 0:
        raise ValueError(
            f"need single_need >= 1, naive_samples >= 1, total_samples >= 0, got "
            f"{single_need}, {naive_samples}, {total_samples}"
        )
    return OverheadRatios(total_samples, single_need, naive_samples)
