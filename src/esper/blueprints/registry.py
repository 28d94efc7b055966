"""Blueprint registry: family name -> builder, and the functions that validate and build specs.

A blueprint is data (:class:`~esper.contracts.BlueprintSpec`: a family name plus hyperparameters);
a *family* is code that ships with Esper and turns a spec into an ``nn.Module`` for a target layer
geometry. Nothing outside this registry can make a spec execute code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from esper.contracts import BlueprintSpec, KernelTarget
from esper.errors import BlueprintError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""Kernel dtypes by their contract name."""


class BlueprintFamily(Protocol):
    """A kind of kernel: how to validate its hyperparameters and build it for a target."""

    @property
    def name(self) -> str:
        """The family's name in specs (``BlueprintSpec.family``)."""
        ...

    @property
    def params_model(self) -> type[BaseModel]:
        """Pydantic model of the family's hyperparameters (``extra="forbid"``, with defaults)."""
        ...

    def incompatibility(self, params: BaseModel, target: KernelTarget) -> str | None:
        """Why this family cannot serve ``target`` with ``params``, or ``None`` if it can."""
        ...

    def build(self, params: BaseModel, target: KernelTarget) -> nn.Module:
        """A function-preserving module (its output is exactly zero) for ``target``, in float32."""
        ...


_FAMILIES: dict[str, BlueprintFamily] = {}


def register_family(family: BlueprintFamily) -> BlueprintFamily:
    """Add a family to the registry under ``family.name`` (names are unique)."""
    if family.name in _FAMILIES:
        raise BlueprintError(f"blueprint family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    """Names of all registered families, sorted."""
    return sorted(_FAMILIES)


def get_family(name: str) -> BlueprintFamily:
    """The family registered under ``name``; :class:`BlueprintError` naming the known ones if none."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise BlueprintError(
            f"unknown blueprint family {name!r}; known families: {', '.join(family_names())}"
        ) from None


def parse_params(spec: BlueprintSpec) -> BaseModel:
    """Validate a spec's hyperparameters against its family's parameter model."""
    family = get_family(spec.family)
    try:
        return family.params_model.model_validate(spec.params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
            for err in exc.errors()
        )
        raise BlueprintError(
            f"invalid parameters for blueprint family {spec.family!r}: {problems}"
        ) from None


def check_compatible(spec: BlueprintSpec, target: KernelTarget) -> None:
    """Raise :class:`BlueprintError` unless ``spec`` can be built for ``target``."""
    params = parse_params(spec)
    reason = get_family(spec.family).incompatibility(params, target)
    if reason is not None:
        raise BlueprintError(
            f"blueprint {spec.family!r} cannot target {target.describe()}: {reason}"
        )


def is_compatible(spec: BlueprintSpec, target: KernelTarget) -> bool:
    """Whether ``spec`` can be built for ``target`` (no exception)."""
    try:
        check_compatible(spec, target)
    except BlueprintError:
        return False
    return True


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype named ``name`` in a contract."""
    try:
        return DTYPES[name]
    except KeyError:
        raise BlueprintError(
            f"unsupported kernel dtype {name!r}; supported: {', '.join(DTYPES)}"
        ) from None


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_kernel(
    spec: BlueprintSpec,
    target: KernelTarget,
    *,
    init_seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the kernel module for ``spec`` and ``target``, initialised deterministically.

    The same spec, target and ``init_seed`` always give the same weights. The module starts
    function-preserving (its output is zero), in ``target.dtype`` on ``device``.
    """
    check_compatible(spec, target)
    params = parse_params(spec)
    with _seeded(init_seed):
        module = get_family(spec.family).build(params, target)
    return module.to(device=device, dtype=torch_dtype(target.dtype))


def build_empty_kernel(spec: BlueprintSpec, target: KernelTarget) -> nn.Module:
    """Build the kernel's structure on the meta device (no memory, no init) to load weights into."""
    check_compatible(spec, target)
    params = parse_params(spec)
    with torch.device("meta"):
        return get_family(spec.family).build(params, target).to(dtype=torch_dtype(target.dtype))
