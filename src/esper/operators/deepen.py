"""DEEPEN: insert a new block after a layer or into a block stack, blend it in, keep or cull it.

Lifecycle (the seed table of :mod:`esper.contracts`): :meth:`BlockGrowth.deepen` puts a
:class:`~esper.operators.growing_block.GrowingBlock` into the stack at α = 0 (BLENDING: the model
computes exactly what it did); each :meth:`BlockGrowth.advance` (``model.step()``) ramps α by
``1/blend_steps`` until it is 1 (ACTIVE: exactly ``block(x)``); then :meth:`~BlockGrowth.fossilize`
puts the bare block in the wrapper's place (an ordinary submodule: the model is the plain network
of its new depth) or :meth:`~BlockGrowth.cull` takes it out, leaving the host as it was.

The new block's parameters join the model through the same events as a kernel's
(``kernel_grafted("deepen", block_id, block)``), so an attached optimizer gives them their own
group, tagged ``esper_seed="deepen:<id>"``, with empty (zero) state; culling drops the group.

Checkpoints: :meth:`~BlockGrowth.log` describes every live insertion (stack, index, recipe,
state) in plain JSON-able values; :meth:`~BlockGrowth.replay` rebuilds those insertions in a
fresh wrap of the original host before its weights are loaded (``MorphableModel`` keeps the log
as the extra state of its ``deepen_log`` child).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from esper.contracts import SeedState, check_transition
from esper.errors import ConfigurationError, StateDictError, UnknownLayerError
from esper.execution.seed_lifecycle import SeedEvents
from esper.operators import block_stacks
from esper.operators.block_stacks import InsertionPoint
from esper.operators.growing_block import GrowingBlock
from esper.operators.new_blocks import (
    OUTPUT_PROJECTIONS,
    PlainCopy,
    build_residual_block,
    residual_conv_recipe,
    residual_mlp_recipe,
    stack_block,
    structure_of,
    to_host,
)

logger = logging.getLogger(__name__)

DEEPEN_GROUP = "deepen"
"""The layer name a deepen block's parameters join the optimizer under (tag ``deepen:<id>``)."""

LOG_VERSION = 1
INITS = ("fresh", "copy")


@dataclass
class InsertedBlock:
    """One live insertion: where it is, how it was made, and its lifecycle state."""

    block_id: int
    init: str
    recipe: dict[str, Any]
    """How to rebuild the structure: a fresh residual family, or ``{"family": "stack"}``."""
    stack: nn.Module
    module: nn.Module
    """The :class:`GrowingBlock` until fossilized, then the bare block."""
    template: nn.Module | None
    """For ``stack`` recipes: the host's own block whose structure this one has."""
    wrapped: tuple[nn.Module, str] | None
    """Set when ``stack`` is an ``nn.Sequential`` made around a plain attribute layer."""

    @property
    def state(self) -> SeedState:
        """BLENDING, ACTIVE or FOSSILIZED."""
        module = self.module
        return module.state if isinstance(module, GrowingBlock) else SeedState.FOSSILIZED

    @property
    def block(self) -> nn.Module:
        """The new block itself (torch classes only)."""
        module = self.module
        return module.block if isinstance(module, GrowingBlock) else module


