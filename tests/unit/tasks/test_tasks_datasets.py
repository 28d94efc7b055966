"""Embedded datasets: shapes, determinism, no side effects on global RNGs, a non-linear teacher."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from esper.errors import ConfigurationError
from esper.tasks.datasets import (
    load_dataset,
    load_digits_split,
    load_mnist1d_split,
    make_regression_split,
)


def test_digits_split_shapes_and_layout() -> None:
    data = load_digits_split(seed=0)

    assert data.x_train.shape == (1438, 64) and data.x_test.shape == (359, 64)
    assert data.num_classes == 10 and data.num_outputs == 10 and not data.is_regression
    assert data.input_shape == (1, 8, 8)
    assert float(data.x_train.max()) == 1.0 and float(data.x_train.min()) == 0.0


def test_mnist1d_is_generated_offline_with_the_published_split() -> None:
    data = load_mnist1d_split()

    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.y_train.dtype == torch.int64 and set(data.y_train.unique().tolist()) == set(
        range(10)
    )
    assert data.input_shape == (1, 40)


def test_mnist1d_generation_leaves_the_global_random_streams_alone() -> None:
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), float(np.random.rand()))
    random.seed(123)
    np.random.seed(123)

    load_mnist1d_split(num_samples=200, data_seed=7)

    assert (random.random(), float(np.random.rand())) == expected


def test_regression_is_deterministic_standardised_and_not_linear() -> None:
    data = make_regression_split(seed=3, num_samples=1000, in_features=8)
    again = make_regression_split(seed=3, num_samples=1000, in_features=8)
    x = torch.cat([data.x_train, torch.ones(len(data.x_train), 1)], dim=1)  # (N, F + 1)
    solution = torch.linalg.lstsq(x, data.y_train).solution
    residual = data.y_train - x @ solution
    r2_linear = 1 - float(residual.square().sum() / data.y_train.square().sum())

    assert torch.equal(data.x_train, again.x_train) and torch.equal(data.y_test, again.y_test)
    assert data.is_regression and data.num_outputs == 1
    assert abs(float(data.y_train.mean())) < 1e-5
    assert float(data.y_train.std()) == pytest.approx(1.0, abs=1e-5)
    assert r2_linear < 0.9  # a linear student cannot fit the tanh teacher


def test_load_dataset_dispatches_and_names_bad_options() -> None:
    assert load_dataset("regression", seed=1, num_samples=100).x_train.shape == (80, 16)
    with pytest.raises(ConfigurationError, match="digits, mnist1d, regression"):
        load_dataset("cifar10")
    with pytest.raises(ConfigurationError, match="unknown option"):
        load_dataset("digits", num_samples=3)
