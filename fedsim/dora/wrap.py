"""Wrap ``nn.Linear`` modules of a model in DoRA adapters and move adapter state in and out.

DoRA is Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353. Adapter keys
follow HF PEFT 0.21.2's saved-adapter format: ``<module path>.lora_A.weight``,
``<module path>.lora_B.weight`` and ``<module path>.lora_magnitude_vector``. In federated training
only these tensors travel, so clients also compare a hash of the frozen base weights.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import nn

from fedsim.dora.layer import DoRALinear

__all__ = [
    "ADAPTER_SUFFIXES",
    "adapter_state_dict",
    "base_weights_hash",
    "dora_modules",
    "freeze_non_adapter_parameters",
    "load_adapter_state_dict",
    "wrap_linear_modules",
]

logger = logging.getLogger(__name__)

ADAPTER_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
"""State-dict key suffixes of the trainable tensors of a :class:`DoRALinear`."""

_BASE_LAYER_INFIX = ".base_layer."


def _layer_seed(seed: int, name: str) -> int:
    """Derive a per-layer seed from a model seed and the layer's path, the same in every process."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _matcher(pattern: str | Iterable[str], syntax: Literal["regex", "glob"]):
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise ValueError("pattern must contain at least one expression")
    if syntax == "regex":
        compiled = [re.compile(expression) for expression in patterns]
        return lambda name: any(expression.fullmatch(name) for expression in compiled)
    if syntax == "glob":
        return lambda name: any(fnmatch.fnmatchcase(name, expression) for expression in patterns)
    raise ValueError(f"syntax must be 'regex' or 'glob', got {syntax!r}")


def dora_modules(model: nn.Module) -> dict[str, DoRALinear]:
    """Return the :class:`DoRALinear` modules of ``model`` by qualified name, in module order."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, DoRALinear)
    }


def wrap_linear_modules(
    model: nn.Module,
    pattern: str | Iterable[str],
    r: int,
    alpha: float,
    *,
    syntax: Literal["regex", "glob"] = "regex",
    seed: int | None = None,
    **options,
) -> list[str]:
    """Replace the ``nn.Linear`` modules of ``model`` whose qualified names match by DoRA adapters.

    Args:
        model: modified in place. The wrapped linears keep their parameters, now frozen. Other
            parameters keep their ``requires_grad`` (see :func:`freeze_non_adapter_parameters`).
        pattern: one expression or several. A name matches if any expression matches the whole
            qualified name (``re.fullmatch`` for ``"regex"``, ``fnmatch.fnmatchcase`` for ``"glob"``),
            for example ``r"layers\\.\\d+\\.(q|v)_proj"`` or ``"layers.*.q_proj"``.
        r: rank.
        alpha: LoRA alpha.
        syntax: ``"regex"`` or ``"glob"``.
        seed: model seed. Each layer's ``A`` is drawn from a seed derived from it and the layer's
            name, so every process that wraps the same model with the same seed gets the same ``A``.
            None draws from the global generator.
        **options: keyword options of :class:`DoRALinear` (``use_rslora``, ``dropout``, ``kernel``,
            ``norm``, ...).

    Returns:
        The qualified names of the replaced modules, in module order.

    Raises:
        ValueError: if no ``nn.Linear`` matches. Linears already inside a :class:`DoRALinear` are
            never wrapped again, and ``model`` itself is never replaced (wrap a bare ``nn.Linear``
            with :meth:`DoRALinear.from_linear`).
    """
    matches = _matcher(pattern, syntax)
    inside_adapters = {
        f"{name}.base_layer" if name else "base_layer" for name in dora_modules(model)
    }
    targets = [
        name
        for name, module in model.named_modules()
        if name and type(module) is nn.Linear and name not in inside_adapters and matches(name)
    ]
    if not targets:
        linear_names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
        raise ValueError(
            f"pattern {pattern!r} ({syntax}) matched no nn.Linear module; "
            f"linear modules are: {linear_names[:20]}"
        )

    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child_name)
        layer_seed = None if seed is None else _layer_seed(seed, name)
        setattr(
            parent, child_name, DoRALinear.from_linear(linear, r, alpha, seed=layer_seed, **options)
        )

    logger.info(
        "wrapped %d linear modules in DoRA adapters (r=%d, alpha=%g)", len(targets), r, alpha
    )
    return targets


def freeze_non_adapter_parameters(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on every parameter that is not a DoRA adapter tensor.

    Returns:
        The names of the parameters left trainable.
    """
    trainable = []
    for name, parameter in model.named_parameters():
        is_adapter = name.endswith(ADAPTER_SUFFIXES) and _owner_is_dora(model, name)
        parameter.requires_grad_(is_adapter)
        if is_adapter:
            trainable.append(name)
    return trainable


