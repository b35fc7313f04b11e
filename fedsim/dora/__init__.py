"""DoRA adapters for linear layers, with a factored norm and optional fused Triton kernels.

DoRA is Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv 2402.09353). The factored
norm and fused epilogues follow Zelenin and Zhuravlyova, "Scaling DoRA: High-Rank Adaptation via
Factored Norms and Fused Kernels" (arXiv 2603.22276). Names and semantics match HF PEFT's
``LoraConfig(use_dora=True)`` for ``nn.Linear`` (PEFT 0.21.2).

Importing this package never imports Triton. The kernels in :mod:`fedsim.dora.kernels` load on
first use, on CUDA with ``kernel="auto"`` or explicitly with ``kernel="triton"``.
"""

from fedsim.dora.functional import (
    DoRALinearFunction,
    dora_linear,
    resolve_backend,
    triton_available,
)
from fedsim.dora.layer import DoRALinear, LoRAFactor
from fedsim.dora.norm import dense_row_norm, factored_row_norm, weight_row_norm_sq
from fedsim.dora.wrap import (
    ADAPTER_SUFFIXES,
    adapter_state_dict,
    base_weights_hash,
    dora_modules,
    freeze_non_adapter_parameters,
    load_adapter_state_dict,
    wrap_linear_modules,
)

__all__ = [
    "ADAPTER_SUFFIXES",
    "DoRALinear",
    "DoRALinearFunction",
    "LoRAFactor",
    "adapter_state_dict",
    "base_weights_hash",
    "dense_row_norm",
    "dora_linear",
    "dora_modules",
    "factored_row_norm",
    "freeze_non_adapter_parameters",
    "load_adapter_state_dict",
    "resolve_backend",
    "triton_available",
    "weight_row_norm_sq",
    "wrap_linear_modules",
]
