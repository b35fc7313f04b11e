"""The model zoo: small classifiers sized for the data sets fedsim ships.

Every builder takes the input shape of one example (``(features,)`` for tabular data,
``(channels, height, width)`` for images) and the number of classes, so the data set, not the
config, decides the first and last layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MODELS", "ModelSpec", "build_model", "count_parameters"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder, the input shapes it accepts and a one-line summary."""

    builder: Callable[..., nn.Module]
    summary: str
    required_shape: tuple[int, ...] | None = None


def _flat_size(input_shape: Sequence[int]) -> int:
    return int(math.prod(input_shape))


def build_logreg(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build multinomial logistic regression: flatten, then one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(input_shape), num_classes))


def build_mlp(
    input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64)
) -> nn.Module:
    """Build a ReLU multilayer perceptron with the given hidden widths."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = _flat_size(input_shape)
    for units in hidden:
        layers += [nn.Linear(width, int(units)), nn.ReLU()]
        width = int(units)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_lenet5(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build LeNet-5 for 28x28x1 images: 5x5 convs with 20 and 50 filters, fc 800-500-classes.

    At full density one forward pass costs 2,293,000 multiply-accumulates per example.
    """
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 20, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(800, 500),
        nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def build_conv4(input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build Conv4 for 32x32x3 images: unpadded 5x5 convs 64-64-128-128 with batch norm.

    Max pooling follows the second and fourth conv, then fc 512-128-128-classes.
    At full density one forward pass costs 82,489,600 multiply-accumulates per example.
    """
    channels = input_shape[0]

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, kernel_size=5), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(channels, 64),
        *block(64, 64),
        nn.MaxPool2d(2),
        *block(64, 128),
        *block(128, 128),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


MODELS: dict[str, ModelSpec] = {
    "logreg": ModelSpec(build_logreg, "multinomial logistic regression on flattened inputs"),
    "mlp": ModelSpec(build_mlp, "ReLU MLP on flattened inputs (option: hidden, default [128, 64])"),
    "lenet5": ModelSpec(build_lenet5, "LeNet-5 for 28x28x1 images", (1, 28, 28)),
    "conv4": ModelSpec(build_conv4, "Conv4 with batch norm for 32x32x3 images", (3, 32, 32)),
}


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    seed: int | None = None,
    **options: object,
) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` and ``num_classes`` outputs.

    With ``seed`` the initial weights depend only on the seed, not on the global torch state,
    which stays untouched. Raises ``ValueError`` for an unknown name or an input shape the
    model cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    shape = tuple(int(s) for s in input_shape)
    if spec.required_shape is not None and shape != spec.required_shape:
        raise ValueError(
            f"model {name!r} needs inputs of shape {spec.required_shape} (channels, height, width), "
            f"but the data set gives {shape}; pick a data set of that shape or another model"
        )
    if seed is None:
        return spec.builder(shape, num_classes, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.builder(shape, num_classes, **options)


def count_parameters(model: nn.Module) -> int:
    """Return the number of scalar parameters of ``model``, trainable or not."""
    return sum(p.numel() for p in model.parameters())
