"""Statistical coverage of split CP and exact GC-FCP, with fixed seeds and derived tolerances.

Every tolerance is 4 standard errors of a mean over independent trials. Under the normal
approximation a correct implementation falls outside it with probability about 6e-5 (two-sided)
or 3e-5 (one-sided), and the seeds are fixed, so each test is deterministic.
"""

import numpy as np

from fedsim.conformal import (
    SYNTHETIC_INTERVALS,
    absolute_residual,
    calibration_weights,
    coverage_report,
    gcfcp_exact,
    interval_memberships,
    interval_patterns,
    make_synthetic_regression,
    regression_intervals,
    split_conformal_threshold,
)


def test_split_cp_coverage_matches_beta_binomial_mean():
    # With continuous scores, coverage given the calibration set is Beta(n+1−l, l) with
    # l = ⌊(n+1)α⌋, so its mean is 1 − l/(n+1) = 0.9 here. On m test points a trial's coverage
    # has variance ≈ α(1−α)/(n+2) + α(1−α)/m, and the mean over R trials has se² = that / R.
    rng = np.random.default_rng(20240601)
    n, m, trials, alpha = 99, 200, 400, 0.1
    level = (n + 1) * alpha
    expected = 1 - np.floor(level) / (n + 1)

    coverages = []
    for _ in range(trials):
        tau = split_conformal_threshold(np.abs(rng.standard_normal(n)), alpha)
        coverages.append(np.mean(np.abs(rng.standard_normal(m)) <= tau))

    standard_error = np.sqrt((alpha * (1 - alpha) / (n + 2) + alpha * (1 - alpha) / m) / trials)
    assert abs(np.mean(coverages) - expected) <= 4 * standard_error


def test_exact_gcfcp_covers_every_overlapping_group():
    # The synthetic design with four overlapping groups. The guarantee is P(Y ∈ C | X ∈ G) >= 1 − α
    # for every group. The trial means use the empirical standard error over the trials.
    rng = np.random.default_rng(114514)
    trials, alpha = 24, 0.1
    patterns = interval_patterns(SYNTHETIC_INTERVALS)
    sizes = (1000, 333, 333, 333)
    point_weights, w_test = calibration_weights(sizes, "uniform")

    group_coverages = []
    group_probabilities = []
    for _ in range(trials):
        data = make_synthetic_regression(rng, sizes, num_test=1000)
        scores = [absolute_residual(y, data.predict(x)) for x, y in zip(data.calibration_x, data.calibration_y, strict=True)]
        memberships = [interval_memberships(x, SYNTHETIC_INTERVALS) for x in data.calibration_x]
        table = gcfcp_exact(scores, memberships, alpha, patterns=patterns)

        test_memberships = interval_memberships(data.test_x, SYNTHETIC_INTERVALS)
        tau = table.lookup(test_memberships)
        lower, upper = regression_intervals(data.predict(data.test_x), tau)
        covered = (data.test_y >= lower) & (data.test_y <= upper)
        report = coverage_report(covered, upper - lower, test_memberships)
        group_coverages.append(report.group_coverage)
        group_probabilities.append(test_memberships.mean(axis=0))

    group_coverages = np.array(group_coverages)
    mean = group_coverages.mean(axis=0)
    standard_error = group_coverages.std(axis=0, ddof=1) / np.sqrt(trials)
    for group in range(len(SYNTHETIC_INTERVALS)):
        assert mean[group] >= 1 - alpha - 4 * standard_error[group], (group, mean, standard_error)

    # Upper bound for continuous scores: 1 − α + [d · max λ + (Σ λ − min λ)] / P(G).
    # NOTE: derived by analogy with the unweighted bound of Gibbs, Cherian and Candès, not proven.
    probability = np.mean(group_probabilities, axis=0)
    slack = (len(SYNTHETIC_INTERVALS) * point_weights.max() + w_test - point_weights.min()) / probability
    for group in range(len(SYNTHETIC_INTERVALS)):
        assert mean[group] <= 1 - alpha + slack[group] + 4 * standard_error[group], (group, mean, slack)
