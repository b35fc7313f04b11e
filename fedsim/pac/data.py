"""Players whose labels are realizable: every label comes from one fixed reference model.

Two families exist. Synthetic players draw Gaussian features with a mean and covariance of
their own, labelled by one fixed linear separator. Digits players sample with replacement from
parts of scikit-learn's 8x8 digits, split by which digits and which image transformation they
hold, and relabelled by a linear reference model trained on all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from sklearn.datasets import load_digits

from fedsim.pac.learners import LinearClassifier, LogisticRegressionLearner

__all__ = [
    "GaussianPlayer",
    "make_gaussian_players",
    "PoolPlayer",
    "DIGIT_TRANSFORMATIONS",
    "make_digits_players",
]

logger = logging.getLogger(__name__)


@dataclass
class GaussianPlayer:
    """Features x = mean + factor·z with z ~ N(0, I), labelled 1 where w·x + b > 0, else 0.

    With ``margin`` > 0, points closer than ``margin`` to the hyperplane are rejected and
    redrawn, so the labels are separable with that margin. ``samples_drawn`` counts every
    sample returned.
    """

    mean: NDArray[np.float64]
    factor: NDArray[np.float64]
    normal: NDArray[np.float64]
    offset: float = 0.0
    margin: float = 0.0
    samples_drawn: int = field(default=0, init=False)

    def label(self, X: NDArray) -> NDArray[np.int64]:
        """Label features X, shape (n, d), with the reference separator."""
        return (X @ self.normal + self.offset > 0).astype(np.int64)

    def draw(
        self, n: int, rng: np.random.Generator
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Draw n labelled samples: features (n, d) float64 and labels (n,) in {0, 1}."""
        dim = self.mean.size
        norm = float(np.linalg.norm(self.normal))
        accepted: list[NDArray[np.float64]] = []
        missing = n

        # Rejection sampling; without a margin the first batch is the whole sample.
        for _ in range(1_000):
            if missing == 0:
                break
            z = rng.standard_normal((missing, dim))
            X = self.mean + z @ self.factor.T
            if self.margin > 0:
                X = X[np.abs(X @ self.normal + self.offset) / norm >= self.margin]
            accepted.append(X)
            missing -= len(X)
        else:
            raise RuntimeError(
                f"could not draw {n} samples at margin {self.margin}; the player's mass near "
                "the separator is too large, so lower the margin"
            )

        features = np.concatenate(accepted) if accepted else np.empty((0, dim))
        self.samples_drawn += n
        return features, self.label(features)


def make_gaussian_players(
    k: int, dim: int = 10, *, seed: int = 0, spread: float = 2.0, margin: float = 0.0
) -> list[GaussianPlayer]:
    """Make k Gaussian players labelled by one linear separator through the origin.

    The separator's normal is drawn from ``seed``. Player i's mean has norm about ``spread``
    and its covariance factor is a random rotation scaled per axis by factors in [0.5, 1.5].
    Player i's parameters depend only on (seed, i), so the first k players of a larger family
    are the same players.
    """
    if k < 1 or dim < 1:
        raise ValueError(f"k and dim must be >= 1, got k={k}, dim={dim}")

    target_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31 - 1,)))
    normal = target_rng.standard_normal(dim)
    normal /= np.linalg.norm(normal)

    players = []
    for i in range(k):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        mean = spread * rng.standard_normal(dim) / np.sqrt(dim)
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        scales = rng.uniform(0.5, 1.5, size=dim)
        players.append(
            GaussianPlayer(mean=mean, factor=rotation * scales, normal=normal, margin=margin)
        )
    return players


