"""Synthetic federated regression with four overlapping groups.

The data-generating process of the synthetic experiment in Wen, Simeone, Xing, "Efficient
Federated Conformal Prediction with Group-Conditional Guarantees" (arXiv 2603.14198), as in the
authors' public code. Client k = 1..K draws X from N(0.5 + 4(k−1)/(K−1), (0.5 + 0.1(k−1))²)
truncated to [0, 5], and

    Y = Poisson(sin²X + 0.1) + 0.03·X·ε₁ + 25·1{U < 0.01}·ε₂ + N(0, (0.01 k²)²)

with ε₁, ε₂ standard normal and U uniform. A degree-4 polynomial is fitted by least squares on a
separate training sample with the calibration sizes. Test points come from the π-mixture of the
clients. The groups are the feature intervals [0,2), [1,3), [2,4), [3,5), which form 5 atoms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import truncnorm

from fedsim.conformal.weights import mixture_proportions

__all__ = [
    "SYNTHETIC_INTERVALS",
    "SYNTHETIC_CLIENT_SIZES",
    "SyntheticRegression",
    "sample_features",
    "sample_labels",
    "make_synthetic_regression",
]

SYNTHETIC_INTERVALS: tuple[tuple[float, float], ...] = ((0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0))
SYNTHETIC_CLIENT_SIZES: tuple[int, ...] = (1000, 333, 333, 333)
_FEATURE_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class SyntheticRegression:
    """One draw of the synthetic experiment.

    Calibration arrays are per client (lists of shape (n_k,)). ``test_client`` is the 0-based
    client each test point came from. ``coefficients`` are the fitted polynomial's, lowest
    degree first.
    """

    calibration_x: list[NDArray[np.float64]]
    calibration_y: list[NDArray[np.float64]]
    test_x: NDArray[np.float64]
    test_y: NDArray[np.float64]
    test_client: NDArray[np.int64]
    coefficients: NDArray[np.float64]

    def predict(self, x: ArrayLike) -> NDArray[np.float64]:
        """Evaluate the fitted polynomial f(x)."""
        return np.polynomial.polynomial.polyval(np.asarray(x, dtype=np.float64), self.coefficients)


def sample_features(rng: np.random.Generator, client: int, num_clients: int, size: int) -> NDArray[np.float64]:
    """Draw X for the 0-based ``client`` from its truncated normal, shape (size,)."""
    mean = 0.5 + 4.0 * client / (num_clients - 1)
    std = 0.5 + 0.1 * client
    low, high = _FEATURE_RANGE
    return truncnorm.rvs((low - mean) / std, (high - mean) / std, loc=mean, scale=std, size=size,
                         random_state=rng)


def sample_labels(rng: np.random.Generator, x: ArrayLike, client: int, label_shift: bool = True) -> NDArray[np.float64]:
    """Draw Y given X for the 0-based ``client``; ``label_shift`` adds the N(0, (0.01 k²)²) term."""
    x = np.asarray(x, dtype=np.float64)
    size = x.size
    counts = rng.poisson(np.sin(x) ** 2 + 0.1, size=size)
    heteroscedastic = 0.03 * x * rng.standard_normal(size)
    outliers = 25.0 * (rng.uniform(size=size) < 0.01) * rng.standard_normal(size)
    labels = counts + heteroscedastic + outliers
    if label_shift:
        labels = labels + rng.normal(0.0, 0.01 * (client + 1) ** 2, size=size)
    return labels


def make_synthetic_regression(
    rng: np.random.Generator,
    client_sizes: Sequence[int] = SYNTHETIC_CLIENT_SIZES,
    num_test: int = 2000,
    pi: str | ArrayLike = "uniform",
    *,
    degree: int = 4,
    label_shift: bool = True,
) -> SyntheticRegression:
    """Draw training, calibration and test data and fit the polynomial predictor."""
    num_clients = len(client_sizes)
    if num_clients < 2:
        raise ValueError(f"the synthetic design needs at least 2 clients, got {num_clients}")

    train_x, train_y = [], []
    for client, size in enumerate(client_sizes):
        x = sample_features(rng, client, num_clients, size)
        train_x.append(x)
        train_y.append(sample_labels(rng, x, client, label_shift))
    coefficients = np.polynomial.polynomial.polyfit(np.concatenate(train_x), np.concatenate(train_y), degree)

    calibration_x, calibration_y = [], []
    for client, size in enumerate(client_sizes):
        x = sample_features(rng, client, num_clients, size)
        calibration_x.append(x)
        calibration_y.append(sample_labels(rng, x, client, label_shift))

    proportions = mixture_proportions(client_sizes, pi)
    test_client = rng.choice(num_clients, size=num_test, p=proportions)
    test_x = np.empty(num_test)
    test_y = np.empty(num_test)
    for client in range(num_clients):
        chosen = np.flatnonzero(test_client == client)
        test_x[chosen] = sample_features(rng, client, num_clients, chosen.size)
        test_y[chosen] = sample_labels(rng, test_x[chosen], client, label_shift)

    return SyntheticRegression(calibration_x, calibration_y, test_x, test_y, test_client.astype(np.int64),
                               coefficients)
