"""Learners for the realizable setting: consistent linear separators, logistic regression, an MLP.

The guarantees of collaborative PAC learning assume a consistent learner, one that returns a
hypothesis with zero training error whenever the class contains one. The linear learners here
check that they reached zero training error and raise :class:`NotConsistentError` otherwise.
Labels are integers. A sample that contains one label only gets a constant classifier.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linprog
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.svm import LinearSVC

__all__ = [
    "NotConsistentError",
    "ConstantClassifier",
    "LinearClassifier",
    "FlatFeatureClassifier",
    "LinearSeparatorLearner",
    "PerceptronLearner",
    "LogisticRegressionLearner",
    "MLPLearner",
]

logger = logging.getLogger(__name__)


class NotConsistentError(RuntimeError):
    """A learner found no hypothesis with zero training error."""


@dataclass(frozen=True)
class ConstantClassifier:
    """A classifier that predicts one label everywhere."""

    label: int

    def predict(self, X: NDArray) -> NDArray[np.int64]:
        """Predict ``label`` for each of the n rows of X, shape (n, ...) -> (n,)."""
        return np.full(len(X), self.label, dtype=np.int64)


@dataclass(frozen=True)
class LinearClassifier:
    """A linear classifier over flattened features.

    With two classes, ``coef`` has shape (d,) and the prediction is classes[1] where
    coef·x + intercept > 0 and classes[0] elsewhere. With C classes, ``coef`` has shape
    (C, d), ``intercept`` shape (C,), and the prediction is the class of the largest score,
    the smallest class on a tie.
    """

    coef: NDArray[np.float64]
    intercept: NDArray[np.float64]
    classes: NDArray[np.int64]

    def decision_function(self, X: NDArray) -> NDArray[np.float64]:
        """Return scores, shape (n,) for two classes or (n, C) otherwise."""
        flat = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        return flat @ self.coef.T + self.intercept

    def predict(self, X: NDArray) -> NDArray[np.int64]:
        """Predict labels, shape (n,), for features X, shape (n, ...)."""
        scores = self.decision_function(X)
        if self.coef.ndim == 1:
            return np.where(scores > 0, self.classes[1], self.classes[0]).astype(np.int64)
        return self.classes[np.argmax(scores, axis=1)].astype(np.int64)


def _flatten(X: NDArray) -> NDArray[np.float64]:
    return np.asarray(X, dtype=np.float64).reshape(len(X), -1)


@dataclass(frozen=True)
class FlatFeatureClassifier:
    """A fitted scikit-learn classifier applied to features flattened to shape (n, d)."""

    model: MLPClassifier

    def predict(self, X: NDArray) -> NDArray[np.int64]:
        """Predict labels, shape (n,), for features X, shape (n, ...)."""
        return np.asarray(self.model.predict(_flatten(X))).astype(np.int64)


def _single_class(y: NDArray) -> ConstantClassifier | None:
    classes = np.unique(y)
    if classes.size == 0:
        raise ValueError("cannot fit a learner on an empty sample")
    if classes.size == 1:
        return ConstantClassifier(int(classes[0]))
    return None


def _check_consistent(hypothesis: object, X: NDArray, y: NDArray, name: str) -> None:
    mistakes = int(np.count_nonzero(hypothesis.predict(X) != y))  # type: ignore[attr-defined]
    if mistakes:
        raise NotConsistentError(
            f"{name} misclassifies {mistakes} of {len(y)} training samples; the labels may not "
            "be realizable by its class (relabel them with a reference model of the class)"
        )


def _separate_by_linear_program(X: NDArray[np.float64], signs: NDArray[np.float64]) -> NDArray:
    """Find (w, b) with signs_i·(w·x_i + b) ≥ 1 for all i, or raise when none exists."""
    n, d = X.shape
    constraints = -signs[:, None] * np.hstack([X, np.ones((n, 1))])
    result = linprog(
        c=np.zeros(d + 1),
        A_ub=constraints,
        b_ub=-np.ones(n),
        bounds=[(None, None)] * (d + 1),
        method="highs",
    )
    if result.status != 0:
        raise NotConsistentError(
            f"no linear separator fits the {n} training samples (linprog: {result.message})"
        )
    return np.asarray(result.x, dtype=np.float64)


class LinearSeparatorLearner:
    """A consistent learner for two-class linear separators with an intercept.

    It fits a nearly hard-margin linear SVM (scikit-learn's ``LinearSVC``, squared hinge loss,
    primal solver, penalty ``C``). If that leaves training errors, it solves the separation
    linear program with SciPy's HiGHS, which finds a separator whenever one exists. The VC
    dimension of the class in R^d is d + 1.
    """

    def __init__(self, C: float = 1e6, max_iter: int = 10_000) -> None:
        self.C = C
        self.max_iter = max_iter

    @staticmethod
    def vc_dimension(num_features: int) -> int:
        """Return d + 1, the VC dimension of linear separators with an intercept in R^d."""
        return num_features + 1

    def fit(
        self, X: NDArray, y: NDArray, rng: np.random.Generator
    ) -> LinearClassifier | ConstantClassifier:
        """Fit a linear separator with zero training error on X (n, ...) and y (n,)."""
        constant = _single_class(y)
        if constant is not None:
            return constant
        classes = np.unique(y).astype(np.int64)
        if classes.size != 2:
            raise ValueError(f"LinearSeparatorLearner needs two classes, got {classes.tolist()}")

        flat = _flatten(X)
        signs = np.where(y == classes[1], 1.0, -1.0)
        svm = LinearSVC(C=self.C, dual=False, tol=1e-8, max_iter=self.max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            svm.fit(flat, signs)
        hypothesis = LinearClassifier(
            coef=svm.coef_[0].astype(np.float64),
            intercept=np.asarray(svm.intercept_[0], dtype=np.float64),
            classes=classes,
        )

        mistakes = int(np.count_nonzero(hypothesis.predict(flat) != y))
        if mistakes:
            logger.debug("LinearSVC left %d training errors; solving the separation LP", mistakes)
            solution = _separate_by_linear_program(flat, signs)
            hypothesis = LinearClassifier(
                coef=solution[:-1], intercept=np.asarray(solution[-1]), classes=classes
            )
        _check_consistent(hypothesis, flat, y, "LinearSeparatorLearner")
        return hypothesis


class PerceptronLearner:
    """The perceptron (two classes) or multiclass perceptron, in NumPy, run to zero training error.

    Each epoch visits the samples in an order drawn from ``rng`` and updates on every mistake.
    On data separable with margin γ inside a ball of radius R it stops after at most
    (R/γ)² mistakes. It raises :class:`NotConsistentError` after ``max_epochs`` epochs with a
    training error left. Samples are augmented with a constant feature 1 for the intercept.
    """

    def __init__(self, max_epochs: int = 1_000) -> None:
        self.max_epochs = max_epochs

    @staticmethod
    def vc_dimension(num_features: int) -> int:
        """Return d + 1, the VC dimension of two-class linear separators in R^d."""
        return num_features + 1

    def fit(
        self, X: NDArray, y: NDArray, rng: np.random.Generator
    ) -> LinearClassifier | ConstantClassifier:
        """Fit a perceptron with zero training error on X (n, ...) and y (n,)."""
        constant = _single_class(y)
        if constant is not None:
            return constant
        classes, codes = np.unique(y, return_inverse=True)
        flat = np.hstack([_flatten(X), np.ones((len(y), 1))])
        weights = np.zeros((classes.size, flat.shape[1]))

        for _ in range(self.max_epochs):
            mistakes = 0
            for i in rng.permutation(len(y)):
                scores = weights @ flat[i]
                predicted = int(np.argmax(scores))
                if predicted != codes[i]:
                    weights[codes[i]] += flat[i]
                    weights[predicted] -= flat[i]
                    mistakes += 1
            if mistakes == 0:
                break
        else:
            raise NotConsistentError(
                f"the perceptron still made training mistakes after {self.max_epochs} epochs"
            )

        if classes.size == 2:
            # Two score rows are equivalent to one separator: their difference.
            difference = weights[1] - weights[0]
            hypothesis = LinearClassifier(difference[:-1], np.asarray(difference[-1]), classes)
        else:
            hypothesis = LinearClassifier(weights[:, :-1], weights[:, -1], classes)
        _check_consistent(hypothesis, X, y, "PerceptronLearner")
        return hypothesis


class LogisticRegressionLearner:
    """Multinomial logistic regression with a weak penalty (scikit-learn, L-BFGS).

    On separable data a large ``C`` drives the training error to zero, but a finite number of
    iterations may stop short. With ``require_consistent`` (the default) the fit raises
    :class:`NotConsistentError` in that case.
    """

    def __init__(
        self, C: float = 1e4, max_iter: int = 2_000, require_consistent: bool = True
    ) -> None:
        self.C = C
        self.max_iter = max_iter
        self.require_consistent = require_consistent

    def fit(
        self, X: NDArray, y: NDArray, rng: np.random.Generator
    ) -> LinearClassifier | ConstantClassifier:
        """Fit logistic regression on X (n, ...) and y (n,)."""
        constant = _single_class(y)
        if constant is not None:
            return constant

        flat = _flatten(X)
        model = LogisticRegression(C=self.C, max_iter=self.max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(flat, y)
        classes = model.classes_.astype(np.int64)
        if classes.size == 2:
            hypothesis = LinearClassifier(model.coef_[0], np.asarray(model.intercept_[0]), classes)
        else:
            hypothesis = LinearClassifier(model.coef_, model.intercept_, classes)

        if self.require_consistent:
            _check_consistent(hypothesis, flat, y, "LogisticRegressionLearner")
        return hypothesis


class MLPLearner:
    """A small ReLU multilayer perceptron (scikit-learn's ``MLPClassifier``, Adam).

    It trains up to ``max_iter`` epochs. Reaching zero training error is likely on small
    realizable samples but not guaranteed, so there is no consistency check unless
    ``require_consistent`` is set. The seed of each fit comes from ``rng``.
    """

    def __init__(
        self,
        hidden_layer_sizes: tuple[int, ...] = (32,),
        max_iter: int = 500,
        require_consistent: bool = False,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.max_iter = max_iter
        self.require_consistent = require_consistent

    def fit(
        self, X: NDArray, y: NDArray, rng: np.random.Generator
    ) -> FlatFeatureClassifier | ConstantClassifier:
        """Fit the network on X (n, ...) and y (n,)."""
        constant = _single_class(y)
        if constant is not None:
            return constant

        flat = _flatten(X)
        model = MLPClassifier(
            hidden_layer_sizes=self.hidden_layer_sizes,
            max_iter=self.max_iter,
            tol=1e-6,
            n_iter_no_change=50,
            random_state=int(rng.integers(2**31 - 1)),
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(flat, y)

        hypothesis = FlatFeatureClassifier(model)
        if self.require_consistent:
            _check_consistent(hypothesis, flat, y, "MLPLearner")
        return hypothesis
