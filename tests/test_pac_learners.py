"""Learners, realizable players, FedAvg maths and the measured sample need."""

import numpy as np
import pytest

from fedsim.pac import (
    ConstantClassifier,
    LinearSeparatorLearner,
    LogisticRegressionLearner,
    MLPLearner,
    NotConsistentError,
    PerceptronLearner,
    PoolPlayer,
    certification_passes,
    fedavg_average,
    fedavg_round,
    logistic_gradient,
    make_digits_players,
    make_gaussian_players,
    measure_sample_need,
    overhead_ratios,
)


def training_error(hypothesis, X, y):
    return float(np.mean(hypothesis.predict(X) != y))


def test_linear_separator_consistent_on_gaussians():
    player = make_gaussian_players(1, 10, seed=4)[0]
    X, y = player.draw(5000, np.random.default_rng(0))
    hypothesis = LinearSeparatorLearner().fit(X, y, np.random.default_rng(1))
    assert training_error(hypothesis, X, y) == 0.0


def test_linear_program_fallback_is_consistent():
    # A tiny penalty leaves the SVM with training errors, so the separation LP must run.
    player = make_gaussian_players(1, 3, seed=1)[0]
    X, y = player.draw(400, np.random.default_rng(2))
    hypothesis = LinearSeparatorLearner(C=1e-6).fit(X, y, np.random.default_rng(0))
    assert training_error(hypothesis, X, y) == 0.0


