"""Constants of the collaborative PAC presets, checked against hand arithmetic."""

import math

import pytest

from fedsim.pac import (
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


@pytest.mark.parametrize(
    ("k", "expected"),
    # ⌈5·log2 k⌉ by hand: log2 3 = 1.585 → 7.92, log2 5 = 2.322 → 11.61, log2 1000 = 9.966 → 49.83.
    [(1, 1), (2, 5), (3, 8), (4, 10), (5, 12), (8, 15), (16, 20), (64, 30), (1000, 50)],
)
def test_mw_rounds_table(k, expected):
    assert mw_rounds(k) == expected


def test_mw_rounds_uses_log_base_two():
    # With the natural logarithm k = 4 would give ⌈5·1.386⌉ = 7 rounds.
    assert mw_rounds(4) != math.ceil(5 * math.log(4))
    for k in range(2, 3000):
        assert mw_rounds(k) == math.ceil(5 * math.log2(k)), k


def test_mw_rounds_rejects_bad_k():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError):
            mw_rounds(bad)


@pytest.mark.parametrize(("k", "expected"), [(1, 1), (2, 2), (3, 2), (4, 3), (7, 3), (8, 4)])
def test_blum_rounds_table(k, expected):
    assert blum_rounds(k) == expected


def test_vc_bound_reference_value():
    # (8·10/0.1)·log2(130) = 800·7.0224 = 5617.9, above (4/0.1)·log2(40) = 212.9.
    assert vc_sample_bound(10, 0.1, 0.05) == 5618


def test_vc_bound_confidence_term():
    # V = 1, ε = 0.5, δ = 0.5: max(8·log2 4 = 16, 16·log2 26 = 75.2) → 76.
    assert vc_sample_bound(1, 0.5, 0.5) == 76
    # δ tiny makes the confidence term win: (4/0.5)·log2(2e12) = 8·40.86 = 326.9 → 327.
    assert vc_sample_bound(1, 0.5, 1e-12) == 327


def test_test_size_hand_arithmetic():
    # (32·60)·ln(2·4·10/0.05) = 1920·ln 1600 = 1920·7.37776 = 14165.3 → 14166.
    assert required_test_samples(4, 10, 1 / 60, 0.05) == 14166
    # Practical constant: 480·ln(2·2·5/0.1) = 480·5.29832 = 2543.2 → 2544.
    assert required_test_samples(2, 5, 0.1 / 6, 0.1, constant=8) == 2544


def test_certification_size_hand_arithmetic():
    # 128·60·ln(2·10·3/0.05) = 7680·ln 1200 = 7680·7.09008 = 54451.8 → 54452.
    assert certification_sample_size(1 / 60, 0.05, 10, 3) == 54452


def test_failure_fraction_bound_closes():
    # log2 k / T ≤ 0.2 and log2(9/8) = 0.1699, so c_i/T ≤ 0.370 for every k ≥ 2.
    for k in [2, 3, 4, 5, 16, 100, 1000, 2**20]:
        assert max_failure_fraction(k) <= 0.370, k


def test_majority_factor_below_six():
    # (1 − 0.37)/(0.5 − 0.37) = 0.63/0.13 = 4.846, so err(Maj) ≤ 4.85·ε1 < 6·ε1 = ε.
    assert majority_error_factor(0.370) == pytest.approx(0.63 / 0.13)
    assert majority_error_factor(0.370) <= 4.85


def test_natural_log_breaks_majority_bound():
    # T = 5·ln k ≈ 3.47·log2 k: c/T ≤ 1/3.47 + 0.170 = 0.458, factor 0.542/0.042 ≈ 12.9 > 6.
    fraction = 1 / (5 * math.log(2)) + math.log2(9 / 8)
    assert fraction == pytest.approx(0.458, abs=1e-3)
    assert majority_error_factor(fraction) > 6


def test_mw_plan_theory_constants():
    plan = plan_mw(4, 0.1, 0.05, preset="theory", vc_dim=10)
    assert plan.rounds == 10
    assert plan.eps1 == pytest.approx(0.1 / 6)
    assert plan.delta1 == pytest.approx(0.05 / 20)
    assert plan.learner_eps == pytest.approx(0.1 / 96)
    assert plan.test_samples == 14166
    assert plan.pass_threshold == pytest.approx(0.75 * 0.1 / 6)
    assert plan.round_samples == vc_sample_bound(10, 0.1 / 96, 0.05 / 20)


@pytest.mark.parametrize(
    ("k", "learn_millions", "test_total", "ratio"),
    # Reference rows at d = 10, ε = 0.1, δ = 0.05; test totals k·T·n_test by hand:
    # k = 16: n_test = ⌈1920·ln 12800⌉ = 18158; k = 64: ⌈1920·ln 76800⌉ = 21599.
    [
        (4, 10.5, 4 * 10 * 14166, 1961),
        (16, 20.9, 16 * 20 * 18158, 4755),
        (64, 31.4, 64 * 30 * 21599, 12962),
    ],
)
def test_mw_theory_reference_rows(k, learn_millions, test_total, ratio):
    plan = plan_mw(k, 0.1, 0.05, preset="theory", vc_dim=10)
    assert round(plan.train_budget / 1e6, 1) == learn_millions
    assert plan.test_budget == test_total
    assert round((plan.train_budget + plan.test_budget) / 5618) == ratio


def test_mw_plan_practical_constants():
    plan = plan_mw(2, 0.1, 0.1, preset="practical", round_samples=777)
    assert plan.round_samples == 777
    assert plan.rounds == 5
    assert plan.test_samples == 2544


def test_plan_preset_arguments_checked():
    with pytest.raises(ValueError, match="vc_dim"):
        plan_mw(4, 0.1, 0.05, preset="theory")
    with pytest.raises(ValueError, match="round_samples"):
        plan_mw(4, 0.1, 0.05, preset="practical")
    with pytest.raises(ValueError, match="round_samples"):
        plan_mw(4, 0.1, 0.05, preset="theory", vc_dim=3, round_samples=10)
    with pytest.raises(ValueError, match="preset"):
        plan_mw(4, 0.1, 0.05, preset="fast", round_samples=10)
    with pytest.raises(ValueError, match="eps"):
        plan_mw(4, 1.5, 0.05, preset="practical", round_samples=10)


def test_blum_plan_theory_constants():
    plan = plan_blum(4, 0.1, 0.05, preset="theory", vc_dim=10)
    assert plan.rounds == 3
    # n_test = ⌈(32/0.1)·ln(2·4·3/0.05)⌉ = ⌈320·ln 480⌉ = ⌈320·6.17379⌉ = ⌈1975.6⌉.
    assert plan.test_samples == 1976
    assert plan.round_samples == vc_sample_bound(10, 0.025, 0.05 / 12)
    assert plan.pass_threshold == pytest.approx(0.075)


def test_naive_plan_uses_delta_over_k():
    plan = plan_naive(8, 0.1, 0.05, preset="theory", vc_dim=10)
    assert plan.player_samples == vc_sample_bound(10, 0.1, 0.05 / 8)
    assert plan.train_budget == 8 * plan.player_samples
    practical = plan_naive(8, 0.1, 0.05, player_samples=300)
    assert practical.train_budget == 2400
