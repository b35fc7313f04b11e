"""Server calibration of GC-FCP: the weighted group-conditional dual LP and its closed forms.

GC-FCP (Wen, Simeone, Xing, arXiv 2603.14198) combines the group-conditional conformal method
of Gibbs, Cherian and Candès (arXiv 2305.12616) with the mixture weights of federated conformal
prediction (Lu et al., arXiv 2305.17564). Calibration points i carry weights w_i, the imputed test
point carries w_test, and Φ ∈ {0,1}^d is the group membership vector. For an imputed test score s
the dual LP is

    max   Σ_i η_i S_i + η_t s
    s.t.  Σ_i η_i Φ(X_i) + η_t Φ(x) = 0
          −α w_i ≤ η_i ≤ (1−α) w_i,   −α w_test ≤ η_t ≤ (1−α) w_test

and the deterministic threshold is τ(x) = inf{s : η_t*(s) = (1−α) w_test}. η_t*(s) is
non-decreasing in s, so τ is found by bisection on s. The bracket is widened by doubling until
η_t reaches (1−α) w_test, and one extra LP, max η_t over the same constraints, decides exactly
whether that level is reachable at all; if it is not, τ = +inf.

Every LP goes to ``scipy.optimize.linprog(method="highs")``. The default solver is an exact
active-set reduction of the full LP. Within one atom every η_i has the same constraint column,
so an optimal solution puts the atom's highest scores at their upper bounds and its lowest at
their lower bounds. The solver keeps those fixed and solves the LP over a window of ranks per
atom. It then checks the reduced costs of the fixed variables against the LP duals. With β the
negated equality dual, a variable fixed at its upper bound needs S_i ≥ Φ_aᵀβ and one at its lower
bound needs S_i ≤ Φ_aᵀβ. When the check passes, the full LP is solved to optimality, and when it
fails the window grows. ``solver="full"`` solves the literal LP with every variable free (slower, same
answer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.optimize import OptimizeResult, linprog

from fedsim.conformal.groups import atoms
from fedsim.conformal.table import ThresholdTable

__all__ = [
    "CalibrationError",
    "gcc_threshold",
    "max_test_dual",
    "calibrate_table",
    "insufficient_group_mass",
    "weighted_quantile_threshold",
    "mondrian_thresholds",
    "split_conformal_threshold",
]

logger = logging.getLogger(__name__)

# Scaled units: weights are divided by w_test and scores by max |S|, so the test dual lies in
# [−α, 1−α] and the scores in [−1, 1]. HiGHS's default feasibility tolerance is 1e-7.
_REACH_TOLERANCE = 1e-8
_REDUCED_COST_TOLERANCE = 1e-9
_INITIAL_HALF_WINDOW = 32
_MAX_WIDENING_STEPS = 200

# HiGHS's default tolerances (1e-7) let an LP at s within 1e-7 · max |S| of a breakpoint return
# either vertex, which limits τ's precision. Tighter tolerances bring it near the bisection's.
_HIGHS_OPTIONS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


class CalibrationError(RuntimeError):
    """An LP of the calibration failed or the inputs cannot be calibrated."""


def _validate_inputs(
    scores: ArrayLike, weights: ArrayLike, memberships: ArrayLike, w_test: float, alpha: float
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.uint8]]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), scores.shape).copy()
    memberships = np.asarray(memberships)
    if memberships.ndim != 2 or memberships.shape[0] != scores.size:
        raise ValueError(f"memberships must have shape ({scores.size}, d), got {memberships.shape}")
    if np.any((memberships != 0) & (memberships != 1)):
        raise ValueError("memberships must contain only 0 and 1")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not np.isfinite(weights).all() or np.any(weights < 0):
        raise ValueError("weights must be finite and non-negative")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if not (np.isfinite(w_test) and w_test > 0):
        raise ValueError(f"w_test must be finite and positive, got {w_test}")
    return scores, weights, memberships.astype(np.uint8)


@dataclass
class _AtomData:
    """One atom's points, sorted by decreasing score, with weights in scaled units."""

    pattern: NDArray[np.float64]
    scores: NDArray[np.float64]
    weights: NDArray[np.float64]
    prefix_weight: NDArray[np.float64] = field(init=False)

    def __post_init__(self) -> None:
        self.prefix_weight = np.concatenate([[0.0], np.cumsum(self.weights)])

    @property
    def size(self) -> int:
        return int(self.scores.size)

    @property
    def total(self) -> float:
        return float(self.prefix_weight[-1])


