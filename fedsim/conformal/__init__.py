"""Federated conformal calibration with group-conditional coverage (GC-FCP).

Implements the maths of Wen, Simeone, Xing, "Efficient Federated Conformal Prediction with
Group-Conditional Guarantees" (arXiv 2603.14198, UAI 2026). The package provides conformity
scores, groups and atoms, mixture weights and a mergeable weighted quantile summary. It solves
the weighted group-conditional dual LP, with its closed-form special cases, and builds prediction
sets and coverage metrics. It also generates the paper's synthetic regression and runs the
baselines. Arrays in, arrays out: no Flower, no Ray, no file I/O.
"""

from fedsim.conformal.calibration import (
    CalibrationError,
    calibrate_table,
    gcc_threshold,
    insufficient_group_mass,
    max_test_dual,
    mondrian_thresholds,
    split_conformal_threshold,
    weighted_quantile_threshold,
)
from fedsim.conformal.federated import (
    ClientSummary,
    SketchedCalibration,
    calibrate_from_sketches,
    centralized_split_cp,
    federated_cp,
    gcfcp_exact,
    gcfcp_sketched,
    merge_summaries,
    raw_uplink_bytes,
    summarize_client,
)
from fedsim.conformal.groups import (
    atoms,
    interval_memberships,
    interval_patterns,
    label_window_map,
    label_window_memberships,
    pattern_from_key,
    pattern_key,
)
from fedsim.conformal.prediction import (
    CoverageReport,
    coverage_report,
    prediction_sets,
    regression_intervals,
)
from fedsim.conformal.scores import (
    absolute_residual,
    aps_scores,
    classification_scores,
    raps_scores,
    thr_scores,
)
from fedsim.conformal.sketch import QuantileSketch
from fedsim.conformal.synthetic import (
    SYNTHETIC_CLIENT_SIZES,
    SYNTHETIC_INTERVALS,
    SyntheticRegression,
    make_synthetic_regression,
)
from fedsim.conformal.table import ThresholdTable
from fedsim.conformal.weights import calibration_weights, mixture_proportions

__all__ = [
    "CalibrationError",
    "ClientSummary",
    "CoverageReport",
    "QuantileSketch",
    "SYNTHETIC_CLIENT_SIZES",
    "SYNTHETIC_INTERVALS",
    "SketchedCalibration",
    "SyntheticRegression",
    "ThresholdTable",
    "absolute_residual",
    "aps_scores",
    "atoms",
    "calibrate_from_sketches",
    "calibrate_table",
    "calibration_weights",
    "centralized_split_cp",
    "classification_scores",
    "coverage_report",
    "federated_cp",
    "gcc_threshold",
    "gcfcp_exact",
    "gcfcp_sketched",
    "insufficient_group_mass",
    "interval_memberships",
    "interval_patterns",
    "label_window_map",
    "label_window_memberships",
    "make_synthetic_regression",
    "max_test_dual",
    "merge_summaries",
    "mixture_proportions",
    "mondrian_thresholds",
    "pattern_from_key",
    "pattern_key",
    "prediction_sets",
    "raps_scores",
    "raw_uplink_bytes",
    "regression_intervals",
    "split_conformal_threshold",
    "summarize_client",
    "thr_scores",
    "weighted_quantile_threshold",
]
