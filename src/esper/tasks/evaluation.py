"""Evaluation: the task's loss and score (accuracy, or R² for regression) on a held-out split."""

from __future__ import annotations

import torch
from torch import nn

from esper.tasks.datasets import TensorSplit


def task_loss(outputs: torch.Tensor, targets: torch.Tensor, *, regression: bool) -> torch.Tensor:
    """Mean cross-entropy for classification, mean squared error for regression (a 0-d tensor).

    Args:
        outputs: ``(B, C)`` logits or ``(B, D)`` predictions.
        targets: ``(B,)`` class indices or ``(B, D)`` values.
    """
    if regression:
        return nn.functional.mse_loss(outputs, targets)
    return nn.functional.cross_entropy(outputs, targets)


def score_name(split: TensorSplit) -> str:
    """``accuracy`` or ``r2``."""
    return "r2" if split.is_regression else "accuracy"


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, regression: bool, batch_size: int = 1024
) -> tuple[float, float]:
    """``(mean loss, score)`` of ``model`` on ``(x, y)``, in eval mode (restored afterwards).

    The score is accuracy for classification and the coefficient of determination
    ``R² = 1 - SSE / SST`` for regression.
    """
    was_training = model.training
    model.eval()
    try:
        outputs = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)
    loss = float(task_loss(outputs, y, regression=regression))
    if regression:
        sse = (outputs - y).square().sum()
        sst = (y - y.mean(dim=0)).square().sum()
        return loss, float(1.0 - sse / sst)
    return loss, float((outputs.argmax(dim=1) == y).float().mean())
