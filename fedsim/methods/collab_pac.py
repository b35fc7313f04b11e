"""Runner glue for collaborative PAC learning (``strategy.name: collab_pac``).

Multiplicative weights after J. Chen, Q. Zhang, Y. Zhou, "Tight Bounds for Collaborative PAC
Learning via Multiplicative Weights" (NeurIPS 2018, arXiv 1805.09217), with A. Blum,
N. Haghtalab, A. D. Procaccia, M. Qiao's personalized algorithm ("Collaborative PAC Learning",
NeurIPS 2017) and the naive baseline beside it. The strategy is
``fedsim.strategies.CollaborativePAC`` and the client ``fedsim.clients.pac``.

How the run config maps onto the algorithm:

- k = ``data.num_clients``; player i is partition i. The players' distributions are set by the
  ``strategy`` keys ``players`` (``gaussian`` or ``digits``) and their generator settings,
  which ``data.dataset`` must match (``synthetic`` or ``digits``). The rest of ``data`` and the
  ``model`` and ``client`` sections are not used.
- The algorithm fixes its rounds: T = max(1, ⌈5·log2 k⌉) for MW, at most ⌊log2 k⌋ + 1 for Blum,
  1 for naive. ``run.rounds`` must be at least that many, and the rounds beyond are not run.
  With ``allow_fewer_rounds: true`` a smaller ``run.rounds`` truncates the run (smoke tests),
  which voids the guarantee.
- Sample needs left null are measured before round 1 with :func:`fedsim.pac.measure_sample_need`
  on players built in the driver process (the same generator as the clients). Those draws
  are reported as ``calibration_draws``, apart from the algorithm's cost.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from fedsim.config import ConfigError, RunConfig, StrategySection, check_choice, check_value
from fedsim.methods.base import DataInfo, Method, register_method

__all__ = ["CollabPACSection", "player_settings", "summarize_collab_pac"]

logger = logging.getLogger(__name__)

ALGORITHMS = ("mw", "blum_personalized", "naive")
LEARNERS = ("linear", "logistic", "mlp", "perceptron", "fedavg")
PRESETS = ("practical", "theory")
PLAYER_KINDS = ("gaussian", "digits")
DATASET_OF_PLAYERS = {"gaussian": "synthetic", "digits": "digits"}
TWO_CLASS_LEARNERS = ("linear", "fedavg")
TRANSFORMATIONS = ("identity", "shift-right", "shift-down", "dim")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    check_choice(f"strategy.{key}", value, allowed)


def _require(condition: bool, key: str, value: object, expected: str) -> None:
    check_value(condition, f"strategy.{key}", value, expected)


def planned_rounds(algorithm: str, k: int) -> int:
    """Return the rounds ``algorithm`` needs for k players (at most, for Blum)."""
    from fedsim.pac import blum_rounds, mw_rounds

    if algorithm == "mw":
        return mw_rounds(k)
    if algorithm == "blum_personalized":
        return blum_rounds(k)
    return 1


@dataclass
class CollabPACSection(StrategySection):
    """Collaborative PAC's keys under ``strategy:``.

    ``round_samples`` is the learner's sample size: m_t per MW round, m_r per Blum round, samples
    per player for naive. Null means the VC bound (``preset: theory``) or a measured learning
    curve (``practical``). ``single_need`` is m_{ε,δ} of one distribution and ``naive_need`` the
    per-player m_{ε,δ/k} of the naive baseline; null measures them. ``certify_attempts`` null
    means 3 with ``learner: fedavg`` and 0 otherwise. ``players_seed`` null means ``run.seed``.
    Player keys: ``dim``, ``spread``, ``margin`` (gaussian); ``digits_per_player``,
    ``margin_quantile``, ``transformations``, ``holdout_fraction`` (digits).
    """

    name: str = "collab_pac"
    centralized_evaluation: bool = False
    algorithm: str = "mw"
    learner: str = "linear"
    preset: str = "practical"
    eps: float = 0.1
    delta: float = 0.05
    round_samples: int | None = None
    test_target: str = "round"
    evaluation_samples: int = 2000
    certify_attempts: int | None = None
    fedavg_rounds: int = 20
    fedavg_local_steps: int = 1
    fedavg_lr: float = 1.0
    single_need: int | None = None
    naive_need: int | None = None
    calibration_repeats: int = 20
    allow_fewer_rounds: bool = False
    players: str = "gaussian"
    players_seed: int | None = None
    dim: int = 10
    spread: float = 2.0
    margin: float = 0.0
    digits_per_player: int = 3
    margin_quantile: float = 0.05
    transformations: list[str] = field(default_factory=lambda: ["identity", "shift-right"])
    holdout_fraction: float = 0.2

    def resolved_certify_attempts(self) -> int:
        """Return the certification attempts per round: the key, or its default for the learner."""
        if self.certify_attempts is not None:
            return self.certify_attempts
        return 3 if self.learner == "fedavg" else 0

    def validate(self, config: RunConfig) -> None:
        """Check the keys and their combination with ``run``, ``data`` and ``backend``."""
        _choice("algorithm", self.algorithm, ALGORITHMS)
        _choice("learner", self.learner, LEARNERS)
        _choice("preset", self.preset, PRESETS)
        _choice("test_target", self.test_target, ("round", "majority"))
        _choice("players", self.players, PLAYER_KINDS)
        self._validate_numbers()
        self._validate_players(config)
        self._validate_learner()
        self._validate_run(config)

    def _validate_numbers(self) -> None:
        _require(0.0 < self.eps < 1.0, "eps", self.eps, "a target error in (0, 1)")
        _require(0.0 < self.delta < 1.0, "delta", self.delta, "a failure probability in (0, 1)")
        for key in ("round_samples", "single_need", "naive_need"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, value, "null (measure it) or a number of samples >= 1")
        _require(self.evaluation_samples >= 1, "evaluation_samples", self.evaluation_samples, "a number of samples >= 1")
        _require(self.calibration_repeats >= 1, "calibration_repeats", self.calibration_repeats, "an integer >= 1")
        if self.certify_attempts is not None:
            _require(self.certify_attempts >= 0, "certify_attempts", self.certify_attempts, "null or an integer >= 0")
        _require(self.fedavg_rounds >= 1, "fedavg_rounds", self.fedavg_rounds, "an integer >= 1")
        _require(self.fedavg_local_steps >= 1, "fedavg_local_steps", self.fedavg_local_steps, "an integer >= 1")
        _require(math.isfinite(self.fedavg_lr) and self.fedavg_lr > 0, "fedavg_lr", self.fedavg_lr, "a step size > 0")
        if self.players_seed is not None:
            _require(self.players_seed >= 0, "players_seed", self.players_seed, "null (use run.seed) or an integer >= 0")
        _require(self.fraction_train == 1.0, "fraction_train", self.fraction_train, "1.0; every player takes part in every round")
        _require(self.fraction_evaluate == 1.0, "fraction_evaluate", self.fraction_evaluate, "1.0; every player is tested")
        if self.centralized_evaluation:
            raise ConfigError(
                "invalid value for 'strategy.centralized_evaluation': True; collab_pac has no global model "
                "to evaluate centrally. Set it to false; every player reports its final error instead"
            )

    def _validate_players(self, config: RunConfig) -> None:
        expected = DATASET_OF_PLAYERS[self.players]
        if config.data.dataset != expected:
            raise ConfigError(
                f"invalid value for 'data.dataset': {config.data.dataset!r}; strategy.players={self.players!r} "
                f"needs data.dataset={expected!r}"
            )
        _require(self.dim >= 1, "dim", self.dim, "a feature dimension >= 1")
        _require(math.isfinite(self.spread) and self.spread >= 0, "spread", self.spread, "a number >= 0")
        _require(math.isfinite(self.margin) and self.margin >= 0, "margin", self.margin, "a distance >= 0")
        _require(1 <= self.digits_per_player <= 10, "digits_per_player", self.digits_per_player, "an integer in [1, 10]")
        _require(0.0 <= self.margin_quantile < 1.0, "margin_quantile", self.margin_quantile, "a fraction in [0, 1)")
        _require(0.0 < self.holdout_fraction < 1.0, "holdout_fraction", self.holdout_fraction, "a fraction in (0, 1)")
        unknown = [name for name in self.transformations if name not in TRANSFORMATIONS]
        _require(bool(self.transformations) and not unknown, "transformations", list(self.transformations), f"a non-empty list of {', '.join(TRANSFORMATIONS)}")

    def _validate_learner(self) -> None:
        if self.players == "digits" and self.learner in TWO_CLASS_LEARNERS:
            raise ConfigError(
                f"invalid value for 'strategy.learner': {self.learner!r} fits two classes, but digits players have up "
                "to 10 labels; use logistic, perceptron or mlp"
            )
        if self.learner == "fedavg" and self.algorithm != "mw":
            raise ConfigError(f"'strategy.learner' = 'fedavg' needs 'strategy.algorithm' = 'mw', got {self.algorithm!r}")
        if self.resolved_certify_attempts() > 0 and self.algorithm != "mw":
            raise ConfigError(f"'strategy.certify_attempts' > 0 needs 'strategy.algorithm' = 'mw', got {self.algorithm!r}")
        if self.preset == "theory":
            if self.round_samples is not None:
                raise ConfigError("'strategy.round_samples' must be null with preset 'theory', which derives it from the VC bound")
            if self.players != "gaussian" or self.learner == "mlp":
                raise ConfigError(
                    "preset 'theory' needs gaussian players and a linear learner (linear, logistic, perceptron or "
                    "fedavg), whose VC dimension dim + 1 is known; use preset 'practical'"
                )

    def _validate_run(self, config: RunConfig) -> None:
        k = config.data.num_clients
        needed = planned_rounds(self.algorithm, k)
        if config.run.rounds < needed and not self.allow_fewer_rounds:
            raise ConfigError(
                f"invalid value for 'run.rounds': {config.run.rounds}; algorithm {self.algorithm!r} needs {needed} rounds "
                f"for {k} players. Set run.rounds >= {needed}, or strategy.allow_fewer_rounds=true for a truncated run "
                "without the guarantee"
            )
        if config.run.checkpoint_every != 0:
            raise ConfigError("invalid value for 'run.checkpoint_every': collab_pac cannot resume a run; set it to 0")


def player_settings(config: RunConfig) -> dict[str, Any]:
    """Return the ``players`` config record the clients build their distributions from."""
    section = config.strategy
    assert isinstance(section, CollabPACSection)
    seed = config.run.seed if section.players_seed is None else section.players_seed
    settings: dict[str, Any] = {"kind": section.players, "k": config.data.num_clients, "seed": seed}
    if section.players == "gaussian":
        settings.update({"dim": section.dim, "spread": section.spread, "margin": section.margin})
    else:
        settings.update(
            {
                "digits-per-player": section.digits_per_player,
                "margin-quantile": section.margin_quantile,
                "transformations": list(section.transformations),
                "holdout-fraction": section.holdout_fraction,
            }
        )
    return settings


@dataclass(frozen=True)
class _SampleNeeds:
    round_samples: int | None
    single_need: int | None
    naive_samples: int | None
    calibration_draws: int


def _calibration_learner(learner: str) -> Any:
    from fedsim.strategies.collab_pac import build_learner

    # FedAvg trains logistic regression, so the pooled logistic learner replaces it here.
    return build_learner("logistic" if learner == "fedavg" else learner)


def _measure_needs(config: RunConfig) -> _SampleNeeds:
    """Measure the sample needs left null in the config, on players built in the driver."""
    from fedsim.clients.pac import build_distributions
    from fedsim.pac import blum_rounds, measure_sample_need, mw_rounds

    section = config.strategy
    assert isinstance(section, CollabPACSection)
    k = config.data.num_clients
    round_samples, single, naive_need = section.round_samples, section.single_need, section.naive_need
    want_round = round_samples is None and section.preset == "practical"
    if not (want_round or single is None or naive_need is None):
        return _SampleNeeds(round_samples, single, k * naive_need, 0)

    players = [distribution.player for distribution in build_distributions(player_settings(config))]
    learner = _calibration_learner(section.learner)
    draws = 0

    # NOTE: measure_sample_need tries n = 100·2^j, so a need below 100 samples is reported as 100
    # and the overhead ratios then understate the overhead.
    def measure(target: float, delta: float) -> int:
        nonlocal draws
        logger.info("measuring the sample need at error %.4g, delta %.4g on %d players", target, delta, k)
        need = measure_sample_need(players, learner, target, delta, seed=config.run.seed, repeats=section.calibration_repeats)
        draws += need.calibration_draws
        return need.samples

    if single is None:
        single = measure(section.eps, section.delta)
    if naive_need is None:
        naive_need = measure(section.eps, section.delta / k)
    if want_round:
        if section.algorithm == "mw":
            rounds = mw_rounds(k)
            round_samples = measure(section.eps / 6.0 / 16.0, section.delta / (2.0 * rounds))
        elif section.algorithm == "blum_personalized":
            round_samples = measure(section.eps / 4.0, section.delta / (4.0 * blum_rounds(k)))
        else:
            round_samples = naive_need
    return _SampleNeeds(round_samples, single, k * naive_need, draws)


def _build_collab_pac(config: RunConfig, info: DataInfo) -> Strategy:
    from fedsim.strategies import CollaborativePAC

    section = config.strategy
    assert isinstance(section, CollabPACSection)
    needs = _measure_needs(config)
    vc_dim = section.dim + 1 if section.preset == "theory" else None
    return CollaborativePAC(
        num_players=config.data.num_clients,
        algorithm=section.algorithm,
        learner=section.learner,
        eps=section.eps,
        delta=section.delta,
        preset=section.preset,
        round_samples=needs.round_samples,
        vc_dim=vc_dim,
        seed=config.run.seed,
        players=player_settings(config),
        evaluation_samples=section.evaluation_samples,
        test_target=section.test_target,
        certify_attempts=section.resolved_certify_attempts(),
        num_features=section.dim if section.players == "gaussian" else None,
        fedavg_rounds=section.fedavg_rounds,
        fedavg_local_steps=section.fedavg_local_steps,
        fedavg_lr=section.fedavg_lr,
        single_need=needs.single_need,
        naive_samples=needs.naive_samples,
        calibration_draws=needs.calibration_draws,
    )


FINAL_KEYS = (
    "worst_error",
    "mean_error",
    "fraction_within_eps",
    "rounds_run",
    "total_samples",
    "train_samples_total",
    "test_samples_total",
    "certify_samples_total",
    "evaluation_samples_total",
    "calibration_draws",
    "single_need",
    "naive_samples",
    "overhead_vs_single",
    "overhead_vs_naive",
)

CLIENT_COLUMNS = {
    "train_samples": "client_train_samples",
    "test_samples": "client_test_samples",
    "certify_samples": "client_certify_samples",
    "evaluation_samples": "client_evaluate_samples",
    "counted_train_samples": "client_counted_train_samples",
    "counted_test_samples": "client_counted_test_samples",
    "counted_certify_samples": "client_counted_certify_samples",
    "counted_evaluation_samples": "client_counted_evaluate_samples",
    "failures": "client_failures",
    "final_error": "client_errors",
    "flagged": "client_flagged",
}


def summarize_collab_pac(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Add ``summary["collab_pac"]`` (totals, errors, overhead ratios) and ``summary["clients"]``.

    The numbers come from the last row, which the final evaluation fills. ``clients`` has one
    entry per player: samples by phase as the server received them and as the player counted
    them, failed tests, final weight 2^failures and final error. A run that stopped before its
    final evaluation gets neither key.
    """
    last = rows[-1] if rows else {}
    if "worst_error" not in last:
        return
    report = {key: last[key] for key in FINAL_KEYS if key in last}
    report["bytes_up"] = summary.get("bytes_up", 0)
    report["bytes_down"] = summary.get("bytes_down", 0)
    summary["collab_pac"] = report
    summary["total_samples"] = last["total_samples"]
    summary["worst_client_error"] = last["worst_error"]
    summary["mean_client_error"] = last["mean_error"]

    clients = []
    for player in range(len(last["client_failures"])):
        entry = {"partition_id": player}
        for name, column in CLIENT_COLUMNS.items():
            entry[name] = last[column][player]
        entry["flagged"] = bool(entry["flagged"])
        entry["final_weight"] = 2 ** int(entry["failures"])
        clients.append(entry)
    summary["clients"] = clients


register_method(
    Method(
        name="collab_pac",
        section=CollabPACSection,
        summary="collaborative PAC learning with multiplicative weights (Chen et al. 2018), Blum et al. 2017, naive",
        client_app="fedsim.clients.pac:app",
        build_strategy=_build_collab_pac,
        initial_arrays=lambda config, info: ArrayRecord(),
        summarize=summarize_collab_pac,
        plot_columns=("failures", "max_weight_log2", "total_samples", "round_samples"),
    )
)
