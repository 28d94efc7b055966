"""Health collection: every seeded layer's health window read in one transfer, with the device
work batched across layers.

:func:`collect_health` is what :meth:`esper.MorphableModel.collect_telemetry` runs. Its cost per
layer is nearly all host work, so it is kept small:

- the base layers' gradient norms are one fused ``_foreach_norm`` over every gradient of every
  layer, then one norm per row of a (layers, gradients per layer) matrix: a handful of device ops
  for the model, where each layer used to run its own (one norm per gradient, a stack, a norm);
- every layer's accumulators and the norms go into one ``cat`` (of three) and are read with one ``tolist()``
  (invariant 5: one transfer per collection), then zeroed with one fused ``_foreach_zero_``;
- the index tensors that place gradient norms are built once per set of layers with gradients and
  reused (no host-to-device copy on later collections);
- the signals are built from the host values (:func:`~esper.execution.seed_health.build_health_signal`,
  which reuses the immutable record of a seed that recorded nothing).

A layer with a running seed whose kernel output was not finite in the window goes through the
layer's own :meth:`~esper.execution.KasminaLayer.health_signal`, which quarantines it first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from esper.contracts import HealthSignal
from esper.execution import seed_health
from esper.execution.kasmina_layer import KasminaLayer
from esper.execution.state_layout import LAYER_HEALTH_FIELDS, SEED_HEALTH_FIELDS

_Placement = tuple[torch.Tensor, torch.Tensor, int]
"""(flat positions of the gradient norms in the padded matrix, rows with gradients, width)."""


class LayerHealthReader:
    """Reads the health windows of a fixed sequence of layers (one per model).

    Args:
        layers: the model's seeded layers, each once, in model order.
    """

    def __init__(self, layers: Sequence[KasminaLayer]) -> None:
        self.layers = tuple(layers)
        self._placements: dict[tuple[object, ...], _Placement] = {}

    def read(
        self,
        *,
        step: int,
        timestamp: float,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[HealthSignal]:
        """Every layer's :class:`HealthSignal` for the window just ended, accumulators reset.

        Args:
            step: the model's step, stamped on every signal.
            timestamp: the wall-clock time stamped on every signal.
            reduce: applied to the flat tensor of every accumulator and gradient norm before it is
                read (e.g. an all-reduce mean across ranks).
        """
        layers = self.layers
        if not layers:
            return []
        layouts = [layer.seed_layout for layer in layers]
        layer_health = [layout.layer_health for layout in layouts]  # (4,) each
        seed_rows = [layout.seed_health for layout in layouts]  # (N_i, 3) each
        flat = torch.cat(
            [torch.cat(layer_health), torch.cat(seed_rows).view(-1), self._grad_norms(layouts)]
        )
        if reduce is not None:
            flat = reduce(flat)
        values = flat.tolist()  # the one transfer
        n_layer = len(LAYER_HEALTH_FIELDS)
        seed_offset = n_layer * len(layers)
        grad_offset = len(values) - len(layers)
        signals = []
        for i, (layer, layout) in enumerate(zip(layers, layouts, strict=True)):
            seed_size = layout.num_seeds * len(SEED_HEALTH_FIELDS)
            window = values[n_layer * i : n_layer * (i + 1)]
            window += values[seed_offset : seed_offset + seed_size]
            window.append(values[grad_offset + i])
            seed_offset += seed_size
            if _needs_quarantine(window, layout):
                signals.append(layer.health_signal(window, step=step, timestamp=timestamp))
                continue
            signals.append(
                seed_health.build_health_signal(
                    window,
                    layout.slots,
                    layer_name=layer.layer_name,
                    layer_kind=layer.profile.kind,
                    step=step,
                    timestamp=timestamp,
                )
            )
        torch._foreach_zero_([*layer_health, *seed_rows])
        return signals

    def _grad_norms(self, layouts: Sequence[seed_health.SeedStateLayout]) -> torch.Tensor:
        """Each layer's base gradient norm (-1 without gradients), one tensor of shape (L,)."""
        grads = [
            [p.grad.detach() for p in _parameters(layer.base) if p.grad is not None]
            for layer in self.layers
        ]
        reference = layouts[0].layer_health
        dtypes = {layout.layer_health.dtype for layout in layouts}
        if len(dtypes) > 1:  # accumulators of mixed widths: each layer on its own (cat promotes)
            return torch.cat(
                [
                    seed_health.grad_norm(layer_grads, layout.layer_health)
                    for layer_grads, layout in zip(grads, layouts, strict=True)
                ]
            )
        flat_grads = [g for layer_grads in grads for g in layer_grads]
        if not flat_grads:
            return torch.full((len(layouts),), -1.0, dtype=reference.dtype, device=reference.device)
        positions, with_grads, width = self._placement(grads, reference.device)
        per_grad = torch._foreach_norm(flat_grads, 2, reference.dtype)  # fused, one per grad
        padded = torch.zeros(len(layouts) * width, dtype=reference.dtype, device=reference.device)
        padded[positions] = torch.stack(per_grad)
        norms = torch.linalg.vector_norm(padded.view(len(layouts), width), dim=1)  # (L,)
        return torch.where(with_grads, norms, -1.0)

    def _placement(
        self, grads: Sequence[Sequence[torch.Tensor]], device: torch.device
    ) -> _Placement:
        counts = tuple(len(layer_grads) for layer_grads in grads)
        key = (device, counts)
        placement = self._placements.get(key)
        if placement is None:
            width = max(counts)
            flat_positions = [row * width + col for row, n in enumerate(counts) for col in range(n)]
            positions = torch.tensor(flat_positions, dtype=torch.long, device=device)
            with_grads = torch.tensor([n > 0 for n in counts], dtype=torch.bool, device=device)
            placement = (positions, with_grads, width)
            self._placements = {key: placement}  # only the latest set of layers with gradients
        return placement


def _parameters(module: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
    """``module.parameters()``, read straight from its table when it has no submodules (what
    every base layer but attention is; the generator costs more than the rest of a layer's
    collection)."""
    if module._modules:
        return module.parameters()
    return dict.fromkeys(p for p in module._parameters.values() if p is not None)


def _needs_quarantine(window: Sequence[float], layout: seed_health.SeedStateLayout) -> bool:
    return any(
        layout.slots[i].state.runs_kernel
        for i in seed_health.nonfinite_seeds(window, layout.num_seeds)
    )
