"""Runner glue for GC-FCP (``strategy.name: gcfcp``): config section, strategy, summary.

GC-FCP (Wen, Simeone, Xing, "Efficient Federated Conformal Prediction with Group-Conditional
Guarantees", arXiv 2603.14198, UAI 2026) calibrates a frozen predictor in one round so that its
sets cover the label with probability at least 1 − α in each of d overlapping groups. A run is
``training_rounds`` FedAvg rounds followed by ``repeats`` calibration rounds, each on a fresh
calibration/test split, so ``run.rounds`` must equal ``training_rounds + repeats``.

Two data sources:

- ``paper_synthetic``: the synthetic regression of the paper. The predictor is a degree-4
  polynomial fitted by least squares on one pooled training draw of ``client_sizes`` points per
  client (stream ``gcfcp-train``), sent to clients as ``coefficients``. Each client then draws its
  own calibration and test data. ``data.num_clients`` must equal ``len(client_sizes)``; the
  ``data`` section is otherwise unused by the clients.
- ``partition``: fedsim's data partition and model. FedAvg trains the model, then each client's
  test split is cut into calibration and test parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.config import ConfigError, RunConfig, StrategySection, check_choice, check_value
from fedsim.conformal.synthetic import (
    SYNTHETIC_CLIENT_SIZES,
    SYNTHETIC_INTERVALS,
    sample_features,
    sample_labels,
)
from fedsim.methods.base import CentralEvaluation, DataInfo, Method, register_method
from fedsim.methods.fedavg import build_run_model, central_model_evaluation
from fedsim.seeding import numpy_rng

__all__ = ["GCFCPSection", "GroupsSection", "fit_synthetic_predictor", "summarize_gcfcp"]

CALIBRATION_MODES = ("gcfcp", "gcfcp_exact", "federated_cp", "centralized_cp")
SCORES = ("thr", "aps", "raps", "residual")
DATA_SOURCES = ("paper_synthetic", "partition")
GROUP_KINDS = ("intervals", "label_windows")

REPEATED_COLUMNS = (
    "coverage", "worst_group_coverage", "max_coverage_gap", "mean_size", "unbounded_fraction",
    "uplink_summary_bytes", "raw_score_bytes", "summary_to_raw_ratio", "pseudo_points", "atoms",
    "infinite_thresholds", "calibration_s",
)
"""Columns of a calibration row that ``summarize_gcfcp`` averages over the repeats."""


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    check_choice(f"strategy.{key}", value, allowed)


def _require(condition: bool, key: str, value: object, expected: str) -> None:
    check_value(condition, f"strategy.{key}", value, expected)


@dataclass
class GroupsSection:
    """The d groups: feature intervals [low, high) or windows of predicted labels.

    ``feature`` indexes the flattened input for ``intervals`` (the paper's synthetic data has
    one feature). ``windows`` lists, per group, the predicted labels it contains.
    """

    kind: str = "intervals"
    intervals: list[list[float]] = field(default_factory=lambda: [list(bounds) for bounds in SYNTHETIC_INTERVALS])
    feature: int = 0
    windows: list[list[int]] = field(default_factory=lambda: [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]])


@dataclass
class GCFCPSection(StrategySection):
    """GC-FCP's keys under ``strategy:``; the common keys keep their meaning.

    ``fraction_train`` and ``fraction_evaluate`` apply to the FedAvg rounds only, because every
    client takes part in calibration. ``compression`` is the maximum number of pseudo-points per
    atom in a client summary. ``test_size`` is the number of test points per client and
    ``client_sizes`` the calibration (and training) points per client of ``paper_synthetic``.
    ``calibration_fraction`` is the share of a client's test split used for calibration with
    ``partition``. ``unreachable``, ``on_solver_failure`` and ``solver`` go to the LP solver.
    """

    name: str = "gcfcp"
    centralized_evaluation: bool = False
    alpha: float = 0.1
    score: str = "residual"
    raps_lambda: float = 0.01
    raps_k: int = 5
    calibration: str = "gcfcp"
    compression: int = 50
    recompress: bool = True
    pi: str = "uniform"
    conservative: bool = False
    unreachable: str = "inf"
    on_solver_failure: str = "upper"
    solver: str = "active-set"
    transport_dtype: str = "float32"
    training_rounds: int = 0
    repeats: int = 1
    data_source: str = "paper_synthetic"
    client_sizes: list[int] = field(default_factory=lambda: list(SYNTHETIC_CLIENT_SIZES))
    test_size: int = 500
    label_shift: bool = True
    polynomial_degree: int = 4
    calibration_fraction: float = 0.5
    groups: GroupsSection = field(default_factory=GroupsSection)

    def validate(self, config: RunConfig) -> None:
        """Check GC-FCP's keys and their combination with the rest of ``config``."""
        _choice("calibration", self.calibration, CALIBRATION_MODES)
        _choice("score", self.score, SCORES)
        _choice("pi", self.pi, ("uniform", "proportional"))
        _choice("unreachable", self.unreachable, ("inf", "bracket_end"))
        _choice("on_solver_failure", self.on_solver_failure, ("upper", "raise"))
        _choice("solver", self.solver, ("active-set", "full"))
        _choice("transport_dtype", self.transport_dtype, ("float32", "float64"))
        _choice("data_source", self.data_source, DATA_SOURCES)
        _choice("groups.kind", self.groups.kind, GROUP_KINDS)

        _require(math.isfinite(self.alpha) and 0.0 < self.alpha < 1.0, "alpha", self.alpha, "a miscoverage level in (0, 1)")
        _require(self.compression >= 1, "compression", self.compression, "an integer >= 1 (pseudo-points per atom)")
        _require(self.raps_lambda >= 0, "raps_lambda", self.raps_lambda, "a number >= 0")
        _require(self.raps_k >= 0, "raps_k", self.raps_k, "an integer >= 0")
        _require(self.training_rounds >= 0, "training_rounds", self.training_rounds, "an integer >= 0")
        _require(self.repeats >= 1, "repeats", self.repeats, "an integer >= 1")
        _require(self.test_size >= 1, "test_size", self.test_size, "an integer >= 1")
        _require(0.0 < self.calibration_fraction < 1.0, "calibration_fraction", self.calibration_fraction, "a number in (0, 1)")
        _require(self.polynomial_degree >= 0, "polynomial_degree", self.polynomial_degree, "an integer >= 0")
        if config.run.rounds != self.training_rounds + self.repeats:
            raise ConfigError(
                f"invalid value for 'run.rounds': {config.run.rounds}; GC-FCP runs strategy.training_rounds "
                f"({self.training_rounds}) FedAvg rounds and then strategy.repeats ({self.repeats}) calibration "
                f"rounds, so set run.rounds={self.training_rounds + self.repeats}"
            )
        self._validate_groups()
        if self.data_source == "paper_synthetic":
            self._validate_paper_synthetic(config)
        else:
            self._validate_partition(config)

    def _validate_groups(self) -> None:
        groups = self.groups
        if groups.kind == "intervals":
            _require(len(groups.intervals) >= 1, "groups.intervals", groups.intervals, "at least one [low, high] interval")
            for bounds in groups.intervals:
                _require(len(bounds) == 2 and bounds[0] < bounds[1], "groups.intervals", groups.intervals, "[low, high] pairs with low < high")
            _require(groups.feature >= 0, "groups.feature", groups.feature, "a feature index >= 0")
        else:
            _require(len(groups.windows) >= 1, "groups.windows", groups.windows, "at least one list of labels")
            _require(all(label >= 0 for window in groups.windows for label in window), "groups.windows", groups.windows, "lists of class ids >= 0")

    def _validate_paper_synthetic(self, config: RunConfig) -> None:
        _require(len(self.client_sizes) >= 2, "client_sizes", self.client_sizes, "at least 2 clients (the design spreads clients over [0, 5])")
        _require(all(size >= 0 for size in self.client_sizes), "client_sizes", self.client_sizes, "calibration sizes >= 0")
        _require(self.training_rounds == 0, "training_rounds", self.training_rounds, "0 with data_source=paper_synthetic (the polynomial is fitted once)")
        _require(self.score == "residual", "score", self.score, "'residual' with data_source=paper_synthetic (a regression)")
        _require(self.groups.kind == "intervals", "groups.kind", self.groups.kind, "'intervals' with data_source=paper_synthetic")
        _require(self.groups.feature == 0, "groups.feature", self.groups.feature, "0 with data_source=paper_synthetic (one feature)")
        _require(not self.centralized_evaluation, "centralized_evaluation", self.centralized_evaluation,
                 "false with data_source=paper_synthetic (there is no trained model to evaluate)")
        if config.data.num_clients != len(self.client_sizes):
            raise ConfigError(
                f"invalid value for 'data.num_clients': {config.data.num_clients}; strategy.client_sizes "
                f"lists {len(self.client_sizes)} clients, so set data.num_clients={len(self.client_sizes)}"
            )

    def _validate_partition(self, config: RunConfig) -> None:
        regression = config.data.dataset == "synthetic" and config.data.synthetic.task == "regression"
        if regression:
            _require(self.score == "residual", "score", self.score, "'residual' for a regression data set")
            _require(self.groups.kind == "intervals", "groups.kind", self.groups.kind, "'intervals' for a regression data set (label windows need a classifier)")
        else:
            _require(self.score != "residual", "score", self.score, "'thr', 'aps' or 'raps' for a classification data set")
        if self.training_rounds > 0:
            _require(self.fraction_train > 0, "fraction_train", self.fraction_train, "a number in (0, 1] when training_rounds > 0")


