"""Row norms of the DoRA weight ``W + s·B·A`` without forming ``B·A``.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) rescales every
output feature ``i`` of the adapted weight ``V = W + s·B·A`` by ``m_i / ‖V_i‖₂``. Zelenin and
Zhuravlyova ("Scaling DoRA: High-Rank Adaptation via Factored Norms and Fused Kernels",
arXiv 2603.22276) expand the squared norm into rank-sized factors::

    ‖V_i‖² = ‖W_i‖² + 2s·Σ_k B_ik U_ik + s²·Σ_kl B_ik G_kl B_il,   U = W·Aᵀ,  G = A·Aᵀ

``U`` (``[d_out, r]``), ``G`` (``[r, r]``) and ``‖W‖²`` are sums over ``d_in``, so they accumulate over
column chunks of ``W``. The largest temporary is one upcast chunk of ``W``. The factored form costs
about the same FLOPs as forming ``B·A``, but it needs O(d_out·r + r²) memory instead of O(d_out·d_in).

All functions here run without autograd. Norms are accumulated in float32, or in float64 when the
weight is float64.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulation_dtype",
    "default_eps",
    "dense_row_norm",
    "factored_row_norm",
    "norm_chunk_columns",
    "weight_row_norm_sq",
]

_MIB = 1024 * 1024

DEFAULT_CHUNK_MB = 256
"""Memory budget, in MiB, for one upcast column chunk of ``W`` in the norm loop."""

MIN_CHUNK_MB = 16
"""Smallest budget, in MiB, that :func:`norm_chunk_columns` accepts."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype in which norms of a ``dtype`` weight are accumulated (float32 or float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_eps(dtype: torch.dtype) -> float:
    """Return the lower clamp of the row norm for a weight of ``dtype``.

    The clamp keeps ``m / n`` finite for all-zero rows of ``W + s·B·A``. It is 1e-6 for 16-bit
    weights and 1e-12 otherwise.
    """
    return 1e-6 if dtype in (torch.float16, torch.bfloat16) else 1e-12


