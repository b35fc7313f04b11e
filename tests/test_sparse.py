"""Tests of the SpaFL maths in fedsim.sparse (arXiv 2406.00431).

Expected values come from hand arithmetic written out in each test or from an independent
computation (a plain dense layer, a numpy recursion), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from fedsim.models import build_model
from fedsim.sparse import (
    MaskedConv2d,
    MaskedLinear,
    all_param_density,
    apply_threshold_update,
    dense_layer_macs,
    density_report,
    forward_macs,
    get_local_state,
    get_thresholds,
    layer_densities,
    masked_layers,
    mean_layer_density,
    mean_thresholds,
    param_density,
    reset_collapsed_thresholds,
    set_local_state,
    set_thresholds,
    sign_changes,
    sum_threshold_deltas,
    threshold_delta,
    threshold_parameters,
    threshold_penalty,
    threshold_step,
    threshold_weight_update,
    to_masked,
    train_step_macs,
    warmup_coefficient,
)

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None)

LENET_SHAPE = (1, 28, 28)
CONV4_SHAPE = (3, 32, 32)


def masked_lenet5(seed: int = 0) -> nn.Module:
    return to_masked(build_model("lenet5", LENET_SHAPE, 10, seed=seed))


def masked_conv4(seed: int = 0) -> nn.Module:
    return to_masked(build_model("conv4", CONV4_SHAPE, 10, seed=seed))


def tiny_layer(kind: str, ste: str = "identity") -> tuple[nn.Module, torch.Tensor]:
    """Return a float64 masked layer and an input batch for it."""
    generator = torch.Generator().manual_seed(7)
    if kind == "linear":
        layer = MaskedLinear(5, 4, ste=ste, dtype=torch.float64)
        inputs = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    else:
        layer = MaskedConv2d(2, 3, 3, ste=ste, dtype=torch.float64)
        inputs = torch.randn(2, 2, 5, 5, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(
            torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
        )
    return layer, inputs


def nonlinear_loss(output: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 2.0, output.numel(), dtype=output.dtype).view_as(output)
    return (weights * output).sum() + 0.5 * (output**2).sum()


def prune_unit_one(layer: nn.Module) -> None:
    """Switch unit 1 off and give the other units positive thresholds below their scores."""
    with torch.no_grad():
        magnitude = layer.weight.abs().flatten(1).mean(dim=1)
        layer.threshold.copy_(0.5 * magnitude)
        layer.threshold[1] = magnitude[1] + 0.1


# Gradients of the mask and the surrogate step


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_threshold_gradient_is_minus_importance(kind: str) -> None:
    layer, inputs = tiny_layer(kind)
    prune_unit_one(layer)
    mask = layer.active_units().to(torch.float64)
    assert mask.tolist()[1] == 0.0
    assert mask.sum() == layer.weight.shape[0] - 1

    nonlinear_loss(layer(inputs)).backward()

    # Expected: ∂L/∂τ_i = −Σ_j g_ij w_ij and ∂L/∂w_ij = m_i g_ij + sign(w_ij)/d Σ_j' g_ij' w_ij',
    # with g = ∂L/∂w̃ computed independently, w̃ = m·w being a leaf of a plain dense layer.
    view = (-1,) + (1,) * (layer.weight.dim() - 1)
    masked = (mask.view(view) * layer.weight).detach().requires_grad_(True)
    if kind == "linear":
        dense_output = F.linear(inputs, masked)
    else:
        dense_output = F.conv2d(inputs, masked)
    nonlinear_loss(dense_output).backward()
    g = masked.grad
    weight = layer.weight.detach()
    fan_in = weight[0].numel()

    importance = (g * weight).flatten(1).sum(dim=1)
    expected_tau_grad = -importance
    expected_weight_grad = mask.view(view) * g + torch.sign(weight) / fan_in * importance.view(view)

    torch.testing.assert_close(layer.threshold.grad, expected_tau_grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, expected_weight_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_broadcast_mask_equals_replicated_mask(kind: str) -> None:
    layer, inputs = tiny_layer(kind)
    prune_unit_one(layer)
    nonlinear_loss(layer(inputs)).backward()
    broadcast_weight_grad = layer.weight.grad.clone()
    broadcast_tau_grad = layer.threshold.grad.clone()

    weight = layer.weight.detach().clone().requires_grad_(True)
    tau = layer.threshold.detach().clone().requires_grad_(True)
    view = (-1,) + (1,) * (weight.dim() - 1)
    score = weight.abs().flatten(1).mean(dim=1) - tau
    replicated_mask = threshold_step(score.view(view).expand_as(weight).clone())
    masked = replicated_mask * weight
    if kind == "linear":
        output = F.linear(inputs, masked)
    else:
        output = F.conv2d(inputs, masked)
    nonlinear_loss(output).backward()

    torch.testing.assert_close(broadcast_weight_grad, weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(broadcast_tau_grad, tau.grad, rtol=0, atol=1e-12)


def test_cifar_code_ste_zero_threshold_gradients() -> None:
    dense = build_model("mlp", (64,), 10, seed=3).double()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, nn.Linear):
                module.bias.zero_()
    model = to_masked(dense, ste="cifar_code")
    for layer in masked_layers(model).values():
        assert torch.all(layer.score().abs() < 1)
        assert torch.all(layer.active_units())

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8, 64, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (8,), generator=generator)
    alpha = 0.002
    round_index = 1
    loss = F.cross_entropy(model(inputs), labels) + threshold_penalty(model, alpha, round_index)
    loss.backward()
    F.cross_entropy(dense(inputs), labels).backward()

    # At τ = 0 only the regulariser reaches τ: ∂/∂τ_i = −α·c(1)·exp(0).
    regulariser_grad = -alpha * (1.0 / (1.0 + math.exp(5.0 - 10.0)))
    dense_linears = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    for layer, reference in zip(masked_layers(model).values(), dense_linears, strict=True):
        expected_tau_grad = torch.full_like(layer.threshold, regulariser_grad)
        torch.testing.assert_close(layer.threshold.grad, expected_tau_grad, rtol=0, atol=1e-15)
        torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=0, atol=1e-12)


def test_identity_ste_task_loss_reaches_thresholds() -> None:
    model = to_masked(build_model("mlp", (64,), 10, seed=3), ste="identity")
    inputs = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    F.cross_entropy(model(inputs), labels).backward()
    for layer in masked_layers(model).values():
        assert layer.threshold.grad.abs().max() > 0


def test_clipped_ste_blocks_large_scores() -> None:
    score = torch.tensor([-2.0, -0.5, 0.5, 2.0], requires_grad=True)
    threshold_step(score, "clipped").sum().backward()
    assert score.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_invalid_ste_mode_rejected() -> None:
    with pytest.raises(ValueError, match="ste mode"):
        MaskedLinear(3, 2, ste="sigmoid")


# Regulariser and warm-up


def test_warmup_coefficient_reference_values() -> None:
    # The reference values have 7 decimals, so they agree to within half a unit of the 7th.
    assert warmup_coefficient(0) == pytest.approx(0.0066929, abs=5e-8)
    assert warmup_coefficient(1) == pytest.approx(0.9933071, abs=5e-8)
    assert warmup_coefficient(0) == pytest.approx(1 / (1 + math.exp(5)), rel=1e-12)
    assert warmup_coefficient(1) == pytest.approx(1 / (1 + math.exp(-5)), rel=1e-12)
    assert warmup_coefficient(1, period=2.0) == 0.5
    with pytest.raises(ValueError, match="round_index"):
        warmup_coefficient(-1)


@pytest.mark.parametrize("warmup", [True, False])
def test_regulariser_only_sgd_trajectory(warmup: bool) -> None:
    model = nn.Sequential(
        MaskedLinear(4, 3, dtype=torch.float64), MaskedLinear(3, 2, dtype=torch.float64)
    )
    start = {"0": np.array([0.3, -0.2, 0.0]), "1": np.array([1.0, -1.5])}
    set_thresholds(model, start)
    weights_before = [layer.weight.detach().clone() for layer in masked_layers(model).values()]
    lr, alpha, round_index = 0.5, 0.1, 0
    optimizer = torch.optim.SGD(
        [
            {"params": [layer.weight for layer in masked_layers(model).values()], "lr": 0.0},
            {"params": threshold_parameters(model), "lr": lr},
        ],
        momentum=0.0,
    )

    coefficient = 1.0 / (1.0 + math.exp(5.0)) if warmup else 1.0
    expected = {name: values.copy() for name, values in start.items()}
    for _ in range(6):
        optimizer.zero_grad()
        threshold_penalty(model, alpha, round_index, warmup=warmup).backward()
        optimizer.step()
        for name in expected:
            expected[name] = expected[name] + lr * alpha * coefficient * np.exp(-expected[name])

    for name, layer in masked_layers(model).items():
        np.testing.assert_allclose(
            layer.threshold.detach().numpy(), expected[name], rtol=0, atol=1e-14
        )
    for layer, before in zip(masked_layers(model).values(), weights_before, strict=True):
        assert torch.equal(layer.weight, before)


# Threshold-change weight update, by hand
#
# Linear weight W (2×3), Δτ = (0.3, −0.6). Fan-in and the official divisor are both 3.
#   elementwise: row 0 moves by −0.1·sign(w), row 1 by +0.2·sign(w).
#   rowsum: row 0 sums to 1.25 (sign +1), so it moves by −0.1. Row 1 sums to −0.75 (sign −1),
#   so it moves by −(−0.6)(−1)/3 = −0.2.
LINEAR_WEIGHT = [[0.5, -0.25, 1.0], [-2.0, 0.75, 0.5]]
LINEAR_DELTA = [0.3, -0.6]
LINEAR_EXPECTED = {
    "elementwise": [[0.4, -0.15, 0.9], [-2.2, 0.95, 0.7]],
    "rowsum": [[0.4, -0.35, 0.9], [-2.2, 0.55, 0.3]],
}


@pytest.mark.parametrize("sign_mode", ["elementwise", "rowsum"])
@pytest.mark.parametrize("divisor", ["fan_in", "official"])
def test_update_linear_hand_values(sign_mode: str, divisor: str) -> None:
    weight = torch.tensor(LINEAR_WEIGHT, dtype=torch.float64)
    updated = threshold_weight_update(
        weight, torch.tensor(LINEAR_DELTA, dtype=torch.float64), sign_mode, divisor
    )
    expected = torch.tensor(LINEAR_EXPECTED[sign_mode], dtype=torch.float64)
    torch.testing.assert_close(updated, expected, rtol=0, atol=1e-12)


def conv_weight() -> torch.Tensor:
    """Return a 2×2×3×3 weight: filter 0 is 0.5 / −0.3 per channel with one zero, filter 1 0.2 / −0.4."""
    weight = torch.empty(2, 2, 3, 3, dtype=torch.float64)
    weight[0, 0] = 0.5
    weight[0, 0, 1, 1] = 0.0
    weight[0, 1] = -0.3
    weight[1, 0] = 0.2
    weight[1, 1] = -0.4
    return weight


# Conv weight from conv_weight(), Δτ = (1.8, −0.9). Fan-in d = 2·3·3 = 18, official d = 3·3 = 9.
# Step sizes Δ/d: fan_in 0.1 and −0.05, official 0.2 and −0.1.
# Row sums: filter 0 is 8·0.5 − 9·0.3 = 1.3 (sign +1), filter 1 is 9·0.2 − 9·0.4 = −1.8 (sign −1).
# Each case lists (filter 0 channel 0, the zero entry, filter 0 channel 1, filter 1 channel 0,
# filter 1 channel 1).
CONV_EXPECTED = {
    # sign(w): filter 0 shrinks by 0.1, the zero stays, filter 1 grows by 0.05.
    ("elementwise", "fan_in"): (0.4, 0.0, -0.2, 0.25, -0.45),
    ("elementwise", "official"): (0.3, 0.0, -0.1, 0.3, -0.5),
    # sign(row sum): filter 0 moves by −0.1, filter 1 by −(−0.9)(−1)/18 = −0.05.
    ("rowsum", "fan_in"): (0.4, -0.1, -0.4, 0.15, -0.45),
    ("rowsum", "official"): (0.3, -0.2, -0.5, 0.1, -0.5),
}


@pytest.mark.parametrize(("sign_mode", "divisor"), list(CONV_EXPECTED))
def test_update_conv_hand_values(sign_mode: str, divisor: str) -> None:
    updated = threshold_weight_update(
        conv_weight(), torch.tensor([1.8, -0.9], dtype=torch.float64), sign_mode, divisor
    )
    channel0, zero_entry, channel1, filter1_channel0, filter1_channel1 = CONV_EXPECTED[
        (sign_mode, divisor)
    ]
    expected = torch.empty(2, 2, 3, 3, dtype=torch.float64)
    expected[0, 0] = channel0
    expected[0, 0, 1, 1] = zero_entry
    expected[0, 1] = channel1
    expected[1, 0] = filter1_channel0
    expected[1, 1] = filter1_channel1
    torch.testing.assert_close(updated, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sign_mode", ["elementwise", "rowsum"])
@pytest.mark.parametrize("divisor", ["fan_in", "official"])
def test_zero_delta_is_identity(sign_mode: str, divisor: str) -> None:
    model = masked_conv4()
    before = get_local_state(model)
    zeros = {name: np.zeros_like(values) for name, values in get_thresholds(model).items()}
    apply_threshold_update(model, zeros, sign_mode, divisor)
    after = get_local_state(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


def test_apply_update_matches_tensor_rule() -> None:
    model = masked_lenet5()
    rng = np.random.default_rng(0)
    delta = {
        name: rng.normal(0, 0.01, v.shape).astype(np.float32)
        for name, v in get_thresholds(model).items()
    }
    expected = {}
    for name, layer in masked_layers(model).items():
        weight = layer.weight.detach().clone()
        fan_in = weight[0].numel()
        for unit in range(weight.shape[0]):
            weight[unit] -= float(delta[name][unit]) * torch.sign(weight[unit]) / fan_in
        expected[name] = weight
    apply_threshold_update(model, delta)
    for name, layer in masked_layers(model).items():
        torch.testing.assert_close(layer.weight.detach(), expected[name], rtol=0, atol=1e-7)


def test_apply_update_rejects_wrong_keys_and_shapes() -> None:
    model = masked_lenet5()
    delta = {name: np.zeros_like(v) for name, v in get_thresholds(model).items()}
    before = get_local_state(model)
    with pytest.raises(ValueError, match="missing"):
        apply_threshold_update(model, {k: v for k, v in delta.items() if k != "0"})
    # Layer "0" comes first and is valid, so it would change if validation came too late.
    wrong_shape = dict(delta)
    wrong_shape["0"] = np.ones(20, dtype=np.float32)
    wrong_shape["9"] = np.ones(11, dtype=np.float32)
    with pytest.raises(ValueError, match="shape"):
        apply_threshold_update(model, wrong_shape)
    after = get_local_state(model)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])


# Masks and densities


def test_zero_threshold_gives_full_density() -> None:
    model = masked_conv4()
    report = density_report(model)
    assert report.param == 1.0
    assert report.all_param == 1.0
    assert report.layer_mean == 1.0
    assert set(report.per_layer.values()) == {1.0}


def test_all_zero_row_is_pruned() -> None:
    layer = MaskedLinear(3, 2)
    with torch.no_grad():
        layer.weight[0] = 0.0
    assert layer.score()[0].item() == 0.0
    assert layer.active_units().tolist() == [False, True]
    output = layer(torch.ones(1, 3))
    assert output[0, 0].item() == 0.0


def test_densities_with_pruned_units_by_hand() -> None:
    model = masked_lenet5()
    with torch.no_grad():
        masked_layers(model)["7"].threshold[:250] = 10.0
    # Layer "7" has 500 units of 800 weights. Masked weights: 500 + 25,000 + 400,000 + 5,000.
    total = 20 * 25 + 50 * 500 + 500 * 800 + 10 * 500
    assert total == 430_500
    assert param_density(model) == pytest.approx((total - 250 * 800) / total, abs=1e-15)
    assert mean_layer_density(model) == pytest.approx((1 + 1 + 0.5 + 1) / 4, abs=1e-15)
    assert layer_densities(model)["7"] == 0.5
    assert all_param_density(model) == param_density(model)


def test_all_param_density_counts_batch_norm() -> None:
    model = masked_conv4()
    with torch.no_grad():
        masked_layers(model)["19"].threshold.fill_(10.0)
    masked_weights = (
        3 * 25 * 64
        + 64 * 25 * 64
        + 64 * 25 * 128
        + 128 * 25 * 128
        + 512 * 128
        + 128 * 128
        + 128 * 10
    )
    assert masked_weights == 804_800
    batch_norm_affine = 2 * (64 + 64 + 128 + 128)
    expected = (masked_weights - 1280 + batch_norm_affine) / (masked_weights + batch_norm_affine)
    assert all_param_density(model) == pytest.approx(expected, abs=1e-15)
    assert param_density(model) == pytest.approx(
        (masked_weights - 1280) / masked_weights, abs=1e-15
    )


def test_collapse_reset_restores_layer() -> None:
    model = masked_lenet5()
    with torch.no_grad():
        masked_layers(model)["3"].threshold.fill_(5.0)
        masked_layers(model)["7"].threshold[:100] = 5.0
    assert layer_densities(model)["3"] == 0.0

    assert reset_collapsed_thresholds(model) == 1
    assert torch.all(masked_layers(model)["3"].threshold == 0)
    assert layer_densities(model)["3"] == 1.0
    assert layer_densities(model)["7"] == 0.8
    assert reset_collapsed_thresholds(model) == 0


def test_collapse_reset_boundary_is_inclusive() -> None:
    layer = MaskedLinear(4, 100)
    model = nn.Sequential(layer)
    with torch.no_grad():
        layer.threshold[1:] = 5.0
    assert layer_densities(model)["0"] == 0.01
    assert reset_collapsed_thresholds(model, min_density=0.01) == 1


# Multiply-accumulate counts and threshold counts


def test_lenet5_dense_macs_and_thresholds() -> None:
    model = masked_lenet5()
    macs = dense_layer_macs(model, LENET_SHAPE)
    # conv 1→20 5×5 on 28×28 gives 24×24, pool 12×12, conv 20→50 gives 8×8, pool 4×4.
    assert macs == {"0": 20 * 24 * 24 * 25, "3": 50 * 8 * 8 * 500, "7": 500 * 800, "9": 10 * 500}
    assert forward_macs(model, macs) == 2_293_000
    assert sum(v.size for v in get_thresholds(model).values()) == 580


def test_conv4_dense_macs_and_thresholds() -> None:
    model = masked_conv4()
    model.train()
    running_mean = model[1].running_mean.clone()
    macs = dense_layer_macs(model, CONV4_SHAPE)
    # 32 → 28 → 24, pool 12 → 8 → 4, pool 2, so the flattened size is 128·2·2 = 512.
    assert macs == {
        "0": 64 * 28 * 28 * 75,
        "3": 64 * 24 * 24 * 1600,
        "7": 128 * 8 * 8 * 1600,
        "10": 128 * 4 * 4 * 3200,
        "15": 128 * 512,
        "17": 128 * 128,
        "19": 10 * 128,
    }
    assert forward_macs(model, macs) == 82_489_600
    assert sum(v.size for v in get_thresholds(model).values()) == 650
    assert model.training
    assert torch.equal(model[1].running_mean, running_mean)


def test_forward_macs_follow_active_units() -> None:
    model = masked_lenet5()
    macs = dense_layer_macs(model, LENET_SHAPE)
    with torch.no_grad():
        masked_layers(model)["0"].threshold[:5] = 10.0
        masked_layers(model)["7"].threshold[:100] = 10.0
    expected = 15 * 24 * 24 * 25 + 50 * 8 * 8 * 500 + 400 * 800 + 10 * 500
    assert forward_macs(model, macs) == expected
    assert train_step_macs(model, macs, batch_size=64) == 3 * 64 * expected


# Conversion, thresholds and local state


def test_to_masked_matches_bias_free_original() -> None:
    original = build_model("lenet5", LENET_SHAPE, 10, seed=1)
    model = to_masked(original)
    assert list(masked_layers(model)) == ["0", "3", "7", "9"]
    assert isinstance(model[0], MaskedConv2d)
    assert isinstance(model[9], MaskedLinear)
    assert model[9].bias is None
    assert original[0].bias is not None

    with torch.no_grad():
        for module in original.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.bias.zero_()
    inputs = torch.randn(4, *LENET_SHAPE, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(inputs), original(inputs), rtol=0, atol=1e-6)


def test_to_masked_keeps_batch_norm_and_names() -> None:
    model = masked_conv4()
    assert list(masked_layers(model)) == ["0", "3", "7", "10", "15", "17", "19"]
    assert isinstance(model[1], nn.BatchNorm2d)
    assert list(masked_layers(to_masked(model))) == list(masked_layers(model))
    assert list(masked_layers(masked_conv4(seed=5))) == list(masked_layers(model))


def test_to_masked_preserves_conv_hyperparameters() -> None:
    source = nn.Sequential(nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=1, groups=2))
    model = to_masked(source)
    layer = model[0]
    assert (layer.kernel_size, layer.stride, layer.padding, layer.groups) == (
        (3, 2),
        (2, 2),
        (1, 1),
        2,
    )
    assert layer.fan_in == 2 * 3 * 2
    torch.testing.assert_close(layer.weight, source[0].weight, rtol=0, atol=0)


def test_thresholds_round_trip_as_float32() -> None:
    model = masked_conv4()
    rng = np.random.default_rng(1)
    values = {
        name: rng.normal(size=v.shape).astype(np.float32)
        for name, v in get_thresholds(model).items()
    }
    set_thresholds(model, values)
    returned = get_thresholds(model)
    assert list(returned) == list(values)
    for name in values:
        assert returned[name].dtype == np.float32
        np.testing.assert_array_equal(returned[name], values[name])

    returned["0"][0] = 123.0
    assert masked_layers(model)["0"].threshold[0].item() != 123.0
    with pytest.raises(ValueError, match="shape"):
        set_thresholds(model, dict(values, **{"0": np.zeros(3, dtype=np.float32)}))
    with pytest.raises(ValueError, match="unexpected"):
        set_thresholds(model, dict(values, extra=np.zeros(3, dtype=np.float32)))


def test_local_state_round_trip() -> None:
    model = masked_conv4(seed=0)
    model.train()
    model(torch.randn(2, *CONV4_SHAPE))
    state = get_local_state(model)
    assert "0.threshold" in state
    assert "1.running_mean" in state

    other = masked_conv4(seed=9)
    set_local_state(other, state)
    for name, value in get_local_state(other).items():
        np.testing.assert_array_equal(value, state[name])


# Aggregation


def threshold_dicts(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"0": rng.normal(size=4).astype(np.float32), "3": rng.normal(size=2).astype(np.float32)}
        for _ in range(count)
    ]


def test_uniform_mean_equals_numpy_mean() -> None:
    clients = threshold_dicts(5)
    result = mean_thresholds(clients)
    for name in ("0", "3"):
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(
            result[name], np.mean([c[name] for c in clients], axis=0), rtol=1e-6
        )


def test_weighted_mean_by_hand() -> None:
    clients = [
        {"0": np.array([1.0, -2.0], dtype=np.float32)},
        {"0": np.array([4.0, 2.0], dtype=np.float32)},
    ]
    result = mean_thresholds(clients, weights=[1, 3])
    # (1·1 + 3·4)/4 = 3.25 and (1·(−2) + 3·2)/4 = 1.0
    np.testing.assert_array_equal(result["0"], np.array([3.25, 1.0], dtype=np.float32))


def test_single_client_gets_its_thresholds() -> None:
    (client,) = threshold_dicts(1, seed=4)
    for weights in (None, [37]):
        result = mean_thresholds([client], weights=weights)
        for name in client:
            np.testing.assert_array_equal(result[name], client[name])


def test_mean_thresholds_rejects_bad_input() -> None:
    clients = threshold_dicts(2)
    with pytest.raises(ValueError, match="empty"):
        mean_thresholds([])
    with pytest.raises(ValueError, match="keys"):
        mean_thresholds([clients[0], {"0": clients[1]["0"]}])
    with pytest.raises(ValueError, match="weights"):
        mean_thresholds(clients, weights=[1, -1])
    with pytest.raises(ValueError, match="NaN"):
        mean_thresholds(
            [clients[0], dict(clients[1], **{"3": np.array([np.nan, 0.0], dtype=np.float32)})]
        )


def test_aggregation_exact_under_cancellation() -> None:
    # Summed left to right in float64, 1000 + 1e-30 rounds to 1000, so the order
    # (1000, 1e-30, −1000) would give 0 and (1000, −1000, 1e-30) would give 1e-30.
    tiny = np.float32(1e-30)
    values = [np.float32(1000.0), tiny, np.float32(-1000.0)]
    expected = np.float32(np.float64(tiny) / 3)
    for order in ([0, 1, 2], [0, 2, 1], [1, 0, 2]):
        clients = [{"0": np.array([values[i]], dtype=np.float32)} for i in order]
        assert mean_thresholds(clients)["0"][0] == expected
        assert mean_thresholds(clients, weights=[2, 2, 2])["0"][0] == expected


def test_threshold_delta_and_sum() -> None:
    old = {"0": np.array([0.5, 1.0], dtype=np.float32)}
    new = {"0": np.array([0.75, 0.0], dtype=np.float32)}
    delta = threshold_delta(new, old)
    np.testing.assert_array_equal(delta["0"], np.array([0.25, -1.0], dtype=np.float32))
    total = sum_threshold_deltas([delta, delta, {"0": np.array([0.5, 0.5], dtype=np.float32)}])
    np.testing.assert_array_equal(total["0"], np.array([1.0, -1.5], dtype=np.float32))


# Lazy and eager application


def test_constructed_sign_flip_breaks_lazy_equals_eager() -> None:
    # w = (0.1, 0.4), d = 2. Δ1 = 0.4 moves both by −0.2·sign(w): (−0.1, 0.2), so w_0 flips.
    # Δ2 = −0.4 then moves by +0.2·sign(w): (−0.3, 0.4). Lazy applies Δ1 + Δ2 = 0: (0.1, 0.4).
    weight = torch.tensor([[0.1, 0.4]], dtype=torch.float64)
    first = torch.tensor([0.4], dtype=torch.float64)
    second = torch.tensor([-0.4], dtype=torch.float64)
    assert sign_changes(weight, first).tolist() == [[True, False]]

    eager = threshold_weight_update(threshold_weight_update(weight, first), second)
    lazy = threshold_weight_update(weight, first + second)
    torch.testing.assert_close(
        eager, torch.tensor([[-0.3, 0.4]], dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(lazy, weight, rtol=0, atol=0)


def test_rowsum_sign_change_marks_whole_row() -> None:
    weight = torch.tensor([[0.1, 0.1, -0.1], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # Row 0 sums to 0.1 and moves by −0.3/3 = −0.1 per weight, so its sum becomes −0.2.
    changes = sign_changes(weight, torch.tensor([0.3, 0.3]), sign_mode="rowsum")
    assert changes.tolist() == [[True, True, True], [False, False, False]]


def masked_pair(conv_weight_values: np.ndarray, linear_weight_values: np.ndarray) -> nn.Module:
    conv = MaskedConv2d(conv_weight_values.shape[1], conv_weight_values.shape[0], 2)
    linear = MaskedLinear(linear_weight_values.shape[1], linear_weight_values.shape[0])
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(conv_weight_values))
        linear.weight.copy_(torch.from_numpy(linear_weight_values))
    return nn.Sequential(conv, nn.Flatten(), linear)


@st.composite
def weights_and_deltas(
    draw: st.DrawFn, same_sign_rows: bool
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Draw weights with |w| ≥ 0.5 and up to 4 deltas whose total step stays below 0.4 per weight."""
    c_out, c_in, rows, cols = (draw(st.integers(1, 3)) for _ in range(4))
    steps = draw(st.integers(1, 4))

    def signed(shape: tuple[int, ...]) -> np.ndarray:
        values = draw(hnp.arrays(np.float32, shape, elements=st.floats(0.5, 1.0, width=32)))
        sign_shape = (shape[0],) + (1,) * (len(shape) - 1) if same_sign_rows else shape
        signs = draw(hnp.arrays(np.int8, sign_shape, elements=st.sampled_from([-1, 1])))
        return (values * signs).astype(np.float32)

    conv_values = signed((c_out, c_in, 2, 2))
    linear_values = signed((rows, cols))
    bound = float(np.float32(0.4 / steps))
    delta_element = st.floats(-bound, bound, width=32)
    deltas = [
        {
            "0": draw(hnp.arrays(np.float32, (c_out,), elements=delta_element)),
            "2": draw(hnp.arrays(np.float32, (rows,), elements=delta_element)),
        }
        for _ in range(steps)
    ]
    return conv_values, linear_values, deltas


