"""The blueprint catalog the Urza service checks submissions against: the registry's families.

:class:`RegistryCatalog` answers the service's two questions (see :mod:`esper.urza.admission`)
from :mod:`esper.blueprints`: is a spec a known family with acceptable parameters, and how large
is the kernel it builds for a target. Sizes come from the kernel's structure built on the meta
device, so asking about a huge kernel allocates nothing.
"""

from __future__ import annotations

import math

from esper.blueprints import check_compatible, parse_params
from esper.blueprints.registry import build_empty_kernel
from esper.contracts import BlueprintSpec, KernelTarget
from esper.urza.admission import KernelSize


class RegistryCatalog:
    """The blueprint families that ship with Esper (and any registered in this process)."""

    def check_spec(self, spec: BlueprintSpec) -> None:
        """Raise :class:`~esper.errors.BlueprintError` for an unknown family or bad parameters."""
        parse_params(spec)

    def kernel_size(self, spec: BlueprintSpec, target: KernelTarget) -> KernelSize:
        """Parameters and tensor bytes of the kernel ``spec`` builds for ``target``.

        Raises:
            BlueprintError: ``spec`` is invalid or cannot target ``target``.
        """
        check_compatible(spec, target)
        module = build_empty_kernel(spec, target)
        tensors = [*module.parameters(), *module.buffers()]
        return KernelSize(
            parameters=sum(math.prod(t.shape) for t in tensors),
            tensor_bytes=sum(math.prod(t.shape) * t.element_size() for t in tensors),
        )
