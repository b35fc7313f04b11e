"""Constants of the collaborative PAC algorithms: rounds, accuracy targets, sample sizes.

Two presets exist. ``theory`` uses the constants under which the multiplicative-weights
analysis closes (T = max(1, ⌈5·log2 k⌉), ε1 = ε/6, δ1 = δ/(2T), tests of
⌈(32/ε1)·ln(2kT/δ)⌉ samples) and the Blumer-style VC bound for the learner. ``practical``
keeps T, ε1 and the pass threshold but takes the learner's sample size from a measured
learning curve (or as given) and uses tests four times smaller, so the theorem no longer
applies to it.

VC bounds take the VC dimension of the class the learner fits: a linear separator in R^d
with an intercept has dimension d + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "PASS_THRESHOLD_FRACTION",
    "TEST_CONSTANTS",
    "Preset",
    "MWPlan",
    "BlumPlan",
    "NaivePlan",
    "vc_sample_bound",
    "mw_rounds",
    "blum_rounds",
    "required_test_samples",
    "certification_sample_size",
    "max_failure_fraction",
    "majority_error_factor",
    "plan_mw",
    "plan_blum",
    "plan_naive",
]

Preset = Literal["theory", "practical"]

# A player fails a test when its empirical error exceeds this fraction of the test's accuracy.
PASS_THRESHOLD_FRACTION = 0.75

# Multiplicative constant of the test size ⌈(C/ε)·ln(2kT/δ)⌉ per preset.
TEST_CONSTANTS: dict[str, int] = {"theory": 32, "practical": 8}

# Certification draws ⌈(C/ε1)·ln(2TA/δ)⌉ and accepts a pooled error rate up to ε1/32.
CERTIFICATION_CONSTANT = 128
CERTIFICATION_THRESHOLD_DIVISOR = 32


def _check_accuracy(eps: float, delta: float) -> None:
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must lie in (0, 1), got {eps!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")


def _check_players(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of players k must be an integer >= 1, got {k!r}")


def _check_preset(preset: str) -> None:
    if preset not in TEST_CONSTANTS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(TEST_CONSTANTS)}")


def vc_sample_bound(vc_dim: int, eps: float, delta: float) -> int:
    """Return the Blumer-style sample size of a consistent learner.

    m(ε, δ) = ⌈max((4/ε)·log2(2/δ), (8V/ε)·log2(13/ε))⌉ samples suffice for a learner that
    outputs a hypothesis consistent with its sample, in a class of VC dimension V, to have
    error at most ε with probability at least 1 − δ in the realizable setting.
    """
    if vc_dim < 1:
        raise ValueError(f"vc_dim must be >= 1, got {vc_dim!r}")
    _check_accuracy(eps, delta)
    confidence_term = (4.0 / eps) * math.log2(2.0 / delta)
    dimension_term = (8.0 * vc_dim / eps) * math.log2(13.0 / eps)
    return math.ceil(max(confidence_term, dimension_term))


def mw_rounds(k: int) -> int:
    """Return T = max(1, ⌈5·log2 k⌉), the number of multiplicative-weights rounds.

    The value is computed in integers: ⌈5·log2 k⌉ is the smallest T with 2^T ≥ k^5, which is
    the bit length of k^5 − 1. The base-2 logarithm matters, because with the natural
    logarithm the majority vote's error bound exceeds ε.
    """
    _check_players(k)
    return max(1, (k**5 - 1).bit_length())


def blum_rounds(k: int) -> int:
    """Return R = ⌊log2 k⌋ + 1, the rounds Blum et al.'s personalized algorithm needs.

    Each round keeps at least half of the remaining players, so the set shrinks to at most
    ⌊|N|/2⌋ and is empty after ⌊log2 k⌋ + 1 rounds.
    """
    _check_players(k)
    return k.bit_length()


def required_test_samples(
    k: int, rounds: int, eps: float, delta: float, constant: float = 32
) -> int:
    """Return the number of fresh samples of one test, ⌈(constant/ε)·ln(2·k·rounds/δ)⌉.

    With constant 32 and a pass threshold of (3/4)·ε, multiplicative Chernoff bounds give
    that a hypothesis with error ≤ ε/2 fails, or one with error > ε passes, with probability
    at most δ/(2·k·rounds) each, so all k·rounds tests are right with probability ≥ 1 − δ/2.
    """
    _check_players(k)
    _check_accuracy(eps, delta)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    return math.ceil((constant / eps) * math.log(2.0 * k * rounds / delta))


def certification_sample_size(eps1: float, delta: float, rounds: int, attempts: int) -> int:
    """Return n_c = ⌈(128/ε1)·ln(2·rounds·attempts/δ)⌉, the mixture draws of one certification.

    A round hypothesis is accepted when its pooled error rate on n_c draws is ≤ ε1/32. Then
    the chance to accept one with mixture error > ε1/16 is at most δ/(2·rounds·attempts).
    """
    _check_accuracy(eps1, delta)
    if rounds < 1 or attempts < 1:
        raise ValueError(f"rounds and attempts must be >= 1, got {rounds!r} and {attempts!r}")
    return math.ceil((CERTIFICATION_CONSTANT / eps1) * math.log(2.0 * rounds * attempts / delta))


def max_failure_fraction(k: int) -> float:
    """Return the bound on c_i / T that holds when every learner call and test succeeds.

    Φ grows by at most 9/8 per round, so 2^{c_i} ≤ k·(9/8)^T and
    c_i / T ≤ (log2 k + T·log2(9/8)) / T. With T = ⌈5·log2 k⌉ this is at most 0.2 + 0.170.
    """
    rounds = mw_rounds(k)
    return (math.log2(k) + rounds * math.log2(9.0 / 8.0)) / rounds


def majority_error_factor(failure_fraction: float) -> float:
    """Return the factor a with err_i(Maj) ≤ a·ε1 for a player that failed a fraction φ of rounds.

    The vote errs at x only if at least T/2 − c_i passing hypotheses err at x, and each
    passing hypothesis has error ≤ ε1, so by Markov's inequality the factor is
    (1 − φ) / (1/2 − φ). It must stay below 6 for the vote's error to stay below ε = 6·ε1.
    """
    if not 0.0 <= failure_fraction < 0.5:
        raise ValueError(f"failure_fraction must lie in [0, 0.5), got {failure_fraction!r}")
    return (1.0 - failure_fraction) / (0.5 - failure_fraction)


@dataclass(frozen=True)
class MWPlan:
    """Constants of one multiplicative-weights run.

    ``round_samples`` is m_t, the learner's sample size in every round, ``test_samples`` the
    size of each player's test, and ``pass_threshold`` the largest empirical error rate that
    passes. Sample counts are per round and per player.
    """

    preset: str
    k: int
    eps: float
    delta: float
    rounds: int
    eps1: float
    delta1: float
    learner_eps: float
    round_samples: int
    test_samples: int
    pass_threshold: float
    vc_dim: int | None

    @property
    def train_budget(self) -> int:
        """Training samples of the whole run, T·m_t."""
        return self.rounds * self.round_samples

    @property
    def test_budget(self) -> int:
        """Test samples of the whole run, k·T·n_test."""
        return self.k * self.rounds * self.test_samples

    def describe(self) -> str:
        """Format the constants on one line, for logs and benchmark output."""
        return (
            f"MW[{self.preset}] k={self.k} eps={self.eps} delta={self.delta} T={self.rounds} "
            f"eps1={self.eps1:.6g} delta1={self.delta1:.6g} m_t={self.round_samples} "
            f"n_test={self.test_samples} threshold={self.pass_threshold:.6g}"
        )


@dataclass(frozen=True)
class BlumPlan:
    """Constants of one run of Blum et al.'s personalized algorithm.

    Each of at most ``rounds`` rounds learns from ``round_samples`` draws of the uniform
    mixture of the remaining players and tests every remaining player on ``test_samples``.
    """

    preset: str
    k: int
    eps: float
    delta: float
    rounds: int
    learner_eps: float
    learner_delta: float
    round_samples: int
    test_samples: int
    pass_threshold: float
    vc_dim: int | None

    def describe(self) -> str:
        """Format the constants on one line, for logs and benchmark output."""
        return (
            f"Blum-personalized[{self.preset}] k={self.k} eps={self.eps} delta={self.delta} "
            f"R={self.rounds} m_r={self.round_samples} n_test={self.test_samples} "
            f"threshold={self.pass_threshold:.6g}"
        )


@dataclass(frozen=True)
class NaivePlan:
    """Constants of the naive baseline: ``player_samples`` draws from every player, one fit."""

    preset: str
    k: int
    eps: float
    delta: float
    player_samples: int
    vc_dim: int | None

    @property
    def train_budget(self) -> int:
        """Training samples of the whole run, k·m."""
        return self.k * self.player_samples

    def describe(self) -> str:
        """Format the constants on one line, for logs and benchmark output."""
        return (
            f"naive[{self.preset}] k={self.k} eps={self.eps} delta={self.delta} "
            f"m_per_player={self.player_samples}"
        )


def _learner_samples(
    preset: str, vc_dim: int | None, measured: int | None, eps: float, delta: float, what: str
) -> int:
    """Resolve a learner sample size: the VC bound for ``theory``, the given value otherwise."""
    if preset == "theory":
        if vc_dim is None:
            raise ValueError(f"the theory preset needs vc_dim to size {what}")
        if measured is not None:
            raise ValueError(
                f"the theory preset derives {what} from vc_dim; pass {what} only with "
                "the practical preset"
            )
        return vc_sample_bound(vc_dim, eps, delta)
    if measured is None:
        raise ValueError(
            f"the practical preset needs {what} from a measured learning curve "
            f"(see measure_sample_need) or set directly"
        )
    if measured < 1:
        raise ValueError(f"{what} must be >= 1, got {measured!r}")
    return int(measured)


def plan_mw(
    k: int,
    eps: float,
    delta: float,
    *,
    preset: Preset = "practical",
    vc_dim: int | None = None,
    round_samples: int | None = None,
) -> MWPlan:
    """Compute the constants of the multiplicative-weights algorithm.

    T = max(1, ⌈5·log2 k⌉), ε1 = ε/6, δ1 = δ/(2T), learner target ε1/16 with confidence
    1 − δ1, tests of ⌈(C/ε1)·ln(2kT/δ)⌉ samples with C = 32 (theory) or 8 (practical), and a
    pass threshold of (3/4)·ε1. ``theory`` needs ``vc_dim``; ``practical`` needs
    ``round_samples``, the measured m̂(ε1/16) or a size chosen directly.
    """
    _check_players(k)
    _check_accuracy(eps, delta)
    _check_preset(preset)

    rounds = mw_rounds(k)
    eps1 = eps / 6.0
    delta1 = delta / (2.0 * rounds)
    learner_eps = eps1 / 16.0
    samples = _learner_samples(preset, vc_dim, round_samples, learner_eps, delta1, "round_samples")

    return MWPlan(
        preset=preset,
        k=k,
        eps=eps,
        delta=delta,
        rounds=rounds,
        eps1=eps1,
        delta1=delta1,
        learner_eps=learner_eps,
        round_samples=samples,
        test_samples=required_test_samples(k, rounds, eps1, delta, TEST_CONSTANTS[preset]),
        pass_threshold=PASS_THRESHOLD_FRACTION * eps1,
        vc_dim=vc_dim,
    )


def plan_blum(
    k: int,
    eps: float,
    delta: float,
    *,
    preset: Preset = "practical",
    vc_dim: int | None = None,
    round_samples: int | None = None,
) -> BlumPlan:
    """Compute the constants of Blum et al.'s personalized algorithm.

    R = ⌊log2 k⌋ + 1 rounds, learner target ε/4 with confidence 1 − δ/(4R), tests of
    ⌈(C/ε)·ln(2kR/δ)⌉ samples (C = 32 or 8 as in :func:`plan_mw`) and a pass threshold of
    (3/4)·ε. ``practical`` needs ``round_samples``, the measured m̂(ε/4) or a chosen size.
    """
    _check_players(k)
    _check_accuracy(eps, delta)
    _check_preset(preset)

    rounds = blum_rounds(k)
    learner_eps = eps / 4.0
    learner_delta = delta / (4.0 * rounds)
    samples = _learner_samples(
        preset, vc_dim, round_samples, learner_eps, learner_delta, "round_samples"
    )

    return BlumPlan(
        preset=preset,
        k=k,
        eps=eps,
        delta=delta,
        rounds=rounds,
        learner_eps=learner_eps,
        learner_delta=learner_delta,
        round_samples=samples,
        test_samples=required_test_samples(k, rounds, eps, delta, TEST_CONSTANTS[preset]),
        pass_threshold=PASS_THRESHOLD_FRACTION * eps,
        vc_dim=vc_dim,
    )


def plan_naive(
    k: int,
    eps: float,
    delta: float,
    *,
    preset: Preset = "practical",
    vc_dim: int | None = None,
    player_samples: int | None = None,
) -> NaivePlan:
    """Compute the constants of the naive baseline: m_{ε,δ/k} samples from every player.

    ``theory`` uses the VC bound at (ε, δ/k). ``practical`` needs ``player_samples``, for
    instance the measured m̂(ε).
    """
    _check_players(k)
    _check_accuracy(eps, delta)
    _check_preset(preset)

    samples = _learner_samples(preset, vc_dim, player_samples, eps, delta / k, "player_samples")
    return NaivePlan(
        preset=preset, k=k, eps=eps, delta=delta, player_samples=samples, vc_dim=vc_dim
    )
