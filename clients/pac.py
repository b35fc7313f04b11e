"""Client of collaborative PAC learning: a player that draws fresh samples from its distribution.

The players follow J. Chen, Q. Zhang, Y. Zhou, "Tight Bounds for Collaborative PAC Learning via
Multiplicative Weights" (NeurIPS 2018, arXiv 1805.09217) and A. Blum, N. Haghtalab,
A. D. Procaccia, M. Qiao, "Collaborative PAC Learning" (NeurIPS 2017): each player is a sample
oracle EX(D_i) and handles the requests of ``fedsim.strategies.CollaborativePAC``.

Player i is partition i. It builds its distribution from the config record ``players`` of the
request, once per process (``kind``, ``k``, ``seed`` and the generator's settings):

- ``gaussian``: player i of :func:`fedsim.pac.make_gaussian_players` (``dim``, ``spread``,
  ``margin``), labelled by one linear separator.
- ``digits``: player i of :func:`fedsim.pac.make_digits_players` (``digits-per-player``,
  ``margin-quantile``, ``transformations``), relabelled by a linear reference model. A seeded
  fraction ``holdout-fraction`` of its pool is held out for the final evaluation, and every
  other draw samples the rest with replacement.

Requests (config record ``config``: ``mode``, ``seed``, ``round``, ``attempt``, ``samples``):

- train, ``draw``: reply with ``samples`` fresh labelled samples (array record ``samples``:
  ``x`` float64 (n, d), ``y`` int64 (n,)).
- train, ``fedavg``: run ``local-steps`` full-batch gradient steps of logistic regression from
  the received θ (array record ``arrays``, key ``theta``) on the round's samples, reply with θ.
- evaluate, ``test`` / ``certify``: count the errors of the received classifier (array record
  ``hypothesis``, a vote when it contains several) on ``samples`` fresh samples.
- evaluate, ``final``: the same on the held-out split, or on ``samples`` fresh draws.

Every draw uses the stream ``derive_rng(seed, round, partition, phase, attempt)``. The player
counts what it drew per phase in ``context.state`` and reports the running totals with every
reply (``ledger-train``, ``ledger-test``, ``ledger-certify``, ``ledger-evaluate``). A FedAvg fit
draws the same samples in every FedAvg round of one attempt, and they are counted once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fedsim.clients.common import new_client_app, partition_id
from fedsim.strategies.collab_pac import majority_of
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from numpy.typing import NDArray

from fedsim.pac import (
    Phase,
    PoolPlayer,
    count_errors,
    derive_rng,
    make_digits_players,
    make_gaussian_players,
)
from fedsim.pac.algorithms import Player
from fedsim.pac.federated import local_gradient_descent
from fedsim.records import array_record_from_numpy, to_numpy

__all__ = ["LocalDistribution", "app", "build_distributions", "local_distribution"]

logger = logging.getLogger(__name__)

app = new_client_app()

LEDGER_STATE = "pac-ledger"
LEDGER_PHASES = ("train", "test", "certify", "evaluate")
PHASE_OF_MODE = {"draw": Phase.TRAIN, "fedavg": Phase.TRAIN, "test": Phase.TEST, "certify": Phase.CERTIFY, "final": Phase.EVALUATE}
LEDGER_OF_MODE = {"draw": "train", "fedavg": "train", "test": "test", "certify": "certify", "final": "evaluate"}


@dataclass(frozen=True)
class LocalDistribution:
    """One player's sample oracle and, for finite pools, its held-out split (features, labels)."""

    player: Player
    holdout: tuple[NDArray, NDArray[np.int64]] | None = None


def _split_pool(player: PoolPlayer, fraction: float, seed: int, index: int) -> LocalDistribution:
    """Hold out a seeded fraction of a pool for evaluation; the rest stays the sample oracle."""
    rng = derive_rng(seed, 0, index, Phase.SPLIT)
    order = rng.permutation(len(player.labels))
    holdout_size = max(1, int(round(fraction * len(order))))
    if holdout_size >= len(order):
        raise ValueError(f"player {player.name!r}: holdout-fraction {fraction} leaves no samples to draw from")
    holdout_index, draw_index = np.sort(order[:holdout_size]), np.sort(order[holdout_size:])
    oracle = PoolPlayer(player.features[draw_index], player.labels[draw_index], name=player.name)
    return LocalDistribution(oracle, (player.features[holdout_index], player.labels[holdout_index]))


def build_distributions(settings: Mapping[str, Any]) -> list[LocalDistribution]:
    """Build all k players' distributions from the ``players`` settings of a request."""
    kind = str(settings.get("kind", "gaussian"))
    k = int(settings["k"])
    seed = int(settings.get("seed", 0))
    if kind == "gaussian":
        players = make_gaussian_players(
            k,
            int(settings.get("dim", 10)),
            seed=seed,
            spread=float(settings.get("spread", 2.0)),
            margin=float(settings.get("margin", 0.0)),
        )
        return [LocalDistribution(player) for player in players]
    if kind == "digits":
        pools, _ = make_digits_players(
            k,
            digits_per_player=int(settings.get("digits-per-player", 3)),
            margin_quantile=float(settings.get("margin-quantile", 0.05)),
            transformations=tuple(str(name) for name in settings.get("transformations", ("identity",))),
        )
        fraction = float(settings.get("holdout-fraction", 0.2))
        return [_split_pool(pool, fraction, seed, index) for index, pool in enumerate(pools)]
    raise ValueError(f"unknown player kind {kind!r}; expected 'gaussian' or 'digits'")


