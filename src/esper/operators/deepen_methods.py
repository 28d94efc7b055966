"""The DEEPEN methods of ``MorphableModel``: ``model.deepen(...)`` and the block lifecycle calls.

:class:`DeepenMethods` is a base class of :class:`esper.core.MorphableModel`; the work is done by
:class:`~esper.operators.deepen.BlockGrowth`, created with the first insertion (or by a checkpoint
that holds insertions) together with the model's ``deepen_log`` child, whose extra state is the
insertion log. A model that never deepens has neither, so its ``state_dict`` is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

from torch import nn

from esper.execution.seed_lifecycle import SeedEvents
from esper.operators.deepen import BlockGrowth, InsertedBlock
from esper.operators.new_blocks import OUTPUT_PROJECTIONS, PlainCopy

DEEPEN_LOG = "deepen_log"
"""The ``MorphableModel`` child whose extra state is the insertion log."""


class DeepenLog(nn.Module):
    """Holds a model's insertion log as its ``_extra_state`` (plain values, ``weights_only``-safe)."""

    def __init__(self, growth: BlockGrowth) -> None:
        super().__init__()
        object.__setattr__(self, "growth", growth)  # not a child: it refers to the model

    def get_extra_state(self) -> dict[str, Any]:
        """The log of :meth:`BlockGrowth.log`."""
        growth: BlockGrowth = self.__dict__["growth"]
        return growth.log()

    def set_extra_state(self, state: Any) -> None:
        """Nothing to do: the model rebuilt the insertions before its children loaded."""


class DeepenMethods(nn.Module):
    """``deepen``, ``fossilize_block``, ``cull_block`` and ``inserted_blocks`` of a wrapped model."""

    model: nn.Module
    plain_copy: PlainCopy

    def deepen(
        self,
        *,
        after: str | None = None,
        into: str | None = None,
        index: int | None = None,
        init: str = "fresh",
        blend_steps: int = 20,
        copy_from: int | None = None,
        hidden: int | None = None,
        activation: str = "relu",
        norm: bool = False,
        output_projections: Sequence[str] = OUTPUT_PROJECTIONS,
    ) -> InsertedBlock:
        """Insert a new block, blended in from α = 0 (the model's output is unchanged).

        Args:
            after: dotted name of a layer (in the wrapped model): a fresh residual block
                ``x + fc2(act(fc1(x)))`` (``fc2`` zero) goes right after it, or a conv block
                ``x + conv2(act(conv1(x)))`` after a Conv1d/2d; its width is that of the last
                Linear/Conv/norm up to the layer (after ``Linear -> act`` too).
            into: dotted name of a block stack (``nn.Sequential``/``nn.ModuleList``: a GPT's
                ``blocks``, an HF decoder's ``model.layers``), with ``index`` the new block's
                position (0 ... len).
            index: see ``into``.
            init: ``"fresh"`` (new weights; residual output projections zero, so the block starts
                as the identity) or ``"copy"`` (G_stack: a copy of block ``copy_from``).
            blend_steps: ``model.step()`` calls over which α ramps 0 -> 1.
            copy_from: the stack block to copy (``"copy"``) or to take the shape of (``"fresh"``);
                default the block below ``index``.
            hidden, activation, norm: width, activation and LayerNorm of a fresh residual block
                (``after=``); ``hidden`` defaults to the block's width.
            output_projections: names of the layers a fresh stack block's residual branches end
                in (zeroed); the default knows torch, GPT-2 and Llama-style blocks.

        Returns:
            The insertion (``block_id``, ``state``, ``block``); pass ``block_id`` to
            :meth:`fossilize_block` or :meth:`cull_block`.

        Raises:
            ConfigurationError: a bad argument, or no block can be built there (the model is
                unchanged); :class:`~esper.errors.UnknownLayerError` for an unknown name.
        """
        inserted = self._block_growth().deepen(
            after=after, into=into, index=index, init=init, blend_steps=blend_steps,
            copy_from=copy_from, hidden=hidden, activation=activation, norm=norm,
            output_projections=output_projections,
        )  # fmt: skip
        self._keep_log()
        return inserted

    def fossilize_block(self, block_id: int) -> None:
        """Keep an ACTIVE inserted block: it becomes an ordinary submodule of its stack."""
        self._block_growth().fossilize(block_id)

    def cull_block(self, block_id: int) -> None:
        """Remove a BLENDING or ACTIVE inserted block; the host is as it was before."""
        self._block_growth().cull(block_id)
        self._keep_log()

    def bypass_block(self, block_id: int) -> AbstractContextManager[None]:
        """``with model.bypass_block(i):`` the block computes the identity (α = 0): evaluate
        the model with and without it on held-out data to judge it (keep or cull)."""
        return self._block_growth().bypassed(block_id)

    @property
    def inserted_blocks(self) -> list[InsertedBlock]:
        """Live insertions (culled ones are gone), by id."""
        growth = self.__dict__.get("_growth")
        return [] if growth is None else [growth.blocks[i] for i in sorted(growth.blocks)]

    def _advance_blocks(self) -> None:
        growth = self.__dict__.get("_growth")
        if growth is not None:
            growth.advance()

    def _block_growth(self) -> BlockGrowth:
        growth = self.__dict__.get("_growth")
        if growth is None:
            growth = BlockGrowth(self.model, cast(SeedEvents, self), type(self).plain_copy)
            object.__setattr__(self, "_growth", growth)
        return growth

    def _keep_log(self) -> None:
        """A ``deepen_log`` child while blocks are inserted, none otherwise (a model whose
        insertions were all culled has the host's ``state_dict`` again)."""
        growth = self._block_growth()
        if growth.blocks and DEEPEN_LOG not in self._modules:
            self.add_module(DEEPEN_LOG, DeepenLog(growth))
        elif not growth.blocks and DEEPEN_LOG in self._modules:
            del self._modules[DEEPEN_LOG]

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Rebuild the checkpoint's insertions first, so every later check and load sees the
        model's grown structure."""
        log = state_dict.get(f"{prefix}{DEEPEN_LOG}._extra_state")
        if log is not None:
            self._block_growth().replay(log)
            self._keep_log()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