def _owner_is_dora(model: nn.Module, key: str) -> bool:
    for suffix in ADAPTER_SUFFIXES:
        if key.endswith(suffix):
            owner = key[: -len(suffix)].rstrip(".")
            module = model.get_submodule(owner) if owner else model
            return isinstance(module, DoRALinear)
    return False


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the DoRA adapter tensors of ``model`` under PEFT's saved-adapter key names.

    Keys are ``<path>.lora_A.weight`` ``[r, d_in]``, ``<path>.lora_B.weight`` ``[d_out, r]`` and
    ``<path>.lora_magnitude_vector`` ``[d_out]`` for every :class:`DoRALinear` at ``<path>``, in
    module order. As with ``state_dict()``, the tensors are detached but share storage with the
    parameters; clone them before the parameters change if a snapshot is needed.
    """
    state: dict[str, torch.Tensor] = {}
    for name, module in dora_modules(model).items():
        prefix = f"{name}." if name else ""
        state[f"{prefix}lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{prefix}lora_B.weight"] = module.lora_B.weight.detach()
        state[f"{prefix}lora_magnitude_vector"] = module.lora_magnitude_vector.detach()
    return state


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
) -> list[str]:
    """Copy adapter tensors (keys as from :func:`adapter_state_dict`) into ``model`` in place.

    Values are cast to each parameter's dtype and device. Cached norms are invalidated.

    Returns:
        The keys of ``model``'s adapters that ``state`` did not contain (empty when ``strict``).

    Raises:
        KeyError: with ``strict``, if keys are missing or unexpected.
        ValueError: if a tensor's shape differs from the parameter's, or a value is not finite.
    """
    targets = {}
    for name, module in dora_modules(model).items():
        prefix = f"{name}." if name else ""
        targets[f"{prefix}lora_A.weight"] = (module, module.lora_A.weight)
        targets[f"{prefix}lora_B.weight"] = (module, module.lora_B.weight)
        targets[f"{prefix}lora_magnitude_vector"] = (module, module.lora_magnitude_vector)

    missing = [key for key in targets if key not in state]
    unexpected = [key for key in state if key not in targets]
    if strict and (missing or unexpected):
        raise KeyError(
            f"adapter state mismatch: missing keys {missing}, unexpected keys {unexpected}"
        )

    for key, value in state.items():
        if key not in targets:
            continue
        module, parameter = targets[key]
        value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(parameter.shape):
            raise ValueError(
                f"adapter tensor {key} has shape {tuple(value.shape)}, expected {tuple(parameter.shape)}"
            )
        if not torch.isfinite(value).all():
            raise ValueError(f"adapter tensor {key} contains NaN or infinite values")
        parameter.copy_(value.to(device=parameter.device, dtype=parameter.dtype))
        module.invalidate_norm_cache()
    return missing


def _strip_base_layer(name: str) -> str:
    name = name.replace(_BASE_LAYER_INFIX, ".")
    return name.removeprefix("base_layer.")


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def base_weights_hash(model: nn.Module) -> str:
    """Return a SHA-256 hex digest of the frozen base weights of ``model``.

    The digest covers every parameter with ``requires_grad=False`` that is not a DoRA adapter tensor
    (the wrapped linears' weights and biases and any other frozen parameter), by name, dtype, shape
    and bytes. Names are taken with ``.base_layer`` removed, so the digest of a model whose linears
    are all frozen is the same before and after :func:`wrap_linear_modules`. Buffers are not included
    (running statistics change during training), and neither are trainable parameters.

    A merged adapter changes the base weights, and so the digest.
    """
    digest = hashlib.sha256()
    entries = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad or name.endswith(ADAPTER_SUFFIXES):
            continue
        entries.append((_strip_base_layer(name), parameter))

    for name, parameter in sorted(entries, key=lambda entry: entry[0]):
        header = f"{name}|{parameter.dtype}|{tuple(parameter.shape)}|".encode()
        digest.update(header)
        digest.update(_tensor_bytes(parameter))
    return digest.hexdigest()
