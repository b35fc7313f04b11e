"""Drivers of multiplicative weights, Blum et al.'s personalized algorithm and the naive baseline.

The drivers run over abstract players, each a sample oracle EX(D_i), and an abstract learner.
They count every sample they receive, per player and per phase (train, test, certify), and
check that each player returned exactly the number of samples requested. Samples drawn to
report the final errors are counted apart and are not part of any algorithm's cost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from fedsim.pac.core import (
    ALL_PLAYERS,
    Phase,
    count_errors,
    derive_rng,
    fails_test,
    plurality_vote,
    probabilities_from_failures,
    split_budget,
)
from fedsim.pac.federated import certification_passes
from fedsim.pac.plan import (
    BlumPlan,
    MWPlan,
    NaivePlan,
    certification_sample_size,
)

__all__ = [
    "Player",
    "Hypothesis",
    "Learner",
    "MajorityVote",
    "SampleLedger",
    "PlayerResult",
    "RoundRecord",
    "RunResult",
    "run_mw",
    "run_blum_personalized",
    "run_naive",
]

logger = logging.getLogger(__name__)

# Round index of the streams that draw samples for the final error report.
EVALUATION_ROUND = 0


@runtime_checkable
class Player(Protocol):
    """A sample oracle EX(D_i).

    ``draw(n, rng)`` returns n i.i.d. labelled samples: features of shape (n, ...) and
    integer labels of shape (n,), using only ``rng`` for randomness.
    """

    def draw(self, n: int, rng: np.random.Generator) -> tuple[NDArray, NDArray]: ...


@runtime_checkable
class Hypothesis(Protocol):
    """A classifier: ``predict(X)`` maps features (n, ...) to integer labels (n,)."""

    def predict(self, X: NDArray) -> NDArray: ...


@runtime_checkable
class Learner(Protocol):
    """A learning algorithm: ``fit(X, y, rng)`` returns a hypothesis trained on (X, y)."""

    def fit(self, X: NDArray, y: NDArray, rng: np.random.Generator) -> Hypothesis: ...


@dataclass(frozen=True)
class MajorityVote:
    """The unweighted plurality vote of hypotheses; a tie goes to the smallest label."""

    hypotheses: tuple[Hypothesis, ...]

    def predict(self, X: NDArray) -> NDArray[np.int64]:
        """Predict labels, shape (n,), for features X, shape (n, ...)."""
        if not self.hypotheses:
            raise ValueError("a majority vote needs at least one hypothesis")
        table = np.stack([np.asarray(h.predict(X)).astype(np.int64) for h in self.hypotheses])
        return plurality_vote(table)


class SampleLedger:
    """Per-player counts of the samples received from players, by phase."""

    def __init__(self, players: Sequence[Player]) -> None:
        self.players = list(players)
        self.counts: dict[Phase, list[int]] = {phase: [0] * len(self.players) for phase in Phase}

    def draw(
        self, player: int, n: int, rng: np.random.Generator, phase: Phase
    ) -> tuple[NDArray, NDArray]:
        """Draw n samples from one player, check their shapes and count them under ``phase``."""
        X, y = self.players[player].draw(int(n), rng)
        X = np.asarray(X)
        y = np.asarray(y)

        if y.shape != (n,) or X.shape[:1] != (n,):
            raise ValueError(
                f"player {player} returned features of shape {X.shape} and labels of shape "
                f"{y.shape} for a request of {n} samples; expected ({n}, ...) and ({n},)"
            )
        if np.issubdtype(X.dtype, np.floating) and not np.isfinite(X).all():
            raise ValueError(f"player {player} returned non-finite features")

        self.counts[phase][player] += int(n)
        return X, y

    def total(self, *phases: Phase) -> int:
        """Return the samples received in the given phases, summed over players."""
        return sum(sum(self.counts[phase]) for phase in phases)


@dataclass(frozen=True)
class PlayerResult:
    """Outcome for one player.

    Sample counts are those the driver received from the player. ``failures`` counts failed
    tests; ``final_weight`` is 2^failures for multiplicative weights and None for algorithms
    without weights. ``final_error`` is the error rate of the player's final classifier on
    ``evaluation_samples`` fresh draws, or None when none were drawn. ``flagged`` marks a
    player of Blum et al.'s algorithm that never passed a test.
    """

    train_samples: int
    test_samples: int
    certify_samples: int
    evaluation_samples: int
    failures: int
    final_weight: int | None
    final_error: float | None
    flagged: bool = False

    @property
    def cost(self) -> int:
        """Samples charged to the algorithm: train, test and certification draws."""
        return self.train_samples + self.test_samples + self.certify_samples


@dataclass(frozen=True)
class RoundRecord:
    """Record of one round.

    ``probabilities`` and ``train_split`` have one entry per player (a player outside the
    round has probability 0). ``test_errors`` is None for a player not tested this round.
    ``certified`` is None when the round was not certified.
    """

    index: int
    probabilities: tuple[float, ...]
    train_split: tuple[int, ...]
    test_errors: tuple[int | None, ...]
    failed: tuple[bool, ...]
    attempts: int = 1
    certified: bool | None = None


@dataclass(frozen=True)
class RunResult:
    """Result of one run: per-player outcomes, per-round history and the final classifiers.

    ``classifiers[i]`` is player i's final classifier, the same object for every player
    except in Blum et al.'s personalized algorithm.
    """

    algorithm: str
    plan: MWPlan | BlumPlan | NaivePlan
    rounds: int
    players: tuple[PlayerResult, ...]
    classifiers: tuple[Hypothesis, ...]
    history: tuple[RoundRecord, ...] = field(default=())

    @property
    def total_train(self) -> int:
        """Training samples over all players."""
        return sum(p.train_samples for p in self.players)

    @property
    def total_test(self) -> int:
        """Test samples over all players."""
        return sum(p.test_samples for p in self.players)

    @property
    def total_certify(self) -> int:
        """Certification samples over all players."""
        return sum(p.certify_samples for p in self.players)

    @property
    def total_samples(self) -> int:
        """The algorithm's cost: train, test and certification samples over all players."""
        return self.total_train + self.total_test + self.total_certify

    @property
    def failures(self) -> tuple[int, ...]:
        """Failed tests per player."""
        return tuple(p.failures for p in self.players)

    @property
    def errors(self) -> tuple[float, ...]:
        """Final error per player; raises if the run drew no evaluation samples."""
        values = [p.final_error for p in self.players]
        if any(v is None for v in values):
            raise ValueError("this run has no final errors; run it with evaluation_samples > 0")
        return tuple(float(v) for v in values)  # type: ignore[arg-type]

    @property
    def worst_error(self) -> float:
        """Largest final error over players."""
        return max(self.errors)

    @property
    def mean_error(self) -> float:
        """Mean final error over players."""
        return float(np.mean(self.errors))


