"""``DoRALinear``: a frozen ``nn.Linear`` adapted by DoRA.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) replaces a frozen
weight ``W`` by ``diag(m / n)·(W + s·B·A)``, where ``n`` contains the row norms of ``W + s·B·A``, and
trains ``A``, ``B`` and the magnitude ``m``. This layer computes ``n`` from rank-sized factors
(Zelenin and Zhuravlyova, "Scaling DoRA", arXiv 2603.22276) and the output with one autograd
function (:mod:`fedsim.dora.functional`).

Parameter names follow HF PEFT's LoRA layer, so ``state_dict()`` keys are ``base_layer.weight``,
``base_layer.bias``, ``lora_A.weight``, ``lora_B.weight`` and ``lora_magnitude_vector``. The last
three are the keys of a PEFT adapter file after its adapter name is removed (PEFT 0.21.2).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.dora.functional import KernelChoice, compute_dtype, dora_linear
from fedsim.dora.norm import (
    accumulation_dtype,
    default_eps,
    dense_row_norm,
    factored_row_norm,
    norm_chunk_columns,
    weight_row_norm_sq,
)

__all__ = ["DoRALinear", "LoRAFactor", "NormChoice"]

logger = logging.getLogger(__name__)

NormChoice = Literal["factored", "dense"]


class LoRAFactor(nn.Module):
    """Holder of one LoRA factor as ``weight``, so state-dict keys read ``lora_A.weight``.

    Unlike ``nn.Linear(bias=False)`` it draws no random numbers at construction.
    """

    def __init__(self, out_features: int, in_features: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, device=device, dtype=dtype)
        )

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


def _adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # As PEFT does by default (autocast_adapter_dtype=True), 16-bit bases get float32 adapters.
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class DoRALinear(nn.Module):
    """DoRA adapter around a frozen ``nn.Linear``.

    Computes ``y = g ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` with ``g = m / n`` and ``n_i = ‖W_i + s·(B·A)_i‖₂``
    detached (a constant for autograd, as in DoRA and PEFT).

    Shapes and dtypes: ``x`` ``[..., in_features]`` in the base weight's dtype, ``W``
    ``[out_features, in_features]``, ``A`` (``lora_A.weight``) ``[r, in_features]``, ``B``
    (``lora_B.weight``) ``[out_features, r]``, ``m`` (``lora_magnitude_vector``) ``[out_features]``.
    ``A``, ``B`` and ``m`` are float32, or float64 for a float64 base. ``g`` and ``n`` are always
    computed in float32 or float64, never in a 16-bit dtype. ``W`` and ``b`` are frozen.

    Initialisation (as in PEFT): ``A`` from ``kaiming_uniform_(a=√5)``, ``B = 0`` and ``m = ‖W‖_row``,
    so the layer starts equal to the base layer.

    Dropout (PEFT's semantics for DoRA): with ``dropout > 0`` in training mode, with ``x̃`` the input
    after dropout,
    ``y = x·Wᵀ + b + (g − 1) ⊙ (x̃·Wᵀ) + g ⊙ (s·(x̃·Aᵀ)·Bᵀ)``.
    The base term uses the clean input, and the DoRA correction uses the dropped-out one. This costs
    a second base matrix product and runs through plain autograd rather than the fused function. In
    eval mode, or with ``dropout == 0``, ``x̃ = x`` and the expression reduces to the direct form.

    Args:
        base_layer: the ``nn.Linear`` to adapt. Its parameters are shared, not copied, and are set to
            ``requires_grad=False``.
        r: rank, at least 1.
        alpha: LoRA alpha. The scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
        use_rslora: use rank-stabilised scaling.
        dropout: dropout probability on the adapter input, in ``[0, 1)``.
        kernel: epilogue implementation: ``"auto"`` (Triton on CUDA when available), ``"triton"`` or
            ``"torch"``.
        norm: ``"factored"`` (default, never forms ``B·A``) or ``"dense"`` (forms ``W + s·B·A``).
        norm_chunk_columns: columns of ``W`` per step of the norm loop. By default a 256 MiB budget
            decides (see :func:`fedsim.dora.norm.norm_chunk_columns`).
        recompute_inner: recompute ``x·Wᵀ + s·h·Bᵀ`` in backward instead of saving it.
        seed: seed of a private generator for ``A``. None draws from the global generator.
        eps: lower clamp of ``n``. The default is 1e-12, or 1e-6 for 16-bit bases.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        kernel: KernelChoice = "auto",
        norm: NormChoice = "factored",
        norm_chunk_columns: int | None = None,
        recompute_inner: bool = False,
        seed: int | None = None,
        eps: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if r < 1:
            raise ValueError(f"rank r must be at least 1, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"kernel must be 'auto', 'triton' or 'torch', got {kernel!r}")
        if norm not in ("factored", "dense"):
            raise ValueError(f"norm must be 'factored' or 'dense', got {norm!r}")
        if norm_chunk_columns is not None and norm_chunk_columns < 1:
            raise ValueError(f"norm_chunk_columns must be at least 1, got {norm_chunk_columns}")

        weight = base_layer.weight
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = int(r)
        self.lora_alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.kernel: KernelChoice = kernel
        self.norm: NormChoice = norm
        self.norm_chunk_columns = norm_chunk_columns
        self.recompute_inner = recompute_inner
        self.eps = default_eps(weight.dtype) if eps is None else float(eps)

        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        adapter_dtype = _adapter_dtype(weight.dtype)
        self.lora_A = LoRAFactor(
            self.r, self.in_features, device=weight.device, dtype=adapter_dtype
        )
        self.lora_B = LoRAFactor(
            self.out_features, self.r, device=weight.device, dtype=adapter_dtype
        )
        self.lora_magnitude_vector = nn.Parameter(
            torch.zeros(self.out_features, device=weight.device, dtype=adapter_dtype)
        )

        self._weight_sq: torch.Tensor | None = None
        self._weight_sq_key: tuple | None = None
        self._norm_cache: torch.Tensor | None = None
        self._norm_cache_key: tuple | None = None
        self._merged_norm: torch.Tensor | None = None

        self.reset_adapter_parameters(seed=seed)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int,
        alpha: float,
        **options,
    ) -> DoRALinear:
        """Wrap ``linear`` (sharing its parameters) in a fresh adapter. ``options`` as in the class."""
        return cls(linear, r, alpha, **options)

    # Properties that code written for nn.Linear reads.

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight ``W``, ``[out_features, in_features]``."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias ``b``, ``[out_features]``, or None."""
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        """Whether the adapter is folded into the base weight (see :meth:`merge`)."""
        return self._merged_norm is not None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.lora_alpha}, scaling={self.scaling:g}, norm={self.norm}, kernel={self.kernel}"
        )

    # Initialisation and caches.

    @torch.no_grad()
    def reset_adapter_parameters(self, seed: int | None = None) -> None:
        """Reset ``A`` to ``kaiming_uniform_(a=√5)``, ``B`` to zeros and ``m`` to ``‖W‖_row``.

        With a ``seed``, ``A`` is drawn on the CPU from a private generator, so every process and
        device gets the same ``A`` for the same seed and shape.

        Raises:
            RuntimeError: if the adapter is merged.
        """
        if self.merged:
            raise RuntimeError(
                "cannot reset the adapter of a merged DoRALinear; call unmerge() first"
            )

        lora_A = self.lora_A.weight
        if seed is None:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        else:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            values = torch.empty(lora_A.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            lora_A.copy_(values)

        self.lora_B.weight.zero_()
        self.lora_magnitude_vector.copy_(self.weight_sq().sqrt())
        self.invalidate_norm_cache()

    def invalidate_norm_cache(self) -> None:
        """Drop the cached norm ``n``; call after writing into ``A`` or ``B`` without autograd.

        In-place writes bump tensor version counters, which the cache checks as well, so this is only
        needed after writes that bypass them (for example through ``.data``).
        """
        self._norm_cache = None
        self._norm_cache_key = None

    def train(self, mode: bool = True) -> DoRALinear:
        if mode:
            self.invalidate_norm_cache()
        return super().train(mode)

    @staticmethod
    def _tensor_key(tensor: torch.Tensor) -> tuple:
        return (tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape))

    def weight_sq(self) -> torch.Tensor:
        """Return ``‖W_i‖²`` (``[out_features]``, float32 or float64), cached while ``W`` is unchanged."""
        key = self._tensor_key(self.weight)
        if self._weight_sq is None or self._weight_sq_key != key:
            self._weight_sq = weight_row_norm_sq(self.weight)
            self._weight_sq_key = key
        return self._weight_sq

    def weight_norm(self) -> torch.Tensor:
        """Return the detached row norm ``n`` of ``W + s·B·A``, ``[out_features]``, float32 or float64.

        In eval mode the result is cached until ``A``, ``B`` or ``W`` change (by version counter or
        storage). In training mode it is computed on every call.
        """
        lora_A = self.lora_A.weight
        lora_B = self.lora_B.weight
        key = None
        if not self.training:
            key = (
                self._tensor_key(lora_A),
                self._tensor_key(lora_B),
                self._tensor_key(self.weight),
            )
            if self._norm_cache is not None and self._norm_cache_key == key:
                return self._norm_cache

        if self.norm == "factored":
            weight_norm = factored_row_norm(
                self.weight,
                lora_A,
                lora_B,
                self.scaling,
                weight_sq=self.weight_sq(),
                chunk_columns=self._chunk_columns(),
                eps=self.eps,
            )
        else:
            weight_norm = dense_row_norm(
                self.weight,
                lora_A,
                lora_B,
                self.scaling,
                chunk_columns=self.norm_chunk_columns,
                eps=self.eps,
            )

        if key is not None:
            self._norm_cache = weight_norm
            self._norm_cache_key = key
        return weight_norm

    def _chunk_columns(self) -> int:
        if self.norm_chunk_columns is not None:
            return self.norm_chunk_columns
        return norm_chunk_columns(
            self.out_features, self.in_features, self.weight.dtype, self.weight.device
        )

    # Forward.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to ``x`` ``[..., in_features]``; return ``[..., out_features]``.

        When merged, this is the base layer with the merged weight. Under ``torch.autocast`` the input,
        base weight and factors are cast to the autocast dtype first, which copies ``W`` as autocast
        itself would.

        Raises:
            TypeError: if ``x``'s dtype differs from the base weight's outside autocast.
        """
        if self.merged:
            return self.base_layer(x)

        weight = self.weight
        bias = self.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            act_dtype = torch.get_autocast_dtype(device_type)
            x = x.to(act_dtype)
            weight = weight.to(act_dtype)
        elif x.dtype != weight.dtype:
            raise TypeError(
                f"input dtype {x.dtype} does not match the base weight dtype {weight.dtype}; "
                "cast the input or run under torch.autocast"
            )
        act_dtype = x.dtype

        weight_norm = self.weight_norm()
        lora_A = self.lora_A.weight.to(act_dtype)
        lora_B = self.lora_B.weight.to(act_dtype)

        with torch.autocast(device_type, enabled=False):
            if self.training and isinstance(self.lora_dropout, nn.Dropout):
                return self._forward_with_dropout(x, weight, bias, lora_A, lora_B, weight_norm)
            return dora_linear(
                x,
                weight,
                bias,
                lora_A,
                lora_B,
                self.lora_magnitude_vector,
                weight_norm,
                self.scaling,
                kernel=self.kernel,
                recompute_inner=self.recompute_inner,
            )

    def _forward_with_dropout(self, x, weight, bias, lora_A, lora_B, weight_norm):
        """PEFT's DoRA with dropout, in the delta form with ``g − 1`` in float32 or float64."""
        dropped = self.lora_dropout(x)
        scale_dtype = compute_dtype(x.dtype)
        scale = self.lora_magnitude_vector.to(scale_dtype) / weight_norm.to(scale_dtype)

        base = F.linear(x, weight, bias)
        dropped_base = F.linear(dropped, weight)
        lora = F.linear(F.linear(dropped, lora_A), lora_B)

        delta = (scale - 1) * dropped_base.to(scale_dtype) + scale * (
            self.scaling * lora.to(scale_dtype)
        )
        return base + delta.to(x.dtype)

    # Merging.

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: ``W ← diag(m / n)·(W + s·B·A)``.

        Afterwards ``forward`` is the base layer alone, and its output matches the unmerged layer up
        to rounding. The norm ``n`` of the unmerged weight is kept for :meth:`unmerge`. This forms one
        ``[out_features, in_features]`` temporary in the accumulation dtype. Merging twice is a
        no-op with a warning.
        """
        if self.merged:
            logger.warning("DoRALinear.merge() called on an already merged layer; nothing to do")
            return

        weight_norm = self.weight_norm().clone()
        acc_dtype = accumulation_dtype(self.weight.dtype)
        scale = self.lora_magnitude_vector.to(acc_dtype) / weight_norm.to(acc_dtype)
        adapted = torch.addmm(
            self.weight.to(acc_dtype),
            self.lora_B.weight.to(acc_dtype),
            self.lora_A.weight.to(acc_dtype),
            alpha=self.scaling,
        )
        adapted.mul_(scale[:, None])
        self.weight.copy_(adapted)
        self._merged_norm = weight_norm
        self.invalidate_norm_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W ← W·diag(n / m) − s·B·A``, using the norm kept by ``merge``.

        Exact up to rounding, provided ``m``, ``A`` and ``B`` did not change while merged. Rows with
        ``m_i = 0`` cannot be recovered (the merged row is zero) and come back as ``−s·(B·A)_i``.
        Unmerging an unmerged layer is a no-op with a warning.
        """
        merged_norm = self._merged_norm
        if merged_norm is None:
            logger.warning(
                "DoRALinear.unmerge() called on a layer that is not merged; nothing to do"
            )
            return

        acc_dtype = accumulation_dtype(self.weight.dtype)
        scale = self.lora_magnitude_vector.to(acc_dtype) / merged_norm.to(acc_dtype)
        inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        restored = self.weight.to(acc_dtype) * inverse[:, None]
        restored.addmm_(
            self.lora_B.weight.to(acc_dtype),
            self.lora_A.weight.to(acc_dtype),
            alpha=-self.scaling,
        )
        self.weight.copy_(restored)
        self._merged_norm = None
        self.invalidate_norm_cache()