class _DualProblem:
    """The dual LP for one test pattern, in scaled units, solved by the active-set reduction."""

    def __init__(
        self,
        scores: NDArray[np.float64],
        weights: NDArray[np.float64],
        memberships: NDArray[np.uint8],
        test_pattern: NDArray[np.uint8],
        w_test: float,
        alpha: float,
        full: bool,
    ) -> None:
        self.alpha = alpha
        self.full = full
        self.scale = float(np.max(np.abs(scores))) if scores.size else 1.0
        if self.scale == 0.0:
            self.scale = 1.0

        # Groups without calibration mass that do not contain x give the equality 0 = 0.
        positive = weights > 0
        has_mass = memberships[positive].any(axis=0) if positive.any() else np.zeros(test_pattern.size, bool)
        self.rows = np.flatnonzero(has_mass | (test_pattern == 1))
        self.test_column = test_pattern[self.rows].astype(np.float64)

        patterns, inverse = atoms(memberships[positive])
        scaled_scores = scores[positive] / self.scale
        scaled_weights = weights[positive] / w_test
        self.atoms: list[_AtomData] = []
        for index, pattern in enumerate(patterns):
            members = np.flatnonzero(inverse == index)
            order = members[np.argsort(-scaled_scores[members], kind="stable")]
            self.atoms.append(_AtomData(pattern[self.rows].astype(np.float64),
                                        scaled_scores[order], scaled_weights[order]))

        # Window [low, high) of free ranks per atom. Ranks below low sit at the upper bound and
        # ranks from high on at the lower bound.
        self.windows: list[tuple[int, int]] = []
        for atom in self.atoms:
            if full or atom.size <= 2 * _INITIAL_HALF_WINDOW:
                self.windows.append((0, atom.size))
            else:
                centre = int(round(alpha * atom.size))
                self.windows.append((max(0, centre - _INITIAL_HALF_WINDOW),
                                     min(atom.size, centre + _INITIAL_HALF_WINDOW)))

    def max_test_dual(self) -> float:
        """Solve max η_t. Only the atom totals matter, each free in [−α W_a, (1−α) W_a]."""
        num_atoms = len(self.atoms)
        objective = np.zeros(num_atoms + 1)
        objective[-1] = -1.0
        if self.rows.size == 0:
            return 1 - self.alpha

        matrix = np.column_stack([atom.pattern for atom in self.atoms] + [self.test_column])
        bounds = [(-self.alpha * atom.total, (1 - self.alpha) * atom.total) for atom in self.atoms]
        bounds.append((-self.alpha, 1 - self.alpha))
        result = linprog(objective, A_eq=matrix, b_eq=np.zeros(self.rows.size), bounds=bounds,
                         method="highs", options=_HIGHS_OPTIONS)
        if result.status != 0:
            raise CalibrationError(f"the max-η_t LP failed: {result.message}")
        return float(result.x[-1])

    def test_dual(self, test_score: float) -> float | None:
        """Return η_t*(s) in scaled units for the scaled test score s, or None if HiGHS fails."""
        if self.rows.size == 0:
            # No constraint links η_t to the others, so it sits at the bound its cost favours.
            return (1 - self.alpha) if test_score > 0 else -self.alpha

        for _ in range(64):
            result = self._solve_restricted(test_score)
            if result.status == 2:
                if not self._grow_all():
                    return None
                continue
            if result.status != 0:
                logger.warning("HiGHS failed on the calibration LP at s=%g: %s",
                               test_score * self.scale, result.message)
                return None
            beta = -np.asarray(result.eqlin.marginals)
            fit = np.array([atom.pattern @ beta for atom in self.atoms])
            if self._fixed_variables_optimal(fit):
                self._recentre(fit)
                return float(result.x[-1])
            self._grow_violated(fit)
        raise CalibrationError("the active-set LP did not converge after 64 window updates")

    def _solve_restricted(self, test_score: float) -> OptimizeResult:
        columns, costs, lower, upper = [], [], [], []
        fixed_sum = np.zeros(self.rows.size)
        for atom, (low, high) in zip(self.atoms, self.windows, strict=True):
            at_upper = (1 - self.alpha) * atom.prefix_weight[low]
            at_lower = -self.alpha * (atom.total - atom.prefix_weight[high])
            fixed_sum += (at_upper + at_lower) * atom.pattern
            count = high - low
            columns.append(np.repeat(atom.pattern[:, None], count, axis=1))
            costs.append(-atom.scores[low:high])
            lower.append(-self.alpha * atom.weights[low:high])
            upper.append((1 - self.alpha) * atom.weights[low:high])

        columns.append(self.test_column[:, None])
        costs.append(np.array([-test_score]))
        lower.append(np.array([-self.alpha]))
        upper.append(np.array([1 - self.alpha]))

        matrix = np.concatenate(columns, axis=1)
        bounds = np.column_stack([np.concatenate(lower), np.concatenate(upper)])
        return linprog(np.concatenate(costs), A_eq=matrix, b_eq=-fixed_sum, bounds=bounds,
                       method="highs", options=_HIGHS_OPTIONS)

    def _fixed_variables_optimal(self, fit: NDArray[np.float64]) -> bool:
        for atom, (low, high), atom_fit in zip(self.atoms, self.windows, fit, strict=True):
            if low > 0 and atom.scores[low - 1] < atom_fit - _REDUCED_COST_TOLERANCE:
                return False
            if high < atom.size and atom.scores[high] > atom_fit + _REDUCED_COST_TOLERANCE:
                return False
        return True

    def _fit_ranks(self, atom: _AtomData, atom_fit: float) -> tuple[int, int]:
        """Return the ranks between which the fit falls: scores above it, and at or above it."""
        # Scores are sorted descending, so counts are ranks.
        above = int(np.sum(atom.scores > atom_fit + _REDUCED_COST_TOLERANCE))
        at_or_above = int(np.sum(atom.scores >= atom_fit - _REDUCED_COST_TOLERANCE))
        return above, at_or_above

    def _grow_violated(self, fit: NDArray[np.float64]) -> None:
        """Widen each window to cover the ranks around its atom's fit, keeping the old window."""
        for index, (atom, (low, high), atom_fit) in enumerate(zip(self.atoms, self.windows, fit, strict=True)):
            above, at_or_above = self._fit_ranks(atom, atom_fit)
            self.windows[index] = (max(0, min(low, above - _INITIAL_HALF_WINDOW)),
                                   min(atom.size, max(high, at_or_above + _INITIAL_HALF_WINDOW)))

    def _recentre(self, fit: NDArray[np.float64]) -> None:
        """Start the next solve from small windows around the current fit."""
        for index, (atom, atom_fit) in enumerate(zip(self.atoms, fit, strict=True)):
            if self.windows[index] == (0, atom.size) and self.full:
                continue
            above, at_or_above = self._fit_ranks(atom, atom_fit)
            self.windows[index] = (max(0, above - _INITIAL_HALF_WINDOW),
                                   min(atom.size, at_or_above + _INITIAL_HALF_WINDOW))

    def _grow_all(self) -> bool:
        grown = False
        for index, (atom, (low, high)) in enumerate(zip(self.atoms, self.windows, strict=True)):
            pad = max(high - low, _INITIAL_HALF_WINDOW)
            new_window = (max(0, low - pad), min(atom.size, high + pad))
            grown |= new_window != (low, high)
            self.windows[index] = new_window
        return grown


