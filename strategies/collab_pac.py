"""Collaborative PAC learning as a Flower strategy: multiplicative weights and two baselines.

k players (clients) each hold a distribution D_i, all labelled by one target of a class of VC
dimension d. The server wants one classifier with error ≤ ε on every D_i, with probability
≥ 1 − δ, from as few labelled samples as possible.

- ``algorithm="mw"``: J. Chen, Q. Zhang, Y. Zhou, "Tight Bounds for Collaborative PAC Learning
  via Multiplicative Weights", NeurIPS 2018, arXiv 1805.09217. Each round draws
  (n_1..n_k) ~ Multinomial(m_t, p) with p_i ∝ 2^{c_i}, learns g_t from fresh samples of the
  mixture, tests g_t on n_test fresh samples of every player and increments c_i (doubles the
  weight) of every player whose empirical error exceeds (3/4)·ε1. The output is the plurality
  vote of g_1..g_T.
- ``algorithm="blum_personalized"``: A. Blum, N. Haghtalab, A. D. Procaccia, M. Qiao,
  "Collaborative PAC Learning", NeurIPS 2017. Round r learns h_r on the uniform mixture of the
  players not yet served and serves every tested player that passes.
- ``algorithm="naive"``: one hypothesis from m_{ε,δ/k} samples of every player.

One server round of this strategy is one round of the algorithm. ``start`` runs it as a series
of message exchanges, each through ``configure_*`` and ``aggregate_*`` on ``self``:

1. train (``MessageType.TRAIN``): pooled learners ask each player for its n_i fresh samples
   and fit the round hypothesis at the server. With ``learner="fedavg"`` the players instead
   run ``fedavg_rounds`` rounds of FedAvg on logistic regression over their n_i samples.
2. certify (``MessageType.EVALUATE``, config ``mode="certify"``), only with certification:
   the players count the errors of the round hypothesis on their share of n_c mixture draws.
   A hypothesis with pooled error rate > ε1/32 is refitted on m_t·2^a samples (attempt a).
3. test (``MessageType.EVALUATE``, ``mode="test"``): every tested player counts the errors of
   the round hypothesis on n_test fresh samples, and the server updates the weights.
4. final (``MessageType.EVALUATE``, ``mode="final"``), after the last round only: each player
   measures the error of its final classifier on fresh evaluation samples.

Every random draw comes from the stream (seed, round, player, phase, attempt) of
:func:`fedsim.pac.derive_rng`, the streams of :func:`fedsim.pac.run_mw`,
:func:`fedsim.pac.run_blum_personalized` and :func:`fedsim.pac.run_naive`. With the same
players, learner, plan and seed, a pooled run therefore reproduces those drivers exactly.

Hypotheses travel as arrays (:func:`hypotheses_to_record`), so the grid's byte ledger counts
them. Pooled learners ship raw samples from clients to the server, which only a simulation
should do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from fedsim.strategies.common import ordered_node_ids
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from numpy.typing import NDArray
from scipy.special import expit

from fedsim.pac import (
    BlumPlan,
    ConstantClassifier,
    Hypothesis,
    Learner,
    LinearClassifier,
    LinearSeparatorLearner,
    LogisticRegressionLearner,
    MajorityVote,
    MLPLearner,
    MWPlan,
    NaivePlan,
    PerceptronLearner,
    Phase,
    certification_passes,
    certification_sample_size,
    count_errors,
    derive_rng,
    fails_test,
    fedavg_average,
    plan_blum,
    plan_mw,
    plan_naive,
    probabilities_from_failures,
    split_budget,
)
from fedsim.pac.core import ALL_PLAYERS
from fedsim.pac.learners import FlatFeatureClassifier
from fedsim.records import array_record_from_numpy, to_numpy

__all__ = [
    "ALGORITHMS",
    "LEARNERS",
    "CollaborativePAC",
    "NumpyMLPClassifier",
    "PlayerReplyError",
    "build_learner",
    "hypotheses_from_record",
    "hypotheses_to_record",
    "majority_of",
]

ALGORITHMS = ("mw", "blum_personalized", "naive")
LEARNERS = ("linear", "logistic", "mlp", "perceptron", "fedavg")

PARTITION_QUERY = "query.partition"
"""Message type of the partition-id query; ``fedsim.clients.common.new_client_app`` handles it."""

CONFIG_RECORD = "config"
PLAYERS_RECORD = "players"
HYPOTHESIS_RECORD = "hypothesis"
SAMPLES_RECORD = "samples"
FEDAVG_RECORD = "arrays"


class PlayerReplyError(RuntimeError):
    """A player failed, or replied with content that breaks the algorithm's sample accounting."""


# Hypotheses as arrays.