def _check_players(players: Sequence[Player], k: int) -> None:
    if len(players) != k:
        raise ValueError(f"the plan is for k={k} players but {len(players)} players were given")


def _draw_training_set(
    ledger: SampleLedger, split: NDArray[np.int64], seed: int, round_index: int, attempt: int
) -> tuple[NDArray, NDArray]:
    """Draw split[i] training samples from each player i and concatenate them."""
    parts_X: list[NDArray] = []
    parts_y: list[NDArray] = []
    for player, n in enumerate(split):
        if n == 0:
            continue
        rng = derive_rng(seed, round_index, player, Phase.TRAIN, attempt)
        X, y = ledger.draw(player, int(n), rng, Phase.TRAIN)
        parts_X.append(X)
        parts_y.append(y)

    if not parts_X:
        raise ValueError("the round's training budget is 0; round_samples must be >= 1")
    return np.concatenate(parts_X), np.concatenate(parts_y)


def _test_player(
    ledger: SampleLedger,
    hypothesis: Hypothesis,
    player: int,
    test_samples: int,
    seed: int,
    round_index: int,
) -> int:
    """Count the errors of ``hypothesis`` on fresh test samples of one player."""
    rng = derive_rng(seed, round_index, player, Phase.TEST)
    X, y = ledger.draw(player, test_samples, rng, Phase.TEST)
    return count_errors(hypothesis.predict(X), y)


