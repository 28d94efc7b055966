"""Embedded datasets: tasks that ship with an installed package, so a run needs no download."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSplit:
    """A classification dataset split into train and test tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        """Features per example (the last input dimension)."""
        return int(self.x_train.shape[-1])


def load_digits_split(*, seed: int = 0, test_fraction: float = 0.2) -> TensorSplit:
    """scikit-learn's 8x8 handwritten digits (1797 images, bundled with the package), scaled to
    [0, 1], flattened to 64 features, shuffled with ``seed`` and split."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0  # (1797, 64)
    y = torch.tensor(labels, dtype=torch.int64)  # (1797,)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return TensorSplit(x[train], y[train], x[test], y[test], num_classes=10)