def fit_synthetic_predictor(seed: int, client_sizes: list[int], degree: int = 4, label_shift: bool = True) -> np.ndarray:
    """Fit the paper's polynomial predictor by least squares on one pooled training draw.

    Client k contributes ``client_sizes[k]`` points from stream ``gcfcp-train`` keyed by k.
    Returns the coefficients, float64 (degree + 1,), lowest degree first.
    """
    features, labels = [], []
    for client, size in enumerate(client_sizes):
        rng = numpy_rng(seed, "gcfcp-train", client)
        x = sample_features(rng, client, len(client_sizes), int(size))
        features.append(x)
        labels.append(sample_labels(rng, x, client, label_shift))
    return np.polynomial.polynomial.polyfit(np.concatenate(features), np.concatenate(labels), degree)


def _initial_arrays(config: RunConfig, info: DataInfo) -> ArrayRecord:
    from fedsim.records import array_record_from_numpy

    section = config.strategy
    assert isinstance(section, GCFCPSection)
    if section.data_source == "paper_synthetic":
        coefficients = fit_synthetic_predictor(config.run.seed, list(section.client_sizes),
                                               section.polynomial_degree, section.label_shift)
        return array_record_from_numpy({"coefficients": coefficients})
    return ArrayRecord(build_run_model(config, info).state_dict())