def _certify(
    ledger: SampleLedger,
    hypothesis: Hypothesis,
    probabilities: NDArray[np.float64],
    plan: MWPlan,
    attempts: int,
    seed: int,
    round_index: int,
    attempt: int,
) -> bool:
    """Accept a round hypothesis whose pooled error on fresh mixture draws is ≤ ε1/32."""
    n_certify = certification_sample_size(plan.eps1, plan.delta, plan.rounds, attempts)
    split_rng = derive_rng(seed, round_index, ALL_PLAYERS, Phase.CERTIFY, attempt)
    split = split_budget(n_certify, probabilities, split_rng)

    errors = 0
    for player, n in enumerate(split):
        if n == 0:
            continue
        rng = derive_rng(seed, round_index, player, Phase.CERTIFY, attempt)
        X, y = ledger.draw(player, int(n), rng, Phase.CERTIFY)
        errors += count_errors(hypothesis.predict(X), y)

    return certification_passes(errors, n_certify, plan.eps1)


def _evaluate(
    ledger: SampleLedger, classifiers: Sequence[Hypothesis], evaluation_samples: int, seed: int
) -> list[float | None]:
    """Return each player's error rate on fresh draws, or None when evaluation_samples is 0."""
    if evaluation_samples == 0:
        return [None] * len(classifiers)

    errors: list[float | None] = []
    for player, classifier in enumerate(classifiers):
        rng = derive_rng(seed, EVALUATION_ROUND, player, Phase.EVALUATE)
        X, y = ledger.draw(player, evaluation_samples, rng, Phase.EVALUATE)
        errors.append(count_errors(classifier.predict(X), y) / evaluation_samples)
    return errors


def _player_results(
    ledger: SampleLedger,
    failures: Sequence[int],
    weights: Sequence[int | None],
    errors: Sequence[float | None],
    flagged: Sequence[bool] | None = None,
) -> tuple[PlayerResult, ...]:
    k = len(ledger.players)
    flags = list(flagged) if flagged is not None else [False] * k
    return tuple(
        PlayerResult(
            train_samples=ledger.counts[Phase.TRAIN][i],
            test_samples=ledger.counts[Phase.TEST][i],
            certify_samples=ledger.counts[Phase.CERTIFY][i],
            evaluation_samples=ledger.counts[Phase.EVALUATE][i],
            failures=int(failures[i]),
            final_weight=weights[i],
            final_error=errors[i],
            flagged=flags[i],
        )
        for i in range(k)
    )


