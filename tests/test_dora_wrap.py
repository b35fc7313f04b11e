"""Tests of wrapping a model's linear layers in DoRA adapters and of adapter state transfer."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fedsim.dora import (
    DoRALinear,
    adapter_state_dict,
    base_weights_hash,
    freeze_non_adapter_parameters,
    load_adapter_state_dict,
    wrap_linear_modules,
)

logging.getLogger("peft").setLevel(logging.ERROR)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        return self.out(torch.tanh(self.q_proj(x)) * self.v_proj(x))


class TinyModel(nn.Module):
    def __init__(self, width: int = 12, classes: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def _model(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel()


def test_wrap_by_regex():
    model = _model()

    names = wrap_linear_modules(model, r"layers\.\d+\.(q|v)_proj", r=2, alpha=4)

    assert names == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert isinstance(model.layers[1].v_proj, DoRALinear)
    assert type(model.layers[0].out) is nn.Linear
    assert type(model.head) is nn.Linear


def test_wrap_by_glob_list():
    model = _model()

    names = wrap_linear_modules(model, ["layers.*.out", "head"], r=2, alpha=4, syntax="glob")

    assert names == ["layers.0.out", "layers.1.out", "head"]
    assert isinstance(model.head, DoRALinear)


def test_wrap_keeps_output_at_init():
    model = _model()
    x = torch.randn(4, 12)
    expected = model(x).detach()

    wrap_linear_modules(model, r".*", r=3, alpha=6, seed=1)

    torch.testing.assert_close(model(x).detach(), expected, rtol=1e-5, atol=1e-6)


def test_wrap_no_match_raises():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        wrap_linear_modules(_model(), r"decoder\..*", r=2, alpha=2)


def test_wrap_never_replaces_root():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        wrap_linear_modules(nn.Linear(4, 4), r".*", r=1, alpha=1)


def test_wrap_twice_skips_wrapped_layers():
    model = _model()
    wrap_linear_modules(model, r".*q_proj", r=2, alpha=2)

    names = wrap_linear_modules(model, r".*", r=2, alpha=2)

    assert "layers.0.q_proj" not in names
    assert not any(name.endswith("base_layer") for name in names)
    assert isinstance(model.layers[0].q_proj.base_layer, nn.Linear)


def test_wrap_passes_options():
    model = _model()

    wrap_linear_modules(model, "head", r=4, alpha=8, use_rslora=True, dropout=0.1, norm="dense")

    assert model.head.scaling == 4.0
    assert isinstance(model.head.lora_dropout, nn.Dropout)
    assert model.head.norm == "dense"


def test_seeded_wrap_is_reproducible():
    first, second = _model(), _model()

    wrap_linear_modules(first, r".*proj", r=2, alpha=2, seed=42)
    wrap_linear_modules(second, r".*proj", r=2, alpha=2, seed=42)

    a_first = first.layers[0].q_proj.lora_A.weight
    a_second = second.layers[0].q_proj.lora_A.weight
    assert torch.equal(a_first, a_second)
    assert not torch.equal(a_first, first.layers[1].q_proj.lora_A.weight)


def test_adapter_keys_match_peft():
    peft = pytest.importorskip("peft", reason="peft is needed to compare key names (dev extra)")
    ours = _model()
    reference = peft.get_peft_model(
        _model(),
        peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "head"], use_dora=True),
    )

    wrap_linear_modules(ours, r".*(q_proj|head)", r=2, alpha=2)

    reference_keys = {
        key.removeprefix("base_model.model.") for key in peft.get_peft_model_state_dict(reference)
    }
    assert set(adapter_state_dict(ours)) == reference_keys


def test_adapter_state_round_trip():
    source, target = _model(), _model()
    wrap_linear_modules(source, r".*proj", r=2, alpha=2, seed=1)
    wrap_linear_modules(target, r".*proj", r=2, alpha=2, seed=2)
    with torch.no_grad():
        for value in adapter_state_dict(source).values():
            value.add_(torch.randn_like(value))
    state = {key: value.clone() for key, value in adapter_state_dict(source).items()}
    x = torch.randn(3, 12)

    missing = load_adapter_state_dict(target, state)

    assert missing == []
    for key, value in adapter_state_dict(target).items():
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_load_adapter_state_rejects_bad_input():
    model = _model()
    wrap_linear_modules(model, "head", r=2, alpha=2)
    state = {key: value.clone() for key, value in adapter_state_dict(model).items()}

    with pytest.raises(KeyError, match="unexpected keys"):
        load_adapter_state_dict(model, {**state, "extra.lora_A.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing keys"):
        load_adapter_state_dict(model, {"head.lora_A.weight": state["head.lora_A.weight"]})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(model, {**state, "head.lora_B.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="NaN"):
        load_adapter_state_dict(
            model, {**state, "head.lora_magnitude_vector": torch.full((3,), float("nan"))}
        )


def test_load_adapter_state_invalidates_eval_cache():
    model = _model()
    wrap_linear_modules(model, "head", r=2, alpha=2)
    model.eval()
    before = model.head.weight_norm()
    state = {key: value.clone() for key, value in adapter_state_dict(model).items()}
    state["head.lora_B.weight"] = torch.ones_like(state["head.lora_B.weight"])

    load_adapter_state_dict(model, state)

    after = model.head.weight_norm()
    lora = model.head
    expected = torch.linalg.norm(
        lora.weight + lora.scaling * lora.lora_B.weight @ lora.lora_A.weight, dim=1
    )
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected.detach(), rtol=1e-6, atol=0)


def test_freeze_non_adapter_parameters():
    model = _model()
    wrap_linear_modules(model, "head", r=2, alpha=2)

    trainable = freeze_non_adapter_parameters(model)

    assert trainable == ["head.lora_magnitude_vector", "head.lora_A.weight", "head.lora_B.weight"]
    assert not model.layers[0].q_proj.weight.requires_grad


def test_base_hash_stable_across_wrap_and_training():
    model = _model()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    before = base_weights_hash(model)

    wrap_linear_modules(model, r".*", r=2, alpha=2)
    after_wrap = base_weights_hash(model)
    with torch.no_grad():
        model.head.lora_B.weight.fill_(1.0)
        model.head.lora_magnitude_vector.mul_(2.0)
    after_adapter_change = base_weights_hash(model)

    assert before == after_wrap
    assert after_wrap == after_adapter_change


def test_base_hash_detects_changed_weights():
    first, second = _model(), _model()
    wrap_linear_modules(first, r".*", r=2, alpha=2)
    wrap_linear_modules(second, r".*", r=2, alpha=2)
    assert base_weights_hash(first) == base_weights_hash(second)

    with torch.no_grad():
        second.layers[1].out.weight[0, 0] += 1e-6

    assert base_weights_hash(first) != base_weights_hash(second)


def test_base_hash_covers_bf16():
    first, second = _model().to(torch.bfloat16), _model().to(torch.bfloat16)
    for model in (first, second):
        wrap_linear_modules(model, r".*", r=2, alpha=2)

    assert base_weights_hash(first) == base_weights_hash(second)
    assert len(base_weights_hash(first)) == 64
