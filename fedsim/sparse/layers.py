"""Threshold-masked layers of SpaFL and the conversion of zoo models to them.

SpaFL (Kim, Saad, Debbah and Hong, "SpaFL: Communication-Efficient Federated Learning with
Sparse Models and Low Computational Overhead", NeurIPS 2024, arXiv 2406.00431) gives every
output unit of a layer (a Linear neuron or a Conv2d filter) one trainable threshold τ_i. With
d_i incoming weights w_i, the unit's score and mask are

    s_i = (1/d_i) Σ_j |w_ij| − τ_i,        m_i = 1[s_i > 0],

and the forward pass uses the masked weight m_i · w_ij. The inequality is strict, so τ = 0
keeps every unit whose weights are not all zero. Masked layers have no bias, so a pruned unit
outputs exactly zero.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "STE_MODES",
    "MaskedConv2d",
    "MaskedLayer",
    "MaskedLinear",
    "SteMode",
    "ThresholdStep",
    "get_local_state",
    "get_thresholds",
    "masked_layers",
    "set_local_state",
    "set_ste",
    "set_thresholds",
    "threshold_parameters",
    "threshold_step",
    "to_masked",
]

logger = logging.getLogger(__name__)

SteMode = Literal["identity", "cifar_code", "clipped"]
STE_MODES: tuple[str, ...] = ("identity", "cifar_code", "clipped")


def _check_ste(ste: str) -> str:
    if ste not in STE_MODES:
        raise ValueError(f"invalid ste mode {ste!r}; expected one of {', '.join(STE_MODES)}")
    return ste


class ThresholdStep(torch.autograd.Function):
    """Unit step m = 1[s > 0] with a straight-through surrogate gradient.

    The backward pass replaces the step's zero derivative by ∂m/∂s := 1 (``identity``),
    1[|s| > 1] (``cifar_code``, the window of the official CIFAR code, which is almost always
    zero because |s| < 1 for usual weight scales) or 1[|s| ≤ 1] (``clipped``, the hardtanh
    straight-through estimator).
    """

    @staticmethod
    def forward(ctx: Any, score: torch.Tensor, ste: str) -> torch.Tensor:
        ctx.ste = ste
        ctx.save_for_backward(score)
        return (score > 0).to(score.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (score,) = ctx.saved_tensors
        if ctx.ste == "identity":
            return grad_output, None
        if ctx.ste == "cifar_code":
            window = score.abs() > 1
        else:
            window = score.abs() <= 1
        return grad_output * window.to(grad_output.dtype), None


def threshold_step(score: torch.Tensor, ste: SteMode = "identity") -> torch.Tensor:
    """Return the mask 1[score > 0] in ``score``'s dtype, differentiable through ``ste``."""
    return cast(torch.Tensor, ThresholdStep.apply(score, _check_ste(ste)))


class MaskedLayer(nn.Module):
    """Behaviour shared by the masked layers: one threshold per output unit.

    Subclasses hold ``weight`` with the output units on dimension 0 and a ``threshold``
    parameter of shape (C_out,), initialised to zero, in the weight's dtype and device.
    """

    weight: torch.Tensor
    threshold: nn.Parameter
    ste: str

    def _init_threshold(self, ste: str) -> None:
        self.ste = _check_ste(ste)
        self.threshold = nn.Parameter(
            torch.zeros(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        )

    @property
    def fan_in(self) -> int:
        """Number d of incoming weights per output unit: C_in/groups·k_h·k_w or n_in."""
        return int(self.weight[0].numel())

    @property
    def num_units(self) -> int:
        """Number of output units C_out, which is also the number of thresholds."""
        return int(self.weight.shape[0])

    def score(self) -> torch.Tensor:
        """Return s = mean_j |w_ij| − τ_i, shape (C_out,), differentiable in w and τ."""
        return self.weight.abs().flatten(1).mean(dim=1) - self.threshold

    def unit_mask(self) -> torch.Tensor:
        """Return the differentiable mask m, shape (C_out,), values 0.0 or 1.0."""
        return threshold_step(self.score(), cast(SteMode, self.ste))

    def masked_weight(self) -> torch.Tensor:
        """Return m · w with the (C_out,) mask broadcast over each unit's weights."""
        mask = self.unit_mask()
        return self.weight * mask.view(-1, *([1] * (self.weight.dim() - 1)))

    @torch.no_grad()
    def active_units(self) -> torch.Tensor:
        """Return a bool tensor (C_out,) that is True where a unit is kept, without gradient."""
        return self.score() > 0


class MaskedLinear(MaskedLayer, nn.Linear):
    """Bias-free ``nn.Linear`` whose output neurons are pruned by trainable thresholds.

    Weight shape (out_features, in_features), initialised like ``nn.Linear`` (Kaiming
    uniform with a = √5), and thresholds of shape (out_features,) initialised to zero.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ste: SteMode = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=False, device=device, dtype=dtype)
        self._init_threshold(ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, ste={self.ste}"


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    """Bias-free ``nn.Conv2d`` whose output filters are pruned by trainable thresholds.

    Weight shape (C_out, C_in/groups, k_h, k_w), initialised like ``nn.Conv2d``, and thresholds
    of shape (C_out,) initialised to zero. Stride, padding, dilation, groups and padding mode
    behave as in ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
        ste: SteMode = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_threshold(ste)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), None)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, ste={self.ste}"


