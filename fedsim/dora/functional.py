"""The DoRA linear map as one autograd function, with PyTorch and Triton epilogues.

DoRA (Liu et al., arXiv 2402.09353) computes, for x ``[N, d_in]``::

    h     = x·Aᵀ                       [N, r]
    inner = x·Wᵀ + s·h·Bᵀ              [N, d_out]
    g     = m / n                      [d_out], float32 (float64 for float64 inputs)
    y     = g ⊙ inner + b

where ``n`` is the row norm of ``W + s·B·A``. As in the DoRA paper and HF PEFT, ``n`` is detached and
counts as a constant in backward. This is the "direct" compose that the torchao DoRA prototype also
uses: one ``[N, d_out]`` buffer for ``inner``, one multiply by ``g``, no ``g - 1`` cancellation.
Backward, with ``dY`` the output gradient::

    d_inner = g ⊙ dY
    dm      = Σ_rows(dY ⊙ inner) / n
    dh      = s · d_inner·B       dB = s · d_innerᵀ·h       dA = dhᵀ·x
    dx      = d_inner·W + dh·A    db = Σ_rows dY

The elementwise steps ("epilogues") run either in PyTorch or in the Triton kernels of
:mod:`fedsim.dora.kernels` (after Zelenin and Zhuravlyova, "Scaling DoRA", arXiv 2603.22276). Both
compute in float32 (float64 for float64 inputs) and reduce ``dm`` in a fixed order, so repeated runs
give identical results.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Literal

import torch

__all__ = [
    "DoRALinearFunction",
    "KernelChoice",
    "compose_backward_torch",
    "compose_forward_torch",
    "compute_dtype",
    "dora_linear",
    "resolve_backend",
    "triton_available",
]

logger = logging.getLogger(__name__)

KernelChoice = Literal["auto", "triton", "torch"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Elements of [rows, d_out] handled per step when the PyTorch path reduces dY ⊙ inner, which bounds
# its float32 temporary at 16 MiB.
_REDUCE_CHUNK_ELEMENTS = 4 * 1024 * 1024

_triton_importable: bool | None = None


def triton_available() -> bool:
    """Return whether :mod:`fedsim.dora.kernels` can be imported (Triton is installed and loads)."""
    global _triton_importable
    if _triton_importable is None:
        if importlib.util.find_spec("triton") is None:
            _triton_importable = False
        else:
            try:
                importlib.import_module("fedsim.dora.kernels")
                _triton_importable = True
            except Exception as error:  # noqa: BLE001 - any import failure means "use torch"
                logger.warning("Triton is installed but failed to load (%s); using PyTorch", error)
                _triton_importable = False
    return _triton_importable


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(kernel: KernelChoice, device: torch.device, dtype: torch.dtype) -> str:
    """Return ``"triton"`` or ``"torch"`` for tensors on ``device`` with activation ``dtype``.

    ``"auto"`` picks Triton for float32, float16 and bfloat16 on CUDA when Triton loads, and PyTorch
    otherwise. ``"triton"`` also runs CPU tensors when ``TRITON_INTERPRET=1`` was set before Triton
    was imported (the Triton interpreter, for tests).

    Raises:
        ValueError: for an unknown ``kernel``, or ``"triton"`` with a dtype the kernels do not take.
        RuntimeError: for ``"triton"`` when Triton does not load, or on a CPU without the interpreter.
    """
    if kernel == "torch":
        return "torch"
    if kernel == "auto":
        eligible = device.type == "cuda" and dtype in _TRITON_DTYPES
        return "triton" if eligible and triton_available() else "torch"
    if kernel != "triton":
        raise ValueError(f"kernel must be 'auto', 'triton' or 'torch', got {kernel!r}")

    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"the Triton kernels take float32, float16 or bfloat16, got {dtype}")
    if not triton_available():
        raise RuntimeError("kernel='triton' needs the triton package; install fedsim[gpu]")
    if device.type != "cuda" and not _triton_interpreting():
        raise RuntimeError(
            f"kernel='triton' needs CUDA tensors, got device {device}; "
            "set TRITON_INTERPRET=1 before importing triton to run the interpreter on CPU"
        )
    return "triton"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype of ``g`` and of the epilogue arithmetic for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compose_forward_torch(
    inner: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``scale ⊙ inner + bias`` in the dtype of ``inner``, computed in ``scale``'s dtype.

    Args:
        inner: ``[N, d_out]``, any floating dtype.
        scale: ``g``, ``[d_out]``, float32 or float64.
        bias: ``[d_out]`` or None.
        out: optional ``[N, d_out]`` destination of ``inner``'s dtype. It may be ``inner`` itself.
    """
    # Multiply, round, then add the bias: the same two roundings as the Triton kernel (without
    # the GPU's multiply-add contraction), so both paths agree bitwise on CPU.
    if inner.dtype == scale.dtype:
        result = torch.mul(inner, scale, out=out)
        return result if bias is None else result.add_(bias.to(scale.dtype))

    result = inner * scale
    if bias is not None:
        result.add_(bias.to(scale.dtype))
    if out is None:
        return result.to(inner.dtype)
    return out.copy_(result)


