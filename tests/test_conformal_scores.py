"""Conformity scores, groups, weights and the threshold table of fedsim.conformal."""

import numpy as np
import pytest

from fedsim.conformal import (
    ThresholdTable,
    absolute_residual,
    aps_scores,
    atoms,
    calibration_weights,
    interval_memberships,
    interval_patterns,
    label_window_map,
    label_window_memberships,
    pattern_from_key,
    pattern_key,
    prediction_sets,
    raps_scores,
    thr_scores,
)

PROBS = np.array([
    [0.5, 0.3, 0.2],
    [0.1, 0.6, 0.3],
    [0.4, 0.4, 0.2],
])


def test_thr_on_softmax_vectors():
    np.testing.assert_allclose(thr_scores(PROBS, [1, 1, 2]), [0.7, 0.4, 0.8])


def test_aps_on_softmax_vectors():
    # Row 0, label 2: 0.5 + 0.3 + 0.2. Row 1, label 2: 0.6 + 0.3. Row 2, label 1: the tie with
    # class 0 is broken by the smaller index, so class 0 comes first: 0.4 + 0.4.
    np.testing.assert_allclose(aps_scores(PROBS, [2, 2, 1]), [1.0, 0.9, 0.8])
    np.testing.assert_allclose(aps_scores(PROBS, [0, 1, 0]), [0.5, 0.6, 0.4])


def test_raps_adds_rank_penalty():
    # Label ranks (1-based): row 0 label 2 -> 3, row 1 label 0 -> 3, row 2 label 1 -> 2.
    scores = raps_scores(PROBS, [2, 0, 1], lambda_reg=0.1, k_reg=1)
    np.testing.assert_allclose(scores, [1.0 + 0.2, 1.0 + 0.2, 0.8 + 0.1])


def test_all_label_scores_match_per_label():
    probs = np.random.default_rng(0).dirichlet(np.ones(6), size=20)
    for function in (thr_scores, aps_scores, raps_scores):
        matrix = function(probs)
        for label in range(6):
            np.testing.assert_allclose(matrix[:, label], function(probs, np.full(20, label)))


def test_prediction_sets_from_threshold():
    sets = prediction_sets(aps_scores(PROBS), [0.55, 0.65, 0.0])
    np.testing.assert_array_equal(sets, [[True, False, False], [False, True, False], [False, False, False]])


def test_absolute_residual():
    np.testing.assert_allclose(absolute_residual([1.0, -2.0], [0.5, 1.0]), [0.5, 3.0])


def test_score_rejects_out_of_range_label():
    with pytest.raises(ValueError, match="labels must lie"):
        thr_scores(PROBS, [0, 1, 3])


def test_interval_memberships_half_open():
    memberships = interval_memberships([0.0, 1.0, 1.99, 2.0, 4.5], [(0, 2), (1, 3), (3, 5)])
    np.testing.assert_array_equal(memberships, [[1, 0, 0], [1, 1, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])


def test_interval_patterns_of_synthetic_groups():
    patterns = interval_patterns([(0, 2), (1, 3), (2, 4), (3, 5)])
    expected = {(0, 0, 0, 0), (1, 0, 0, 0), (1, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 1), (0, 0, 0, 1)}
    assert {tuple(row) for row in patterns.tolist()} == expected


def test_label_window_groups_use_predicted_label():
    membership_map = label_window_map(6, [[0, 1, 2], [2, 3, 4], [4, 5]])
    memberships = label_window_memberships([2, 5, 0], membership_map)
    np.testing.assert_array_equal(memberships, [[1, 1, 0], [0, 0, 1], [1, 0, 0]])


def test_atoms_and_inverse():
    memberships = np.array([[1, 0], [0, 1], [1, 0], [1, 1]])
    patterns, inverse = atoms(memberships)
    np.testing.assert_array_equal(patterns, [[0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(patterns[inverse], memberships)


def test_pattern_key_round_trip():
    for pattern in ([1, 0, 1], [0] * 9, [1] * 9, [0, 1, 1, 0, 1, 0, 0, 1, 1, 1]):
        assert pattern_from_key(pattern_key(pattern), len(pattern)).tolist() == pattern


def test_pattern_key_rejects_wrong_width():
    with pytest.raises(ValueError, match="bytes"):
        pattern_from_key(pattern_key([1] * 9), 4)


def test_weights_sum_to_one():
    for rule in ("uniform", "proportional", [0.1, 0.2, 0.7]):
        point_weights, w_test = calibration_weights([10, 3, 50], rule)
        assert np.dot(point_weights, [10, 3, 50]) + w_test == pytest.approx(1.0, abs=1e-12)


def test_proportional_weights_are_equal():
    point_weights, w_test = calibration_weights([10, 3, 50], "proportional")
    np.testing.assert_allclose(point_weights, 1.0 / (63 + 3))
    assert w_test == pytest.approx(3.0 / 66)


def test_table_lookup_missing_pattern_is_infinite():
    table = ThresholdTable(np.array([[1, 0], [1, 1]]), np.array([2.0, 3.0]))
    np.testing.assert_array_equal(table.lookup([[1, 1], [0, 1], [1, 0]]), [3.0, np.inf, 2.0])


def test_table_round_trips_through_arrays():
    table = ThresholdTable(np.array([[1, 0], [1, 1]]), np.array([2.0, np.inf]))
    copy = ThresholdTable.from_arrays(table.to_arrays())
    np.testing.assert_array_equal(copy.patterns, table.patterns)
    np.testing.assert_array_equal(copy.thresholds, table.thresholds)
