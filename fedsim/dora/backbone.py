"""A small transformer classifier, a task shift and a seeded pre-training step for DoRA fine-tuning.

Federated DoRA fine-tuning (DoRA: Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation",
arXiv 2402.09353; factored norm: Zelenin and Zhuravlyova, "Scaling DoRA", arXiv 2603.22276) needs a
frozen base model that is identical, bit for bit, on every client. This module provides one that trains in a
second on a CPU:

- :class:`RowTransformer` reads an image ``(C, H, W)`` as ``H`` tokens of ``C·W`` features (one
  token per pixel row), or a feature vector ``(F,)`` as one token. Its linear layers have PEFT-like
  names (``blocks.<i>.attn.q_proj``, ``blocks.<i>.mlp.up_proj``, ``head``, ...), so a target pattern
  such as ``r"blocks\\.\\d+\\.attn\\.(q|v)_proj"`` selects them.
- :func:`apply_shift` turns the source task into the target task: ``rotate90`` turns every image a
  quarter turn counter-clockwise, ``flip`` mirrors it left to right, ``invert`` maps a pixel ``v``
  to ``1 − v`` (digits pixels lie in ``[0, 1]``), ``permute_labels`` relabels class ``c`` as
  ``π(c)`` with a seeded permutation ``π`` without fixed points, and ``none`` keeps the task.
- :func:`pretrain` trains every parameter on the source task with Adam, in a fixed order and on one
  thread, so two processes with the same inputs end with the same weights on the same machine.

No Flower, Ray or file I/O happens here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional

__all__ = [
    "SHIFTS",
    "RowTransformer",
    "Shift",
    "apply_shift",
    "build_dora_backbone",
    "label_permutation",
    "pretrain",
    "state_bytes",
]

logger = logging.getLogger(__name__)

Shift = Literal["none", "rotate90", "flip", "invert", "permute_labels"]
SHIFTS: tuple[str, ...] = ("none", "rotate90", "flip", "invert", "permute_labels")
"""Target-task shifts that :func:`apply_shift` implements."""


class _Attention(nn.Module):
    """Multi-head self-attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape

        def split(values: torch.Tensor) -> torch.Tensor:
            return values.view(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        attended = functional.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class _FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(functional.gelu(self.up_proj(x)))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = _FeedForward(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RowTransformer(nn.Module):
    """Transformer classifier over the pixel rows of an image.

    Input ``[N, *input_shape]`` float32, output logits ``[N, num_classes]``. An image ``(C, H, W)``
    becomes ``H`` tokens of ``C·W`` features, and a vector ``(F,)`` one token of ``F`` features.
    Tokens are embedded (``embed``), get a learned position embedding, pass ``depth`` pre-norm
    blocks, and their mean goes through a final layer norm to the linear ``head``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        *,
        width: int = 32,
        depth: int = 2,
        heads: int = 2,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 3:
            self.tokens, self.token_features = shape[1], shape[0] * shape[2]
        elif len(shape) == 1:
            self.tokens, self.token_features = 1, shape[0]
        else:
            raise ValueError(f"RowTransformer takes inputs of shape (C, H, W) or (F,), got {shape}")
        if width % heads != 0:
            raise ValueError(f"width {width} must be a multiple of heads {heads}")

        self.input_shape = shape
        self.embed = nn.Linear(self.token_features, width)
        self.position = nn.Parameter(torch.zeros(1, self.tokens, width))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio * width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.input_shape) == 3:
            # (N, C, H, W) -> (N, H, C·W): one token per pixel row.
            tokens = x.permute(0, 2, 1, 3).reshape(x.shape[0], self.tokens, self.token_features)
        else:
            tokens = x.reshape(x.shape[0], 1, self.token_features)
        hidden = self.embed(tokens) + self.position
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(self.norm(hidden.mean(dim=1)))


def build_dora_backbone(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int,
    width: int = 32,
    depth: int = 2,
    heads: int = 2,
) -> RowTransformer:
    """Build a :class:`RowTransformer` whose initial weights depend only on ``seed``.

    The global torch random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return RowTransformer(input_shape, num_classes, width=width, depth=depth, heads=heads)


def label_permutation(num_classes: int, seed: int) -> np.ndarray:
    """Return a seeded permutation ``π`` of ``0..num_classes−1`` with no fixed point (a derangement).

    It is a random cyclic shift of a random order, so ``π(c) ≠ c`` for every class when
    ``num_classes ≥ 2``.
    """
    rng = np.random.default_rng(int(seed))
    order = rng.permutation(num_classes)
    shift = int(rng.integers(1, num_classes)) if num_classes > 1 else 0
    permutation = np.empty(num_classes, dtype=np.int64)
    permutation[order] = order[(np.arange(num_classes) + shift) % num_classes]
    return permutation


def apply_shift(
    features: np.ndarray, labels: np.ndarray, shift: str, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features, labels)`` of the target task made from source examples.

    ``features`` is ``[N, C, H, W]`` for image shifts (``rotate90``, ``flip``) and any shape for
    the others. Inputs are not modified. ``seed`` only matters for ``permute_labels``.

    Raises:
        ValueError: for an unknown shift, or an image shift on non-image features.
    """
    if shift not in SHIFTS:
        raise ValueError(f"unknown task shift {shift!r}; available: {', '.join(SHIFTS)}")
    if shift in ("rotate90", "flip") and features.ndim != 4:
        raise ValueError(f"shift {shift!r} needs image features [N, C, H, W], got shape {features.shape}")

    if shift == "rotate90":
        return np.ascontiguousarray(np.rot90(features, k=1, axes=(2, 3))), labels
    if shift == "flip":
        return np.ascontiguousarray(features[..., ::-1]), labels
    if shift == "invert":
        return (1.0 - features).astype(features.dtype), labels
    if shift == "permute_labels":
        return features, label_permutation(num_classes, seed)[labels]
    return features, labels


@contextmanager
def _single_thread() -> Iterator[None]:
    # Matrix products may split reductions differently with another thread count, so the
    # pre-trained weights are only reproducible bit for bit at a fixed count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrain(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    seed: int,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> float:
    """Train every parameter of ``model`` in place on ``(features, labels)`` with Adam and cross-entropy.

    Shuffling uses a generator seeded with ``seed``, and the loop runs on one CPU thread, so the
    result depends only on the inputs (and on the machine's floating-point kernels). Returns the
    mean training loss of the last epoch (NaN for ``epochs == 0``). The model is left in eval mode.
    """
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    last_loss = math.nan
    with _single_thread():
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            total = 0.0
            for start in range(0, len(y), batch_size):
                batch = order[start : start + batch_size]
                loss = functional.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            last_loss = total / max(len(y), 1)
            logger.debug("pre-training epoch %d: loss %.4f", epoch + 1, last_loss)
    model.eval()
    return last_loss


def state_bytes(model: nn.Module) -> int:
    """Return the payload bytes of ``model``'s state dict (``numel · itemsize``, summed).

    This is what full-model FedAvg sends per message for this model.
    """
    return sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
