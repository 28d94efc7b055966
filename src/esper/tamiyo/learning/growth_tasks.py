"""Growth tasks: small hosts on embedded data that a growth policy learns and is tested on.

A task draws one :class:`TaskInstance` per episode seed: an untrained host, its data, its loss,
and — for the synthetic task — the layer whose limitation growth should relieve.

* :class:`BottleneckTask` — a **teacher–student regression with a known bottleneck layer**. The
  input has ``K`` groups of features; the host reads each group with its own ``Linear`` branch
  (``branches.k``), squashes each with ``tanh`` and mixes them with a ``Linear`` head. The
  teacher has the same shape except that one branch ``b`` (drawn per seed, so its position
  differs across episodes) adds a residual ReLU block to its linear map: the student lacks a
  non-linearity exactly there. A kernel grafted on ``branches.b`` (a residual MLP reading the same
  group) can represent what is missing; a kernel elsewhere cannot, because no other layer sees
  that group before the ``tanh``. The missing block also carries most of the target's variance,
  so the student's bottleneck branch works hardest and its output spreads widest — the health
  signal a policy has to read (nothing else marks it). Measured at the decision step of the
  default episode (150 steps, 60 held-out instances): the bottleneck branch has the largest
  smoothed ``output_std`` of the branches in 98% of instances and the largest gradient norm in
  62%; with only 100 warm-up steps, 80% and 50%.
* :class:`DigitsTask` — scikit-learn's 8x8 digits with a small MLP (no known bottleneck).
* :class:`MNIST1DTask` — MNIST-1D generated offline with a small MLP (no known bottleneck).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from esper.errors import ConfigurationError
from esper.tasks.datasets import TensorSplit, load_digits_split, load_mnist1d_split
from esper.tasks.hosts import build_mlp


@dataclass(frozen=True)
class TaskInstance:
    """One episode's host and data.

    Attributes:
        name: the task's name.
        host: the untrained host model (not yet wrapped).
        x_train: ``(N, F)`` float32.
        y_train: ``(N, D)`` float32 targets (regression) or ``(N,)`` int64 labels.
        x_val: validation inputs.
        y_val: validation targets.
        regression: the loss is the mean squared error (else cross-entropy); see
            :func:`esper.tasks.evaluation.task_loss`.
        bottleneck: the layer whose limitation growth should relieve, if known.
    """

    name: str
    host: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    regression: bool
    bottleneck: str | None = None


class GrowthTask(Protocol):
    """Draws one instance per episode seed."""

    @property
    def name(self) -> str:
        """Short name used in logs and reports."""
        ...

    def sample(self, seed: int) -> TaskInstance:
        """The instance of episode ``seed`` (same seed, same instance)."""
        ...


class BranchNet(nn.Module):
    """``K`` parallel ``Linear`` branches, one per input group, ``tanh``, then a ``Linear`` head.

    Args:
        branches: number of input groups ``K``.
        group: features per group ``G`` (the input has ``K * G`` features).
        width: output width of each branch ``H``.
    """

    def __init__(self, branches: int, group: int, width: int) -> None:
        super().__init__()
        self.group = group
        self.branches = nn.ModuleList(nn.Linear(group, width) for _ in range(branches))
        self.head = nn.Linear(branches * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K * G)`` -> ``(B, 1)``."""
        parts = x.reshape(x.shape[0], len(self.branches), self.group)  # (B, K, G)
        hidden = [torch.tanh(branch(parts[:, k])) for k, branch in enumerate(self.branches)]
        return self.head(torch.cat(hidden, dim=1))  # (B, K * H) -> (B, 1)


