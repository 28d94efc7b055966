"""A wrapped model's widens: lifecycle calls, optimizer groups, telemetry and checkpoints.

:class:`Widenings` is what ``MorphableModel.widen`` and its step boundary delegate to. It keeps
the widens by producer layer, in the order they happened, and

* announces the new units to the model's graft listeners (so every attached optimizer gives them
  a group, tagged ``widen:<layer>:0``) and their removal when culled or merged;
* ramps α at each step boundary;
* writes a record of the widens into the model's state dict (key ``widen_record``: a uint8
  tensor of JSON, loadable with ``torch.load(weights_only=True)``) and, before a state dict is
  loaded into a freshly wrapped host, replays that record's structure (new units zero, merged
  layers widened, attached optimizers following), so the tensors then load into the right shapes;
* counts events and logs each one (``widen`` / ``cull`` / ``fossilize``, with its time).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

from esper.contracts import SeedState
from esper.errors import StateDictError
from esper.operators import widen as widen_ops
from esper.operators.widen import WIDEN_SEED, WidenGraft
from esper.operators.widen_init import GradMaxBatch

logger = logging.getLogger(__name__)

RECORD_KEY = "widen_record"
"""State-dict key (under the wrapped model's prefix) of the widens' record."""

GraftListener = Callable[[str, int, nn.Module], None]


class Widenings:
    """The widens of one wrapped model.

    Args:
        root: the host model (the wrapped model's inner ``model``).
        optimizers: the model's attached optimizers (the live list, read at each event).
        on_graft: called with ``("widen:<layer>", 0, module)`` when new units join.
        on_removal: called likewise when they leave (culled, or merged into the host).
    """

    def __init__(
        self,
        root: nn.Module,
        optimizers: Sequence[torch.optim.Optimizer],
        on_graft: GraftListener,
        on_removal: GraftListener,
    ) -> None:
        self._root = root
        self._optimizers = optimizers
        self._on_graft = on_graft
        self._on_removal = on_removal
        self.history: list[WidenGraft] = []
        """Every widen, in order (culled ones included)."""
        self.events: dict[str, int] = {"widen": 0, "cull": 0, "fossilize": 0, "refused": 0}

    def active(self) -> dict[str, WidenGraft]:
        """Widens not yet merged or culled, by producer layer."""
        return {
            g.layer_name: g
            for g in self.history
            if g.state in (SeedState.BLENDING, SeedState.ACTIVE)
        }

    def widen(
        self,
        layer_name: str,
        k: int,
        *,
        init: str = "random",
        blend_steps: int = 20,
        gradmax_batches: Iterable[GradMaxBatch] = (),
    ) -> WidenGraft:
        """Start widening ``layer_name`` by ``k`` units (see :func:`esper.operators.widen.build_widen`)."""
        started = time.perf_counter()
        try:
            graft = widen_ops.build_widen(
                self._root,
                layer_name,
                k,
                init=init,
                blend_steps=blend_steps,
                gradmax_batches=gradmax_batches,
            )
        except Exception:
            self.events["refused"] += 1
            raise
        widen_ops.install(self._root, graft)
        self._on_graft(graft.group_name, WIDEN_SEED, _units_module(graft))
        graft.seconds = time.perf_counter() - started
        self.history.append(graft)
        self.events["widen"] += 1
        logger.info(
            "widen %r by %d units (%s init) into %r: %.1f ms",
            layer_name,
            k,
            init,
            graft.path.consumer,
            1e3 * graft.seconds,
        )
        if graft.blend_steps == 0:
            widen_ops.advance(graft)
        return graft

    def touching(self, layer_name: str) -> WidenGraft | None:
        """The widen in progress whose producer, norm or consumer is ``layer_name``, if any."""
        for graft in self.active().values():
            if layer_name in (graft.path.producer, graft.path.norm, graft.path.consumer):
                return graft
        return None

    def get(self, layer_name: str) -> WidenGraft:
        """The widen of ``layer_name`` in progress; :class:`KeyError` naming those there are."""
        try:
            return self.active()[layer_name]
        except KeyError:
            raise KeyError(
                f"no widen of {layer_name!r} in progress (in progress: "
                f"{', '.join(self.active()) or 'none'})"
            ) from None

    def advance(self) -> None:
        """Step boundary: ramp α of every blending widen."""
        for graft in self.active().values():
            widen_ops.advance(graft)

    def cull(self, layer_name: str) -> None:
        """Drop the new units of ``layer_name``'s widen; the host modules are back as they were."""
        graft = self.get(layer_name)
        units = _units_module(graft)
        widen_ops.cull(self._root, graft)
        self._on_removal(graft.group_name, WIDEN_SEED, units)
        self.events["cull"] += 1
        logger.info("widen of %r culled", layer_name)

    def fossilize(self, layer_name: str) -> None:
        """Merge ``layer_name``'s ACTIVE widen into plain wider modules (optimizer following)."""
        graft = self.get(layer_name)
        units = _units_module(graft)
        widen_ops.fossilize(self._root, graft, self._optimizers)
        self._on_removal(graft.group_name, WIDEN_SEED, units)
        self.events["fossilize"] += 1
        logger.info("widen of %r fossilized: merged into plain modules", layer_name)

    def check_plain(self) -> None:
        """Raise if a widen is in progress (its wrappers are not plain torch modules)."""
        if self.active():
            raise StateDictError(
                f"widens of {sorted(self.active())} are in progress; fossilize or cull them "
                "before unwrap()"
            )

    # -- checkpoints ---------------------------------------------------------------------------

    def add_record(self, state_dict: MutableMapping[str, Any], prefix: str) -> None:
        """State-dict hook: add the record of the widens (nothing when there were none)."""
        kept = [g.record() for g in self.history if g.state is not SeedState.DORMANT]
        if kept:
            data = json.dumps(kept, sort_keys=True).encode()
            state_dict[prefix + RECORD_KEY] = torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def replay_record(self, state_dict: MutableMapping[str, Any], prefix: str) -> None:
        """Load pre-hook: rebuild the structure of the saved widens before tensors load.

        Raises:
            StateDictError: the record is malformed, or this model already has other widens.
        """
        tensor = state_dict.pop(prefix + RECORD_KEY, None)
        if tensor is None:
            return
        records = _parse_record(tensor)
        mine = [g.record() for g in self.history if g.state is not SeedState.DORMANT]
        if mine == records:
            return  # loading into the model that saved it (or an exact replay of it)
        if mine:
            raise StateDictError(
                "the checkpoint's widens do not match this model's; load it into a fresh "
                "esper.wrap of the original host"
            )
        for record in records:
            self._replay(record)

    def _replay(self, record: Mapping[str, Any]) -> None:
        state = SeedState[str(record["state"])]
        graft = self.widen(
            str(record["layer"]),
            int(record["k"]),
            init=widen_ops.REPLAY_INIT,  # zeros: the checkpoint holds the new units' values
            blend_steps=int(record["blend_steps"]),
        )
        graft.init = str(record["init"])
        graft.steps_done = int(record["steps_done"])
        graft.state = SeedState.BLENDING if state is SeedState.BLENDING else SeedState.ACTIVE
        widen_ops.set_alpha(graft, graft.alpha)
        if state is SeedState.FOSSILIZED:
            self.fossilize(graft.layer_name)


def _units_module(graft: WidenGraft) -> nn.Module:
    """The new units' parameters as one module (what graft listeners receive)."""
    return nn.ParameterList(graft.new_unit_parameters())


def _parse_record(tensor: object) -> list[dict[str, Any]]:
    try:
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.uint8
        records = json.loads(bytes(tensor.tolist()).decode())
        assert isinstance(records, list) and all(isinstance(r, dict) for r in records)
        return records
    except (AssertionError, ValueError, UnicodeDecodeError) as exc:
        raise StateDictError(
            f"the state dict's {RECORD_KEY!r} is not a record of widens written by Esper"
        ) from exc