@PROPERTY_SETTINGS
@given(
    data=st.data(),
    sign_mode=st.sampled_from(["elementwise", "rowsum"]),
    divisor=st.sampled_from(["fan_in", "official"]),
)
def test_lazy_equals_eager_without_sign_changes(
    data: st.DataObject, sign_mode: str, divisor: str
) -> None:
    conv_values, linear_values, deltas = data.draw(
        weights_and_deltas(same_sign_rows=sign_mode == "rowsum")
    )
    eager = masked_pair(conv_values, linear_values)
    lazy = masked_pair(conv_values, linear_values)

    for delta in deltas:
        for name, layer in masked_layers(eager).items():
            assert not sign_changes(
                layer.weight.detach(), torch.from_numpy(delta[name]), sign_mode, divisor
            ).any()
        apply_threshold_update(eager, delta, sign_mode, divisor)
    apply_threshold_update(lazy, sum_threshold_deltas(deltas), sign_mode, divisor)

    for name, layer in masked_layers(eager).items():
        torch.testing.assert_close(
            layer.weight, masked_layers(lazy)[name].weight, rtol=0, atol=1e-6
        )


# Properties of masks, densities and aggregation


weight_matrices = hnp.arrays(
    np.float64,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
    elements=st.floats(-2.0, 2.0),
)


