"""Initialising a widen's new units: random fan-in with zero fan-out, or GradMax.

* ``random``: the new units' fan-in is drawn as PyTorch initialises a fresh layer of the host's
  class (Kaiming-uniform weights, uniform bias); their fan-out is zero, so the widened model
  computes the host's function even at α = 1, and the fan-out starts learning from the first
  step (its gradient is ``δ_B · act(new units)``, non-zero).
* ``gradmax`` (Evci et al., *GradMax: Growing Neural Networks using Gradient Information*, ICLR
  2022): zero fan-in and bias, so the new units output ``act(0) = 0``; the fan-out is the top-*k*
  left singular vectors of the gradient correlation ``M = Σ δ_B xᵀ`` (``δ_B`` the loss gradient
  at B's output, ``x`` A's input, summed over a batch), which maximises the norm of the new
  fan-in's first gradient ``act'(0) · W_outᵀ M`` for a given fan-out norm. Each column is scaled
  to the mean column norm of B's weight. It needs ``act'(0) ≠ 0`` (GELU, Tanh, SiLU, not ReLU),
  no norm between A and B (a norm of an all-zero unit is not zero) and Linear layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.errors import ConfigurationError
from esper.operators.dataflow import WidenPath

WIDEN_INITS = ("random", "gradmax")
"""Names of the initialisations ``MorphableModel.widen(init=...)`` accepts."""


@dataclass(frozen=True)
class NewUnits:
    """The *k* new units' weights: fan-in ``(k, in, ...)``, bias ``(k,)``, fan-out ``(out, k, ...)``."""

    fan_in: torch.Tensor
    bias: torch.Tensor | None
    fan_out: torch.Tensor


@dataclass(frozen=True)
class GradMaxBatch:
    """What GradMax needs to measure the gradient correlation: a batch and its loss.

    Attributes:
        run: called with no argument, runs a forward of the model and returns the scalar loss
            (e.g. ``lambda: loss_fn(model(x), y)``); its backward is taken once.
    """

    run: Callable[[], torch.Tensor]


def random_units(producer: nn.Module, consumer: nn.Module, k: int) -> NewUnits:
    """Fan-in as a fresh layer of the producer's class would get it; zero fan-out."""
    like = weight_of(producer)
    with torch.no_grad():
        if isinstance(producer, nn.Linear):
            fresh: nn.Module = nn.Linear(producer.in_features, k, bias=producer.bias is not None)
        else:
            assert isinstance(producer, nn.Conv1d | nn.Conv2d)
            fresh = type(producer)(
                producer.in_channels,
                k,
                producer.kernel_size,  # type: ignore[arg-type]
                bias=producer.bias is not None,
            )
        fresh = fresh.to(dtype=like.dtype, device=like.device)
        bias = fresh.bias.detach().clone() if isinstance(fresh.bias, torch.Tensor) else None
        return NewUnits(weight_of(fresh).detach().clone(), bias, _zero_fan_out(consumer, k))


def zero_units(producer: nn.Module, consumer: nn.Module, k: int) -> NewUnits:
    """All-zero new units (a widen replayed from a checkpoint, whose tensors then load)."""
    weight = weight_of(producer)
    fan_in = weight.new_zeros((k, *weight.shape[1:]))
    bias = fan_in.new_zeros(k) if producer.bias is not None else None
    return NewUnits(fan_in, bias, _zero_fan_out(consumer, k))


def gradmax_units(
    root: nn.Module,
    path: WidenPath,
    producer: nn.Module,
    consumer: nn.Module,
    k: int,
    batches: Iterable[GradMaxBatch],
) -> NewUnits:
    """Zero fan-in and bias; fan-out from the top singular vectors of ``Σ δ_B xᵀ``."""
    _check_gradmax_applies(path, producer, consumer)
    assert isinstance(producer, nn.Linear) and isinstance(consumer, nn.Linear)
    modules = dict(root.named_modules())  # hooks go on the modules the parents call
    correlation = gradient_correlation(
        root, modules[path.producer], modules[path.consumer], batches
    )  # (out_B, in_A)
    left, _, _ = torch.linalg.svd(correlation.double(), full_matrices=False)
    fan_out = torch.zeros(consumer.out_features, k, dtype=torch.float64, device=left.device)
    rank = min(k, left.shape[1])
    fan_out[:, :rank] = left[:, :rank]
    column_norm = consumer.weight.detach().double().norm(dim=0).mean()
    fan_out = (fan_out * column_norm).to(consumer.weight.dtype)
    like = producer.weight
    fan_in = torch.zeros(k, producer.in_features, dtype=like.dtype, device=like.device)
    bias = (
        torch.zeros(k, dtype=like.dtype, device=like.device) if producer.bias is not None else None
    )
    return NewUnits(fan_in, bias, fan_out)


def gradient_correlation(
    root: nn.Module, producer: nn.Module, consumer: nn.Module, batches: Iterable[GradMaxBatch]
) -> torch.Tensor:
    """``Σ_batches Σ_rows δ_B xᵀ``: ``(out_B, in_A)``, from one forward and backward per batch.

    ``producer`` and ``consumer`` are the modules as their parents call them (a seeded layer, not
    its base, whose bound fast path skips hooks). Parameter gradients are left as they were.
    """
    saved_grads = {p: p.grad for p in root.parameters()}
    inputs: list[torch.Tensor] = []
    output_grads: list[torch.Tensor] = []

    def keep_input(_: nn.Module, args: tuple[Any, ...]) -> None:
        inputs.append(args[0].detach())

    def keep_output_grad(_: nn.Module, grad_input: Any, grad_output: tuple[torch.Tensor]) -> None:
        output_grads.append(grad_output[0].detach())

    handles = [
        producer.register_forward_pre_hook(keep_input),
        consumer.register_full_backward_hook(keep_output_grad),
    ]
    correlation: torch.Tensor | None = None
    try:
        for batch in batches:
            inputs.clear()
            output_grads.clear()
            batch.run().backward()
            if len(inputs) != 1 or len(output_grads) != 1:
                raise ConfigurationError(
                    "gradmax: the batch's loss must run the widened layers exactly once"
                )
            x = inputs[0].reshape(-1, inputs[0].shape[-1])  # (rows, in_A)
            delta = output_grads[0].reshape(-1, output_grads[0].shape[-1])  # (rows, out_B)
            term = delta.double().T @ x.double()
            correlation = term if correlation is None else correlation + term
    finally:
        for handle in handles:
            handle.remove()
        for param, grad in saved_grads.items():
            param.grad = grad
    if correlation is None:
        raise ConfigurationError("gradmax needs at least one batch (gradmax_batches=[...])")
    return correlation


def _check_gradmax_applies(path: WidenPath, producer: nn.Module, consumer: nn.Module) -> None:
    why = None
    if not (isinstance(producer, nn.Linear) and isinstance(consumer, nn.Linear)):
        why = "it is implemented for Linear layers only"
    elif path.norm is not None:
        why = f"a norm ({path.norm!r}) sits between the layers and a norm of zero units is not zero"
    elif path.zero_slope_at_zero:
        why = "ReLU's derivative at 0 is 0, so zero fan-in units would never learn"
    if why is not None:
        raise ConfigurationError(
            f"cannot widen {path.producer!r} with init='gradmax': {why}; use init='random'"
        )


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight``, typed."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _zero_fan_out(consumer: nn.Module, k: int) -> torch.Tensor:
    weight = weight_of(consumer)
    return weight.new_zeros((weight.shape[0], k, *weight.shape[2:]))