_DISTRIBUTIONS: dict[str, list[LocalDistribution]] = {}
_DISTRIBUTIONS_LOCK = threading.Lock()


def local_distribution(settings: Mapping[str, Any], partition: int) -> LocalDistribution:
    """Return partition ``partition``'s distribution, building all players once per process."""
    key = json.dumps(dict(settings), sort_keys=True)
    with _DISTRIBUTIONS_LOCK:
        distributions = _DISTRIBUTIONS.get(key)
        if distributions is None:
            if len(_DISTRIBUTIONS) >= 4:
                _DISTRIBUTIONS.clear()
            distributions = _DISTRIBUTIONS[key] = build_distributions(settings)
    if not 0 <= partition < len(distributions):
        raise ValueError(f"partition {partition} has no player: the settings define {len(distributions)} players")
    return distributions[partition]


def _ledger(context: Context) -> ConfigRecord:
    if LEDGER_STATE not in context.state.config_records:
        context.state.config_records[LEDGER_STATE] = ConfigRecord({**dict.fromkeys(LEDGER_PHASES, 0), "train-key": ""})
    return context.state.config_records[LEDGER_STATE]


def _reply_metrics(context: Context, partition: int, mode: str, drawn: int, **extra: int) -> MetricRecord:
    """Count ``drawn`` samples under the mode's phase and return the reply's metrics."""
    ledger = _ledger(context)
    phase = LEDGER_OF_MODE[mode]
    ledger[phase] = int(ledger[phase]) + int(drawn)  # type: ignore[arg-type]
    metrics: dict[str, int | float | list[int] | list[float]] = {"partition-id": partition, "drawn": int(drawn), **extra}
    metrics.update({f"ledger-{name}": int(ledger[name]) for name in LEDGER_PHASES})  # type: ignore[arg-type]
    return MetricRecord(metrics)


def _request(message: Message) -> tuple[Mapping[str, Any], dict[str, Any]]:
    settings = dict(message.content.config_records["players"])
    config = dict(message.content.config_records["config"])
    return settings, config


def _draw(distribution: LocalDistribution, config: Mapping[str, Any], partition: int) -> tuple[NDArray, NDArray]:
    mode = str(config["mode"])
    samples = int(config["samples"])
    rng = derive_rng(int(config["seed"]), int(config["round"]), partition, PHASE_OF_MODE[mode], int(config.get("attempt", 0)))
    X, y = distribution.player.draw(samples, rng)
    return np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Draw the requested training samples and send them (``draw``) or train on them (``fedavg``)."""
    settings, config = _request(message)
    partition = partition_id(context)
    distribution = local_distribution(settings, partition)
    mode = str(config["mode"])
    attempt = int(config.get("attempt", 0))
    X, y = _draw(distribution, config, partition)

    if mode == "draw":
        metrics = _reply_metrics(context, partition, mode, len(y), attempt=attempt)
        samples = array_record_from_numpy({"x": X, "y": y})
        return Message(RecordDict({"samples": samples, "train": metrics}), reply_to=message)
    if mode != "fedavg":
        raise ValueError(f"unknown train mode {mode!r}; expected 'draw' or 'fedavg'")

    # The FedAvg rounds of one attempt redraw the same samples from the same stream: count them once.
    ledger = _ledger(context)
    draw_key = f"{config['round']}:{attempt}"
    drawn = 0 if ledger["train-key"] == draw_key else len(y)
    ledger["train-key"] = draw_key

    theta = to_numpy(message.content.array_records["arrays"]["theta"])
    theta = local_gradient_descent(theta, X, y, float(config["lr"]), int(config["local-steps"]))
    metrics = _reply_metrics(context, partition, mode, drawn, attempt=attempt)
    return Message(RecordDict({"arrays": array_record_from_numpy({"theta": theta}), "train": metrics}), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Count the errors of the received classifier on fresh samples (or the held-out split)."""
    settings, config = _request(message)
    partition = partition_id(context)
    distribution = local_distribution(settings, partition)
    mode = str(config["mode"])
    if mode not in ("test", "certify", "final"):
        raise ValueError(f"unknown evaluate mode {mode!r}; expected 'test', 'certify' or 'final'")
    classifier = majority_of(message.content.array_records["hypothesis"])

    if mode == "final" and distribution.holdout is not None:
        X, y = distribution.holdout
    else:
        X, y = _draw(distribution, config, partition)
    errors = count_errors(classifier.predict(X), y)

    metrics = _reply_metrics(context, partition, mode, len(y), errors=errors)
    return Message(RecordDict({mode: metrics}), reply_to=message)
