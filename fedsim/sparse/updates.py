"""SpaFL's threshold regulariser, threshold-to-weight update and collapse reset.

SpaFL (Kim, Saad, Debbah and Hong, NeurIPS 2024, arXiv 2406.00431) trains weights w and
thresholds τ on the local objective

    L(w, τ) = CE(f(x; m·w), y) + α · c(t) · Σ_l Σ_i exp(−τ_{l,i}),
    c(t) = 1 / (1 + exp(5 − 10 t / P)),

whose regulariser always pushes τ up, toward sparsity. After the server averages the
thresholds, each client turns the change Δτ of the global thresholds into a weight step

    w_ij ← w_ij − Δτ_i · sign(w_ij) / d_i,

the weight step that matches the mask path of ∂L/∂w (d_i is the fan-in of unit i). A raised
threshold shrinks the unit's weights toward zero and a lowered one grows them. The official
code uses the sign of the row sum Σ_j w_ij and divides conv weights by k_h·k_w instead of
C_in·k_h·k_w. The options ``sign_mode`` and ``divisor`` select those variants.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from fedsim.sparse.layers import _as_tensor, _check_keys, _require_masked_layers

__all__ = [
    "DIVISORS",
    "SIGN_MODES",
    "Divisor",
    "SignMode",
    "apply_threshold_update",
    "clip_thresholds_",
    "reset_collapsed_thresholds",
    "sign_changes",
    "threshold_penalty",
    "threshold_weight_update",
    "warmup_coefficient",
]

logger = logging.getLogger(__name__)

SignMode = Literal["elementwise", "rowsum"]
Divisor = Literal["fan_in", "official"]
SIGN_MODES: tuple[str, ...] = ("elementwise", "rowsum")
DIVISORS: tuple[str, ...] = ("fan_in", "official")


def warmup_coefficient(round_index: float, period: float = 1.0) -> float:
    """Return the penalty warm-up c(t) = 1 / (1 + exp(5 − 10 t / P)).

    ``round_index`` is t = server round − 1 (0 for the first round) and ``period`` is P > 0.
    With P = 1, c(0) ≈ 0.0067, c(1) ≈ 0.9933 and c(t ≥ 2) is 1 to within 5e-5.
    """
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    if period <= 0:
        raise ValueError(f"warm-up period must be > 0, got {period}")
    return 1.0 / (1.0 + math.exp(5.0 - 10.0 * round_index / period))


def threshold_penalty(
    model: nn.Module,
    alpha: float,
    round_index: float = 0,
    warmup: bool = True,
    period: float = 1.0,
) -> torch.Tensor:
    """Return the scalar α · c(t) · Σ exp(−τ) over all thresholds of ``model``.

    With ``warmup=False`` the coefficient c(t) is 1, as in the official CIFAR-10 code.
    The result is differentiable in τ, with ∂/∂τ_i = −α · c(t) · exp(−τ_i).
    """
    coefficient = warmup_coefficient(round_index, period) if warmup else 1.0
    layers = _require_masked_layers(model)
    total = torch.stack([torch.exp(-layer.threshold).sum() for layer in layers.values()]).sum()
    return (alpha * coefficient) * total


def _divisor_value(weight: torch.Tensor, divisor: str) -> int:
    """Return d for ``weight``: the fan-in, or k_h·k_w (conv) and n_in (linear) for ``official``."""
    if weight.dim() not in (2, 4):
        raise ValueError(
            f"expected a linear weight (2-D) or a conv weight (4-D), got shape {tuple(weight.shape)}"
        )
    if divisor == "fan_in":
        return int(weight[0].numel())
    if divisor == "official":
        if weight.dim() == 4:
            return int(weight.shape[2] * weight.shape[3])
        return int(weight.shape[1])
    raise ValueError(f"invalid divisor {divisor!r}; expected one of {', '.join(DIVISORS)}")


def _update_sign(weight: torch.Tensor, sign_mode: str) -> torch.Tensor:
    """Return the sign factor of the update, broadcastable to ``weight``."""
    if sign_mode == "elementwise":
        return torch.sign(weight)
    if sign_mode == "rowsum":
        row_sums = weight.flatten(1).sum(dim=1)
        return torch.sign(row_sums).view(-1, *([1] * (weight.dim() - 1)))
    raise ValueError(f"invalid sign_mode {sign_mode!r}; expected one of {', '.join(SIGN_MODES)}")


def threshold_weight_update(
    weight: torch.Tensor,
    delta: torch.Tensor,
    sign_mode: SignMode = "elementwise",
    divisor: Divisor = "fan_in",
) -> torch.Tensor:
    """Return w − Δτ_i · sign / d for a linear (C_out, n_in) or conv (C_out, C_in, k_h, k_w) weight.

    ``delta`` has shape (C_out,). The sign is sign(w_ij) (``elementwise``) or the sign of the
    row sum Σ_j w_ij (``rowsum``, the official code). d is the fan-in d_i (``fan_in``) or the
    official code's k_h·k_w for conv and n_in for linear (``official``); the two agree on
    linear layers. A weight with sign 0 is left unchanged, and Δτ = 0 returns ``weight``'s
    values unchanged. The input is not modified.
    """
    if delta.shape != (weight.shape[0],):
        raise ValueError(
            f"delta has shape {tuple(delta.shape)}, expected ({weight.shape[0]},) "
            f"for a weight of shape {tuple(weight.shape)}"
        )
    scale = 1.0 / _divisor_value(weight, divisor)
    sign = _update_sign(weight, sign_mode)
    step = delta.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1))) * scale
    return weight - step * sign


def sign_changes(
    weight: torch.Tensor,
    delta: torch.Tensor,
    sign_mode: SignMode = "elementwise",
    divisor: Divisor = "fan_in",
) -> torch.Tensor:
    """Return a bool tensor shaped like ``weight`` marking where the update's sign factor changes.

    The update is linear in Δτ while its sign factor stays fixed. So applying Δ₁ then Δ₂
    equals applying Δ₁ + Δ₂ at once unless the first step changes a sign factor. That factor
    is the weight's own sign (``elementwise``) or its row sum's sign (``rowsum``, marked on
    every weight of the row). Reaching exactly zero counts as a change.
    """
    updated = threshold_weight_update(weight, delta, sign_mode, divisor)
    before = _update_sign(weight, sign_mode)
    after = _update_sign(updated, sign_mode)
    return (before != after).expand_as(weight)


@torch.no_grad()
def apply_threshold_update(
    model: nn.Module,
    delta: Mapping[str, np.ndarray | torch.Tensor],
    sign_mode: SignMode = "elementwise",
    divisor: Divisor = "fan_in",
) -> None:
    """Apply the threshold-change weight step to every masked layer of ``model``, in place.

    ``delta`` maps each name of ``masked_layers(model)`` to Δτ of shape (C_out,), usually the
    change of the global thresholds between two rounds. Thresholds, batch norm and optimizer
    state are untouched. Raises ``ValueError`` on a key or shape mismatch, before any weight
    is changed.
    """
    layers = _require_masked_layers(model)
    _check_keys(layers, delta, "delta")

    values = {
        name: _as_tensor(delta[name]).to(layer.weight.device) for name, layer in layers.items()
    }
    for name, layer in layers.items():
        if tuple(values[name].shape) != (layer.num_units,):
            raise ValueError(
                f"delta {name!r} has shape {tuple(values[name].shape)}, expected ({layer.num_units},)"
            )

    for name, layer in layers.items():
        layer.weight.copy_(threshold_weight_update(layer.weight, values[name], sign_mode, divisor))


@torch.no_grad()
def reset_collapsed_thresholds(model: nn.Module, min_density: float = 0.01) -> int:
    """Set τ := 0 in every masked layer whose density is ≤ ``min_density`` and return the count.

    A layer's density is its fraction of active units, which equals its fraction of active
    weights. The official code resets a layer in its forward pass, so call this before each
    forward pass to keep every layer from staying fully pruned. After a reset only units
    whose weights are all zero stay off.
    """
    resets = 0
    for name, layer in _require_masked_layers(model).items():
        density = int(layer.active_units().sum()) / layer.num_units
        if density <= min_density:
            layer.threshold.zero_()
            resets += 1
            logger.debug("reset thresholds of layer %r at density %.4f", name, density)
    return resets


@torch.no_grad()
def clip_thresholds_(model: nn.Module, bound: float) -> None:
    """Clamp every threshold of ``model`` to [−bound, bound], in place."""
    if bound <= 0:
        raise ValueError(f"threshold clip bound must be > 0, got {bound}")
    for layer in _require_masked_layers(model).values():
        layer.threshold.clamp_(-bound, bound)
