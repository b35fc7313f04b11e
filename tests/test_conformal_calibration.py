"""Group-conditional dual LP of GC-FCP against closed forms and hand-derived cases."""

import math

import numpy as np
import pytest

from fedsim.conformal import (
    QuantileSketch,
    calibrate_from_sketches,
    calibration_weights,
    federated_cp,
    gcc_threshold,
    gcfcp_exact,
    gcfcp_sketched,
    insufficient_group_mass,
    max_test_dual,
    merge_summaries,
    mondrian_thresholds,
    split_conformal_threshold,
    summarize_client,
    weighted_quantile_threshold,
)


def brute_force_weighted_quantile(scores, weights, w_test, alpha):
    """Return the smallest score s with Σ_{S_i <= s} w_i >= (1−α)(W + w_test), by scanning."""
    level = (1 - alpha) * (np.sum(weights) + w_test)
    for candidate in np.sort(scores):
        if np.sum(weights[scores <= candidate]) >= level * (1 - 1e-12):
            return candidate
    return np.inf


@pytest.mark.parametrize("alpha", [0.1, 0.25])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_group_lp_matches_weighted_quantile(alpha, seed):
    rng = np.random.default_rng(seed)
    sizes = [60, 25, 40]
    scores = [rng.exponential(scale=1 + k, size=n) for k, n in enumerate(sizes)]
    point_weights, w_test = calibration_weights(sizes, "uniform")
    pooled = np.concatenate(scores)
    weights = np.repeat(point_weights, sizes)

    expected = brute_force_weighted_quantile(pooled, weights, w_test, alpha)
    closed_form = weighted_quantile_threshold(pooled, weights, w_test, alpha)
    lp = gcc_threshold(pooled, weights, np.ones((pooled.size, 1)), [1], w_test, alpha)

    assert closed_form == expected
    assert federated_cp(scores, alpha) == expected
    assert lp == pytest.approx(expected, abs=1e-6 * pooled.max())


def test_proportional_weights_give_pooled_order_statistic():
    rng = np.random.default_rng(5)
    sizes = [30, 12, 50, 7]
    scores = [rng.uniform(size=n) for n in sizes]
    pooled = np.sort(np.concatenate(scores))
    total, clients, alpha = sum(sizes), len(sizes), 0.1

    rank = math.ceil((total + clients) * (1 - alpha))  # 1-based rank in the pooled sample
    expected = pooled[rank - 1]
    assert federated_cp(scores, alpha, "proportional") == expected

    table = gcfcp_exact(scores, [np.ones((n, 1)) for n in sizes], alpha, "proportional")
    assert table.lookup([[1]])[0] == pytest.approx(expected, abs=1e-6)


def test_partition_lp_matches_mondrian():
    rng = np.random.default_rng(7)
    n, alpha = 300, 0.1
    group_index = rng.integers(0, 3, size=n)
    memberships = np.eye(3, dtype=int)[group_index]
    scores = rng.gamma(2.0, size=n) * (1 + group_index)
    weights = rng.choice([1 / 101, 1 / 201], size=n)
    w_test = 1 / 101 + 1 / 201

    closed_form = mondrian_thresholds(scores, weights, group_index, 3, w_test, alpha)
    for group in range(3):
        members = group_index == group
        expected = brute_force_weighted_quantile(scores[members], weights[members], w_test, alpha)
        assert closed_form[group] == expected
        lp = gcc_threshold(scores, weights, memberships, np.eye(3, dtype=int)[group], w_test, alpha)
        assert lp == pytest.approx(expected, abs=1e-6 * scores.max())


def test_one_client_is_split_cp():
    scores = np.random.default_rng(11).normal(size=19) ** 2
    alpha = 0.1
    expected = np.sort(scores)[17]  # ⌈(19 + 1) · 0.9⌉ = 18th smallest
    assert split_conformal_threshold(scores, alpha) == expected
    lp = gcc_threshold(scores, 1 / 20, np.ones((19, 1)), [1], 1 / 20, alpha)
    assert lp == pytest.approx(expected, abs=1e-6 * scores.max())


def test_split_cp_infinite_for_small_n():
    assert split_conformal_threshold(np.arange(5.0), 0.1) == np.inf


def test_overlapping_threshold_above_every_score():
    # Atoms (1,0) and (0,1) hold 500 scores 9 + j/500 (j = 1..500) each, atom (1,1) contains 9.5 and
    # 9.7, and every weight, the test's included, is 1/1003. For x in (1,1) the dual puts both
    # (1,1) points at −α w and needs Σ η over atom (1,0) equal to −0.7 w at η_t = 0.9 w. The greedy
    # solution then has 49 points at the upper bound and the 50th largest score 9 + 451/500 as
    # the fractional one, so raising η_t costs 2 · 9.902 per unit and τ = 19.804.
    grid = 9 + np.arange(1, 501) / 500
    scores = np.concatenate([grid, grid, [9.5, 9.7]])
    memberships = np.vstack([np.tile([1, 0], (500, 1)), np.tile([0, 1], (500, 1)), np.tile([1, 1], (2, 1))])
    weight = 1 / 1003

    tau = gcc_threshold(scores, weight, memberships, [1, 1], weight, 0.1)
    assert tau > scores.max()
    assert tau == pytest.approx(2 * (9 + 451 / 500), abs=1e-6 * 20)

    # The fixed bracket [0, 1.25 · max S] of the official GC-FCP code cannot contain it.
    assert tau > 1.25 * scores.max()