def test_linear_separator_rejects_xor():
    X = np.array([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    y = np.array([0, 0, 1, 1])
    with pytest.raises(NotConsistentError):
        LinearSeparatorLearner().fit(X, y, np.random.default_rng(0))


def test_single_label_gives_constant():
    X = np.zeros((5, 2))
    for learner in (LinearSeparatorLearner(), PerceptronLearner(), LogisticRegressionLearner()):
        hypothesis = learner.fit(X, np.full(5, 3), np.random.default_rng(0))
        assert hypothesis == ConstantClassifier(3)


def test_perceptron_binary_with_margin():
    player = make_gaussian_players(1, 5, seed=2, margin=0.2)[0]
    X, y = player.draw(1000, np.random.default_rng(3))
    assert np.all(np.abs(X @ player.normal) >= 0.2)
    hypothesis = PerceptronLearner().fit(X, y, np.random.default_rng(0))
    assert training_error(hypothesis, X, y) == 0.0


def test_digits_players_realizable():
    players, reference = make_digits_players(12)
    assert len(players) == 12
    X = np.concatenate([p.features for p in players])
    y = np.concatenate([p.labels for p in players])
    assert X.shape[1] == 64
    np.testing.assert_array_equal(reference.predict(X), y)
    assert len(np.unique(y)) == 10

    # Player 11 has original digits 1, 2, 3 under the second transformation, shifted right:
    # its first pixel column is blank.
    assert players[11].name == "11:digits[1, 2, 3]:shift-right"
    assert np.all(players[11].features.reshape(-1, 8, 8)[:, :, 0] == 0)

    sample = np.random.default_rng(0).choice(len(y), size=600, replace=False)
    hypothesis = PerceptronLearner().fit(X[sample], y[sample], np.random.default_rng(0))
    assert training_error(hypothesis, X[sample], y[sample]) == 0.0


def test_pool_player_reports_reuse(caplog):
    player = PoolPlayer(np.arange(10.0)[:, None], np.zeros(10, dtype=np.int64), name="p")
    player.draw(6, np.random.default_rng(0))
    assert not caplog.records
    player.draw(6, np.random.default_rng(1))
    assert player.reuse_ratio == pytest.approx(1.2)
    assert "exceed its pool of 10" in caplog.text


def test_mlp_learner_fits_small_sample():
    player = make_gaussian_players(1, 4, seed=0)[0]
    X, y = player.draw(200, np.random.default_rng(0))
    hypothesis = MLPLearner(max_iter=300).fit(X, y, np.random.default_rng(0))
    assert training_error(hypothesis, X, y) <= 0.05


def test_logistic_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((30, 3))
    y = rng.integers(0, 2, 30)
    theta = rng.standard_normal(4)

    def loss(t):
        scores = X @ t[:-1] + t[-1]
        return float(np.mean(np.logaddexp(0.0, scores) - y * scores))

    step = 1e-6
    numeric = np.array(
        [(loss(theta + step * e) - loss(theta - step * e)) / (2 * step) for e in np.eye(4)]
    )
    np.testing.assert_allclose(logistic_gradient(theta, X, y), numeric, atol=1e-8)


def test_fedsgd_equals_pooled_gradient_step():
    rng = np.random.default_rng(1)
    clients = []
    for n in (5, 40, 17):
        X = rng.normal(loc=rng.normal(size=3), size=(n, 3))
        clients.append((X, rng.integers(0, 2, n)))
    theta = rng.standard_normal(4)
    X_all = np.concatenate([X for X, _ in clients])
    y_all = np.concatenate([y for _, y in clients])

    federated = fedavg_round(theta, clients, lr=0.3, local_steps=1)
    centralized = theta - 0.3 * logistic_gradient(theta, X_all, y_all)
    np.testing.assert_allclose(federated, centralized, rtol=0, atol=1e-12)

    # Several local steps on different clients drift away from centralized GD.
    drifted = fedavg_round(theta, clients, lr=0.3, local_steps=20)
    pooled = theta
    for _ in range(20):
        pooled = pooled - 0.3 * logistic_gradient(pooled, X_all, y_all)
    assert not np.allclose(drifted, pooled, atol=1e-6)


def test_fedavg_average_weights_by_examples():
    average = fedavg_average([np.array([0.0, 4.0]), np.array([3.0, 1.0])], [1, 2])
    np.testing.assert_array_equal(average, [2.0, 2.0])
    with pytest.raises(ValueError):
        fedavg_average([np.zeros(2)], [0])


def test_certification_rule():
    # ε1 = 1/60: accept up to ε1/32 = 1/1920. 28 errors in 54452 is 5.14e-4 ≤ 5.21e-4.
    assert certification_passes(28, 54452, 1 / 60)
    assert not certification_passes(29, 54452, 1 / 60)


class HalfLineLearner:
    """Positive above the largest negative sample, for the target x > 0."""

    def fit(self, X, y, rng):
        negatives = X[y == 0, 0]
        threshold = float(negatives.max()) if negatives.size else -np.inf

        class Hypothesis:
            def predict(self, Z):
                return (Z[:, 0] > threshold).astype(np.int64)

        return Hypothesis()


class LinePlayer:
    def draw(self, n, rng):
        X = rng.uniform(-1, 1, size=(n, 1))
        return X, (X[:, 0] > 0).astype(np.int64)


def test_measured_need_on_half_line():
    # The learner's error is −(largest negative)/2, so P(error ≤ t) = 1 − (1 − t)^n.
    # For t = 0.005 that is 0.39, 0.63, 0.87, 0.98, 0.9997 at n = 100, 200, 400, 800, 1600,
    # so 19 successes in 20 trials arrive at n = 800 or, less likely, 1600.
    need = measure_sample_need([LinePlayer(), LinePlayer()], HalfLineLearner(), 0.005, 0.05, seed=0)
    assert need.per_player[0] in (800, 1600)
    assert need.per_player[1] in (800, 1600)
    assert need.samples == max(need.per_player)
    assert need.calibration_draws > 0

    easy = measure_sample_need([LinePlayer()], HalfLineLearner(), 0.2, 0.05, seed=0)
    # At n = 100, P(error ≤ 0.2) = 1 − 0.8^100 ≈ 1.
    assert easy.samples == 100


def test_measured_need_gives_up():
    with pytest.raises(RuntimeError, match="did not reach"):
        measure_sample_need(
            [LinePlayer()], HalfLineLearner(), 1e-4, 0.05, seed=0, repeats=2, max_samples=400
        )


def test_overhead_ratios():
    ratios = overhead_ratios(total_samples=12_000, single_need=400, naive_samples=48_000)
    assert ratios.versus_single == 30.0
    assert ratios.versus_naive == 0.25