def run_mw(
    players: Sequence[Player],
    learner: Learner,
    plan: MWPlan,
    *,
    seed: int,
    evaluation_samples: int = 10_000,
    test_target: Literal["round", "majority"] = "round",
    certify_attempts: int = 0,
) -> RunResult:
    """Run collaborative PAC learning with multiplicative weights (Chen, Zhang, Zhou 2018).

    Each of the plan's T rounds samples (n_1..n_k) ~ Multinomial(m_t, p) with
    p_i ∝ 2^{c_i}, fits g_t on the pooled fresh samples, and tests g_t on n_test fresh
    samples of every player. A player whose empirical error exceeds (3/4)·ε1 gets
    c_i ← c_i + 1, so its weight doubles. The output is the plurality vote of g_1..g_T.

    ``test_target="majority"`` tests the running vote Maj(g_1..g_t) instead of g_t. The
    guarantee's proof uses g_t. ``certify_attempts`` > 0 enables certified rounds, meant for
    round hypotheses that a federated trainer produces. Each attempt a = 0, 1, … fits on
    m_t·2^a fresh mixture samples and draws n_c = ⌈(128/ε1)·ln(2T·A/δ)⌉ certification
    samples. The first hypothesis with pooled error ≤ ε1/32 is accepted. If none is, the
    last attempt's hypothesis is kept and the round is recorded as not certified.
    """
    _check_players(players, plan.k)
    if test_target not in ("round", "majority"):
        raise ValueError(f"test_target must be 'round' or 'majority', got {test_target!r}")
    if certify_attempts < 0:
        raise ValueError(f"certify_attempts must be >= 0, got {certify_attempts!r}")

    ledger = SampleLedger(players)
    failures = [0] * plan.k
    hypotheses: list[Hypothesis] = []
    history: list[RoundRecord] = []
    logger.info("starting %s", plan.describe())

    for round_index in range(1, plan.rounds + 1):
        probabilities = probabilities_from_failures(failures)

        # Fit the round hypothesis on fresh mixture samples, certifying it if requested.
        certified: bool | None = None
        attempts_used = 0
        for attempt in range(max(1, certify_attempts)):
            attempts_used = attempt + 1
            budget = plan.round_samples * 2**attempt
            split_rng = derive_rng(seed, round_index, ALL_PLAYERS, Phase.SPLIT, attempt)
            split = split_budget(budget, probabilities, split_rng)
            X, y = _draw_training_set(ledger, split, seed, round_index, attempt)
            learner_rng = derive_rng(seed, round_index, ALL_PLAYERS, Phase.LEARNER, attempt)
            hypothesis = learner.fit(X, y, learner_rng)

            if certify_attempts == 0:
                break
            certified = _certify(
                ledger,
                hypothesis,
                probabilities,
                plan,
                certify_attempts,
                seed,
                round_index,
                attempt,
            )
            if certified:
                break
        if certified is False:
            logger.warning(
                "round %d: no hypothesis passed certification in %d attempts; keeping the last",
                round_index,
                certify_attempts,
            )
        hypotheses.append(hypothesis)

        # Test the round hypothesis (or the running vote) on every player.
        target: Hypothesis = hypothesis
        if test_target == "majority":
            target = MajorityVote(tuple(hypotheses))
        test_errors = [
            _test_player(ledger, target, i, plan.test_samples, seed, round_index)
            for i in range(plan.k)
        ]
        failed = [fails_test(e, plan.test_samples, plan.pass_threshold) for e in test_errors]

        # Double the weight of every failing player.
        for player, player_failed in enumerate(failed):
            if player_failed:
                failures[player] += 1

        history.append(
            RoundRecord(
                index=round_index,
                probabilities=tuple(float(p) for p in probabilities),
                train_split=tuple(int(n) for n in split),
                test_errors=tuple(test_errors),
                failed=tuple(failed),
                attempts=attempts_used,
                certified=certified,
            )
        )
        logger.debug(
            "round %d: %d of %d players failed, max failures %d",
            round_index,
            sum(failed),
            plan.k,
            max(failures),
        )

    vote = MajorityVote(tuple(hypotheses))
    classifiers = [vote] * plan.k
    errors = _evaluate(ledger, classifiers, evaluation_samples, seed)
    weights = [2**c for c in failures]
    return RunResult(
        algorithm="mw",
        plan=plan,
        rounds=plan.rounds,
        players=_player_results(ledger, failures, weights, errors),
        classifiers=tuple(classifiers),
        history=tuple(history),
    )


