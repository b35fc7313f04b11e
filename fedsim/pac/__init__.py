"""Collaborative PAC learning: multiplicative weights, Blum et al.'s algorithm, a naive baseline.

k players each hold a distribution D_i labelled by one target f* of VC dimension d. The goal
is one classifier with error ≤ ε on every D_i, with probability ≥ 1 − δ, from few samples.

- J. Chen, Q. Zhang, Y. Zhou, "Tight Bounds for Collaborative PAC Learning via Multiplicative
  Weights", NeurIPS 2018, arXiv:1805.09217. The server keeps a weight 2^{c_i} per player,
  learns each round's hypothesis from the weight-proportional mixture, doubles the weight of
  players where it fails a test, and outputs the majority vote: :func:`run_mw`.
- A. Blum, N. Haghtalab, A. D. Procaccia, M. Qiao, "Collaborative PAC Learning", NeurIPS 2017.
  The personalized algorithm learns on the uniform mixture of the players
  not yet served and serves those who pass: :func:`run_blum_personalized`.
- The naive baseline learns one consistent hypothesis from m_{ε,δ/k} samples of every
  player: :func:`run_naive`.

Constants come from :mod:`fedsim.pac.plan` (presets ``theory`` and ``practical``). Everything
here is arrays in, arrays out: no Flower, no Ray, no file I/O.
"""

from fedsim.pac.algorithms import (
    Hypothesis,
    Learner,
    MajorityVote,
    Player,
    PlayerResult,
    RoundRecord,
    RunResult,
    SampleLedger,
    run_blum_personalized,
    run_mw,
    run_naive,
)
from fedsim.pac.core import (
    Phase,
    count_errors,
    derive_rng,
    fails_test,
    plurality_vote,
    probabilities_from_failures,
    split_budget,
    weights_from_failures,
)
from fedsim.pac.data import (
    GaussianPlayer,
    PoolPlayer,
    make_digits_players,
    make_gaussian_players,
)
from fedsim.pac.federated import (
    certification_passes,
    fedavg_average,
    fedavg_round,
    local_gradient_descent,
    logistic_gradient,
)
from fedsim.pac.learners import (
    ConstantClassifier,
    LinearClassifier,
    LinearSeparatorLearner,
    LogisticRegressionLearner,
    MLPLearner,
    NotConsistentError,
    PerceptronLearner,
)
from fedsim.pac.measure import OverheadRatios, SampleNeed, measure_sample_need, overhead_ratios
from fedsim.pac.plan import (
    BlumPlan,
    MWPlan,
    NaivePlan,
    Preset,
    blum_rounds,
    certification_sample_size,
    majority_error_factor,
    max_failure_fraction,
    mw_rounds,
    plan_blum,
    plan_mw,
    plan_naive,
    required_test_samples,
    vc_sample_bound,
)

__all__ = [
    "BlumPlan",
    "ConstantClassifier",
    "GaussianPlayer",
    "Hypothesis",
    "Learner",
    "LinearClassifier",
    "LinearSeparatorLearner",
    "LogisticRegressionLearner",
    "MLPLearner",
    "MWPlan",
    "MajorityVote",
    "NaivePlan",
    "NotConsistentError",
    "OverheadRatios",
    "PerceptronLearner",
    "Phase",
    "Player",
    "PlayerResult",
    "PoolPlayer",
    "Preset",
    "RoundRecord",
    "RunResult",
    "SampleLedger",
    "SampleNeed",
    "blum_rounds",
    "certification_passes",
    "certification_sample_size",
    "count_errors",
    "derive_rng",
    "fails_test",
    "fedavg_average",
    "fedavg_round",
    "local_gradient_descent",
    "logistic_gradient",
    "majority_error_factor",
    "make_digits_players",
    "make_gaussian_players",
    "max_failure_fraction",
    "measure_sample_need",
    "mw_rounds",
    "overhead_ratios",
    "plan_blum",
    "plan_mw",
    "plan_naive",
    "plurality_vote",
    "probabilities_from_failures",
    "required_test_samples",
    "run_blum_personalized",
    "run_mw",
    "run_naive",
    "split_budget",
    "vc_sample_bound",
    "weights_from_failures",
]
