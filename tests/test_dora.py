"""Tests of the DoRA layer, its factored norm and its autograd function (PyTorch path, CPU).

Expected values come from independent computations: HF PEFT's DoRA layer
(``LoraConfig(use_dora=True)``), the dense norm ``torch.linalg.norm(W + s·B·A, dim=1)``,
``torch.autograd.gradcheck`` and the plain base layer.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import pytest
import torch
from torch import nn

from fedsim.dora import (
    DoRALinear,
    adapter_state_dict,
    dense_row_norm,
    dora_linear,
    factored_row_norm,
    weight_row_norm_sq,
)
from fedsim.dora.probe import AllocationProbe

peft = pytest.importorskip("peft", reason="peft is needed for the parity tests (dev extra)")

logging.getLogger("peft").setLevel(logging.ERROR)

F64 = torch.float64


def _dense_norm(weight, lora_A, lora_B, scaling):
    return torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1)


def _random_factors(d_out, d_in, r, dtype=F64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=dtype)
    lora_A = torch.randn(r, d_in, generator=generator, dtype=dtype) / math.sqrt(d_in)
    lora_B = torch.randn(d_out, r, generator=generator, dtype=dtype)
    return weight, lora_A, lora_B


def _trained_layer(d_in=24, d_out=20, r=4, alpha=8.0, bias=True, seed=0, **options) -> DoRALinear:
    """A float64 DoRALinear with random non-zero B and perturbed m, as after some training."""
    torch.manual_seed(seed)
    linear = nn.Linear(d_in, d_out, bias=bias, dtype=F64)
    layer = DoRALinear.from_linear(linear, r, alpha, seed=seed + 1, **options)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        layer.lora_B.weight.copy_(0.3 * torch.randn(d_out, r, generator=generator, dtype=F64))
        layer.lora_magnitude_vector.mul_(
            1 + 0.2 * torch.rand(d_out, generator=generator, dtype=F64)
        )
    return layer


def _peft_copy(layer: DoRALinear, dropout: float = 0.0) -> nn.Module:
    """Build PEFT's DoRA around a copy of ``layer``'s base and load ``layer``'s adapter into it."""
    base = nn.Sequential(copy.deepcopy(layer.base_layer))
    config = peft.LoraConfig(
        r=layer.r,
        lora_alpha=layer.lora_alpha,
        use_rslora=layer.use_rslora,
        lora_dropout=dropout,
        target_modules=["0"],
        use_dora=True,
    )
    model = peft.get_peft_model(base, config)
    state = {f"base_model.model.0.{key}": value for key, value in adapter_state_dict(layer).items()}
    result = peft.set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    return model


def _peft_parameters(model):
    module = model.base_model.model[0]
    return (
        module.lora_A["default"].weight,
        module.lora_B["default"].weight,
        module.lora_magnitude_vector["default"].weight,
    )


# Factored norm.


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_factored_norm_matches_dense_fp64(chunk):
    weight, lora_A, lora_B = _random_factors(33, 50, 6)
    expected = _dense_norm(weight, lora_A, lora_B, 0.75)

    actual = factored_row_norm(weight, lora_A, lora_B, 0.75, chunk_columns=chunk)

    assert actual.dtype == F64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)


def test_factored_norm_matches_dense_fp32():
    weight, lora_A, lora_B = _random_factors(64, 96, 8, dtype=torch.float32)
    expected = _dense_norm(weight.double(), lora_A.double(), lora_B.double(), 2.0)

    actual = factored_row_norm(weight, lora_A, lora_B, 2.0, chunk_columns=16)

    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=0)


def test_factored_norm_bf16_weight_accumulates_fp32():
    weight, lora_A, lora_B = _random_factors(48, 80, 4, dtype=torch.float32)
    weight = weight.bfloat16()
    expected = _dense_norm(weight.double(), lora_A.double(), lora_B.double(), 0.5)

    actual = factored_row_norm(weight, lora_A, lora_B, 0.5, chunk_columns=32)

    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=1e-6, atol=0)


def test_factored_norm_zero_scaling_is_weight_norm():
    weight, lora_A, lora_B = _random_factors(10, 12, 3)

    actual = factored_row_norm(weight, lora_A, lora_B, 0.0)

    torch.testing.assert_close(actual, torch.linalg.norm(weight, dim=1), rtol=1e-14, atol=0)


def test_factored_norm_rank_above_input_dim():
    weight, lora_A, lora_B = _random_factors(9, 5, 12)

    actual = factored_row_norm(weight, lora_A, lora_B, 0.3, chunk_columns=2)

    torch.testing.assert_close(actual, _dense_norm(weight, lora_A, lora_B, 0.3), rtol=1e-12, atol=0)


