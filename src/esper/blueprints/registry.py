"""Blueprint registry: family name -> builder, and the functions that validate and build specs.

A blueprint is data (:class:`~esper.contracts.BlueprintSpec`: a family name plus hyperparameters);
a *family* is code that ships with Esper and turns a spec into an ``nn.Module`` for a target layer
geometry. Nothing outside this registry can make a spec execute code.
"""

from __future__ import annotations

import math
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
        """A function-preserving module (its output is exactly zero) for ``target``, in float32.

        A family may also define ``initialize(module, params, generator)``: then ``build`` only
        lays out the structure (it runs on the meta device) and ``initialize`` draws every random
        value from ``generator`` (see :func:`initialize_kernel`).
        """
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
def _seeded_global_rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def initialize_kernel(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every parameter of a kernel its PyTorch default initialisation, drawn from
    ``generator`` instead of the global RNG, then zero the kernel's output stage.

    Draws happen in registration order, exactly as the layers' own ``reset_parameters`` draw
    them after ``torch.manual_seed``, so a kernel built this way equals one built directly under a
    seeded global RNG. The global RNG is never touched: compiling or loading a kernel on a
    background thread cannot disturb the training thread's random stream.

    Raises:
        BlueprintError: a parameter belongs to a layer type this function cannot initialise
            (families build from Linear, Conv1d/Conv2d, LayerNorm and BatchNorm layers).
    """
    initialised: set[int] = set()
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                initialised.add(id(layer.weight))
                if layer.bias is not None:
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
                    initialised.add(id(layer.bias))
            elif isinstance(layer, nn.LayerNorm | nn.BatchNorm1d | nn.BatchNorm2d):
                layer.reset_parameters()  # ones and zeros: no randomness
                initialised.update(id(p) for p in layer.parameters(recurse=False))
    missing = [name for name, p in module.named_parameters() if id(p) not in initialised]
    if missing:
        raise BlueprintError(
            f"cannot initialise kernel parameters {missing} of {type(module).__name__}: kernel "
            "families build from Linear, Conv1d/Conv2d, LayerNorm and BatchNorm layers"
        )
    zero_output = getattr(module, "zero_output_", None)
    if callable(zero_output):
        zero_output()
    return module


def build_kernel(
    spec: BlueprintSpec,
    target: KernelTarget,
    *,
    init_seed: int = 0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Build the kernel module for ``spec`` and ``target``, initialised deterministically.

    The same spec, target and ``init_seed`` always give the same weights. A family with an
    ``initialize(module, params, generator)`` method (all built-in ones) is built on the meta
    device and initialised from a private generator, so building never touches the global RNG
    and is safe on any thread. A family without one initialises in ``build`` under a seeded fork
    of the global RNG, which must then only be used from the training thread. The module starts
    function-preserving (its output is zero), in ``target.dtype`` on ``device``.
    """
    check_compatible(spec, target)
    params = parse_params(spec)
    family = get_family(spec.family)
    initialize = getattr(family, "initialize", None)
    if callable(initialize):
        with torch.device("meta"):
            module = family.build(params, target)
        module = module.to_empty(device="cpu").float()
        initialize(module, params, torch.Generator().manual_seed(init_seed))
    else:  # a family that initialises in build(): seed a fork of the global RNG around it
        with _seeded_global_rng(init_seed):
            module = family.build(params, target)
    return module.to(device=device, dtype=torch_dtype(target.dtype))


def build_empty_kernel(spec: BlueprintSpec, target: KernelTarget) -> nn.Module:
    """Build the kernel's structure on the meta device (no memory, no init) to load weights into."""
    check_compatible(spec, target)
    params = parse_params(spec)
    with torch.device("meta"):
        return get_family(spec.family).build(params, target).to(dtype=torch_dtype(target.dtype))