def _central_evaluation(config: RunConfig, spec: dict[str, Any], info: DataInfo) -> CentralEvaluation | None:
    section = config.strategy
    assert isinstance(section, GCFCPSection)
    if section.data_source == "paper_synthetic":
        return None
    return central_model_evaluation(config, spec, info)


def _build_gcfcp(config: RunConfig, info: DataInfo) -> Strategy:
    from fedsim.strategies import GCFCP
    from fedsim.strategies.gcfcp import GroupSpec

    section = config.strategy
    assert isinstance(section, GCFCPSection)
    try:
        groups = GroupSpec(
            kind=section.groups.kind,
            intervals=tuple((float(low), float(high)) for low, high in section.groups.intervals),
            windows=tuple(tuple(int(label) for label in window) for window in section.groups.windows),
            feature=section.groups.feature,
            num_classes=info.num_classes,
        )
    except ValueError as error:
        raise ConfigError(f"invalid value for 'strategy.groups': {error}") from error
    if section.data_source == "partition" and groups.kind == "intervals":
        num_features = int(np.prod(info.input_shape))
        if section.groups.feature >= num_features:
            raise ConfigError(f"invalid value for 'strategy.groups.feature': {section.groups.feature}; "
                              f"the data set has {num_features} features")
    return GCFCP(
        groups,
        section.alpha,
        training_rounds=section.training_rounds,
        score=section.score,
        calibration=section.calibration,
        compression=section.compression,
        recompress=section.recompress,
        pi=section.pi,
        conservative=section.conservative,
        unreachable=section.unreachable,
        on_solver_failure=section.on_solver_failure,
        solver=section.solver,
        transport_dtype=section.transport_dtype,
        raps_lambda=section.raps_lambda,
        raps_k=section.raps_k,
        fraction_train=section.fraction_train,
        fraction_evaluate=section.fraction_evaluate,
        min_train_nodes=section.min_train_nodes,
        min_evaluate_nodes=section.min_evaluate_nodes,
        seed=config.run.seed,
    )