def test_factored_norm_zero_rows_clamped():
    weight, lora_A, lora_B = _random_factors(6, 8, 2)
    weight[2] = 0.0
    lora_B[2] = 0.0

    actual = factored_row_norm(weight, lora_A, lora_B, 1.0, eps=1e-12)

    assert torch.isfinite(actual).all()
    assert actual[2].item() == 1e-12


def test_factored_norm_cached_weight_sq():
    weight, lora_A, lora_B = _random_factors(15, 21, 3)
    weight_sq = weight_row_norm_sq(weight)

    actual = factored_row_norm(weight, lora_A, lora_B, 1.5, weight_sq=weight_sq)

    torch.testing.assert_close(weight_sq, (weight**2).sum(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(actual, _dense_norm(weight, lora_A, lora_B, 1.5), rtol=1e-12, atol=0)


def test_factored_norm_chunk_independent():
    weight, lora_A, lora_B = _random_factors(21, 64, 5)

    results = [
        factored_row_norm(weight, lora_A, lora_B, 0.9, chunk_columns=chunk) for chunk in (1, 3, 64)
    ]

    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-14, atol=0)


def test_factored_norm_factor_invariances():
    weight, lora_A, lora_B = _random_factors(13, 17, 4)
    permutation = torch.tensor([2, 0, 3, 1])
    expected = factored_row_norm(weight, lora_A, lora_B, 0.6)

    permuted = factored_row_norm(weight, lora_A[permutation], lora_B[:, permutation], 0.6)
    rescaled = factored_row_norm(weight, 3.0 * lora_A, lora_B / 3.0, 0.6)

    torch.testing.assert_close(permuted, expected, rtol=1e-13, atol=0)
    torch.testing.assert_close(rescaled, expected, rtol=1e-13, atol=0)


def test_dense_norm_matches_reference():
    weight, lora_A, lora_B = _random_factors(17, 19, 5)

    actual = dense_row_norm(weight, lora_A, lora_B, 0.4, chunk_columns=4)

    torch.testing.assert_close(actual, _dense_norm(weight, lora_A, lora_B, 0.4), rtol=1e-13, atol=0)


def test_layer_norm_matches_dense():
    layer = _trained_layer()
    expected = _dense_norm(
        layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    ).detach()

    torch.testing.assert_close(layer.weight_norm(), expected, rtol=1e-12, atol=0)


# Layer behaviour.


def test_init_equals_base_layer():
    torch.manual_seed(3)
    linear = nn.Linear(20, 14, dtype=F64)
    x = torch.randn(7, 20, dtype=F64)
    expected = linear(x).detach()

    layer = DoRALinear.from_linear(linear, r=4, alpha=8, seed=5)

    assert torch.count_nonzero(layer.lora_B.weight) == 0
    torch.testing.assert_close(
        layer.lora_magnitude_vector.detach(),
        torch.linalg.norm(linear.weight, dim=1),
        rtol=1e-14,
        atol=0,
    )
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-14, atol=1e-15)


def test_seeded_init_matches_kaiming_uniform():
    linear = nn.Linear(30, 10)
    generator = torch.Generator().manual_seed(11)
    expected = torch.empty(4, 30)
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5), generator=generator)

    layer = DoRALinear.from_linear(linear, r=4, alpha=4, seed=11)

    assert torch.equal(layer.lora_A.weight.detach(), expected)
    assert not layer.weight.requires_grad
    assert not layer.bias.requires_grad


def test_scaling_plain_and_rslora():
    linear = nn.Linear(8, 8)

    plain = DoRALinear.from_linear(linear, r=16, alpha=32)
    rslora = DoRALinear.from_linear(copy.deepcopy(linear), r=16, alpha=32, use_rslora=True)

    assert plain.scaling == 2.0
    assert rslora.scaling == 8.0


def test_state_dict_keys_follow_peft():
    layer = _trained_layer()

    keys = set(layer.state_dict())

    assert keys == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
        "lora_magnitude_vector",
    }


def test_adapter_dtypes_for_bf16_base():
    linear = nn.Linear(16, 8, dtype=torch.bfloat16)

    layer = DoRALinear.from_linear(linear, r=2, alpha=2)

    assert layer.lora_A.weight.dtype == torch.float32
    assert layer.lora_B.weight.dtype == torch.float32
    assert layer.lora_magnitude_vector.dtype == torch.float32
    assert layer.weight_norm().dtype == torch.float32


def test_bf16_forward_runs_and_tracks_fp32():
    layer = _trained_layer(d_in=32, d_out=16)
    layer_bf16 = copy.deepcopy(layer)
    layer_bf16.base_layer.to(torch.bfloat16)
    x = torch.randn(5, 32, dtype=F64)

    expected = layer(x).detach()
    actual = layer_bf16(x.bfloat16())

    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.double(), expected, rtol=3e-2, atol=3e-2)