def _masked_copy(module: nn.Module, ste: str) -> MaskedLayer:
    """Build the masked counterpart of a Linear or Conv2d with the same weight values."""
    masked: MaskedLayer
    if isinstance(module, nn.Linear):
        masked = MaskedLinear(
            module.in_features,
            module.out_features,
            ste=cast(SteMode, ste),
            device=module.weight.device,
            dtype=module.weight.dtype,
        )
    else:
        conv = cast(nn.Conv2d, module)
        masked = MaskedConv2d(
            conv.in_channels,
            conv.out_channels,
            cast(tuple[int, int], conv.kernel_size),
            stride=cast(tuple[int, int], conv.stride),
            padding=cast(Any, conv.padding),
            dilation=cast(tuple[int, int], conv.dilation),
            groups=conv.groups,
            padding_mode=cast(Any, conv.padding_mode),
            ste=cast(SteMode, ste),
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
    source = cast(torch.Tensor, module.weight)
    with torch.no_grad():
        masked.weight.copy_(source)
    masked.weight.requires_grad_(source.requires_grad)
    return masked


def to_masked(model: nn.Module, ste: SteMode = "identity") -> nn.Module:
    """Return a copy of ``model`` with every Linear and Conv2d replaced by its masked form.

    The copy keeps the module names, shapes, weight values, batch norm layers and activations.
    Biases are dropped, as SpaFL's masked layers have none, so the copy computes what the
    original computes with its Linear and Conv2d biases set to zero (at τ = 0). Thresholds start
    at zero. Layers that are already masked are kept as they are. ``model`` is not modified.
    A module registered under two names stays shared in the copy.
    """
    _check_ste(ste)
    converted = copy.deepcopy(model)
    replacements: dict[int, MaskedLayer] = {}

    def convert(parent: nn.Module) -> nn.Module:
        if isinstance(parent, MaskedLayer):
            return parent
        if isinstance(parent, (nn.Linear, nn.Conv2d)):
            if id(parent) not in replacements:
                replacements[id(parent)] = _masked_copy(parent, ste)
            return replacements[id(parent)]
        for name, child in list(parent.named_children()):
            new_child = convert(child)
            if new_child is not child:
                setattr(parent, name, new_child)
        return parent

    result = convert(converted)
    logger.debug("converted %d layers to masked layers", len(replacements))
    return result


def masked_layers(model: nn.Module) -> dict[str, MaskedLayer]:
    """Return the masked layers of ``model`` keyed by module name, in ``named_modules`` order.

    The names (for example ``"0"``, ``"3"`` for an ``nn.Sequential``) depend only on the
    model's structure, so every client and the server derive the same keys.
    """
    return {
        name: module for name, module in model.named_modules() if isinstance(module, MaskedLayer)
    }


def _require_masked_layers(model: nn.Module) -> dict[str, MaskedLayer]:
    layers = masked_layers(model)
    if not layers:
        raise ValueError("model has no masked layers; convert it with to_masked first")
    return layers


def set_ste(model: nn.Module, ste: SteMode) -> None:
    """Set the surrogate gradient of every masked layer of ``model`` to ``ste``."""
    _check_ste(ste)
    for layer in masked_layers(model).values():
        layer.ste = ste


def threshold_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the threshold parameters of ``model``, in ``masked_layers`` order."""
    return [layer.threshold for layer in masked_layers(model).values()]


def get_thresholds(model: nn.Module) -> dict[str, np.ndarray]:
    """Return copies of all thresholds as ``{layer_name: float32 array of shape (C_out,)}``.

    The keys and their order are those of ``masked_layers``. These arrays are exactly what a
    SpaFL client uploads.
    """
    return {
        name: layer.threshold.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, layer in _require_masked_layers(model).items()
    }


def _check_keys(expected: Mapping[str, Any], given: Mapping[str, Any], what: str) -> None:
    missing = [name for name in expected if name not in given]
    unexpected = [name for name in given if name not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{what} keys do not match the model's masked layers: missing {missing}, "
            f"unexpected {unexpected}"
        )


def _as_tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.as_tensor(np.asarray(value))


def set_thresholds(model: nn.Module, thresholds: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy ``thresholds`` into the model's threshold parameters, in place.

    ``thresholds`` must have exactly the keys of ``get_thresholds(model)`` and arrays of shape
    (C_out,). Values are cast to the parameter's dtype. Raises ``ValueError`` on a key or shape
    mismatch, before any parameter is changed.
    """
    layers = _require_masked_layers(model)
    _check_keys(layers, thresholds, "threshold")

    values = {name: _as_tensor(thresholds[name]) for name in layers}
    for name, layer in layers.items():
        if tuple(values[name].shape) != tuple(layer.threshold.shape):
            raise ValueError(
                f"threshold {name!r} has shape {tuple(values[name].shape)}, "
                f"expected {tuple(layer.threshold.shape)}"
            )

    with torch.no_grad():
        for name, layer in layers.items():
            layer.threshold.copy_(values[name].to(layer.threshold.dtype))


def get_local_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Return copies of the whole ``state_dict`` (weights, thresholds, batch norm statistics).

    This is the per-client state that SpaFL keeps between rounds and never uploads.
    """
    return {
        name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()
    }


def set_local_state(model: nn.Module, state: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Load a state from ``get_local_state`` into ``model``, whose keys must match exactly."""
    tensors = {name: _as_tensor(value) for name, value in state.items()}
    model.load_state_dict(tensors, strict=True)