def max_test_dual(
    scores: ArrayLike,
    weights: ArrayLike,
    memberships: ArrayLike,
    test_pattern: ArrayLike,
    w_test: float,
    alpha: float,
) -> float:
    """Return max η_t over the dual's constraints, in the units of w_test.

    τ(x) is finite exactly when this reaches (1−α)·w_test. The scores do not enter the LP and
    are accepted only for a uniform signature.
    """
    scores, weights, memberships = _validate_inputs(scores, weights, memberships, w_test, alpha)
    problem = _DualProblem(scores, weights, memberships, np.asarray(test_pattern, dtype=np.uint8),
                           w_test, alpha, full=False)
    return problem.max_test_dual() * w_test


def gcc_threshold(
    scores: ArrayLike,
    weights: ArrayLike,
    memberships: ArrayLike,
    test_pattern: ArrayLike,
    w_test: float,
    alpha: float,
    *,
    rtol: float = 1e-9,
    solver: Literal["active-set", "full"] = "active-set",
    unreachable: Literal["inf", "bracket_end"] = "inf",
    on_solver_failure: Literal["upper", "raise"] = "upper",
) -> float:
    """Compute the deterministic GC-FCP threshold τ for one test pattern.

    Args:
        scores: calibration scores S_i, shape (n,). Summary pseudo-points are passed the same way.
        weights: w_i >= 0, shape (n,) or a scalar.
        memberships: Φ(X_i), shape (n, d), entries 0 or 1.
        test_pattern: Φ(x), shape (d,).
        w_test: weight of the imputed test point, > 0.
        alpha: miscoverage level in (0, 1).
        rtol: bisection stops when the bracket is narrower than rtol · max(max |S|, |τ|).
        solver: "active-set" (exact and fast) or "full" (the literal LP).
        unreachable: "inf" returns +inf when (1−α) w_test is unreachable. "bracket_end"
            returns 1.25 · max S instead, as the reference code does, which can under-cover.
        on_solver_failure: "upper" returns the bracket's upper end (+inf before the bracket is
            found) and logs a warning. "raise" raises CalibrationError.

    Returns:
        τ in score units, or +inf.
    """
    scores, weights, memberships = _validate_inputs(scores, weights, memberships, w_test, alpha)
    test_pattern = np.asarray(test_pattern, dtype=np.uint8).reshape(-1)
    if test_pattern.size != memberships.shape[1]:
        raise ValueError(f"test_pattern has {test_pattern.size} groups, memberships has {memberships.shape[1]}")

    if not test_pattern.any():
        # x is in no group, so its fit Φ(x)ᵀβ is 0 whatever β, and no coverage is promised.
        return 0.0

    problem = _DualProblem(scores, weights, memberships, test_pattern, w_test, alpha,
                           full=(solver == "full"))
    target = 1.0 - alpha

    # Step 1: decide reachability exactly.
    if problem.max_test_dual() < target - _REACH_TOLERANCE:
        if unreachable == "bracket_end":
            return 1.25 * float(scores.max(initial=0.0))
        return float("inf")

    def reached(test_score: float) -> bool | None:
        dual = problem.test_dual(test_score)
        return None if dual is None else dual >= target - _REACH_TOLERANCE

    def fail(upper: float) -> float:
        message = f"the calibration LP failed for pattern {test_pattern.tolist()}"
        if on_solver_failure == "raise":
            raise CalibrationError(message)
        logger.warning("%s; returning the bracket's upper end %g", message, upper * problem.scale)
        return upper * problem.scale

    # Step 2: widen the bracket [low, high] by doubling until η_t reaches the target at high
    # and not at low. Scores are scaled to [−1, 1] here.
    scaled = scores / problem.scale
    high = max(float(scaled.max(initial=0.0)), 0.0)
    step = 1.0
    for _ in range(_MAX_WIDENING_STEPS):
        state = reached(high)
        if state is None:
            return fail(float("inf"))
        if state:
            break
        high += step
        step *= 2.0
    else:
        raise CalibrationError(f"no finite upper bracket found for pattern {test_pattern.tolist()}")

    low = min(float(scaled.min(initial=0.0)), 0.0)
    step = 1.0
    for _ in range(_MAX_WIDENING_STEPS):
        state = reached(low)
        if state is None:
            return fail(high)
        if not state:
            break
        high = low
        low -= step
        step *= 2.0
    else:
        raise CalibrationError(f"no finite lower bracket found for pattern {test_pattern.tolist()}")

    # Step 3: bisection. Invariant: the target is reached at high and not at low.
    while high - low > rtol * max(1.0, abs(high)):
        middle = 0.5 * (low + high)
        state = reached(middle)
        if state is None:
            return fail(high)
        if state:
            high = middle
        else:
            low = middle
    return high * problem.scale


