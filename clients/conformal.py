"""Client of GC-FCP: FedAvg training, calibration summaries and evaluation of calibrated sets.

Wen, Simeone, Xing, "Efficient Federated Conformal Prediction with Group-Conditional
Guarantees", arXiv 2603.14198, UAI 2026. The wire format of the messages is documented in
``fedsim.strategies.gcfcp``. Handlers:

- ``train`` and ``evaluate``: fedsim's FedAvg client, for the training rounds;
- ``train.calibrate``: scores on the calibration split, one summary per atom;
- ``evaluate.conformal``: prediction sets on the test split, coverage and size counts per group.

Where the calibration and test data come from is set by the ``strategy`` section of the run spec:

- ``data_source: paper_synthetic``: client k draws its own data from the synthetic design of
  the paper (``fedsim.conformal.synthetic``): ``client_sizes[k]`` calibration points and
  ``test_size`` test points from its truncated-normal feature law. The draw of calibration
  round r depends only on (run seed, r, k). The predictor is the polynomial whose coefficients
  arrive in the ``arrays`` record (key ``coefficients``, lowest degree first).
- ``data_source: partition``: the client's test split of fedsim's partition is shuffled with
  (run seed, r, k) and cut into a calibration part (``calibration_fraction``) and a test part.
  The predictor is the run's model with the received global weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedsim.clients.common import (
    build_client_model,
    get_client_data,
    load_arrays,
    new_client_app,
    partition_id,
    read_spec,
)
from fedsim.clients.fedavg import evaluate as fedavg_evaluate
from fedsim.clients.fedavg import train as fedavg_train
from fedsim.strategies.gcfcp import table_from_record
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedsim.conformal import (
    QuantileSketch,
    absolute_residual,
    atoms,
    classification_scores,
    interval_memberships,
    label_window_memberships,
    prediction_sets,
)
from fedsim.conformal.synthetic import sample_features, sample_labels
from fedsim.records import array_record_from_numpy, to_numpy_dict
from fedsim.seeding import numpy_rng

__all__ = ["ConformalSplit", "Predictor", "app", "conformal_split", "synthetic_client_data"]

app = new_client_app()
app.train()(fedavg_train)
app.evaluate()(fedavg_evaluate)


@dataclass(frozen=True)
class ConformalSplit:
    """One client's calibration and test data for one calibration round.

    Features have shape (n, ...) and labels (n,): class ids for classification, floats for
    regression.
    """

    calibration_x: np.ndarray
    calibration_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def synthetic_client_data(
    seed: int, client: int, repeat: int, client_sizes: list[int], test_size: int, label_shift: bool = True
) -> ConformalSplit:
    """Draw the paper's synthetic calibration and test data of 0-based ``client`` for round ``repeat``.

    Features are 1-D, shape (n,). The streams are named ``gcfcp-calibration`` and ``gcfcp-test``
    and keyed by (repeat, client), so every process draws the same data.
    """
    num_clients = len(client_sizes)
    calibration_rng = numpy_rng(seed, "gcfcp-calibration", repeat, client)
    calibration_x = sample_features(calibration_rng, client, num_clients, int(client_sizes[client]))
    calibration_y = sample_labels(calibration_rng, calibration_x, client, label_shift)

    test_rng = numpy_rng(seed, "gcfcp-test", repeat, client)
    test_x = sample_features(test_rng, client, num_clients, int(test_size))
    test_y = sample_labels(test_rng, test_x, client, label_shift)
    return ConformalSplit(calibration_x, calibration_y, test_x, test_y)


def conformal_split(spec: dict[str, Any], context: Context, repeat: int) -> ConformalSplit:
    """Return this client's calibration and test data for calibration round ``repeat`` (0-based)."""
    section = spec["strategy"]
    client = partition_id(context)
    if section["data_source"] == "paper_synthetic":
        return synthetic_client_data(int(spec["seed"]), client, repeat, list(section["client_sizes"]),
                                     int(section["test_size"]), bool(section["label_shift"]))

    data = get_client_data(spec, context)
    order = numpy_rng(int(spec["seed"]), "gcfcp-split", repeat, client).permutation(len(data.test_y))
    num_calibration = int(round(float(section["calibration_fraction"]) * order.size))
    calibration, test = order[:num_calibration], order[num_calibration:]
    return ConformalSplit(data.test_x[calibration], data.test_y[calibration], data.test_x[test], data.test_y[test])


class Predictor:
    """The frozen predictor of one calibration round: a polynomial or the run's model."""

    def __init__(self, spec: dict[str, Any], context: Context, arrays: ArrayRecord) -> None:
        self.coefficients: np.ndarray | None = None
        self.model: torch.nn.Module | None = None
        if spec["strategy"]["data_source"] == "paper_synthetic":
            self.coefficients = np.asarray(to_numpy_dict(arrays)["coefficients"], dtype=np.float64)
            self.task = "regression"
            return
        data = get_client_data(spec, context)
        self.model = build_client_model(spec, data)
        load_arrays(self.model, arrays)
        self.task = data.task

    @torch.no_grad()
    def outputs(self, x: np.ndarray) -> np.ndarray:
        """Return predictions f(x), shape (n,), for regression or softmax vectors (n, C)."""
        if self.coefficients is not None:
            return np.polynomial.polynomial.polyval(np.asarray(x, dtype=np.float64), self.coefficients)
        assert self.model is not None
        self.model.eval()
        features = torch.as_tensor(np.asarray(x, dtype=np.float32))
        output = self.model(features)
        if self.task == "regression":
            return output.reshape(-1).double().numpy()
        return torch.softmax(output.double(), dim=1).numpy()