def test_dtype_mismatch_raises():
    layer = DoRALinear.from_linear(nn.Linear(4, 3), r=2, alpha=2)

    with pytest.raises(TypeError, match="does not match the base weight dtype"):
        layer(torch.randn(2, 4, dtype=F64))


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="rank"):
        DoRALinear.from_linear(nn.Linear(4, 3), r=0, alpha=2)
    with pytest.raises(ValueError, match="dropout"):
        DoRALinear.from_linear(nn.Linear(4, 3), r=1, alpha=2, dropout=1.0)
    with pytest.raises(ValueError, match="kernel"):
        DoRALinear.from_linear(nn.Linear(4, 3), r=1, alpha=2, kernel="cuda")
    with pytest.raises(TypeError, match="nn.Linear"):
        DoRALinear.from_linear(nn.Conv1d(4, 3, 1), r=1, alpha=2)


def test_eval_norm_cache_invalidated_by_inplace_change():
    layer = _trained_layer().eval()
    first = layer.weight_norm()
    assert layer.weight_norm() is first

    with torch.no_grad():
        layer.lora_B.weight.mul_(2.0)
    second = layer.weight_norm()

    expected = _dense_norm(layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    assert second is not first
    torch.testing.assert_close(second, expected.detach(), rtol=1e-12, atol=0)


def test_training_mode_recomputes_norm():
    layer = _trained_layer().train()

    assert layer.weight_norm() is not layer.weight_norm()


def test_no_grad_forward_matches_grad_forward():
    layer = _trained_layer()
    x = torch.randn(4, 24, dtype=F64)
    expected = layer(x).detach()

    with torch.no_grad():
        actual = layer(x)

    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_leading_dims_preserved():
    layer = _trained_layer()
    x = torch.randn(2, 3, 24, dtype=F64)

    y = layer(x)

    assert y.shape == (2, 3, 20)
    torch.testing.assert_close(y[1, 2], layer(x[1, 2].unsqueeze(0))[0], rtol=1e-14, atol=1e-14)


def test_zero_tokens():
    layer = _trained_layer()

    y = layer(torch.randn(0, 24, dtype=F64))
    y.sum().backward()

    assert y.shape == (0, 20)
    assert torch.count_nonzero(layer.lora_magnitude_vector.grad) == 0


# Parity with PEFT (float64).


def _forward_backward(module, x, parameters, upstream):
    x = x.clone().requires_grad_(True)
    y = module(x)
    grads = torch.autograd.grad(y, (x, *parameters), grad_outputs=upstream)
    return y.detach(), grads


@pytest.mark.parametrize(
    ("bias", "use_rslora", "recompute_inner", "r"),
    [(True, False, False, 4), (False, True, False, 8), (True, False, True, 30)],
)
def test_parity_with_peft(bias, use_rslora, recompute_inner, r):
    layer = _trained_layer(
        d_in=24, d_out=20, r=r, bias=bias, use_rslora=use_rslora, recompute_inner=recompute_inner
    )
    reference = _peft_copy(layer)
    x = torch.randn(2, 5, 24, dtype=F64)
    upstream = torch.randn(2, 5, 20, dtype=F64)
    ours_params = (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)

    y, grads = _forward_backward(layer, x, ours_params, upstream)
    y_ref, grads_ref = _forward_backward(reference, x, _peft_parameters(reference), upstream)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for name, grad, grad_ref in zip(("x", "A", "B", "m"), grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def test_parity_with_peft_dropout():
    layer = _trained_layer(dropout=0.3)
    reference = _peft_copy(layer, dropout=0.3)
    layer.train()
    reference.train()
    x = torch.randn(6, 24, dtype=F64)
    upstream = torch.randn(6, 20, dtype=F64)
    ours_params = (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector)

    torch.manual_seed(123)
    y, grads = _forward_backward(layer, x, ours_params, upstream)
    torch.manual_seed(123)
    y_ref, grads_ref = _forward_backward(reference, x, _peft_parameters(reference), upstream)

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for name, grad, grad_ref in zip(("x", "A", "B", "m"), grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10, msg=f"gradient of {name}")


def test_dropout_inactive_in_eval():
    layer = _trained_layer(dropout=0.5).eval()
    reference = _trained_layer().eval()
    x = torch.randn(4, 24, dtype=F64)

    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)


# Autograd function.


def test_gradcheck_function():
    generator = torch.Generator().manual_seed(7)

    def make(*shape):
        return torch.randn(*shape, generator=generator, dtype=F64).requires_grad_(True)

    x, weight, bias = make(3, 5), make(4, 5), make(4)
    lora_A, lora_B, magnitude = make(2, 5), make(4, 2), make(4)
    weight_norm = torch.rand(4, generator=generator, dtype=F64) + 0.5

    def function(x, weight, bias, lora_A, lora_B, magnitude):
        return dora_linear(
            x, weight, bias, lora_A, lora_B, magnitude, weight_norm, 0.7, kernel="torch"
        )

    assert torch.autograd.gradcheck(function, (x, weight, bias, lora_A, lora_B, magnitude))


def test_gradcheck_function_recompute():
    generator = torch.Generator().manual_seed(8)

    def make(*shape):
        return torch.randn(*shape, generator=generator, dtype=F64).requires_grad_(True)

    x, lora_A, lora_B, magnitude = make(2, 3, 6), make(3, 6), make(5, 3), make(5)
    weight = torch.randn(5, 6, generator=generator, dtype=F64)
    weight_norm = torch.rand(5, generator=generator, dtype=F64) + 0.5

    def function(x, lora_A, lora_B, magnitude):
        return dora_linear(
            x,
            weight,
            None,
            lora_A,
            lora_B,
            magnitude,
            weight_norm,
            1.3,
            kernel="torch",
            recompute_inner=True,
        )

    assert torch.autograd.gradcheck(function, (x, lora_A, lora_B, magnitude))


def test_norm_receives_no_gradient():
    layer = _trained_layer()
    x = torch.randn(3, 24, dtype=F64)
    weight_norm = layer.weight_norm().detach()
    scale = (layer.lora_magnitude_vector / weight_norm).detach()
    inner = x @ layer.weight.T + layer.scaling * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T

    layer(x).sum().backward()

    expected_b = (
        layer.scaling
        * (scale[:, None] * torch.ones(3, 20, dtype=F64).T)
        @ (x @ layer.lora_A.weight.T)
    )
    torch.testing.assert_close(
        layer.lora_B.weight.grad, expected_b.detach(), rtol=1e-12, atol=1e-12
    )
    expected_m = (inner.sum(dim=0) / weight_norm).detach()
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, expected_m, rtol=1e-12, atol=1e-12)