def run_blum_personalized(
    players: Sequence[Player],
    learner: Learner,
    plan: BlumPlan,
    *,
    seed: int,
    evaluation_samples: int = 10_000,
) -> RunResult:
    """Run Blum, Haghtalab, Procaccia, Qiao's personalized algorithm (NeurIPS 2017).

    Round r fits h_r on samples of the uniform mixture of the remaining players N_r and
    tests every player of N_r. Players whose empirical error is ≤ (3/4)·ε keep h_r as their
    classifier and leave. The loop ends when N is empty or after R = ⌊log2 k⌋ + 1 rounds.
    A player still left then (possible only after a wrong test or learner failure) gets the
    last round's hypothesis and is flagged.
    """
    _check_players(players, plan.k)
    ledger = SampleLedger(players)
    remaining = list(range(plan.k))
    classifiers: list[Hypothesis | None] = [None] * plan.k
    failures = [0] * plan.k
    history: list[RoundRecord] = []
    logger.info("starting %s", plan.describe())

    hypothesis: Hypothesis | None = None
    rounds_run = 0
    for round_index in range(1, plan.rounds + 1):
        if not remaining:
            break
        rounds_run = round_index

        # Fit h_r on the uniform mixture of the remaining players.
        probabilities = np.zeros(plan.k)
        probabilities[remaining] = 1.0 / len(remaining)
        split_rng = derive_rng(seed, round_index, ALL_PLAYERS, Phase.SPLIT)
        split = split_budget(plan.round_samples, probabilities, split_rng)
        X, y = _draw_training_set(ledger, split, seed, round_index, attempt=0)
        learner_rng = derive_rng(seed, round_index, ALL_PLAYERS, Phase.LEARNER)
        hypothesis = learner.fit(X, y, learner_rng)

        # Test it on the remaining players; those who pass keep it and leave.
        test_errors: list[int | None] = [None] * plan.k
        failed = [False] * plan.k
        for player in remaining:
            errors = _test_player(ledger, hypothesis, player, plan.test_samples, seed, round_index)
            test_errors[player] = errors
            if fails_test(errors, plan.test_samples, plan.pass_threshold):
                failed[player] = True
                failures[player] += 1
            else:
                classifiers[player] = hypothesis
        remaining = [player for player in remaining if failed[player]]

        history.append(
            RoundRecord(
                index=round_index,
                probabilities=tuple(float(p) for p in probabilities),
                train_split=tuple(int(n) for n in split),
                test_errors=tuple(test_errors),
                failed=tuple(failed),
            )
        )

    flagged = [False] * plan.k
    if remaining:
        logger.warning(
            "players %s never passed a test in %d rounds; they keep the last hypothesis",
            remaining,
            plan.rounds,
        )
        for player in remaining:
            classifiers[player] = hypothesis
            flagged[player] = True

    final = [c for c in classifiers if c is not None]
    assert len(final) == plan.k
    errors = _evaluate(ledger, final, evaluation_samples, seed)
    return RunResult(
        algorithm="blum-personalized",
        plan=plan,
        rounds=rounds_run,
        players=_player_results(ledger, failures, [None] * plan.k, errors, flagged),
        classifiers=tuple(final),
        history=tuple(history),
    )


def run_naive(
    players: Sequence[Player],
    learner: Learner,
    plan: NaivePlan,
    *,
    seed: int,
    evaluation_samples: int = 10_000,
) -> RunResult:
    """Run the naive baseline: draw m samples from every player and fit one hypothesis.

    With m = m_{ε,δ/k} and a consistent learner, a union bound over players gives error ≤ ε
    on every player with probability ≥ 1 − δ, at a cost of k·m samples.
    """
    _check_players(players, plan.k)
    ledger = SampleLedger(players)
    logger.info("starting %s", plan.describe())

    split = np.full(plan.k, plan.player_samples, dtype=np.int64)
    X, y = _draw_training_set(ledger, split, seed, round_index=1, attempt=0)
    hypothesis = learner.fit(X, y, derive_rng(seed, 1, ALL_PLAYERS, Phase.LEARNER))

    classifiers = [hypothesis] * plan.k
    errors = _evaluate(ledger, classifiers, evaluation_samples, seed)
    return RunResult(
        algorithm="naive",
        plan=plan,
        rounds=1,
        players=_player_results(ledger, [0] * plan.k, [None] * plan.k, errors),
        classifiers=tuple(classifiers),
    )
