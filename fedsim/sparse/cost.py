"""Densities and multiply-accumulate counts of SpaFL's sparse sub-networks.

SpaFL (Kim, Saad, Debbah and Hong, NeurIPS 2024, arXiv 2406.00431) prunes whole output units,
so a masked layer's density is its fraction of active units, and its forward cost shrinks in
proportion.

Cost convention: one MAC is one multiply-accumulate. A masked layer's forward MACs per example
are (active output units) × (output positions) × (fan-in). For a conv that is
active filters × H_out × W_out × C_in/groups · k_h · k_w. For a linear layer it is
active neurons × n_in × the number of leading positions (1 for plain vectors, T for T tokens). A training step is
counted as 3 × the forward MACs (forward, input gradient and weight gradient), as in the
official code.

Pruned inputs are not subtracted: a unit switched off in one layer still counts as an input
of the next layer (no cascading). With batch norm between two layers this is what the network
computes, because batch norm maps a pruned filter's zero output to a constant that is in general
not zero. Without batch norm the count is an upper bound on the MACs the sub-network needs.
Layers that are not masked are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.sparse.layers import MaskedLayer, _require_masked_layers

__all__ = [
    "TRAIN_MACS_FACTOR",
    "DensityReport",
    "all_param_density",
    "dense_layer_macs",
    "density_report",
    "forward_macs",
    "layer_densities",
    "mean_layer_density",
    "param_density",
    "train_step_macs",
]

TRAIN_MACS_FACTOR = 3


def layer_densities(model: nn.Module) -> dict[str, float]:
    """Return each masked layer's fraction of active units (equal to its fraction of active weights)."""
    return {
        name: int(layer.active_units().sum()) / layer.num_units
        for name, layer in _require_masked_layers(model).items()
    }


def _active_and_total_weights(model: nn.Module) -> tuple[int, int]:
    active = 0
    total = 0
    for layer in _require_masked_layers(model).values():
        active += int(layer.active_units().sum()) * layer.fan_in
        total += layer.weight.numel()
    return active, total


def param_density(model: nn.Module) -> float:
    """Return the fraction of masked-layer weights that are active (SpaFL's primary density)."""
    active, total = _active_and_total_weights(model)
    return active / total


def all_param_density(model: nn.Module) -> float:
    """Return the fraction of all model parameters that are in use.

    Counted: active masked weights plus every parameter outside the masked layers' weights
    (batch norm affine parameters, unmasked layers). Thresholds are not counted because they
    only define the mask. Buffers such as batch norm running statistics are not parameters and
    are not counted either.
    """
    active, total = _active_and_total_weights(model)
    masked_parameter_ids = set()
    for layer in _require_masked_layers(model).values():
        masked_parameter_ids.add(id(layer.weight))
        masked_parameter_ids.add(id(layer.threshold))
    other = sum(p.numel() for p in model.parameters() if id(p) not in masked_parameter_ids)
    return (active + other) / (total + other)


def mean_layer_density(model: nn.Module) -> float:
    """Return the unweighted mean of the layer densities (the official code's density)."""
    densities = layer_densities(model)
    return sum(densities.values()) / len(densities)


@dataclass(frozen=True)
class DensityReport:
    """All density figures of a masked model, each in [0, 1]."""

    param: float
    all_param: float
    layer_mean: float
    per_layer: dict[str, float]


def density_report(model: nn.Module) -> DensityReport:
    """Return the parameter-weighted, all-parameter, layer-mean and per-layer densities."""
    return DensityReport(
        param=param_density(model),
        all_param=all_param_density(model),
        layer_mean=mean_layer_density(model),
        per_layer=layer_densities(model),
    )


@torch.no_grad()
def dense_layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """Return each masked layer's forward MACs per example at full density.

    ``input_shape`` is the shape of one example without the batch dimension, for example
    (1, 28, 28). The output shapes come from one forward pass of a zero batch of size 1 in
    evaluation mode, so batch norm statistics are not updated. Every module's training flag is
    restored afterwards. Compute these once per model and pass them to ``forward_macs``.
    """
    layers = _require_masked_layers(model)
    output_positions: dict[str, int] = {}

    def record(name: str, layer: MaskedLayer):
        def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            output_positions[name] = output.numel() // layer.num_units

        return hook

    handles = [layer.register_forward_hook(record(name, layer)) for name, layer in layers.items()]
    training_flags = {module: module.training for module in model.modules()}
    reference = next(iter(layers.values())).weight
    try:
        model.eval()
        model(torch.zeros((1, *input_shape), dtype=reference.dtype, device=reference.device))
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in training_flags.items():
            module.training = flag

    missing = [name for name in layers if name not in output_positions]
    if missing:
        raise ValueError(f"masked layers {missing} were not called in the forward pass")
    return {
        name: layer.num_units * output_positions[name] * layer.fan_in
        for name, layer in layers.items()
    }


def forward_macs(model: nn.Module, layer_macs: Mapping[str, int]) -> int:
    """Return the forward MACs per example of the active sub-network.

    ``layer_macs`` comes from ``dense_layer_macs``. Each layer contributes its dense MACs times
    its fraction of active units, which is an integer because every unit costs the same.
    """
    total = 0
    for name, layer in _require_masked_layers(model).items():
        if name not in layer_macs:
            raise ValueError(f"layer_macs has no entry for masked layer {name!r}")
        per_unit = layer_macs[name] // layer.num_units
        total += per_unit * int(layer.active_units().sum())
    return total


def train_step_macs(model: nn.Module, layer_macs: Mapping[str, int], batch_size: int) -> int:
    """Return the MACs of one training step on ``batch_size`` examples: 3 × forward × batch."""
    return TRAIN_MACS_FACTOR * batch_size * forward_macs(model, layer_macs)