def test_function_rejects_mixed_dtypes():
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match="share one dtype"):
        dora_linear(
            x,
            torch.randn(3, 4, dtype=F64),
            None,
            torch.randn(1, 4),
            torch.randn(3, 1),
            torch.ones(3),
            torch.ones(3),
            1.0,
            kernel="torch",
        )


def test_kernel_triton_on_cpu_raises():
    pytest.importorskip("triton", reason="triton is not installed")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set, so the interpreter accepts CPU tensors")
    layer = DoRALinear.from_linear(nn.Linear(4, 3), r=1, alpha=1, kernel="triton")

    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        layer(torch.randn(2, 4))


# Allocation probe: no [d_out, d_in] temporary besides W itself.


def _full_size_allocations(probe, d_out, d_in):
    forbidden = {(d_out, d_in), (d_in, d_out), (d_in, d_in)}
    return [allocation for allocation in probe.allocations if allocation.shape in forbidden]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_forward_backward_allocates_no_weight_sized_tensor(dtype):
    d_in, d_out = 40, 24
    linear = nn.Linear(d_in, d_out, dtype=dtype)
    layer = DoRALinear.from_linear(linear, r=4, alpha=8, seed=0)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer._weight_sq = None  # include the one-time ‖W‖² computation
    x = torch.randn(6, d_in, dtype=dtype, requires_grad=True)

    with AllocationProbe() as probe:
        layer(x).sum().backward()

    assert probe.allocations, "the probe recorded nothing"
    assert _full_size_allocations(probe, d_out, d_in) == []


def test_allocation_probe_detects_peft_dense_norm():
    d_in, d_out = 40, 24
    layer = _trained_layer(d_in=d_in, d_out=d_out)
    reference = _peft_copy(layer)
    x = torch.randn(6, d_in, dtype=F64)

    with AllocationProbe() as probe:
        reference(x)

    assert _full_size_allocations(probe, d_out, d_in) != []


# Merging.


def test_merge_unmerge_round_trip():
    layer = _trained_layer()
    x = torch.randn(5, 24, dtype=F64)
    original_weight = layer.weight.detach().clone()
    expected = layer(x).detach()

    layer.merge()
    merged_output = layer(x).detach()
    merged_weight = layer.weight.detach().clone()
    layer.unmerge()

    assert not layer.merged
    torch.testing.assert_close(merged_output, expected, rtol=1e-12, atol=1e-12)
    scale = (layer.lora_magnitude_vector / layer.weight_norm()).detach()
    dense = scale[:, None] * (
        original_weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    )
    torch.testing.assert_close(merged_weight, dense.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.weight.detach(), original_weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-12, atol=1e-12)


def test_merge_twice_warns(caplog):
    layer = _trained_layer()
    layer.merge()

    with caplog.at_level(logging.WARNING, logger="fedsim.dora.layer"):
        layer.merge()

    assert "already merged" in caplog.text
