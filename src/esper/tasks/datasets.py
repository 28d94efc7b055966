"""Embedded datasets: tasks that ship with an installed package or are generated, so a run needs
no download.

* ``digits``: scikit-learn's 8x8 handwritten digits (bundled with scikit-learn).
* ``mnist1d``: MNIST-1D (Greydanus 2020), generated offline by the ``mnist1d`` package from its
  templates (never downloaded).
* ``regression``: a synthetic teacher–student regression: a fixed random non-linear teacher maps
  Gaussian inputs to targets.

Every loader returns a :class:`TensorSplit` of float32 inputs ``(N, F)``; its ``input_shape``
says how a convolutional or sequence host may view one example (``(1, 8, 8)`` for digits).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from esper.errors import ConfigurationError

DATASETS: tuple[str, ...] = ("digits", "mnist1d", "regression")
"""Names accepted by :func:`load_dataset`."""


@dataclass(frozen=True)
class TensorSplit:
    """A dataset split into train and test tensors.

    Attributes:
        x_train: ``(N_train, F)`` float32 inputs.
        y_train: ``(N_train,)`` int64 class labels, or ``(N_train, D)`` float32 regression targets.
        x_test: ``(N_test, F)`` float32.
        y_test: like ``y_train`` for the test examples.
        num_classes: number of classes; 0 for a regression task.
        input_shape: the layout of one example for hosts that need one, ``(C, *S)`` (e.g.
            ``(1, 8, 8)`` for digits, ``(1, 40)`` for MNIST-1D); ``()`` means flat features only.
        name: the dataset's name.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...] = ()
    name: str = ""

    @property
    def num_features(self) -> int:
        """Features per example (the last input dimension)."""
        return int(self.x_train.shape[-1])

    @property
    def is_regression(self) -> bool:
        """Whether targets are real values (scored by R², not accuracy)."""
        return self.num_classes == 0

    @property
    def num_outputs(self) -> int:
        """Width of a model's output: the classes, or the regression targets per example."""
        return self.num_classes if self.num_classes else int(self.y_train.shape[-1])


def hold_out_validation(
    split: TensorSplit, fraction: float, *, seed: int = 0
) -> tuple[TensorSplit, torch.Tensor, torch.Tensor]:
    """Move a random ``fraction`` of the training examples into a validation set.

    Returns:
        The split with the remaining training examples, and ``(x_val, y_val)``.
    """
    n_val = int(len(split.x_train) * fraction)
    order = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    remaining = dataclasses.replace(
        split, x_train=split.x_train[train], y_train=split.y_train[train]
    )
    return remaining, split.x_train[val], split.y_train[val]


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
    return TensorSplit(
        x[train], y[train], x[test], y[test], num_classes=10, input_shape=(1, 8, 8), name="digits"
    )


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(
    num_samples: int, data_seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = data_seed
    # make_dataset reseeds Python's and NumPy's global generators: keep the caller's streams.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def load_mnist1d_split(*, num_samples: int = 5000, data_seed: int = 42) -> TensorSplit:
    """MNIST-1D generated offline: ``num_samples`` length-40 signals of 10 classes, 80% train.

    ``data_seed=42`` with 5000 samples is the published dataset. Generation takes a few seconds
    and is cached per process.
    """
    if num_samples < 100:
        raise ConfigurationError(
            f"mnist1d needs num_samples >= 100 (10 classes, train and test), got {num_samples}"
        )
    x_train, y_train, x_test, y_test = _mnist1d_arrays(num_samples, data_seed)
    return TensorSplit(
        torch.tensor(x_train, dtype=torch.float32),  # (0.8 N, 40)
        torch.tensor(y_train, dtype=torch.int64),
        torch.tensor(x_test, dtype=torch.float32),  # (0.2 N, 40)
        torch.tensor(y_test, dtype=torch.int64),
        num_classes=10,
        input_shape=(1, int(x_train.shape[-1])),
        name="mnist1d",
    )


def make_regression_split(
    *,
    seed: int = 0,
    num_samples: int = 2000,
    in_features: int = 16,
    out_features: int = 1,
    teacher_hidden: int = 32,
    noise: float = 0.05,
    test_fraction: float = 0.2,
) -> TensorSplit:
    """A teacher–student regression: ``y = teacher(x) + noise`` with ``x ~ N(0, I)``.

    The teacher is a fixed random two-hidden-layer tanh network (drawn from ``seed``), so a
    linear student cannot fit it and a small non-linear one fits it partly. Targets are
    standardised on the training split.
    """
    if num_samples < 10 or not 0 < test_fraction < 1:
        raise ConfigurationError(
            f"regression needs num_samples >= 10 and 0 < test_fraction < 1, got "
            f"num_samples={num_samples}, test_fraction={test_fraction}"
        )
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(in_features, teacher_hidden, generator=generator) * 1.5 / in_features**0.5
    w2 = (
        torch.randn(teacher_hidden, teacher_hidden, generator=generator) * 1.5 / teacher_hidden**0.5
    )
    w3 = torch.randn(teacher_hidden, out_features, generator=generator) / teacher_hidden**0.5
    x = torch.randn(num_samples, in_features, generator=generator)  # (N, F)
    y = torch.tanh(torch.tanh(x @ w1) @ w2) @ w3  # (N, D)
    y = y + noise * y.std() * torch.randn(y.shape, generator=generator)
    n_test = int(num_samples * test_fraction)
    y_train = y[n_test:]
    y = (y - y_train.mean(dim=0)) / y_train.std(dim=0)
    return TensorSplit(
        x[n_test:], y[n_test:], x[:n_test], y[:n_test], num_classes=0, name="regression"
    )


def load_dataset(name: str, *, seed: int = 0, **options: Any) -> TensorSplit:
    """The embedded dataset ``name`` (one of :data:`DATASETS`) with its loader's ``options``.

    ``seed`` shuffles digits and draws the regression teacher; MNIST-1D's data is fixed by its
    own ``data_seed`` option.

    Raises:
        ConfigurationError: an unknown name or option.
    """
    loaders = {
        "digits": lambda: load_digits_split(seed=seed, **options),
        "mnist1d": lambda: load_mnist1d_split(**options),
        "regression": lambda: make_regression_split(seed=seed, **options),
    }
    if name not in loaders:
        raise ConfigurationError(
            f"unknown dataset {name!r}; the embedded datasets are {', '.join(DATASETS)}"
        )
    try:
        return loaders[name]()
    except TypeError as exc:
        raise ConfigurationError(
            f"dataset {name!r} got an unknown option ({exc}); see esper.tasks.datasets"
        ) from exc
