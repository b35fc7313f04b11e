"""Tests of the model zoo: output shapes, input-shape checks, seeded builds, parameter counts."""

from __future__ import annotations

import pytest
import torch

from fedsim.models import build_model, count_parameters


@pytest.mark.parametrize(
    ("name", "input_shape"),
    [
        ("logreg", (30,)),
        ("logreg", (1, 8, 8)),
        ("mlp", (13,)),
        ("mlp", (1, 8, 8)),
        ("lenet5", (1, 28, 28)),
        ("conv4", (3, 32, 32)),
    ],
)
def test_output_shape(name: str, input_shape: tuple[int, ...]) -> None:
    model = build_model(name, input_shape, num_classes=7, seed=0)
    model.eval()

    with torch.no_grad():
        outputs = model(torch.zeros(4, *input_shape))

    assert outputs.shape == (4, 7)


def test_mlp_hidden_widths() -> None:
    model = build_model("mlp", (10,), num_classes=3, seed=0, hidden=[5])

    # One hidden layer: 10 * 5 + 5 = 55, then 5 * 3 + 3 = 18.
    assert count_parameters(model) == 73


def test_lenet5_rejects_digits_shape() -> None:
    with pytest.raises(ValueError) as caught:
        build_model("lenet5", (1, 8, 8), num_classes=10)

    assert "(1, 8, 8)" in str(caught.value)
    assert "(1, 28, 28)" in str(caught.value)


def test_conv4_rejects_grayscale() -> None:
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        build_model("conv4", (1, 28, 28), num_classes=10)


def test_unknown_model() -> None:
    with pytest.raises(ValueError, match="unknown model 'lenet'"):
        build_model("lenet", (1, 28, 28), num_classes=10)


@pytest.mark.parametrize("name", ["logreg", "mlp", "lenet5"])
def test_same_seed_same_weights(name: str) -> None:
    shape = (1, 28, 28)
    first = build_model(name, shape, num_classes=10, seed=11).state_dict()
    second = build_model(name, shape, num_classes=10, seed=11).state_dict()

    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


def test_other_seed_other_weights() -> None:
    first = build_model("mlp", (8,), num_classes=3, seed=11).state_dict()
    second = build_model("mlp", (8,), num_classes=3, seed=12).state_dict()

    assert not torch.equal(first["1.weight"], second["1.weight"])


def test_seeded_build_keeps_global_rng() -> None:
    before = torch.get_rng_state()

    build_model("mlp", (64,), num_classes=10, seed=5)

    assert torch.equal(torch.get_rng_state(), before)


def test_lenet5_parameter_count() -> None:
    model = build_model("lenet5", (1, 28, 28), num_classes=10)

    # conv1 1->20, 5x5:   1 * 20 * 25 + 20     =     520
    # conv2 20->50, 5x5:  20 * 50 * 25 + 50    =  25,050
    # fc 800->500:        800 * 500 + 500      = 400,500
    # fc 500->10:         500 * 10 + 10        =   5,010
    # total                                    = 431,080
    assert count_parameters(model) == 431_080


def test_conv4_parameter_count() -> None:
    model = build_model("conv4", (3, 32, 32), num_classes=10)

    # Spatial size: 32 -> 28 -> 24 -> pool 12 -> 8 -> 4 -> pool 2, so fc input is 128 * 2 * 2 = 512.
    # conv 3->64:     3 * 64 * 25 + 64      =   4,864   batch norm 2 * 64  = 128
    # conv 64->64:    64 * 64 * 25 + 64     = 102,464   batch norm 2 * 64  = 128
    # conv 64->128:   64 * 128 * 25 + 128   = 204,928   batch norm 2 * 128 = 256
    # conv 128->128:  128 * 128 * 25 + 128  = 409,728   batch norm 2 * 128 = 256
    # fc 512->128:    512 * 128 + 128       =  65,664
    # fc 128->128:    128 * 128 + 128       =  16,512
    # fc 128->10:     128 * 10 + 10         =   1,290
    # total: 4,864 + 102,464 + 204,928 + 409,728 + 768 + 65,664 + 16,512 + 1,290 = 806,218
    assert count_parameters(model) == 806_218


def test_logreg_parameter_count() -> None:
    model = build_model("logreg", (1, 8, 8), num_classes=10)

    # 64 inputs * 10 classes + 10 biases.
    assert count_parameters(model) == 650
