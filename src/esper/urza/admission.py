"""Admission: which blueprints and compile jobs the Urza service takes in.

The service stores blueprints that some worker will compile, and queues compiles whose kernels
it will later have to store and serve. Before either is accepted:

- a blueprint must name a family the catalog knows, with parameters that family accepts;
- a compile job's kernel must fit the service's limits: no more than ``max_kernel_parameters``
  parameters (when set), and tensors no larger than ``max_artifact_bytes`` (an artifact that
  large would be refused at upload anyway, after a wasted compile).

Blueprint families are code that ships with :mod:`esper.blueprints`, which Urza does not import:
the service is given a :class:`BlueprintCatalog` by whoever starts it (``esper urza serve`` passes
:class:`esper.tezzeret.RegistryCatalog`). Without one, blueprints are checked only as contracts and
jobs only by their target's bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from esper.contracts import BlueprintSpec, KernelTarget
from esper.urza.errors import JobRefusedError
from esper.urza.settings import ServiceLimits


@dataclass(frozen=True)
class KernelSize:
    """How large the kernel a blueprint builds for a target is.

    Attributes:
        parameters: elements of all its tensors (parameters and buffers).
        tensor_bytes: bytes of those tensors in the target's dtype (the artifact adds a header).
    """

    parameters: int
    tensor_bytes: int


class BlueprintCatalog(Protocol):
    """The blueprint families a service accepts, and the size of what they build."""

    def check_spec(self, spec: BlueprintSpec) -> None:
        """Raise :class:`~esper.errors.BlueprintError` unless ``spec`` names a known family with
        parameters it accepts (the message names the known families or the bad parameter)."""
        ...

    def kernel_size(self, spec: BlueprintSpec, target: KernelTarget) -> KernelSize:
        """The size of the kernel ``spec`` builds for ``target`` (nothing is allocated).

        Raises:
            BlueprintError: ``spec`` is invalid or cannot target ``target``.
        """
        ...


class Admission:
    """The service's checks of submitted blueprints and compile jobs.

    Args:
        limits: the service's limits.
        catalog: the known blueprint families; ``None``: no family or size checks.
    """

    def __init__(self, limits: ServiceLimits, catalog: BlueprintCatalog | None) -> None:
        self.limits = limits
        self.catalog = catalog

    def check_blueprint(self, spec: BlueprintSpec) -> None:
        """Raise :class:`~esper.errors.BlueprintError` for a spec the catalog does not accept."""
        if self.catalog is not None:
            self.catalog.check_spec(spec)

    def check_job(self, spec: BlueprintSpec, target: KernelTarget) -> None:
        """Refuse a compile of ``spec`` for ``target`` whose kernel would exceed the limits.

        Raises:
            BlueprintError: the catalog cannot build ``spec`` for ``target``.
            JobRefusedError: the kernel would be too large.
        """
        if self.catalog is None:
            return
        size = self.catalog.kernel_size(spec, target)
        limits = self.limits
        what = f"a {spec.family} kernel for {target.describe()}"
        if (
            limits.max_kernel_parameters is not None
            and size.parameters > limits.max_kernel_parameters
        ):
            raise JobRefusedError(
                f"{what} would have {size.parameters:,} parameters; this service compiles kernels "
                f"of at most {limits.max_kernel_parameters:,} (max_kernel_parameters). Choose "
                "smaller blueprint parameters, or raise ESPER_URZA_MAX_KERNEL_PARAMETERS."
            )
        if size.tensor_bytes > limits.max_artifact_bytes:
            raise JobRefusedError(
                f"{what} would be at least {size.tensor_bytes:,} bytes; this service stores "
                f"artifacts of at most {limits.max_artifact_bytes:,} (max_artifact_bytes). "
                "Choose smaller blueprint parameters, or raise --max-artifact-bytes."
            )