def calibrate_table(
    scores: ArrayLike,
    weights: ArrayLike,
    memberships: ArrayLike,
    w_test: float,
    alpha: float,
    patterns: ArrayLike | None = None,
    **threshold_options,
) -> ThresholdTable:
    """Compute τ for every pattern, shape (P, d), and return the lookup table.

    ``patterns`` defaults to the atoms of ``memberships``. Pass every pattern that test inputs
    can have, because patterns absent from the table get +inf. ``threshold_options`` go to
    ``gcc_threshold``.
    """
    memberships = np.asarray(memberships)
    patterns = atoms(memberships)[0] if patterns is None else np.asarray(patterns, dtype=np.uint8)
    thresholds = np.array([
        gcc_threshold(scores, weights, memberships, pattern, w_test, alpha, **threshold_options)
        for pattern in patterns
    ], dtype=np.float64)
    return ThresholdTable(patterns, thresholds)


def insufficient_group_mass(
    weights: ArrayLike, memberships: ArrayLike, test_pattern: ArrayLike, w_test: float, alpha: float
) -> bool:
    """Check the sufficient condition for τ = +inf: some group G ∋ x has (1−α) w_test > α W_G.

    The condition is not necessary when groups overlap, so ``gcc_threshold`` decides with an LP.
    """
    weights = np.asarray(weights, dtype=np.float64).reshape(-1)
    memberships = np.asarray(memberships, dtype=np.float64)
    group_mass = weights @ memberships
    test_groups = np.asarray(test_pattern).reshape(-1) == 1
    return bool(np.any((1 - alpha) * w_test > alpha * group_mass[test_groups]))