def test_unreachable_threshold_is_infinite():
    # Every calibration point is in G1 and G2 and x is in G1 only. The G2 equality forces Σ η_i = 0,
    # the G1 equality then forces η_t = 0 < (1−α) w_test, although G1 has plenty of mass.
    rng = np.random.default_rng(2)
    scores = rng.uniform(size=200)
    memberships = np.ones((200, 2), dtype=int)
    weight = 1 / 201

    assert not insufficient_group_mass(weight * np.ones(200), memberships, [1, 0], weight, 0.1)
    assert max_test_dual(scores, weight, memberships, [1, 0], weight, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert gcc_threshold(scores, weight, memberships, [1, 0], weight, 0.1) == np.inf
    assert gcc_threshold(scores, weight, memberships, [1, 1], weight, 0.1) < np.inf


def test_group_with_little_mass_is_infinite():
    # Group 2 contains 5 points of weight w, and (1−α) w = 0.9 w > α · 5 w = 0.5 w.
    rng = np.random.default_rng(4)
    scores = rng.uniform(size=105)
    memberships = np.zeros((105, 2), dtype=int)
    memberships[:100, 0] = 1
    memberships[100:, 1] = 1
    weight = 1 / 106

    assert insufficient_group_mass(np.full(105, weight), memberships, [0, 1], weight, 0.1)
    assert gcc_threshold(scores, weight, memberships, [0, 1], weight, 0.1) == np.inf
    assert gcc_threshold(scores, weight, memberships, [1, 0], weight, 0.1) < np.inf
    legacy = gcc_threshold(scores, weight, memberships, [0, 1], weight, 0.1, unreachable="bracket_end")
    assert legacy == pytest.approx(1.25 * scores.max())


def test_active_set_solver_matches_full_lp():
    rng = np.random.default_rng(9)
    n = 600
    x = rng.uniform(0, 5, size=n)
    memberships = np.column_stack([(x >= low) & (x < low + 2) for low in range(4)]).astype(int)
    scores = np.abs(rng.standard_t(3, size=n))
    weights = rng.choice([1 / 401, 1 / 201], size=n)
    for pattern in ([1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]):
        fast = gcc_threshold(scores, weights, memberships, pattern, 0.01, 0.1)
        full = gcc_threshold(scores, weights, memberships, pattern, 0.01, 0.1, solver="full")
        assert fast == pytest.approx(full, abs=1e-6 * scores.max())


def test_pattern_outside_every_group_gets_zero():
    scores = np.arange(1.0, 21.0)
    assert gcc_threshold(scores, 1 / 21, np.ones((20, 1)), [0], 1 / 21, 0.1) == 0.0


def test_exact_sketch_reproduces_exact_lp():
    rng = np.random.default_rng(12)
    sizes = [80, 40, 40]
    x = [rng.uniform(0, 3, size=n) for n in sizes]
    memberships = [np.column_stack([(xs < 2), (xs >= 1)]).astype(int) for xs in x]
    scores = [rng.exponential(size=n) for n in sizes]

    exact = gcfcp_exact(scores, memberships, 0.1)
    sketched = gcfcp_sketched(scores, memberships, 0.1, compression=10**6, server_compression=None)
    np.testing.assert_allclose(sketched.table.lookup(exact.patterns), exact.thresholds,
                               atol=1e-9 * max(s.max() for s in scores))
    assert sketched.max_relative_rank_error == 0.0


def test_sketch_lp_keeps_atom_weight():
    rng = np.random.default_rng(13)
    memberships = rng.integers(0, 2, size=(500, 3))
    summary = summarize_client(rng.normal(size=500), memberships, 0.002, compression=7)
    merged = merge_summaries([summary, summary], compression=7)
    total = sum(sketch.total_weight for sketch in merged.values())
    assert total == pytest.approx(2 * 0.002 * 500)
    assert all(sketch.size <= 7 for sketch in merged.values())


def test_conservative_mode_raises_thresholds():
    rng = np.random.default_rng(14)
    scores = rng.exponential(size=400)
    memberships = np.ones((400, 1), dtype=int)
    summary = summarize_client(scores, memberships, 1 / 401, compression=40)
    merged = merge_summaries([summary], compression=40)
    plain = calibrate_from_sketches(merged, 1, 1 / 401, 0.1, [[1]])
    careful = calibrate_from_sketches(merged, 1, 1 / 401, 0.1, [[1]], conservative=True)
    assert careful.thresholds[0] > plain.thresholds[0]


def test_d1_threshold_monotone_in_scores():
    rng = np.random.default_rng(15)
    scores = rng.uniform(size=50)
    base = gcc_threshold(scores, 1 / 51, np.ones((50, 1)), [1], 1 / 51, 0.2)
    raised = scores + rng.uniform(0, 0.3, size=50)
    assert gcc_threshold(raised, 1 / 51, np.ones((50, 1)), [1], 1 / 51, 0.2) >= base - 1e-9


def test_invalid_alpha_rejected():
    with pytest.raises(ValueError, match="alpha"):
        gcc_threshold([1.0], 0.5, [[1]], [1], 0.5, 1.5)


def test_quantile_sketch_from_arrays_default_bound():
    sketch = QuantileSketch.from_arrays([1.0, 2.0], [0.5, 0.5], compression=4)
    assert sketch.rank_error == pytest.approx(0.25)
