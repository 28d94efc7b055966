"""The widen operator's part of ``MorphableModel``'s public API (a base class of it).

``model.widen(layer, k, init=..., blend_steps=..., gradmax_batches=...)`` starts a widen;
``model.widenings`` (:class:`~esper.operators.widenings.Widenings`) holds them and has
``fossilize(layer)``/``cull(layer)``. The state-dict hooks registered here write the record of
the widens and replay it before a load (before the seeded layers' own checks run).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from esper.errors import IllegalTransitionError
from esper.operators.widen import WidenGraft
from esper.operators.widen_init import GradMaxBatch
from esper.operators.widenings import Widenings


class WidenOperations(nn.Module):
    """Adds :meth:`widen` and :attr:`widenings` to a wrapped model (``MorphableModel``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_state_dict_post_hook(_add_record)
        self.register_load_state_dict_pre_hook(_replay_record)

    def kernel_grafted(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """New parameters joined the model (the model fans this out to its listeners)."""
        raise NotImplementedError

    def kernel_removed(self, layer_name: str, seed_idx: int, module: nn.Module) -> None:
        """Parameters left the model (the model fans this out to its listeners)."""
        raise NotImplementedError

    @property
    def widenings(self) -> Widenings:
        """This model's widens (created on first use)."""
        found = self.__dict__.get("_widenings")
        if found is None:
            found = Widenings(
                self.__dict__["_modules"]["model"],
                self.__dict__["_optimizers"],
                self.kernel_grafted,
                self.kernel_removed,
            )
            self.__dict__["_widenings"] = found
        return found

    def check_not_widening(self, layer_name: str) -> None:
        """Refuse a kernel load into a layer that a widen in progress touches: the kernel would
        be built for the layer's width before the merge, not after it.

        Raises:
            IllegalTransitionError: naming the widen and the fix (fossilize or cull it first).
        """
        widenings: Widenings | None = self.__dict__.get("_widenings")
        graft = widenings.touching(layer_name) if widenings is not None else None
        if graft is not None:
            raise IllegalTransitionError(
                f"layer {layer_name!r} is part of the widen of {graft.layer_name!r} into "
                f"{graft.path.consumer!r} ({graft.state.name}); load a kernel there after "
                f"model.widenings.fossilize({graft.layer_name!r}) or .cull({graft.layer_name!r})"
            )

    def widen(
        self,
        layer_name: str,
        k: int,
        *,
        init: str = "random",
        blend_steps: int = 20,
        gradmax_batches: Iterable[GradMaxBatch] = (),
    ) -> WidenGraft:
        """Widen the Linear/Conv ``layer_name`` by ``k`` units, together with its consumer and
        the norm between; the model's output is unchanged (α starts at 0).

        Args:
            layer_name: dotted name of the layer in the original model.
            k: number of new units (output features or channels).
            init: ``"random"`` (random fan-in, zero fan-out) or ``"gradmax"`` (zero fan-in,
                fan-out from the gradient correlation of ``gradmax_batches``).
            blend_steps: steps (``model.step()`` calls) over which α ramps to 1; 0: at once.
            gradmax_batches: for ``init="gradmax"``, batches whose loss is measured.

        Returns:
            The widen, BLENDING (ACTIVE if ``blend_steps`` is 0); keep it with
            ``model.widenings.fossilize(layer_name)``, drop it with ``...cull(layer_name)``.

        Raises:
            ConfigurationError: a bad argument or ``"cannot widen <layer>: <why>"``; nothing
                was changed.
        """
        return self.widenings.widen(
            layer_name, k, init=init, blend_steps=blend_steps, gradmax_batches=gradmax_batches
        )


def _add_record(module: nn.Module, state_dict: Any, prefix: str, _: Any) -> None:
    assert isinstance(module, WidenOperations)
    module.widenings.add_record(state_dict, prefix)


def _replay_record(module: nn.Module, state_dict: Any, prefix: str, *_: Any) -> None:
    assert isinstance(module, WidenOperations)
    module.widenings.replay_record(state_dict, prefix)
