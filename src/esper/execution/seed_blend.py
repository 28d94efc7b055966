"""Seed blend: a layer's running kernels added to its output, ``y + Σ alpha_i · kernel_i(u)``.

This is the hot path of a layer with a kernel running (:class:`~esper.execution.KasminaLayer`
calls :func:`blend` once per forward; a dormant layer never comes here). Per running seed the
layer keeps a :data:`RunningSeed` tuple, rebuilt at lifecycle changes by :func:`running_seeds`,
so the loop does no indexing or attribute lookup per seed. Everything done with the output of a
kernel on trial (BLENDING or ACTIVE) is guarded:

* a kernel whose output is not finite contributes exactly zero, decided on the device (its sum,
  accumulated in at least float32, is added to the seed's ``output_sum`` so the next telemetry
  read quarantines it), and its non-finite gradient never reaches the host's;
* a kernel that raises, or whose output the blend cannot use, is reported to ``on_fault`` and
  skipped for the rest of the forward.

The guard costs, per seed, a sum, its accumulation and, without gradients, three 0-dim
operations for a masked scale and one ``nan_to_num`` of the output (with gradients: ``isfinite``
and one ``where``), on top of the ``addcmul`` that blends; and one :class:`FiniteGradient` per
layer. Measured alternatives are in ``benchmarks/active_seed.py``'s docstring.

A FOSSILIZED kernel has passed its trial and is kept for good: :func:`add_fossils` runs it as a
plain module, ``y + alpha · kernel(u)`` with the same ``addcmul`` as ``unwrap()``'s frozen
kernels, without guard or statistics (a kernel that raises is still reported to ``on_fault``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from esper.contracts import SeedState
from esper.execution.fast_paths import nest_like, unbind_sequences
from esper.execution.grafted_kernel import GraftedKernel
from esper.execution.state_layout import SeedStateLayout

RunningSeed = tuple[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]
"""``(seed_idx, kernel, alpha, seed_health row, output_sum)``: views of the buffers of one seed
whose kernel is on trial (BLENDING or ACTIVE)."""

FossilSeed = tuple[int, nn.Module, torch.Tensor]
"""``(seed_idx, kernel, alpha)`` of a FOSSILIZED seed: run as a plain module."""

FaultHandler = Callable[[int, BaseException], None]
"""Called with ``(seed_idx, exception)`` when a kernel fails inside the blend."""

_SUM_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
"""Kernel outputs in these dtypes are summed (for the finiteness check) in float32: a float16
sum of ordinary activations overflows."""


class FiniteGradient(torch.autograd.Function):
    """Identity in forward; in backward, non-finite gradient entries become zero.

    Applied to a kernel's input: a kernel whose output is not finite is scaled to zero, but its
    backward (NaN weights times a zero gradient) is NaN, which would reach the host's gradients and
    ruin the host at the next optimizer step. Finite gradients pass unchanged (bit for bit).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def running_seeds(
    layout: SeedStateLayout, kernels: Sequence[GraftedKernel | None]
) -> tuple[tuple[RunningSeed, ...], tuple[FossilSeed, ...]]:
    """``(on trial, fossilized)``: the seeds whose kernels run (``layout.running``), split into
    :data:`RunningSeed` tuples (guarded) and :data:`FossilSeed` tuples (plain)."""
    guarded, fossils = [], []
    for i in layout.running:
        grafted = kernels[i]
        assert grafted is not None, "a running seed always holds a kernel"
        if layout.slots[i].state is SeedState.FOSSILIZED:
            fossils.append((i, grafted.kernel, layout.alpha[i]))
        else:
            guarded.append(
                (
                    i,
                    grafted.kernel,
                    layout.alpha[i],
                    layout.seed_health[i],
                    layout.seed_health[i, 2],
                )
            )
    return tuple(guarded), tuple(fossils)


def add_fossils(
    y: torch.Tensor,
    kernel_in: torch.Tensor,
    fossils: tuple[FossilSeed, ...],
    *,
    on_fault: FaultHandler,
) -> torch.Tensor:
    """``y + Σ alpha_i · kernel_i(kernel_in)`` over fossilized seeds, as plain modules compute it."""
    for seed_idx, kernel, alpha in fossils:
        try:
            scale = alpha if alpha.dtype == y.dtype else alpha.to(y.dtype)
            y = torch.addcmul(y, kernel(kernel_in), scale)
        except Exception as exc:  # a faulty kernel must never take training down
            on_fault(seed_idx, exc)
    return y