class BlockGrowth:
    """The deepen insertions of one model.

    Args:
        root: the wrapped model (``MorphableModel.model``); paths are relative to it.
        events: receives ``kernel_grafted``/``kernel_removed`` for each block.
        plain_copy: makes a plain-torch deep copy of a (possibly seeded) block.
    """

    def __init__(self, root: nn.Module, events: SeedEvents, plain_copy: PlainCopy) -> None:
        self.root = root
        self.events = events
        self.plain_copy = plain_copy
        self.blocks: dict[int, InsertedBlock] = {}
        self.next_id = 0

    # -- growing -------------------------------------------------------------------------------

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
        """Insert a new block, BLENDING at α = 0; see ``MorphableModel.deepen``."""
        if init not in INITS:
            raise ConfigurationError(f"init must be 'fresh' or 'copy', got {init!r}")
        if isinstance(blend_steps, bool) or not isinstance(blend_steps, int) or blend_steps < 1:
            raise ConfigurationError(f"blend_steps must be an int >= 1, got {blend_steps!r}")
        if (after is None) == (into is None):
            raise ConfigurationError(
                "deepen() takes exactly one of after='<layer>' (a new residual block after that "
                "layer) or into='<stack>' with index=i (a new block in a block stack); stacks of "
                f"this model: {', '.join(block_stacks.block_stacks(self.root)) or 'none'}"
            )
        if after is not None:
            if index is not None or init == "copy" or copy_from is not None:
                raise ConfigurationError(
                    "after='<layer>' inserts a fresh residual block; index, copy_from and "
                    "init='copy' are for into='<stack>' (copying one of the stack's blocks)"
                )
            point = block_stacks.stack_after(self.root, after)
            block, recipe = self._residual_block(point, hidden, activation, norm)
            template = None
        else:
            assert into is not None
            if index is None:
                raise ConfigurationError(f"into={into!r} needs index=i: where the new block goes")
            point = block_stacks.stack_at(self.root, into, index)
            template = self._template(point, copy_from, init)
            block = stack_block(
                template, init=init, plain_copy=self.plain_copy,
                output_projections=output_projections,
            )  # fmt: skip
            recipe = {"family": "stack"}
            template = self._host_template(template)
        block_id = self.next_id
        growing = GrowingBlock(block, block_id=block_id, blend_steps=blend_steps)
        block_stacks.insert(point, growing, name=f"deepen{block_id}")
        self.next_id += 1
        inserted = InsertedBlock(
            block_id, init, recipe, point.stack, growing, template, point.wrapped
        )
        self.blocks[block_id] = inserted
        self.events.kernel_grafted(DEEPEN_GROUP, block_id, growing.block)
        logger.info(
            "inserted block %d (%s, %s, %d parameters) at index %d; blending over %d steps",
            block_id, init, recipe["family"], sum(p.numel() for p in block.parameters()),
            point.index, blend_steps,
        )  # fmt: skip
        return inserted

    def _residual_block(
        self, point: InsertionPoint, hidden: int | None, activation: str, norm: bool
    ) -> tuple[nn.Module, dict[str, Any]]:
        layer, width = block_stacks.output_width(point.stack, point.index)
        if isinstance(layer, nn.Conv1d | nn.Conv2d):
            dims = 1 if isinstance(layer, nn.Conv1d) else 2
            recipe = residual_conv_recipe(width, dims=dims, kernel_size=3, activation=activation)
        else:
            recipe = residual_mlp_recipe(width, hidden=hidden, activation=activation, norm=norm)
        return to_host(build_residual_block(recipe), layer), recipe

    def _template(self, point: InsertionPoint, copy_from: int | None, init: str) -> nn.Module:
        children = list(point.stack._modules.values())
        if copy_from is None:
            copy_from = max(point.index - 1, 0)  # the block below (G_stack stacks upwards)
        if isinstance(copy_from, bool) or not isinstance(copy_from, int):
            raise ConfigurationError(f"copy_from must be a block index, got {copy_from!r}")
        if not 0 <= copy_from < len(children):
            raise ConfigurationError(
                f"copy_from must be from 0 to {len(children) - 1} (the stack has {len(children)} "
                f"blocks), got {copy_from}"
            )
        source = children[copy_from]
        assert source is not None
        return source.block if isinstance(source, GrowingBlock) else source

    def _host_template(self, source: nn.Module) -> nn.Module:
        """The host block whose structure ``source`` has (itself, or an inserted block's)."""
        for inserted in self.blocks.values():
            if inserted.block is source and inserted.template is not None:
                return inserted.template
        return source

    # -- lifecycle -----------------------------------------------------------------------------

    def advance(self) -> None:
        """Step boundary: ramp every BLENDING block's α; at 1 it is ACTIVE."""
        for inserted in self.blocks.values():
            growing = inserted.module
            if isinstance(growing, GrowingBlock) and growing.state is SeedState.BLENDING:
                growing.blend_steps_done += 1
                growing.alpha.fill_(min(1.0, growing.blend_steps_done / growing.blend_steps))
                if growing.blend_steps_done >= growing.blend_steps:
                    check_transition(growing.state, SeedState.ACTIVE, where=_where(inserted))
                    growing.state = SeedState.ACTIVE

    def fossilize(self, block_id: int) -> None:
        """Keep an ACTIVE block: the bare block takes the wrapper's place in its stack."""
        inserted = self.get(block_id)
        check_transition(inserted.state, SeedState.FOSSILIZED, where=_where(inserted))
        growing = inserted.module
        assert isinstance(growing, GrowingBlock)
        block_stacks.replace(inserted.stack, growing, growing.block)
        inserted.module = growing.block
        logger.info("fossilized inserted block %d: now an ordinary submodule", block_id)

    def cull(self, block_id: int) -> None:
        """Remove a BLENDING or ACTIVE block: the host is the one it was before the insertion."""
        inserted = self.get(block_id)
        check_transition(inserted.state, SeedState.DORMANT, where=_where(inserted))
        block_stacks.remove(inserted.stack, inserted.module, wrapped=inserted.wrapped)
        del self.blocks[block_id]
        self.events.kernel_removed(DEEPEN_GROUP, block_id, inserted.block)
        logger.info("culled inserted block %d: the host is as before its insertion", block_id)

    @contextmanager
    def bypassed(self, block_id: int) -> Iterator[None]:
        """Inside the ``with``, a BLENDING or ACTIVE block computes the identity (α = 0), e.g.
        to judge it by an ablation on held-out data; its α is restored on exit."""
        inserted = self.get(block_id)
        growing = inserted.module
        if not isinstance(growing, GrowingBlock):
            raise ConfigurationError(
                f"{_where(inserted)} is FOSSILIZED: it is part of the host and cannot be bypassed"
            )
        alpha = growing.alpha.clone()
        growing.alpha.zero_()
        try:
            yield
        finally:
            growing.alpha.copy_(alpha)

    def get(self, block_id: int) -> InsertedBlock:
        """The live insertion ``block_id``; :class:`UnknownLayerError` if there is none."""
        inserted = self.blocks.get(block_id) if isinstance(block_id, int) else None
        if inserted is None:
            raise UnknownLayerError(
                f"no inserted block with id {block_id!r}; live blocks: "
                f"{sorted(self.blocks) or 'none'}"
            )
        return inserted

    # -- checkpoints ---------------------------------------------------------------------------

    def log(self) -> dict[str, Any]:
        """Every live insertion as plain values (where it is now, how to rebuild it, its state)."""
        paths = {id(m): name for name, m in self.root.named_modules(remove_duplicate=False)}
        entries = []
        for inserted in self.blocks.values():
            stack = inserted.stack
            module = inserted.module
            originals = self._originals(stack)
            template = inserted.template
            entries.append(
                {
                    "id": inserted.block_id,
                    "init": inserted.init,
                    "recipe": dict(inserted.recipe),
                    "stack": paths[id(stack)],
                    "index": block_stacks.index_in(stack, module),
                    "key": next(k for k, m in stack._modules.items() if m is module),
                    "template": None if template is None else _position(originals, template),
                    "wrapped": inserted.wrapped is not None,
                    "state": inserted.state.name,
                    "blend_steps": getattr(module, "blend_steps", 0),
                    "blend_steps_done": getattr(module, "blend_steps_done", 0),
                }
            )
        return {"version": LOG_VERSION, "next_id": self.next_id, "blocks": entries}

    def _originals(self, stack: nn.Module) -> list[nn.Module]:
        inserted = {id(b.module) for b in self.blocks.values() if b.stack is stack}
        return [m for m in stack._modules.values() if m is not None and id(m) not in inserted]

    def replay(self, log: Mapping[str, Any]) -> None:
        """Rebuild the insertions of ``log`` (from :meth:`log`) in this model, which has none.

        Raises:
            StateDictError: the log is malformed or does not fit this model's stacks.
        """
        entries = _check_log(log)
        if self.blocks:
            if _structure(self.log()) == _structure(log):
                self._restore_progress(entries)
                return
            raise StateDictError(
                "the checkpoint's inserted blocks differ from this model's; load it into a fresh "
                "esper.wrap of the original host model"
            )
        by_stack: dict[str, list[dict[str, Any]]] = {}
        for entry in entries:
            by_stack.setdefault(entry["stack"], []).append(entry)
        for path in sorted(by_stack, key=lambda p: len(p.split(".")) if p else 0):
            self._replay_stack(path, sorted(by_stack[path], key=lambda e: e["index"]))
        self.next_id = max([int(log["next_id"]), *(e["id"] + 1 for e in entries)])

    def _restore_progress(self, entries: list[dict[str, Any]]) -> None:
        """Loading into the same insertions: take the checkpoint's lifecycle state and ramp
        progress (α itself is a buffer and loads with the weights)."""
        for entry in entries:
            growing = self.blocks[entry["id"]].module
            if isinstance(growing, GrowingBlock):
                growing.state = SeedState[entry["state"]]
                growing.blend_steps = entry["blend_steps"]
                growing.blend_steps_done = entry["blend_steps_done"]

    def _replay_stack(self, path: str, entries: list[dict[str, Any]]) -> None:
        wrapped = None
        if entries[0]["wrapped"]:
            stack, wrapped = block_stacks.wrap_layer(self.root, path)
        else:
            stack = block_stacks.submodule(self.root, path, what="checkpoint's block stack")
        originals = list(m for m in stack._modules.values() if m is not None)
        for entry in entries:
            if not 0 <= entry["index"] <= len(stack._modules):
                raise StateDictError(
                    f"inserted block {entry['id']}: index out of range of {path!r}"
                )
            template = None
            if entry["recipe"].get("family") == "stack":
                if not isinstance(entry["template"], int) or not (
                    0 <= entry["template"] < len(originals)
                ):
                    raise StateDictError(f"inserted block {entry['id']}: bad template index")
                template = originals[entry["template"]]
                block = to_host(structure_of(template, self.plain_copy), template)
            else:
                block = to_host(build_residual_block(entry["recipe"]), stack)
            module: nn.Module = block
            if entry["state"] != SeedState.FOSSILIZED.name:
                growing = GrowingBlock(
                    block, block_id=entry["id"], blend_steps=entry["blend_steps"]
                )
                growing.state = SeedState[entry["state"]]
                growing.blend_steps_done = entry["blend_steps_done"]
                module = growing
            block_stacks.insert(InsertionPoint(stack, entry["index"]), module, name=entry["key"])
            self.blocks[entry["id"]] = InsertedBlock(
                entry["id"], entry["init"], entry["recipe"], stack, module, template, wrapped
            )
            self.events.kernel_grafted(DEEPEN_GROUP, entry["id"], block)