def _reduce_rows_product(
    grad: torch.Tensor, inner: torch.Tensor, acc_dtype: torch.dtype
) -> torch.Tensor:
    """Return ``Σ_rows grad ⊙ inner`` in ``acc_dtype``, in row chunks that bound the temporary."""
    rows, cols = grad.shape
    total = torch.zeros(cols, dtype=acc_dtype, device=grad.device)
    step = max(_REDUCE_CHUNK_ELEMENTS // max(cols, 1), 1)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        product = grad[start:stop].to(acc_dtype) * inner[start:stop].to(acc_dtype)
        total.add_(product.sum(dim=0))
    return total


def compose_backward_torch(
    grad_output: torch.Tensor,
    scale: torch.Tensor,
    inner: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(d_inner, Σ_rows dY ⊙ inner)`` for the compose ``y = g ⊙ inner + b``.

    Args:
        grad_output: ``dY``, ``[N, d_out]``.
        scale: ``g``, ``[d_out]``, float32 or float64.
        inner: ``[N, d_out]``, or None when the magnitude needs no gradient.

    Returns:
        ``d_inner = g ⊙ dY`` in ``dY``'s dtype, and the row sum in ``scale``'s dtype (None without
        ``inner``).
    """
    if grad_output.dtype == scale.dtype:
        grad_inner = grad_output * scale
    else:
        grad_inner = (grad_output * scale).to(grad_output.dtype)

    row_sum = None
    if inner is not None:
        row_sum = _reduce_rows_product(grad_output, inner, scale.dtype)
    return grad_inner, row_sum


def _compose_forward(backend: str, inner: torch.Tensor, scale: torch.Tensor, bias, out=None):
    if backend == "triton":
        from fedsim.dora import kernels

        return kernels.compose_forward(inner, scale, bias, out=out)
    return compose_forward_torch(inner, scale, bias, out=out)


def _compose_backward(backend: str, grad_output: torch.Tensor, scale: torch.Tensor, inner):
    if backend == "triton":
        from fedsim.dora import kernels

        return kernels.compose_backward(grad_output, scale, inner)
    return compose_backward_torch(grad_output, scale, inner)


def _lora_inner(x2d, weight, lora_A, lora_B, scaling):
    """Return ``(h, inner)`` with ``h = x·Aᵀ`` and ``inner = x·Wᵀ + s·h·Bᵀ``."""
    h = x2d @ lora_A.T
    inner = x2d @ weight.T
    inner.addmm_(h, lora_B.T, alpha=scaling)
    return h, inner


class DoRALinearFunction(torch.autograd.Function):
    """Autograd function for ``y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b`` with ``n`` constant.

    It saves ``x``, ``h = x·Aᵀ``, ``g`` and, when ``m`` needs a gradient and ``recompute_inner`` is
    False, ``inner``, which is the only saved tensor of the output's size. When nothing needs
    ``inner`` in backward, ``y`` is written into the ``inner`` buffer in place.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x2d: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        magnitude: torch.Tensor,
        weight_norm: torch.Tensor,
        scaling: float,
        backend: str,
        recompute_inner: bool,
    ) -> torch.Tensor:
        scale_dtype = compute_dtype(x2d.dtype)
        scale = magnitude.detach().to(scale_dtype) / weight_norm.detach().to(scale_dtype)

        h, inner = _lora_inner(x2d, weight, lora_A, lora_B, scaling)

        needs_grad = any(ctx.needs_input_grad)
        keep_inner = ctx.needs_input_grad[5] and not recompute_inner
        if keep_inner:
            output = _compose_forward(backend, inner, scale, bias)
        else:
            output = _compose_forward(backend, inner, scale, bias, out=inner)

        ctx.scaling = scaling
        ctx.backend = backend
        ctx.recompute_inner = recompute_inner
        ctx.magnitude_dtype = magnitude.dtype
        if needs_grad:
            ctx.save_for_backward(
                x2d, weight, lora_A, lora_B, h, scale, weight_norm, inner if keep_inner else None
            )
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        x2d, weight, lora_A, lora_B, h, scale, weight_norm, inner = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, need_m = ctx.needs_input_grad[:6]
        scaling = ctx.scaling
        grad_output = grad_output.contiguous()

        # Epilogue: d_inner = g ⊙ dY and, for dm, the row sums of dY ⊙ inner.
        if need_m and inner is None:
            _, inner = _lora_inner(x2d, weight, lora_A, lora_B, scaling)
        grad_inner, row_sum = _compose_backward(
            ctx.backend, grad_output, scale, inner if need_m else None
        )
        del inner

        grad_x = grad_weight = grad_bias = grad_a = grad_b = grad_m = None
        if need_m:
            grad_m = (row_sum / weight_norm.to(row_sum.dtype)).to(ctx.magnitude_dtype)
        if need_b:
            grad_bias = grad_output.sum(dim=0)

        # The low-rank path: dh = s·d_inner·B, dB = s·d_innerᵀ·h, dA = dhᵀ·x.
        if need_bb:
            grad_b = (grad_inner.T @ h).mul_(scaling)
        if need_w:
            grad_weight = grad_inner.T @ x2d
        if need_x or need_a:
            grad_h = (grad_inner @ lora_B).mul_(scaling)
            if need_a:
                grad_a = grad_h.T @ x2d
            if need_x:
                grad_x = grad_inner @ weight
                grad_x.addmm_(grad_h, lora_A)

        return grad_x, grad_weight, grad_bias, grad_a, grad_b, grad_m, None, None, None, None


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: float,
    *,
    kernel: KernelChoice = "auto",
    recompute_inner: bool = False,
) -> torch.Tensor:
    """Apply the DoRA linear map ``y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``.

    Args:
        x: ``[..., d_in]``.
        weight: ``W``, ``[d_out, d_in]``, same dtype as ``x``.
        bias: ``b``, ``[d_out]`` or None.
        lora_A: ``A``, ``[r, d_in]``, same dtype as ``x``.
        lora_B: ``B``, ``[d_out, r]``, same dtype as ``x``.
        magnitude: ``m``, ``[d_out]``, any floating dtype. Its gradient has its dtype.
        weight_norm: ``n``, ``[d_out]``, treated as a constant (no gradient flows into it).
        scaling: ``s``.
        kernel: ``"auto"``, ``"triton"`` or ``"torch"`` epilogues (see :func:`resolve_backend`).
        recompute_inner: recompute ``inner`` in backward instead of saving it.

    Returns:
        ``y``, ``[..., d_out]`` in ``x``'s dtype. ``g`` and the epilogue arithmetic are float32
        (float64 for float64 ``x``). Gradients flow to every input except ``weight_norm``.

    Raises:
        TypeError: if ``x``, ``weight``, ``lora_A`` and ``lora_B`` do not share one dtype.
    """
    dtypes = {x.dtype, weight.dtype, lora_A.dtype, lora_B.dtype}
    if len(dtypes) != 1:
        raise TypeError(
            "x, weight, lora_A and lora_B must share one dtype, got "
            f"{x.dtype}, {weight.dtype}, {lora_A.dtype} and {lora_B.dtype}"
        )

    backend = resolve_backend(kernel, x.device, x.dtype)
    leading_shape = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    output = DoRALinearFunction.apply(
        x2d, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, backend, recompute_inner
    )
    return output.reshape(*leading_shape, weight.shape[0])
