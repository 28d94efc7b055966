"""GrowingBlock: a new block blended into the host, ``y = lerp(x, block(x), α)``, until it is kept.

``torch.lerp`` computes ``x + α·(block(x) − x)`` for ``α < 0.5`` and ``block(x) − (block(x) − x)·
(1 − α)`` above, so at α = 0 the output is exactly ``x`` (the host without the block: insertion is
function-preserving whatever the block holds, a G_stack copy included) and at α = 1 exactly
``block(x)`` (what the fossilized host computes once the wrapper is gone). α is a 0-dim device
buffer, so its ramp never recompiles a compiled model and is in ``state_dict``.

The block reads the first argument (or first keyword argument) of the call; other arguments
(an attention mask...) are passed through, and a block that returns a tuple (HF decoder layers)
has its first element blended.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from esper.contracts import SeedState


class GrowingBlock(nn.Module):
    """A block being grown into a stack: blended with α from 0 while BLENDING/ACTIVE.

    Args:
        block: the new block (torch classes only).
        block_id: the model-wide id of this insertion.
        blend_steps: steps over which α ramps from 0 to 1.
    """

    alpha: torch.Tensor

    def __init__(self, block: nn.Module, *, block_id: int, blend_steps: int) -> None:
        super().__init__()
        self.block = block
        self.block_id = block_id
        self.blend_steps = blend_steps
        self.state = SeedState.BLENDING
        self.blend_steps_done = 0
        reference = next(iter((*block.parameters(), *block.buffers())), None)
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        device = reference.device if reference is not None else None
        self.register_buffer("alpha", torch.zeros((), dtype=dtype, device=device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``lerp(x, block(x), α)``; a tuple result has its first element blended."""
        out = self.block(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        y = out[0] if isinstance(out, tuple) else out
        blended = torch.lerp(x, y, self.alpha.to(y.dtype))
        return (blended, *out[1:]) if isinstance(out, tuple) else blended

    def extra_repr(self) -> str:
        return f"block_id={self.block_id}, state={self.state.name}"


class _KeepBlock(fx.Tracer):
    """Traces a GrowingBlock without entering its block (kept as one ``call_module``)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == "block" or super().is_leaf_module(m, module_qualified_name)


class _SingleInputBlend(nn.Module):
    alpha: torch.Tensor

    def __init__(self, block: nn.Module, alpha: torch.Tensor) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("alpha", alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        alpha: torch.Tensor = self.alpha
        return torch.lerp(x, y, alpha.to(y.dtype))


def plain_growing_block(growing: GrowingBlock) -> nn.Module:
    """Torch classes computing what ``growing`` computes now: its block once α is 1, else an
    ``fx.GraphModule`` holding the block and α (blocks called with one tensor)."""
    if growing.state is SeedState.FOSSILIZED or bool(growing.alpha == 1):
        return growing.block
    root = _SingleInputBlend(growing.block, growing.alpha.detach().clone())
    graph = _KeepBlock().trace(root)
    return fx.GraphModule(root, graph, class_name="BlendedBlock")