@dataclass
class PoolPlayer:
    """A player that samples with replacement from a finite pool of labelled examples.

    Draws beyond the pool size repeat examples, so "fresh" samples are no longer
    independent of earlier ones. ``reuse_ratio`` reports draws per pool example, and the
    first draw past the pool size logs a warning.
    """

    features: NDArray
    labels: NDArray[np.int64]
    name: str = ""
    samples_drawn: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if len(self.features) != len(self.labels) or len(self.labels) == 0:
            raise ValueError(
                f"player {self.name!r} needs a non-empty pool with one label per example, got "
                f"{len(self.features)} examples and {len(self.labels)} labels"
            )

    @property
    def reuse_ratio(self) -> float:
        """Draws so far divided by the pool size."""
        return self.samples_drawn / len(self.labels)

    def draw(self, n: int, rng: np.random.Generator) -> tuple[NDArray, NDArray[np.int64]]:
        """Draw n examples uniformly with replacement: features (n, ...), labels (n,)."""
        index = rng.integers(0, len(self.labels), size=n)
        before = self.samples_drawn
        self.samples_drawn += n
        if before <= len(self.labels) < self.samples_drawn:
            logger.warning(
                "player %s: %d draws exceed its pool of %d examples; samples now repeat",
                self.name,
                self.samples_drawn,
                len(self.labels),
            )
        return self.features[index], self.labels[index]


def _shift(images: NDArray, rows: int, columns: int) -> NDArray:
    shifted = np.roll(images, (rows, columns), axis=(1, 2))
    if rows:
        shifted[:, :rows, :] = 0.0
    if columns:
        shifted[:, :, :columns] = 0.0
    return shifted


# Image transformations that distinguish players; images are (n, 8, 8) with values in [0, 1].
DIGIT_TRANSFORMATIONS = {
    "identity": lambda images: images,
    "shift-right": lambda images: _shift(images, 0, 1),
    "shift-down": lambda images: _shift(images, 1, 0),
    "dim": lambda images: 0.6 * images,
}


def make_digits_players(
    k: int,
    *,
    digits_per_player: int = 3,
    margin_quantile: float = 0.05,
    transformations: Sequence[str] = tuple(DIGIT_TRANSFORMATIONS),
) -> tuple[list[PoolPlayer], LinearClassifier]:
    """Split scikit-learn's digits into k players and relabel them with a linear reference model.

    Player i gets the images of the original digits (i + j) mod 10 for j < digits_per_player,
    under transformation number ⌊i/10⌋ mod len(transformations). The reference model is
    multinomial logistic regression trained on every transformed image with its original
    digit. Its predictions replace the labels, so a multiclass linear classifier fits every
    label exactly. The fraction ``margin_quantile`` of images with the smallest gap between
    the two best reference scores is dropped, which gives the labels a positive margin.
    Features are flattened to shape (n, 64). The construction uses no randomness.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    unknown = [name for name in transformations if name not in DIGIT_TRANSFORMATIONS]
    if unknown or not transformations:
        raise ValueError(
            f"unknown transformations {unknown}; expected names from {list(DIGIT_TRANSFORMATIONS)}"
        )
    if not 1 <= digits_per_player <= 10:
        raise ValueError(f"digits_per_player must lie in [1, 10], got {digits_per_player}")

    digits = load_digits()
    images = digits.images / 16.0
    variants = [
        DIGIT_TRANSFORMATIONS[name](images).reshape(len(images), -1) for name in transformations
    ]

    # Fit the reference on all variants and replace every label by its prediction.
    all_features = np.concatenate(variants)
    all_digits = np.tile(digits.target, len(variants))
    reference_learner = LogisticRegressionLearner(C=1.0, max_iter=5_000, require_consistent=False)
    reference = reference_learner.fit(all_features, all_digits, np.random.default_rng(0))
    assert isinstance(reference, LinearClassifier)

    # Keep only images with a positive margin between the two best reference scores.
    scores = np.sort(reference.decision_function(all_features), axis=1)
    gaps = scores[:, -1] - scores[:, -2]
    threshold = np.quantile(gaps, margin_quantile)
    above_margin = (gaps > threshold).reshape(len(variants), len(images))

    players = []
    for i in range(k):
        variant = (i // 10) % len(variants)
        player_digits = [(i + j) % 10 for j in range(digits_per_player)]
        mask = np.isin(digits.target, player_digits) & above_margin[variant]
        features = variants[variant][mask]
        name = f"{i}:digits{player_digits}:{transformations[variant]}"
        players.append(PoolPlayer(features, reference.predict(features), name=name))
    return players, reference
