"""Local training and evaluation loops on in-memory arrays.

The loops batch tensors directly instead of going through a ``DataLoader``: client data is small
and already in memory, and the per-batch cost of a loader dominates small models. Shuffling uses
an explicit ``torch.Generator`` so each client's order in each round is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

__all__ = ["EvalResult", "TrainResult", "evaluate_model", "make_optimizer", "train_model"]


@dataclass(frozen=True)
class TrainResult:
    """Mean training loss over all examples seen, the example count and the optimizer steps."""

    loss: float
    num_examples: int
    steps: int


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy on a split (accuracy is NaN for regression), and its size."""

    loss: float
    accuracy: float
    num_examples: int


def make_optimizer(
    parameters: Iterable[nn.Parameter],
    name: str,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build the ``sgd`` or ``adam`` optimizer over ``parameters``."""
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; available: sgd, adam")


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """Cross-entropy for classification, mean squared error for regression (mean over the batch)."""
    if task == "regression":
        return functional.mse_loss(outputs.squeeze(-1), targets)
    return functional.cross_entropy(outputs, targets)


def _as_tensors(x: np.ndarray, y: np.ndarray, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32 if task == "regression" else np.int64))
    return features, targets


def train_model(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    task: str = "classification",
    extra_loss: Callable[[], torch.Tensor] | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    grad_clip: float | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` passes over ``(x, y)`` in shuffled mini-batches.

    ``extra_loss`` is added to each batch's task loss (a regulariser); ``before_step`` runs before
    each forward pass and ``after_step`` after each optimizer step with the batch size.
    The returned loss is the task loss averaged over examples, without ``extra_loss``.
    A non-finite loss is not an error here: the server rejects the update it produces.
    """
    features, targets = _as_tensors(x, y, task)
    n = features.shape[0]
    model.train()
    total_loss, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            if before_step is not None:
                before_step()
            loss = task_loss(model(features[batch]), targets[batch], task)
            objective = loss + extra_loss() if extra_loss is not None else loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch)
            seen += len(batch)
            steps += 1
            if after_step is not None:
                after_step(len(batch))
    return TrainResult(total_loss / seen if seen else math.nan, seen, steps)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: str = "classification",
    batch_size: int = 1024,
) -> EvalResult:
    """Return the mean loss and accuracy of ``model`` on ``(x, y)``; NaN on an empty split."""
    features, targets = _as_tensors(x, y, task)
    n = features.shape[0]
    if n == 0:
        return EvalResult(math.nan, math.nan, 0)
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, n, batch_size):
        outputs = model(features[start : start + batch_size])
        batch_targets = targets[start : start + batch_size]
        total_loss += float(task_loss(outputs, batch_targets, task)) * len(batch_targets)
        if task != "regression":
            correct += int((outputs.argmax(dim=1) == batch_targets).sum())
    accuracy = correct / n if task != "regression" else math.nan
    return EvalResult(total_loss / n, accuracy, n)