def _mean_and_error(values: list[float]) -> tuple[float, float | None]:
    """Return the mean and its standard error (None for fewer than two values)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None
    return mean, float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _column_values(rows: list[dict[str, Any]], column: str) -> list[float]:
    return [float(row[column]) for row in rows
            if isinstance(row.get(column), (int, float)) and math.isfinite(float(row[column]))]


def summarize_gcfcp(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Add the calibration results to ``summary``: means over the repeats and a groups table.

    Calibration rows are those with ``calibration_clients``. For every column of
    ``REPEATED_COLUMNS`` and every ``coverage_g<j>`` / ``size_g<j>``, ``summary["final"]``
    gets the mean over the repeats and, with two or more repeats, ``<column>_se``, its standard
    error. ``summary["groups"]`` lists per group (1-based): coverage, mean size and their
    standard errors, and the number of repeats in which the group had test points.
    """
    calibration_rows = [row for row in rows if "calibration_clients" in row]
    summary["gcfcp"] = {"repeats": len(calibration_rows)}
    if not calibration_rows:
        return

    final = summary.setdefault("final", {})
    group_ids = sorted({int(key[len("coverage_g"):]) for row in calibration_rows for key in row if key.startswith("coverage_g")})
    columns = list(REPEATED_COLUMNS) + [f"{prefix}{group}" for group in group_ids for prefix in ("coverage_g", "size_g")]
    for column in columns:
        values = _column_values(calibration_rows, column)
        if not values:
            continue
        mean, error = _mean_and_error(values)
        final[column] = mean
        if error is not None:
            final[f"{column}_se"] = error
    if "target_coverage" in calibration_rows[-1]:
        final["target_coverage"] = calibration_rows[-1]["target_coverage"]

    table = []
    for group in group_ids:
        coverage = _column_values(calibration_rows, f"coverage_g{group}")
        sizes = _column_values(calibration_rows, f"size_g{group}")
        coverage_mean, coverage_error = _mean_and_error(coverage)
        entry: dict[str, Any] = {"group": group, "coverage": coverage_mean, "coverage_se": coverage_error, "repeats": len(coverage)}
        if sizes:
            entry["mean_size"], entry["mean_size_se"] = _mean_and_error(sizes)
        table.append(entry)
    summary["groups"] = table
    summary["gcfcp"].update({
        "worst_group_coverage": final.get("worst_group_coverage"),
        "coverage": final.get("coverage"),
        "mean_size": final.get("mean_size"),
        "uplink_summary_bytes": final.get("uplink_summary_bytes"),
        "raw_score_bytes": final.get("raw_score_bytes"),
    })


register_method(
    Method(
        name="gcfcp",
        section=GCFCPSection,
        summary="GC-FCP (Wen et al. 2026): one-round federated conformal calibration with group-conditional coverage",
        client_app="fedsim.clients.conformal:app",
        build_strategy=_build_gcfcp,
        initial_arrays=_initial_arrays,
        central_evaluation=_central_evaluation,
        summarize=summarize_gcfcp,
        plot_columns=("coverage", "worst_group_coverage", "mean_size"),
    )
)