@PROPERTY_SETTINGS
@given(weights=weight_matrices, data=st.data())
def test_masks_binary_and_densities_bounded(weights: np.ndarray, data: st.DataObject) -> None:
    layer = MaskedLinear(weights.shape[1], weights.shape[0], dtype=torch.float64)
    tau = data.draw(hnp.arrays(np.float64, (weights.shape[0],), elements=st.floats(-1.0, 3.0)))
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weights))
        layer.threshold.copy_(torch.from_numpy(tau))
    model = nn.Sequential(layer)

    mask = layer.unit_mask()
    assert set(mask.tolist()) <= {0.0, 1.0}
    expected_mask = (np.abs(weights).mean(axis=1) - tau > 0).astype(np.float64)
    np.testing.assert_array_equal(mask.detach().numpy(), expected_mask)
    report = density_report(model)
    for value in (report.param, report.all_param, report.layer_mean, *report.per_layer.values()):
        assert 0.0 <= value <= 1.0


@PROPERTY_SETTINGS
@given(weights=weight_matrices, data=st.data())
def test_raising_threshold_never_turns_unit_on(weights: np.ndarray, data: st.DataObject) -> None:
    rows = weights.shape[0]
    tau = data.draw(hnp.arrays(np.float64, (rows,), elements=st.floats(-1.0, 2.0)))
    increase = data.draw(hnp.arrays(np.float64, (rows,), elements=st.floats(0.0, 2.0)))
    layer = MaskedLinear(weights.shape[1], rows, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weights))
        layer.threshold.copy_(torch.from_numpy(tau))
    before = layer.active_units().clone()
    with torch.no_grad():
        layer.threshold.add_(torch.from_numpy(increase))
    after = layer.active_units()
    assert not torch.any(after & ~before)


@PROPERTY_SETTINGS
@given(
    clients=st.lists(
        st.fixed_dictionaries(
            {
                "a": hnp.arrays(np.float32, (3,), elements=st.floats(-1e3, 1e3, width=32)),
                "b": hnp.arrays(np.float32, (2,), elements=st.floats(-1e3, 1e3, width=32)),
            }
        ),
        min_size=1,
        max_size=6,
    ),
    data=st.data(),
)
def test_aggregation_order_invariant(
    clients: list[dict[str, np.ndarray]], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(clients))))
    weights = data.draw(
        st.lists(st.integers(1, 1000), min_size=len(clients), max_size=len(clients))
    )
    shuffled = [clients[i] for i in order]
    shuffled_weights = [weights[i] for i in order]

    uniform, uniform_shuffled = mean_thresholds(clients), mean_thresholds(shuffled)
    weighted = mean_thresholds(clients, weights)
    weighted_shuffled = mean_thresholds(shuffled, shuffled_weights)
    for name in ("a", "b"):
        np.testing.assert_array_equal(uniform[name], uniform_shuffled[name])
        np.testing.assert_array_equal(weighted[name], weighted_shuffled[name])
