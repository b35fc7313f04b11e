"""Weights, mixture sampling, the pass/fail test and the plurality vote."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsim.pac import (
    Phase,
    derive_rng,
    fails_test,
    plurality_vote,
    probabilities_from_failures,
    required_test_samples,
    split_budget,
    weights_from_failures,
)


def test_weights_are_exact_powers():
    assert weights_from_failures([0, 3, 1, 3]) == [1, 8, 2, 8]


def test_probabilities_closed_form():
    p = probabilities_from_failures([0, 3, 1, 3])
    np.testing.assert_array_equal(p, np.array([1, 8, 2, 8]) / 19)


def test_huge_failure_counts_do_not_overflow():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights = weights_from_failures([5000, 0])
        p = probabilities_from_failures([5000, 0])
        close = probabilities_from_failures([5000, 4999])
        equal = probabilities_from_failures([5000, 5000, 5000])

    assert weights[0] == 2**5000
    assert weights[0].bit_length() == 5001
    assert p[0] == 1.0
    assert p[1] == 0.0
    np.testing.assert_allclose(close, [2 / 3, 1 / 3], rtol=1e-15)
    np.testing.assert_allclose(equal, [1 / 3] * 3, rtol=1e-15)


def test_probabilities_reject_negative_counts():
    with pytest.raises(ValueError):
        probabilities_from_failures([0, -1])
    with pytest.raises(ValueError):
        probabilities_from_failures([])


@settings(max_examples=100, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    budget=st.integers(0, 100_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_sums_to_budget(counts, budget, seed):
    p = probabilities_from_failures(counts)
    split = split_budget(budget, p, np.random.default_rng(seed))
    assert split.shape == (len(counts),)
    assert int(split.sum()) == budget
    assert split.min() >= 0


def test_split_one_hot_takes_one_player():
    split = split_budget(1234, [0.0, 0.0, 1.0, 0.0], np.random.default_rng(0))
    np.testing.assert_array_equal(split, [0, 0, 1234, 0])


def test_split_matches_mixture_chi_square():
    p = probabilities_from_failures([0, 1, 2, 3, 0])
    split = split_budget(200_000, p, np.random.default_rng(7))
    result = stats.chisquare(split, 200_000 * p)
    assert result.pvalue > 1e-3


def test_split_rejects_bad_probabilities():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        split_budget(10, [0.5, 0.6], rng)
    with pytest.raises(ValueError):
        split_budget(10, [1.5, -0.5], rng)
    with pytest.raises(ValueError):
        split_budget(-1, [1.0], rng)


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(0, 2000), min_size=1, max_size=20))
def test_probabilities_are_distribution(counts):
    p = probabilities_from_failures(counts)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert p.max() <= 1.0
    leader = int(np.argmax(counts))
    assert p[leader] > 0
    # Players within 1000 failures of the leader keep a positive probability.
    for count, probability in zip(counts, p, strict=True):
        if max(counts) - count <= 1000:
            assert probability > 0


def test_fails_test_threshold_boundary():
    # ε1 = 1/60, threshold 0.0125, n_test = 14166: 0.0125·14166 = 177.075 errors.
    threshold = 0.75 / 60
    assert not fails_test(177, 14166, threshold)
    assert fails_test(178, 14166, threshold)
    assert not fails_test(0, 14166, threshold)
    # Exactly at the threshold passes: 10/800 = 0.0125 is not above 0.0125.
    assert not fails_test(10, 800, 0.0125)
    assert fails_test(11, 800, 0.0125)


def test_fails_test_rejects_bad_counts():
    with pytest.raises(ValueError):
        fails_test(5, 0, 0.1)
    with pytest.raises(ValueError):
        fails_test(11, 10, 0.1)


@pytest.mark.parametrize("true_error_factor", [0.5, 1.0])
def test_test_outcome_rates_match_binomial(true_error_factor):
    eps1, delta, k, rounds = 0.1 / 6, 0.05, 4, 10
    n = required_test_samples(k, rounds, eps1, delta, constant=8)
    threshold = 0.75 * eps1
    true_error = true_error_factor * eps1
    repeats = 2000

    errors = np.random.default_rng(11).binomial(n, true_error, size=repeats)
    outcomes = np.array([fails_test(int(e), n, threshold) for e in errors])

    # Wrong outcome: failing at ε1/2, passing at ε1. Its exact rate comes from the binomial tail.
    largest_passing = math.floor(threshold * n)
    if true_error_factor == 0.5:
        wrong_rate = outcomes.mean()
        exact = stats.binom.sf(largest_passing, n, true_error)
    else:
        wrong_rate = 1.0 - outcomes.mean()
        exact = stats.binom.cdf(largest_passing, n, true_error)
    standard_error = math.sqrt(max(exact * (1 - exact), 1e-4) / repeats)
    assert wrong_rate <= exact + 4 * standard_error


def test_vote_binary_majority():
    predictions = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]])
    np.testing.assert_array_equal(plurality_vote(predictions), [1, 1, 1, 0])


def test_vote_binary_tie_goes_to_zero():
    predictions = np.array([[0, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(plurality_vote(predictions), [0, 0, 1])


def test_vote_multiclass_plurality():
    # Column 0: 2 twice; column 1: 5 twice; column 2: 7 twice; column 3: 3 twice.
    predictions = np.array([[2, 5, 7, 3], [2, 7, 5, 3], [9, 5, 7, 1]])
    np.testing.assert_array_equal(plurality_vote(predictions), [2, 5, 7, 3])


def test_vote_multiclass_ties_go_to_smallest():
    # Column 0: 9 and 4 twice each → 4. Column 1: 2 twice beats 9 and 8. Column 2: three-way tie.
    predictions = np.array([[9, 9, 6], [4, 2, 4], [4, 2, 9], [9, 8, 1]])
    assert plurality_vote(predictions).tolist() == [4, 2, 1]
    np.testing.assert_array_equal(plurality_vote(np.array([[4], [9], [6]])), [4])
    np.testing.assert_array_equal(plurality_vote(np.array([[-1], [3]])), [-1])


def test_vote_single_hypothesis_is_identity():
    row = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(plurality_vote(row), row[0])


def test_vote_rejects_bad_input():
    with pytest.raises(ValueError):
        plurality_vote(np.zeros((0, 3), dtype=int))
    with pytest.raises(ValueError):
        plurality_vote(np.array([0, 1]))
    with pytest.raises(ValueError):
        plurality_vote(np.array([[0.5, 1.0]]))


def test_streams_independent_of_order():
    first = derive_rng(5, 3, 2, Phase.TEST).random(4)
    derive_rng(5, 1, 1, Phase.TRAIN).random(100)
    again = derive_rng(5, 3, 2, Phase.TEST).random(4)
    other_phase = derive_rng(5, 3, 2, Phase.TRAIN).random(4)
    other_attempt = derive_rng(5, 3, 2, Phase.TEST, attempt=1).random(4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_phase)
    assert not np.array_equal(first, other_attempt)