def weighted_quantile_threshold(scores: ArrayLike, weights: ArrayLike, w_test: float, alpha: float) -> float:
    """Compute the federated (one-group) threshold in closed form.

    τ = inf{s : Σ_{S_i ≤ s} w_i ≥ (1−α)(W + w_test)} with W = Σ_i w_i, or +inf when W is
    below that level. With weights λ_k and w_test = Σ_k λ_k this is FCP's weighted quantile.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), scores.shape)
    order = np.argsort(scores, kind="stable")
    cumulative = np.cumsum(weights[order])
    level = (1 - alpha) * (weights.sum() + w_test)

    # Guard against the sum landing one rounding step below an exactly attained level.
    slack = 1e-12 * max(level, 1e-300)
    position = int(np.searchsorted(cumulative, level - slack, side="left"))
    if position >= scores.size:
        return float("inf")
    return float(scores[order][position])


def mondrian_thresholds(
    scores: ArrayLike,
    weights: ArrayLike,
    group_index: ArrayLike,
    num_groups: int,
    w_test: float,
    alpha: float,
) -> NDArray[np.float64]:
    """Compute the thresholds of disjoint groups in closed form, shape (num_groups,).

    ``group_index`` (shape (n,)) names each point's group. In group g,
    τ_g = inf{s : Σ_{i∈G_g, S_i≤s} w_i ≥ (1−α)(W_g + w_test)}; an empty group gets +inf.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), scores.shape)
    group_index = np.asarray(group_index, dtype=np.int64).reshape(-1)
    thresholds = np.full(num_groups, np.inf)
    for group in range(num_groups):
        members = group_index == group
        if members.any():
            thresholds[group] = weighted_quantile_threshold(scores[members], weights[members], w_test, alpha)
    return thresholds


def split_conformal_threshold(scores: ArrayLike, alpha: float) -> float:
    """Return the ⌈(n+1)(1−α)⌉-th smallest score, or +inf when that rank exceeds n."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    rank = int(np.ceil((scores.size + 1) * (1 - alpha) - 1e-12))
    if rank > scores.size:
        return float("inf")
    return float(scores[max(rank, 1) - 1])