def norm_chunk_columns(
    out_features: int,
    in_features: int,
    weight_dtype: torch.dtype,
    device: torch.device,
    budget_mb: float = DEFAULT_CHUNK_MB,
) -> int:
    """Return the number of columns of ``W`` processed per step of the norm loop.

    A chunk is only needed when ``W`` must be upcast to the accumulation dtype. A weight that is
    already float32 or float64 is used in one piece, because its chunks are views and cost no memory.
    Otherwise the chunk contains at most ``budget_mb`` MiB of upcast values (at least
    :data:`MIN_CHUNK_MB`), and on CUDA it is a multiple of 64 columns.

    Raises:
        ValueError: if ``budget_mb`` is below :data:`MIN_CHUNK_MB`.
    """
    if budget_mb < MIN_CHUNK_MB:
        raise ValueError(f"norm chunk budget must be at least {MIN_CHUNK_MB} MiB, got {budget_mb}")

    acc_dtype = accumulation_dtype(weight_dtype)
    if weight_dtype == acc_dtype:
        return max(in_features, 1)

    on_cuda = torch.device(device).type == "cuda"
    bytes_per_column = max(out_features, 1) * torch.empty((), dtype=acc_dtype).element_size()
    columns = int(budget_mb * _MIB) // bytes_per_column
    if on_cuda:
        columns = max((columns // 64) * 64, 64)
    return int(min(max(columns, 1), max(in_features, 1)))


def weight_row_norm_sq(weight: torch.Tensor) -> torch.Tensor:
    """Return ``‖W_i‖²`` for every row of ``weight``.

    Args:
        weight: ``[d_out, d_in]`` of any floating dtype.

    Returns:
        ``[d_out]`` in the accumulation dtype (float32, or float64 for a float64 weight). The
        reduction upcasts on load, so no ``[d_out, d_in]`` temporary is allocated.
    """
    acc_dtype = accumulation_dtype(weight.dtype)
    with torch.no_grad():
        return torch.linalg.vector_norm(weight.detach(), dim=1, dtype=acc_dtype).square()


def _chunk_bounds(in_features: int, chunk_columns: int) -> list[tuple[int, int]]:
    step = max(int(chunk_columns), 1)
    return [(start, min(start + step, in_features)) for start in range(0, in_features, step)]


def factored_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    weight_sq: torch.Tensor | None = None,
    chunk_columns: int | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Compute ``n_i = ‖W_i + s·(B·A)_i‖₂`` from rank-sized factors, never forming ``B·A``.

    Args:
        weight: frozen base weight ``W``, ``[d_out, d_in]``, any floating dtype.
        lora_A: ``A``, ``[r, d_in]``.
        lora_B: ``B``, ``[d_out, r]``.
        scaling: ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        weight_sq: cached ``‖W_i‖²`` from :func:`weight_row_norm_sq`. It is computed here when None.
        chunk_columns: columns of ``W`` and ``A`` per accumulation step. The default comes from
            :func:`norm_chunk_columns`.
        eps: lower clamp of the norm. The default comes from :func:`default_eps`.

    Returns:
        ``[d_out]`` in the accumulation dtype, detached. The squared norm is clamped at 0 before the
        square root (rounding can make it slightly negative when ``V_i`` is nearly zero), and the norm
        is clamped at ``eps``.
    """
    d_out, d_in = weight.shape
    acc_dtype = accumulation_dtype(weight.dtype)
    if chunk_columns is None:
        chunk_columns = norm_chunk_columns(d_out, d_in, weight.dtype, weight.device)
    if eps is None:
        eps = default_eps(weight.dtype)

    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        weight = weight.detach()
        lora_A = lora_A.detach().to(acc_dtype)
        lora_B = lora_B.detach().to(acc_dtype)
        if weight_sq is None:
            weight_sq = weight_row_norm_sq(weight)

        # U = W·Aᵀ and G = A·Aᵀ, accumulated over column chunks of W and A.
        cross: torch.Tensor | None = None
        gram: torch.Tensor | None = None
        for start, stop in _chunk_bounds(d_in, chunk_columns):
            weight_chunk = weight[:, start:stop].to(acc_dtype)
            a_chunk = lora_A[:, start:stop]
            if cross is None or gram is None:
                cross = weight_chunk @ a_chunk.T
                gram = a_chunk @ a_chunk.T
            else:
                cross.addmm_(weight_chunk, a_chunk.T)
                gram.addmm_(a_chunk, a_chunk.T)
            del weight_chunk
        if cross is None or gram is None:  # d_in == 0
            rank = lora_A.shape[0]
            cross = torch.zeros(d_out, rank, dtype=acc_dtype, device=weight.device)
            gram = torch.zeros(rank, rank, dtype=acc_dtype, device=weight.device)

        # n² = ‖W‖² + 2s·rowsum(B ⊙ U) + s²·rowsum((B·G) ⊙ B).
        norm_sq = weight_sq.to(acc_dtype).clone()
        norm_sq.add_((lora_B * cross).sum(dim=1), alpha=2.0 * scaling)
        norm_sq.add_(((lora_B @ gram) * lora_B).sum(dim=1), alpha=scaling * scaling)

        return norm_sq.clamp_(min=0.0).sqrt_().clamp_(min=eps)


def dense_row_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    chunk_columns: int | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Compute ``n_i = ‖W_i + s·(B·A)_i‖₂`` by forming ``W + s·B·A`` one column chunk at a time.

    This is the reference form and a benchmark baseline. With ``chunk_columns >= d_in`` it allocates
    a full ``[d_out, d_in]`` temporary. Arguments and result are as in :func:`factored_row_norm`.
    """
    d_out, d_in = weight.shape
    acc_dtype = accumulation_dtype(weight.dtype)
    if chunk_columns is None:
        chunk_columns = d_in
    if eps is None:
        eps = default_eps(weight.dtype)

    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        lora_A = lora_A.detach().to(acc_dtype)
        lora_B = lora_B.detach().to(acc_dtype)
        norm_sq = torch.zeros(d_out, dtype=acc_dtype, device=weight.device)
        for start, stop in _chunk_bounds(d_in, chunk_columns):
            adapted = torch.addmm(
                weight[:, start:stop].detach().to(acc_dtype),
                lora_B,
                lora_A[:, start:stop],
                alpha=scaling,
            )
            norm_sq.add_(adapted.square_().sum(dim=1))
            del adapted

        return norm_sq.clamp_(min=0.0).sqrt_().clamp_(min=eps)