def blend(
    y: torch.Tensor,
    kernel_in: torch.Tensor,
    running: tuple[RunningSeed, ...],
    *,
    record: bool,
    on_fault: FaultHandler,
) -> torch.Tensor:
    """``y + Σ alpha_i · kernel_i(kernel_in)`` over the running seeds (dense tensors).

    Args:
        y: the base layer's output.
        kernel_in: what the kernels read (the layer's input or ``y``, by layer kind).
        running: the running seeds.
        record: also add each seed's squared contribution to its health row (a sampled forward).
        on_fault: told about a kernel that failed; the blend goes on without it.

    The kernels share one :class:`FiniteGradient` on their input: where one of them sends back
    a non-finite gradient, the whole sum is zeroed there (the host's gradient stays finite; that
    kernel is quarantined at the next telemetry read).
    """
    if running and kernel_in.requires_grad:  # one gradient guard for all the kernels on trial
        try:
            kernel_in = FiniteGradient.apply(kernel_in)
        except Exception as exc:  # an input the guard cannot take: no kernel runs on it
            for seed_idx, *_ in running:
                on_fault(seed_idx, exc)
            return y
    for seed_idx, kernel, alpha, health, output_sum in running:
        try:  # everything done with a kernel's output is guarded: a fault bypasses the seed
            k = kernel(kernel_in)
            wide = _SUM_DTYPES.get(k.dtype)  # sum(dtype=None) costs a microsecond more
            k_sum = k.detach().sum() if wide is None else k.detach().sum(dtype=wide)
            output_sum.add_(k_sum)  # stays finite iff every output in the window was
            # Non-finite output contributes exactly zero without a host read: nan_to_num makes
            # every element finite, and the scale drops to zero because k_sum - k_sum is 0
            # for a finite sum and NaN for an infinite or NaN one. Measured cheaper than
            # ``torch.where`` on an ``isfinite`` flag, whose 0-dim condition is broadcast
            # slowly on a CPU (2x at batch 32, 2.6x at batch 256: see active_seed.py).
            # In training, ``where`` on the flag is the cheaper of the two once the backward is
            # counted (nan_to_num's backward masks the gradient again; the scale already zeroes
            # it): both give the same bits for a finite output.
            if k.requires_grad:
                scale = alpha
                k = torch.where(k_sum.isfinite(), k, 0.0)
            else:
                scale = torch.nan_to_num(alpha + (k_sum - k_sum), nan=0.0)
                k = torch.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
            if record:
                contribution_sq = (k.detach().to(health.dtype) * scale).square().mean()
                health[:2].add_(torch.stack([contribution_sq, torch.ones_like(contribution_sq)]))
            if scale.dtype != y.dtype:  # a float32 scale would promote under CUDA autocast
                scale = scale.to(y.dtype)
            y = torch.addcmul(y, k, scale)
        except Exception as exc:  # a faulty kernel must never take training down
            on_fault(seed_idx, exc)
    return y


def blend_sequences(
    base_out: torch.Tensor,
    kernel_in: torch.Tensor,
    current_seeds: Callable[[], tuple[RunningSeed, ...]],
    *,
    fossils: tuple[FossilSeed, ...],
    record: bool,
    on_fault: FaultHandler,
) -> torch.Tensor:
    """:func:`add_fossils` then :func:`blend` for a nested tensor, one sequence at a time (see
    ``fast_paths``).

    ``current_seeds`` is asked again for every sequence: a seed faulted in one sequence is out
    of the running seeds for the next. If the nested tensor cannot be taken apart or rebuilt,
    every seed still running is faulted and the base output is returned as is.
    """
    if not current_seeds() and not fossils:
        return base_out
    try:
        outputs = unbind_sequences(base_out)
        inputs = outputs if kernel_in is base_out else unbind_sequences(kernel_in)
        pieces = [
            blend(
                add_fossils(y, u, fossils, on_fault=on_fault),
                u,
                current_seeds(),
                record=record,
                on_fault=on_fault,
            )
            for y, u in zip(outputs, inputs, strict=True)
        ]
        return nest_like(pieces, base_out)
    except Exception as exc:
        for seed_idx in [f[0] for f in fossils] + [s[0] for s in current_seeds()]:
            on_fault(seed_idx, exc)
        return base_out
