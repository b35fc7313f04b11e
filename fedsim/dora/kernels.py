"""Triton kernels for the elementwise steps of the DoRA linear layer.

The fused compose follows Zelenin and Zhuravlyova, "Scaling DoRA: High-Rank Adaptation via Factored
Norms and Fused Kernels" (arXiv 2603.22276), applied to the direct form ``y = g ⊙ inner + b`` of DoRA
(Liu et al., arXiv 2402.09353). The matrix products stay in PyTorch; these kernels replace the
elementwise passes around them:

* forward: ``y = g ⊙ inner + b``, optionally written over ``inner``;
* backward: ``d_inner = g ⊙ dY`` plus one float32 partial sum of ``dY ⊙ inner`` per block of rows,
  which PyTorch then adds in a fixed order. No atomics are used, so results are reproducible.

Every load is upcast to float32 and every value is rounded once on store. ``g`` stays float32. This
module imports Triton at import time, so only import it where Triton is wanted. Set
``TRITON_INTERPRET=1`` before the first import of Triton to run these kernels on CPU tensors (the
interpreter is exact for float32 and float16, but it rounds bfloat16 stores by truncation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["compose_backward", "compose_forward"]

# Fixed tile sizes: the kernels are memory-bound, and in-place launches must not be autotuned
# (every autotune trial would apply the update again).
_BLOCK_ROWS = 32
_BLOCK_COLS = 128
_NUM_WARPS = 4


@triton.jit
def _compose_forward_kernel(
    inner_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    n_rows,
    n_cols,
    HAS_BIAS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_mask[None, :]
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]

    inner = tl.load(inner_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    result = inner * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        result = result + bias[None, :]

    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _compose_backward_kernel(
    grad_ptr,
    scale_ptr,
    inner_ptr,
    grad_inner_ptr,
    partial_ptr,
    n_rows,
    n_cols,
    HAS_INNER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = col_block * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_mask[None, :]
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]

    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=col_mask, other=0.0)
    grad_inner = grad * scale[None, :]
    tl.store(grad_inner_ptr + offsets, grad_inner.to(grad_inner_ptr.dtype.element_ty), mask=mask)

    if HAS_INNER:
        inner = tl.load(inner_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        partial = tl.sum(grad * inner, axis=0)
        tl.store(partial_ptr + row_block.to(tl.int64) * n_cols + cols, partial, mask=col_mask)


def _grid(n_rows: int, n_cols: int) -> tuple[int, int]:
    return (triton.cdiv(n_rows, _BLOCK_ROWS), triton.cdiv(n_cols, _BLOCK_COLS))


def _check_matrix(name: str, tensor: torch.Tensor) -> None:
    if tensor.dim() != 2 or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous 2-D tensor, got shape {tuple(tensor.shape)}")


def _check_scale(scale: torch.Tensor, n_cols: int) -> None:
    if scale.dtype != torch.float32 or scale.shape != (n_cols,) or not scale.is_contiguous():
        raise ValueError(
            f"scale must be a contiguous float32 tensor of shape ({n_cols},), "
            f"got {scale.dtype} of shape {tuple(scale.shape)}"
        )


def compose_forward(
    inner: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``scale ⊙ inner + bias``, computed in float32 and rounded once to ``inner``'s dtype.

    Args:
        inner: contiguous ``[N, d_out]``, float32, float16 or bfloat16.
        scale: ``g``, contiguous float32 ``[d_out]``.
        bias: ``[d_out]`` of any floating dtype, or None.
        out: optional contiguous destination shaped and typed like ``inner``. It may be ``inner``.

    Raises:
        ValueError: on a non-contiguous or wrongly shaped argument.
    """
    _check_matrix("inner", inner)
    n_rows, n_cols = inner.shape
    _check_scale(scale, n_cols)
    if out is None:
        out = torch.empty_like(inner)
    elif out.shape != inner.shape or out.dtype != inner.dtype or not out.is_contiguous():
        raise ValueError("out must be contiguous and match inner's shape and dtype")
    if bias is not None:
        bias = bias.contiguous()
        if bias.shape != (n_cols,):
            raise ValueError(f"bias must have shape ({n_cols},), got {tuple(bias.shape)}")

    if inner.numel() == 0:
        return out
    _compose_forward_kernel[_grid(n_rows, n_cols)](
        inner,
        scale,
        bias if bias is not None else scale,
        out,
        n_rows,
        n_cols,
        HAS_BIAS=bias is not None,
        BLOCK_ROWS=_BLOCK_ROWS,
        BLOCK_COLS=_BLOCK_COLS,
        num_warps=_NUM_WARPS,
    )
    return out


def compose_backward(
    grad_output: torch.Tensor,
    scale: torch.Tensor,
    inner: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(g ⊙ dY, Σ_rows dY ⊙ inner)`` for the compose ``y = g ⊙ inner + b``.

    Args:
        grad_output: ``dY``, contiguous ``[N, d_out]``, float32, float16 or bfloat16.
        scale: ``g``, contiguous float32 ``[d_out]``.
        inner: contiguous ``[N, d_out]`` like ``dY``, or None when the magnitude needs no gradient.

    Returns:
        ``d_inner`` in ``dY``'s dtype, and the float32 row sum (None without ``inner``). The kernel
        writes one partial sum per block of rows, and ``torch.sum`` adds the blocks in order.

    Raises:
        ValueError: on a non-contiguous or wrongly shaped argument.
    """
    _check_matrix("grad_output", grad_output)
    n_rows, n_cols = grad_output.shape
    _check_scale(scale, n_cols)
    if inner is not None:
        _check_matrix("inner", inner)
        if inner.shape != grad_output.shape:
            raise ValueError(f"inner has shape {tuple(inner.shape)}, expected {(n_rows, n_cols)}")

    grad_inner = torch.empty_like(grad_output)
    grid = _grid(n_rows, n_cols)
    partial = None
    if inner is not None:
        partial = torch.zeros(grid[0], n_cols, dtype=torch.float32, device=grad_output.device)

    if grad_output.numel() > 0:
        _compose_backward_kernel[grid](
            grad_output,
            scale,
            inner if inner is not None else grad_output,
            grad_inner,
            partial if partial is not None else scale,
            n_rows,
            n_cols,
            HAS_INNER=inner is not None,
            BLOCK_ROWS=_BLOCK_ROWS,
            BLOCK_COLS=_BLOCK_COLS,
            num_warps=_NUM_WARPS,
        )

    row_sum = partial.sum(dim=0) if partial is not None else None
    return grad_inner, row_sum