def _where(inserted: InsertedBlock) -> str:
    return f"inserted block {inserted.block_id}"


def _position(modules: Sequence[nn.Module], module: nn.Module) -> int:
    return next(i for i, m in enumerate(modules) if m is module)


def _structure(log: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    return sorted(
        (
            e["id"], e["stack"], e["index"], e["key"], str(e["recipe"]), e["template"],
            e["state"] == SeedState.FOSSILIZED.name,
        )
        for e in log["blocks"]
    )  # fmt: skip


_ENTRY_KEYS = {
    "id": int, "init": str, "recipe": dict, "stack": str, "index": int, "key": str,
    "wrapped": bool, "state": str, "blend_steps": int, "blend_steps_done": int,
}  # fmt: skip


def _check_log(log: Mapping[str, Any]) -> list[dict[str, Any]]:
    if not isinstance(log, Mapping) or log.get("version") != LOG_VERSION:
        raise StateDictError(
            f"deepen_log._extra_state is not a version-{LOG_VERSION} deepen log; the checkpoint "
            "was written by another Esper version"
        )
    entries = log.get("blocks")
    if not isinstance(entries, list) or not isinstance(log.get("next_id"), int):
        raise StateDictError("deepen_log._extra_state has no 'blocks' list or 'next_id'")
    for entry in entries:
        wrong = [
            key for key, kind in _ENTRY_KEYS.items()
            if not isinstance(entry, Mapping) or not isinstance(entry.get(key), kind)
        ]  # fmt: skip
        if wrong or entry["state"] not in ("BLENDING", "ACTIVE", "FOSSILIZED"):
            raise StateDictError(f"deepen log entry {entry!r} is malformed (keys {wrong})")
    return [dict(e) for e in entries]