def _memberships(groups: dict[str, np.ndarray], x: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Compute Φ(x), uint8 (n, d), from the group arrays sent by the server."""
    if "label_map" in groups:
        return label_window_memberships(np.argmax(outputs, axis=1), groups["label_map"])
    feature = int(groups["feature"][0])
    values = np.asarray(x, dtype=np.float64).reshape(len(x), -1)[:, feature]
    return interval_memberships(values, [tuple(bounds) for bounds in groups["intervals"]])


def _score_options(config: ConfigRecord) -> dict[str, Any]:
    return {"kind": str(config["score"]), "lambda_reg": float(config["raps-lambda"]), "k_reg": int(config["raps-k"])}


def _scores(config: ConfigRecord, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the conformity scores of the true labels, shape (n,)."""
    if str(config["score"]) == "residual":
        return absolute_residual(labels, outputs)
    return classification_scores(outputs, np.asarray(labels, dtype=np.int64), **_score_options(config))


def _summary_arrays(
    scores: np.ndarray, memberships: np.ndarray, upload: str, compression: int, dtype: np.dtype
) -> tuple[dict[str, np.ndarray], list[float], int]:
    """Build the uploaded arrays, the per-atom rank errors (in count units) and the atom count."""
    patterns, inverse = atoms(memberships)
    if upload == "pooled":
        return {"scores": scores.astype(dtype)}, [], patterns.shape[0]

    packed = np.zeros((patterns.shape[0], (memberships.shape[1] + 7) // 8), dtype=np.uint8)
    if patterns.shape[0]:
        packed = np.packbits(patterns, axis=1, bitorder="little")
    arrays: dict[str, np.ndarray] = {"patterns": packed}
    rank_errors = []
    for index in range(patterns.shape[0]):
        atom_scores = scores[inverse == index]
        if upload == "atoms":
            arrays[f"atom/{index}/value"] = np.sort(atom_scores).astype(dtype)
            continue
        sketch = QuantileSketch.from_scores(atom_scores, 1.0, compression)
        values, weights = sketch.to_arrays(dtype)
        arrays[f"atom/{index}/value"] = values
        arrays[f"atom/{index}/weight"] = weights
        rank_errors.append(sketch.rank_error)
    return arrays, rank_errors, patterns.shape[0]


@app.train("calibrate")
def calibrate(message: Message, context: Context) -> Message:
    """Score the calibration split with the received predictor and upload per-atom summaries."""
    spec = read_spec(message, context)
    content = message.content
    config = content.config_records["config"]
    repeat = int(config["repeat"])  # type: ignore[arg-type]
    split = conformal_split(spec, context, repeat)
    predictor = Predictor(spec, context, content.array_records["arrays"])
    groups = to_numpy_dict(content.array_records["groups"])

    outputs = predictor.outputs(split.calibration_x)
    scores = _scores(config, outputs, split.calibration_y)
    memberships = _memberships(groups, split.calibration_x, outputs)

    arrays, rank_errors, num_atoms = _summary_arrays(
        scores, memberships, str(config["upload"]), int(config["compression"]),  # type: ignore[arg-type]
        np.dtype(str(config["transport-dtype"])),
    )
    metrics: dict[str, Any] = {"num-examples": int(scores.size), "num-atoms": num_atoms}
    if rank_errors:
        metrics["rank-error"] = [float(value) for value in rank_errors]
    reply = RecordDict({"summary": array_record_from_numpy(arrays), "calibration": MetricRecord(metrics)})
    return Message(reply, reply_to=message)


@app.evaluate("conformal")
def evaluate_sets(message: Message, context: Context) -> Message:
    """Build prediction sets (or intervals) on the test split and count coverage per group.

    Counts are plain sums over the m_k test points, so the server can weight clients exactly:
    ``covered`` sets that contain the label, ``size-sum`` the total size of bounded sets
    (interval width 2τ or number of labels), ``unbounded`` sets with τ = +inf in regression,
    and the same per group in ``group-*`` lists of length d.
    """
    spec = read_spec(message, context)
    content = message.content
    config = content.config_records["config"]
    split = conformal_split(spec, context, int(config["repeat"]))  # type: ignore[arg-type]
    predictor = Predictor(spec, context, content.array_records["arrays"])
    groups = to_numpy_dict(content.array_records["groups"])
    table = table_from_record(content.array_records["table"])

    outputs = predictor.outputs(split.test_x)
    memberships = _memberships(groups, split.test_x, outputs)
    thresholds = table.lookup(memberships)
    if str(config["score"]) == "residual":
        covered = absolute_residual(split.test_y, outputs) <= thresholds
        sizes = 2.0 * thresholds
    else:
        sets = prediction_sets(classification_scores(outputs, None, **_score_options(config)), thresholds)
        covered = sets[np.arange(sets.shape[0]), np.asarray(split.test_y, dtype=np.int64)]
        sizes = sets.sum(axis=1).astype(np.float64)

    bounded = np.isfinite(sizes)
    finite_sizes = np.where(bounded, sizes, 0.0)
    members = memberships.astype(bool)
    metrics = MetricRecord({
        "num-examples": int(covered.size),
        "covered": int(covered.sum()),
        "size-sum": float(finite_sizes.sum()),
        "unbounded": int((~bounded).sum()),
        "group-count": [int(v) for v in members.sum(axis=0)],
        "group-covered": [int(v) for v in (members & covered[:, None]).sum(axis=0)],
        "group-size-sum": [float(v) for v in (members * finite_sizes[:, None]).sum(axis=0)],
        "group-unbounded": [int(v) for v in (members & ~bounded[:, None]).sum(axis=0)],
    })
    return Message(RecordDict({"coverage": metrics}), reply_to=message)