@dataclass(frozen=True)
class NumpyMLPClassifier:
    """A ReLU multilayer perceptron rebuilt from scikit-learn's ``MLPClassifier`` parameters.

    ``weights[j]`` has shape (n_j, n_{j+1}) and ``biases[j]`` shape (n_{j+1},). A single output
    unit is a logistic output (two classes), several are a softmax. Predictions follow
    scikit-learn's rule: class 1 where the logistic output exceeds 0.5, else the first class of
    largest softmax output.
    """

    weights: tuple[NDArray[np.float64], ...]
    biases: tuple[NDArray[np.float64], ...]
    classes: NDArray[np.int64]

    def predict(self, X: NDArray) -> NDArray[np.int64]:
        """Predict labels, shape (n,), for features X, shape (n, ...)."""
        activation = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        last = len(self.weights) - 1
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            activation = activation @ weight + bias
            if index < last:
                activation = np.maximum(activation, 0.0)

        if activation.shape[1] == 1:
            return np.where(expit(activation[:, 0]) > 0.5, self.classes[1], self.classes[0]).astype(np.int64)
        shifted = np.exp(activation - activation.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        return self.classes[np.argmax(probabilities, axis=1)].astype(np.int64)


def _hypothesis_arrays(hypothesis: Hypothesis) -> dict[str, NDArray]:
    """Return the named arrays of one hypothesis; the names identify its kind."""
    if isinstance(hypothesis, ConstantClassifier):
        return {"label": np.asarray([hypothesis.label], dtype=np.int64)}
    if isinstance(hypothesis, LinearClassifier):
        return {
            "coef": np.asarray(hypothesis.coef, dtype=np.float64),
            "intercept": np.asarray(hypothesis.intercept, dtype=np.float64),
            "classes": np.asarray(hypothesis.classes, dtype=np.int64),
        }
    if isinstance(hypothesis, FlatFeatureClassifier):
        model = hypothesis.model
        if model.activation != "relu":
            raise ValueError(f"only ReLU networks can be sent, got activation {model.activation!r}")
        arrays: dict[str, NDArray] = {}
        for layer, (weight, bias) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
            arrays[f"weight{layer}"] = np.asarray(weight, dtype=np.float64)
            arrays[f"bias{layer}"] = np.asarray(bias, dtype=np.float64)
        arrays["classes"] = np.asarray(model.classes_, dtype=np.int64)
        return arrays
    if isinstance(hypothesis, NumpyMLPClassifier):
        arrays = {}
        for layer, (weight, bias) in enumerate(zip(hypothesis.weights, hypothesis.biases, strict=True)):
            arrays[f"weight{layer}"] = weight
            arrays[f"bias{layer}"] = bias
        arrays["classes"] = hypothesis.classes
        return arrays
    raise TypeError(f"cannot send a hypothesis of type {type(hypothesis).__name__}")


def hypotheses_to_record(hypotheses: Sequence[Hypothesis]) -> ArrayRecord:
    """Encode hypotheses as one ``ArrayRecord`` with keys ``"<index>/<parameter>"``.

    Linear classifiers send ``coef`` and ``intercept`` (float64) and ``classes`` (int64),
    constant ones ``label``, and networks ``weight<j>``, ``bias<j>`` and ``classes``.
    """
    arrays: dict[str, NDArray] = {}
    for index, hypothesis in enumerate(hypotheses):
        for name, values in _hypothesis_arrays(hypothesis).items():
            arrays[f"{index}/{name}"] = values
    return array_record_from_numpy(arrays)


def _hypothesis_from_arrays(arrays: Mapping[str, NDArray]) -> Hypothesis:
    if "label" in arrays:
        return ConstantClassifier(int(arrays["label"][0]))
    if "coef" in arrays:
        return LinearClassifier(
            coef=np.array(arrays["coef"], dtype=np.float64),
            intercept=np.array(arrays["intercept"], dtype=np.float64),
            classes=np.array(arrays["classes"], dtype=np.int64),
        )
    if "weight0" in arrays:
        layers = sum(1 for name in arrays if name.startswith("weight"))
        return NumpyMLPClassifier(
            weights=tuple(np.array(arrays[f"weight{j}"], dtype=np.float64) for j in range(layers)),
            biases=tuple(np.array(arrays[f"bias{j}"], dtype=np.float64) for j in range(layers)),
            classes=np.array(arrays["classes"], dtype=np.int64),
        )
    raise ValueError(f"unknown hypothesis encoding with arrays {sorted(arrays)}")


def hypotheses_from_record(record: ArrayRecord) -> list[Hypothesis]:
    """Decode the hypotheses of :func:`hypotheses_to_record`, in index order."""
    grouped: dict[int, dict[str, NDArray]] = {}
    for key, array in record.items():
        index, _, name = key.partition("/")
        if not index.isdigit() or not name:
            raise ValueError(f"invalid hypothesis array key {key!r}; expected '<index>/<parameter>'")
        grouped.setdefault(int(index), {})[name] = to_numpy(array)
    if sorted(grouped) != list(range(len(grouped))):
        raise ValueError(f"hypothesis indices must be 0..n-1, got {sorted(grouped)}")
    return [_hypothesis_from_arrays(grouped[index]) for index in range(len(grouped))]


def majority_of(record: ArrayRecord) -> Hypothesis:
    """Return the classifier encoded in ``record``: the one hypothesis, or the plurality vote of several."""
    hypotheses = hypotheses_from_record(record)
    return hypotheses[0] if len(hypotheses) == 1 else MajorityVote(tuple(hypotheses))


def build_learner(name: str) -> Learner:
    """Return the pooled learner called ``name`` (``linear``, ``logistic``, ``mlp`` or ``perceptron``).

    Logistic regression and the MLP do not insist on zero training error, because a finite
    number of iterations can stop short of it. Each round reports its training error instead.
    """
    if name == "linear":
        return LinearSeparatorLearner()
    if name == "logistic":
        return LogisticRegressionLearner(require_consistent=False)
    if name == "mlp":
        return MLPLearner()
    if name == "perceptron":
        return PerceptronLearner()
    raise ValueError(f"unknown pooled learner {name!r}; expected linear, logistic, mlp or perceptron")


# Per-player sample ledger kept by the server.

PHASES = ("train", "test", "certify", "evaluate")


@dataclass
class _Ledger:
    """Samples per player and phase, as received by the server or, for tests, as requested and reported drawn."""

    counts: dict[str, list[int]]

    @classmethod
    def empty(cls, k: int) -> _Ledger:
        return cls({phase: [0] * k for phase in PHASES})

    def add(self, phase: str, player: int, samples: int) -> None:
        self.counts[phase][player] += int(samples)

    def cost(self) -> int:
        """Samples charged to the algorithm: train, test and certification draws."""
        return sum(sum(self.counts[phase]) for phase in ("train", "test", "certify"))


class CollaborativePAC(Strategy):
    """Collaborative PAC learning with multiplicative weights, Blum et al.'s algorithm or naive.

    Players are the clients in partition order: player i is the node of partition i. The
    clients build their own distributions from the ``players`` settings sent with every message
    (see ``fedsim.clients.pac``). The strategy receives only their samples and error counts.

    Parameters
    ----------
    num_players : int
        k, the number of players; ``start`` checks it against the grid's nodes.
    algorithm : str (default: "mw")
        ``mw``, ``blum_personalized`` or ``naive``.
    learner : str (default: "linear")
        ``linear``, ``logistic``, ``mlp``, ``perceptron`` (fitted at the server on pooled
        samples) or ``fedavg`` (logistic regression trained by FedAvg on the players, MW only).
    eps, delta : float (default: 0.1, 0.05)
        Target error ε of every player and failure probability δ.
    preset : str (default: "practical")
        Constants of :mod:`fedsim.pac.plan`: ``theory`` or ``practical``.
    round_samples : int or None
        The learner's sample size: m_t per MW round, m_r per Blum round, samples per player for
        naive. Required by the practical preset; the theory preset derives it from ``vc_dim``.
    vc_dim : int or None
        VC dimension of the learner's class, required by the theory preset.
    seed : int (default: 0)
        Root seed of every sample stream, sent to the players with each request.
    players : mapping
        Settings from which each client builds its distribution, sent verbatim as the config
        record ``players``: strings, numbers, booleans or lists of them.
    evaluation_samples : int (default: 2000)
        Fresh samples per player for the final error (a finite pool may use its held-out split
        instead). They are reported apart and are not part of the algorithm's cost.
    test_target : str (default: "round")
        MW only: test the round hypothesis g_t (``round``, what the proof uses) or the running
        vote Maj(g_1..g_t) (``majority``).
    certify_attempts : int (default: 0)
        MW only: with A > 0, certify each round hypothesis on n_c = ⌈(128/ε1)·ln(2T·A/δ)⌉
        mixture draws and refit on m_t·2^a samples, up to A attempts, until one passes.
    num_features : int or None
        Feature dimension d, required by ``learner="fedavg"`` to start from θ = 0 ∈ R^{d+1}.
    fedavg_rounds, fedavg_local_steps, fedavg_lr : int, int, float (default: 20, 1, 1.0)
        FedAvg rounds per fit, full-batch gradient steps per FedAvg round and their step size.
    single_need, naive_samples : int or None
        m_{ε,δ} of one distribution and the naive baseline's total cost k·m_{ε,δ/k}, measured
        or from a bound. When given, the final round reports the overhead ratios.
    calibration_draws : int (default: 0)
        Samples spent measuring sample needs before the run, reported apart from the cost.
    """

    def __init__(
        self,
        num_players: int,
        algorithm: str = "mw",
        learner: str = "linear",
        eps: float = 0.1,
        delta: float = 0.05,
        preset: str = "practical",
        round_samples: int | None = None,
        vc_dim: int | None = None,
        seed: int = 0,
        players: Mapping[str, Any] | None = None,
        evaluation_samples: int = 2000,
        test_target: str = "round",
        certify_attempts: int = 0,
        num_features: int | None = None,
        fedavg_rounds: int = 20,
        fedavg_local_steps: int = 1,
        fedavg_lr: float = 1.0,
        single_need: int | None = None,
        naive_samples: int | None = None,
        calibration_draws: int = 0,
    ) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")
        if learner not in LEARNERS:
            raise ValueError(f"unknown learner {learner!r}; expected one of {LEARNERS}")
        if test_target not in ("round", "majority"):
            raise ValueError(f"test_target must be 'round' or 'majority', got {test_target!r}")
        if learner == "fedavg" and (algorithm != "mw" or num_features is None):
            raise ValueError("learner 'fedavg' needs algorithm 'mw' and num_features")
        if certify_attempts < 0 or (certify_attempts and algorithm != "mw"):
            raise ValueError(f"certify_attempts must be 0, or >= 1 with algorithm 'mw', got {certify_attempts!r}")
        if evaluation_samples < 1:
            raise ValueError(f"evaluation_samples must be >= 1, got {evaluation_samples!r}")

        self.k = int(num_players)
        self.algorithm = algorithm
        self.learner_name = learner
        self.seed = int(seed)
        self.players = dict(players or {})
        self.evaluation_samples = int(evaluation_samples)
        self.test_target = test_target
        self.certify_attempts = int(certify_attempts)
        self.num_features = num_features
        self.fedavg_rounds = int(fedavg_rounds)
        self.fedavg_local_steps = int(fedavg_local_steps)
        self.fedavg_lr = float(fedavg_lr)
        self.single_need = single_need
        self.naive_samples = naive_samples
        self.calibration_draws = int(calibration_draws)

        plan_options = {"preset": preset, "vc_dim": vc_dim}
        self.plan: MWPlan | BlumPlan | NaivePlan
        if algorithm == "mw":
            self.plan = plan_mw(self.k, eps, delta, round_samples=round_samples, **plan_options)  # type: ignore[arg-type]
        elif algorithm == "blum_personalized":
            self.plan = plan_blum(self.k, eps, delta, round_samples=round_samples, **plan_options)  # type: ignore[arg-type]
        else:
            self.plan = plan_naive(self.k, eps, delta, player_samples=round_samples, **plan_options)  # type: ignore[arg-type]
        self.learner: Learner | None = None if learner == "fedavg" else build_learner(learner)
        self._reset()

    # State.

    @property
    def planned_rounds(self) -> int:
        """Rounds of the algorithm: T for MW, at most R = ⌊log2 k⌋ + 1 for Blum, 1 for naive."""
        if isinstance(self.plan, NaivePlan):
            return 1
        return self.plan.rounds

    @property
    def weights(self) -> list[int]:
        """Exact weights w_i = 2^{c_i}, one per player."""
        return [2**c for c in self.failures]

    def _reset(self) -> None:
        self.failures: list[int] = [0] * self.k
        self.ledger = _Ledger.empty(self.k)
        self.client_ledgers: list[dict[str, int]] = [dict.fromkeys(PHASES, 0) for _ in range(self.k)]
        self.hypotheses: list[ArrayRecord] = []
        self.remaining: list[int] = list(range(self.k))
        self.final_classifier: list[int | None] = [None] * self.k
        self.final_errors: list[float | None] = [None] * self.k
        self.flagged: list[bool] = [False] * self.k
        self.nodes: list[int] = []
        self._split: NDArray[np.int64] = np.zeros(self.k, dtype=np.int64)
        self._pooled: tuple[NDArray, NDArray] | None = None
        self._requests: dict[int, tuple[str, int]] = {}
        self._train_metrics: dict[str, Any] = {}
        self._evaluate_metrics: dict[str, Any] = {}
        self._certified: bool | None = None

    def summary(self) -> None:
        """Log the algorithm, learner and constants."""
        log(INFO, "\t├──> Collaborative PAC: %s with learner %s, %d players", self.algorithm, self.learner_name, self.k)
        log(INFO, "\t└──> %s", self.plan.describe())

    def probabilities(self) -> NDArray[np.float64]:
        """Return this round's sampling probabilities, shape (k,): p_i ∝ 2^{c_i} (MW), uniform over N_r (Blum)."""
        if self.algorithm == "mw":
            return probabilities_from_failures(self.failures)
        probabilities = np.zeros(self.k)
        if self.remaining:
            probabilities[self.remaining] = 1.0 / len(self.remaining)
        return probabilities

    # The round loop.

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the algorithm: ``min(num_rounds, planned_rounds)`` rounds, then the final evaluation.

        ``initial_arrays`` is not used. The algorithm fixes its own number of rounds: rounds
        beyond it are not run, and fewer rounds (``num_rounds`` < ``planned_rounds``) truncate
        the run, which voids the guarantee. Blum et al.'s algorithm stops early once every
        player is served. ``evaluate_fn(round, arrays)`` is called once at the end of every
        round with the round hypothesis. Raises :class:`PlayerReplyError` when a player fails.
        """
        self._reset()
        self.nodes = self._player_nodes(grid, timeout)
        rounds = min(int(num_rounds), self.planned_rounds)
        if num_rounds > self.planned_rounds:
            log(INFO, "collab PAC: the algorithm needs %d rounds; the remaining %d requested rounds are not run",
                self.planned_rounds, num_rounds - self.planned_rounds)
        if num_rounds < self.planned_rounds:
            log(WARNING, "collab PAC: running %d of the %d rounds the algorithm needs; the guarantee does not hold",
                num_rounds, self.planned_rounds)
        self.summary()

        result = Result()
        train_base = dict(train_config or {})
        evaluate_base = dict(evaluate_config or {})
        for server_round in range(1, rounds + 1):
            self._train_metrics = {}
            self._evaluate_metrics = {}

            hypothesis = self._fit_round(grid, server_round, train_base, evaluate_base, timeout)
            self.hypotheses.append(hypothesis)
            result.arrays = hypothesis

            if self.algorithm != "naive":
                self._exchange_evaluate(grid, server_round, hypothesis, {**evaluate_base, "mode": "test"}, timeout)

            finished = server_round == rounds or (self.algorithm == "blum_personalized" and not self.remaining)
            if finished:
                self._exchange_evaluate(grid, server_round, hypothesis, {**evaluate_base, "mode": "final"}, timeout)
            if evaluate_fn is not None:
                evaluate_fn(server_round, hypothesis)
            if finished:
                break
        return result

    def _player_nodes(self, grid: Grid, timeout: float) -> list[int]:
        """Return the node id of every player, indexed by partition id."""
        partition_of = getattr(grid, "partition_of", None)
        node_ids = ordered_node_ids(grid)
        if callable(partition_of):
            mapping = {int(partition_of(node)): int(node) for node in node_ids}
        else:
            queries = [Message(RecordDict(), dst_node_id=node, message_type=PARTITION_QUERY) for node in node_ids]
            mapping = {}
            for reply in grid.send_and_receive(queries, timeout=timeout):
                if reply.has_error():
                    raise PlayerReplyError(f"node {reply.metadata.src_node_id} did not report its partition id: {reply.error.reason}")
                partition = int(reply.content.metric_records["partition"]["partition-id"])  # type: ignore[arg-type]
                mapping[partition] = int(reply.metadata.src_node_id)
        if sorted(mapping) != list(range(self.k)):
            raise PlayerReplyError(
                f"collab PAC needs the partitions 0..{self.k - 1} of {self.k} players, the grid has partitions "
                f"{sorted(mapping)}; set the number of players to the number of nodes"
            )
        return [mapping[player] for player in range(self.k)]

    def _fit_round(
        self, grid: Grid, server_round: int, train_base: dict[str, Any], evaluate_base: dict[str, Any], timeout: float
    ) -> ArrayRecord:
        """Fit the round hypothesis, certifying and refitting it when certification is on."""
        self._certified = None
        hypothesis = ArrayRecord()
        attempts = max(1, self.certify_attempts)
        for attempt in range(attempts):
            config = {**train_base, "attempt": attempt}
            if self.learner_name == "fedavg":
                hypothesis = self._fit_federated(grid, server_round, config, timeout)
            else:
                messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord(config), grid)
                replies = grid.send_and_receive(messages, timeout=timeout)
                arrays, _ = self.aggregate_train(server_round, replies)
                assert arrays is not None
                hypothesis = arrays

            if self.certify_attempts == 0:
                break
            certify = {**evaluate_base, "mode": "certify", "attempt": attempt}
            self._exchange_evaluate(grid, server_round, hypothesis, certify, timeout)
            if self._certified:
                break
        if self._certified is False:
            log(WARNING, "round %d: no hypothesis passed certification in %d attempts; keeping the last",
                server_round, self.certify_attempts)
        return hypothesis

    def _fit_federated(self, grid: Grid, server_round: int, config: dict[str, Any], timeout: float) -> ArrayRecord:
        """Run ``fedavg_rounds`` FedAvg rounds from θ = 0 and return θ as a linear hypothesis."""
        assert self.num_features is not None
        theta = array_record_from_numpy({"theta": np.zeros(self.num_features + 1)})
        for step in range(self.fedavg_rounds):
            messages = self.configure_train(server_round, theta, ConfigRecord({**config, "fedavg-step": step}), grid)
            replies = grid.send_and_receive(messages, timeout=timeout)
            arrays, _ = self.aggregate_train(server_round, replies)
            assert arrays is not None
            theta = arrays

        values = to_numpy(theta["theta"])
        classifier = LinearClassifier(values[:-1].copy(), np.asarray(values[-1]), np.array([0, 1], dtype=np.int64))
        return hypotheses_to_record([classifier])

    def _exchange_evaluate(
        self, grid: Grid, server_round: int, hypothesis: ArrayRecord, config: dict[str, Any], timeout: float
    ) -> None:
        messages = self.configure_evaluate(server_round, hypothesis, ConfigRecord(config), grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        self.aggregate_evaluate(server_round, replies)

    # Messages.

    def _message(self, player: int, content: dict[str, Any], message_type: str) -> Message:
        records = RecordDict({PLAYERS_RECORD: ConfigRecord(dict(self.players))})
        for name, record in content.items():
            records[name] = record
        return Message(records, dst_node_id=self.nodes[player], message_type=message_type)

    def _stream_config(self, server_round: int, mode: str, samples: int, attempt: int = 0) -> dict[str, Any]:
        return {"mode": mode, "seed": self.seed, "round": server_round, "attempt": attempt, "samples": int(samples)}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Request each player's share n_i of the round's m_t mixture samples (players with n_i = 0 get none).

        The shares (n_1..n_k) ~ Multinomial(m_t·2^attempt, p) come from the round's split stream.
        Pooled learners request the samples themselves (mode ``draw``). With ``fedavg`` the
        message carries θ (``arrays``) and the player trains on its samples (mode ``fedavg``).
        """
        if not self.nodes:
            self.nodes = self._player_nodes(grid, 600.0)
        attempt = int(config.get("attempt", 0))  # type: ignore[arg-type]
        step = int(config.get("fedavg-step", 0))  # type: ignore[arg-type]

        if step == 0:
            if isinstance(self.plan, NaivePlan):
                self._split = np.full(self.k, self.plan.player_samples, dtype=np.int64)
            else:
                budget = self.plan.round_samples * 2**attempt
                split_rng = derive_rng(self.seed, server_round, ALL_PLAYERS, Phase.SPLIT, attempt)
                self._split = split_budget(budget, self.probabilities(), split_rng)

        messages = []
        self._requests = {}
        for player, samples in enumerate(self._split):
            if samples == 0:
                continue
            if self.learner_name == "fedavg":
                settings = self._stream_config(server_round, "fedavg", samples, attempt)
                settings.update({"local-steps": self.fedavg_local_steps, "lr": self.fedavg_lr, "fedavg-step": step})
                content: dict[str, Any] = {CONFIG_RECORD: ConfigRecord(settings), FEDAVG_RECORD: arrays}
            else:
                content = {CONFIG_RECORD: ConfigRecord(self._stream_config(server_round, "draw", samples, attempt))}
            messages.append(self._message(player, content, MessageType.TRAIN))
            self._requests[self.nodes[player]] = ("train", int(samples))
        return messages

    def _checked_replies(self, replies: Iterable[Message], record: str) -> list[tuple[int, RecordDict]]:
        """Return (player, content) per reply in player order; raise on a failed or inconsistent reply."""
        player_of = {node: player for player, node in enumerate(self.nodes)}
        checked = []
        seen = set()
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            player = player_of.get(node, -1)
            if reply.has_error():
                raise PlayerReplyError(
                    f"player {player} (node {node}) failed: {reply.error.reason}; collaborative PAC learning needs every player's reply"
                )
            metrics = reply.content.metric_records.get(record)
            if metrics is None:
                raise PlayerReplyError(f"player {player} (node {node}) replied without the metric record {record!r}")
            reported = int(metrics.get("partition-id", -1))  # type: ignore[arg-type]
            if reported != player:
                raise PlayerReplyError(f"node {node} is player {player} but reported partition id {reported}")
            phase, requested = self._requests.get(node, ("", -1))
            drawn = int(metrics.get("drawn", -1))  # type: ignore[arg-type]
            if not self._draw_matches(phase, drawn, requested):
                raise PlayerReplyError(f"player {player} drew {drawn} samples for {phase!r}, {requested} were requested")
            for key in PHASES:
                self.client_ledgers[player][key] = int(metrics.get(f"ledger-{key}", 0))  # type: ignore[arg-type]
            seen.add(node)
            checked.append((player, reply.content))
        missing = sorted(player_of[node] for node in set(self._requests) - seen)
        if missing:
            raise PlayerReplyError(f"players {missing} did not reply; collaborative PAC learning needs every player's reply")
        return sorted(checked, key=lambda item: item[0])

    def _draw_matches(self, phase: str, drawn: int, requested: int) -> bool:
        """Check a reported draw: exact, except a held-out evaluation split and repeated FedAvg draws (0)."""
        if phase == "evaluate":
            return drawn >= 1
        if phase == "train" and self.learner_name == "fedavg":
            return drawn in (0, requested)
        return drawn == requested

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Fit the round hypothesis on the pooled samples, or average the players' θ (``fedavg``).

        Returns the hypothesis (:func:`hypotheses_to_record`) or θ, and the round's training
        metrics so far: ``round-samples`` (training draws this round, all attempts),
        ``train-error`` (of a pooled fit on its own sample), ``p-max`` and ``players-sampled``.
        """
        checked = self._checked_replies(replies, "train")
        received = 0
        arrays: ArrayRecord
        if self.learner_name == "fedavg":
            thetas = [to_numpy(content.array_records[FEDAVG_RECORD]["theta"]) for _, content in checked]
            counts = [int(self._split[player]) for player, _ in checked]
            for player, content in checked:
                drawn = int(content.metric_records["train"]["drawn"])  # type: ignore[arg-type]
                self.ledger.add("train", player, drawn)
                received += drawn
            arrays = array_record_from_numpy({"theta": fedavg_average(thetas, counts)})
        else:
            features, labels = [], []
            for player, content in checked:
                samples = content.array_records.get(SAMPLES_RECORD)
                if samples is None:
                    raise PlayerReplyError(f"player {player} replied without the array record {SAMPLES_RECORD!r}")
                X, y = to_numpy(samples["x"]), to_numpy(samples["y"])
                if len(X) != self._split[player] or y.shape != (self._split[player],):
                    raise PlayerReplyError(
                        f"player {player} sent features of shape {X.shape} and labels of shape {y.shape} "
                        f"for {self._split[player]} requested samples"
                    )
                self.ledger.add("train", player, len(y))
                received += len(y)
                features.append(X)
                labels.append(y)
            X_all, y_all = np.concatenate(features), np.concatenate(labels)
            attempt = self._attempt_of(checked)
            learner_rng = derive_rng(self.seed, server_round, ALL_PLAYERS, Phase.LEARNER, attempt)
            assert self.learner is not None
            fitted = self.learner.fit(X_all, y_all, learner_rng)
            arrays = hypotheses_to_record([fitted])
            self._train_metrics["train-error"] = count_errors(fitted.predict(X_all), y_all) / len(y_all)

        metrics = self._train_metrics
        metrics["round-samples"] = int(metrics.get("round-samples", 0)) + received
        metrics["p-max"] = float(self.probabilities().max()) if self.algorithm != "naive" else 1.0 / self.k
        metrics["players-sampled"] = int(np.count_nonzero(self._split))
        return arrays, MetricRecord(dict(metrics))

    @staticmethod
    def _attempt_of(checked: list[tuple[int, RecordDict]]) -> int:
        return int(checked[0][1].metric_records["train"].get("attempt", 0))  # type: ignore[arg-type]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Build the certification, test or final-evaluation requests (``config["mode"]``).

        ``test`` sends ``arrays`` (the round hypothesis) to every player still tested, or the
        running vote with ``test_target="majority"``. ``certify`` splits n_c mixture draws by
        Multinomial(n_c, p). ``final`` sends each player its final classifier: the vote of all
        round hypotheses (MW), the hypothesis of the round it passed (Blum) or the one fit (naive).
        """
        if not self.nodes:
            self.nodes = self._player_nodes(grid, 600.0)
        mode = str(config.get("mode", "test"))
        self._requests = {}
        messages = []

        if mode == "certify":
            assert isinstance(self.plan, MWPlan)
            attempt = int(config.get("attempt", 0))  # type: ignore[arg-type]
            total = certification_sample_size(self.plan.eps1, self.plan.delta, self.plan.rounds, self.certify_attempts)
            split_rng = derive_rng(self.seed, server_round, ALL_PLAYERS, Phase.CERTIFY, attempt)
            shares = split_budget(total, self.probabilities(), split_rng)
            for player, samples in enumerate(shares):
                if samples == 0:
                    continue
                settings = self._stream_config(server_round, "certify", samples, attempt)
                content = {CONFIG_RECORD: ConfigRecord(settings), HYPOTHESIS_RECORD: arrays}
                messages.append(self._message(player, content, MessageType.EVALUATE))
                self._requests[self.nodes[player]] = ("certify", int(samples))
            return messages

        if mode == "test":
            assert not isinstance(self.plan, NaivePlan)
            target = arrays
            if self.test_target == "majority":
                target = _concatenate(self.hypotheses)
            tested = list(range(self.k)) if self.algorithm == "mw" else list(self.remaining)
            for player in tested:
                settings = self._stream_config(server_round, "test", self.plan.test_samples)
                content = {CONFIG_RECORD: ConfigRecord(settings), HYPOTHESIS_RECORD: target}
                messages.append(self._message(player, content, MessageType.EVALUATE))
                self._requests[self.nodes[player]] = ("test", self.plan.test_samples)
            return messages

        if mode != "final":
            raise ValueError(f"unknown evaluation mode {mode!r}; expected certify, test or final")
        vote = _concatenate(self.hypotheses)
        for player in range(self.k):
            classifier = vote if self.algorithm == "mw" else self.hypotheses[self._final_round(player) - 1]
            settings = self._stream_config(0, "final", self.evaluation_samples)
            content = {CONFIG_RECORD: ConfigRecord(settings), HYPOTHESIS_RECORD: classifier}
            messages.append(self._message(player, content, MessageType.EVALUATE))
            self._requests[self.nodes[player]] = ("evaluate", self.evaluation_samples)
        return messages

    def _final_round(self, player: int) -> int:
        """Return the round whose hypothesis is the player's final classifier (Blum and naive)."""
        served = self.final_classifier[player]
        if served is None:
            # Never served (Blum after a wrong test): the last round's hypothesis, flagged.
            self.flagged[player] = self.algorithm == "blum_personalized"
            return len(self.hypotheses)
        return served

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Apply certification, test or final-evaluation replies; return the round's evaluation metrics so far.

        Test replies double the weight of every failing player (MW) or serve every passing one
        (Blum). Metrics: ``test-samples``, ``failures`` (players failing this round),
        ``max-weight-log2`` (max c_i), ``total-samples`` (cost so far), and the per-player
        lists ``failed`` (1, 0, or −1 when not tested) and ``failure-counts``. The final
        evaluation adds ``worst-error``, ``mean-error`` and the per-player ``client-*`` lists.
        """
        replies = list(replies)
        mode = next((name for name in ("test", "certify", "final") if replies and name in replies[0].content.metric_records), "")
        if not mode:
            raise PlayerReplyError("evaluation replies carry no 'test', 'certify' or 'final' metric record")
        checked = self._checked_replies(replies, mode)
        metrics = self._evaluate_metrics

        if mode == "certify":
            errors = sum(int(content.metric_records["certify"]["errors"]) for _, content in checked)  # type: ignore[arg-type, misc]
            total = 0
            for player, content in checked:
                drawn = int(content.metric_records["certify"]["drawn"])  # type: ignore[arg-type]
                self.ledger.add("certify", player, drawn)
                total += drawn
            assert isinstance(self.plan, MWPlan)
            self._certified = certification_passes(errors, total, self.plan.eps1)
            metrics["certify-samples"] = int(metrics.get("certify-samples", 0)) + total
            metrics["attempts"] = int(metrics.get("attempts", 0)) + 1
            metrics["certified"] = int(self._certified)
        elif mode == "test":
            self._apply_tests(server_round, checked, metrics)
        else:
            self._apply_final(checked, metrics)

        metrics["total-samples"] = self.ledger.cost()
        metrics["client-counted-samples"] = sum(
            ledger[phase] for ledger in self.client_ledgers for phase in ("train", "test", "certify")
        )
        return MetricRecord(dict(metrics))

    def _apply_tests(self, server_round: int, checked: list[tuple[int, RecordDict]], metrics: dict[str, Any]) -> None:
        assert not isinstance(self.plan, NaivePlan)
        failed = [-1] * self.k
        errors = [-1] * self.k
        for player, content in checked:
            record = content.metric_records["test"]
            errors[player] = int(record["errors"])  # type: ignore[arg-type]
            self.ledger.add("test", player, int(record["drawn"]))  # type: ignore[arg-type]
            failed[player] = int(fails_test(errors[player], self.plan.test_samples, self.plan.pass_threshold))

        # Double the weight of every failing player (MW); serve every passing one (Blum).
        for player, outcome in enumerate(failed):
            if outcome == 1:
                self.failures[player] += 1
            elif outcome == 0 and self.algorithm == "blum_personalized":
                self.final_classifier[player] = server_round
        if self.algorithm == "blum_personalized":
            self.remaining = [player for player in self.remaining if failed[player] == 1]
            metrics["remaining"] = len(self.remaining)

        metrics["test-samples"] = len(checked) * self.plan.test_samples
        metrics["failures"] = sum(1 for outcome in failed if outcome == 1)
        metrics["max-weight-log2"] = max(self.failures)
        metrics["failed"] = failed
        metrics["test-errors"] = errors
        metrics["failure-counts"] = list(self.failures)

    def _apply_final(self, checked: list[tuple[int, RecordDict]], metrics: dict[str, Any]) -> None:
        for player, content in checked:
            record = content.metric_records["final"]
            drawn = int(record["drawn"])  # type: ignore[arg-type]
            self.ledger.add("evaluate", player, drawn)
            self.final_errors[player] = int(record["errors"]) / drawn  # type: ignore[arg-type]
        errors = [float(e) for e in self.final_errors if e is not None]
        eps = self.plan.eps

        metrics["worst-error"] = max(errors)
        metrics["mean-error"] = float(np.mean(errors))
        metrics["fraction-within-eps"] = sum(1 for e in errors if e <= eps) / len(errors)
        metrics["rounds-run"] = len(self.hypotheses)
        metrics["train-samples-total"] = sum(self.ledger.counts["train"])
        metrics["test-samples-total"] = sum(self.ledger.counts["test"])
        metrics["certify-samples-total"] = sum(self.ledger.counts["certify"])
        metrics["evaluation-samples-total"] = sum(self.ledger.counts["evaluate"])
        metrics["calibration-draws"] = self.calibration_draws
        if self.single_need is not None:
            metrics["single-need"] = int(self.single_need)
            metrics["overhead-vs-single"] = self.ledger.cost() / self.single_need
        if self.naive_samples is not None:
            metrics["naive-samples"] = int(self.naive_samples)
            metrics["overhead-vs-naive"] = self.ledger.cost() / self.naive_samples

        for phase in PHASES:
            metrics[f"client-{phase}-samples"] = list(self.ledger.counts[phase])
            metrics[f"client-counted-{phase}-samples"] = [ledger[phase] for ledger in self.client_ledgers]
        metrics["client-failures"] = list(self.failures)
        metrics["client-errors"] = [float(e) if e is not None else math.nan for e in self.final_errors]
        metrics["client-flagged"] = [int(flag) for flag in self.flagged]


def _concatenate(records: Sequence[ArrayRecord]) -> ArrayRecord:
    """Merge single-hypothesis records into one ensemble record, renumbering the indices."""
    arrays: dict[str, Any] = {}
    for index, record in enumerate(records):
        for key, array in record.items():
            _, _, name = key.partition("/")
            arrays[f"{index}/{name}"] = array
    return ArrayRecord(arrays)