@dataclass(frozen=True)
class BottleneckTask:
    """The synthetic teacher–student task with one bottleneck branch per instance.

    Attributes:
        branch_choices: the number of branches ``K`` is drawn from these per instance.
        group: features per input group.
        width: output width of every branch.
        block_hidden: hidden width of the teacher's missing residual block.
        block_scale: output scale of the missing block (how much of the target it carries).
        train_examples: training set size.
        val_examples: validation set size.
        bottleneck: force the bottleneck branch (``None``: drawn per instance).
    """

    branch_choices: tuple[int, ...] = (4,)
    group: int = 4
    width: int = 8
    block_hidden: int = 32
    block_scale: float = 3.0
    train_examples: int = 1024
    val_examples: int = 1024
    bottleneck: int | None = None

    @property
    def name(self) -> str:
        """``"bottleneck"``."""
        return "bottleneck"

    def sample(self, seed: int) -> TaskInstance:
        """Teacher, data and an untrained host for episode ``seed``."""
        choose = random.Random(seed)
        k = choose.choice(self.branch_choices)
        b = self.bottleneck if self.bottleneck is not None else choose.randrange(k)
        if not 0 <= b < k:
            raise ConfigurationError(f"bottleneck branch {b} is outside 0..{k - 1}")
        g = torch.Generator().manual_seed(seed)
        gsz, h = self.group, self.width
        linear = [torch.randn(h, gsz, generator=g) * 0.7 / math.sqrt(gsz) for _ in range(k)]
        down = torch.randn(self.block_hidden, gsz, generator=g) * 1.5 / math.sqrt(gsz)
        up = torch.randn(h, self.block_hidden, generator=g) * self.block_scale
        up = up / math.sqrt(self.block_hidden)
        head = torch.randn(1, k * h, generator=g) / math.sqrt(h)

        def teacher(x: torch.Tensor) -> torch.Tensor:
            parts = x.reshape(x.shape[0], k, gsz)  # (N, K, G)
            outputs = []
            for i in range(k):
                z = parts[:, i] @ linear[i].T  # (N, H)
                if i == b:
                    z = z + torch.relu(parts[:, i] @ down.T) @ up.T
                outputs.append(torch.tanh(z))
            return torch.cat(outputs, dim=1) @ head.T  # (N, 1)

        x_train = torch.randn(self.train_examples, k * gsz, generator=g)
        x_val = torch.randn(self.val_examples, k * gsz, generator=g)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            host = BranchNet(k, gsz, h)
        return TaskInstance(
            name=self.name,
            host=host,
            x_train=x_train,
            y_train=teacher(x_train),
            x_val=x_val,
            y_val=teacher(x_val),
            regression=True,
            bottleneck=f"branches.{b}",
        )


def _classification_instance(
    name: str, split: TensorSplit, hidden: tuple[int, ...], seed: int
) -> TaskInstance:
    """An instance of a classification split: a freshly initialised MLP (seeded by ``seed``),
    the split's test examples as validation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        host = build_mlp(split.num_features, split.num_classes, hidden=hidden)
    return TaskInstance(
        name, host, split.x_train, split.y_train, split.x_test, split.y_test, regression=False
    )


@dataclass(frozen=True)
class DigitsTask:
    """scikit-learn digits (64 features, 10 classes) with an MLP of the given hidden widths."""

    hidden: tuple[int, ...] = (16, 16)

    @property
    def name(self) -> str:
        """``"digits"``."""
        return "digits"

    def sample(self, seed: int) -> TaskInstance:
        """A shuffled split and a freshly initialised MLP for episode ``seed``."""
        return _classification_instance(self.name, load_digits_split(seed=seed), self.hidden, seed)


@dataclass(frozen=True)
class MNIST1DTask:
    """MNIST-1D (40-sample signals, 10 classes; generated offline) with a small MLP."""

    hidden: tuple[int, ...] = (32, 32)
    num_samples: int = 2000

    @property
    def name(self) -> str:
        """``"mnist1d"``."""
        return "mnist1d"

    def sample(self, seed: int) -> TaskInstance:
        """The dataset (fixed) and a freshly initialised MLP for episode ``seed``."""
        split = load_mnist1d_split(num_samples=self.num_samples)
        return _classification_instance(self.name, split, self.hidden, seed)
