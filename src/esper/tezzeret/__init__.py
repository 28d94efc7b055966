"""Tezzeret: the blueprint compiler that turns blueprints into validated, characterized kernels.

:func:`compile_blueprint` builds a blueprint for a target layer geometry, validates it, measures
it and serializes it into a content-addressed artifact; :class:`TezzeretWorker` claims compile
jobs from Urza, compiles them off the training thread, stores the kernels and announces them on
Oona; :func:`find_or_enqueue` and :func:`wait_for_kernel` are how a run asks for a kernel.
"""

from esper.tezzeret.blueprint_catalog import RegistryCatalog
from esper.tezzeret.compiler import (
    BlueprintValidationError,
    CompiledKernel,
    compile_blueprint,
    example_input,
)
from esper.tezzeret.kernel_requests import (
    KernelLookup,
    KernelRequest,
    KernelUnavailableError,
    find_or_enqueue,
    jobs_in_flight,
    wait_for_jobs,
    wait_for_kernel,
)
from esper.tezzeret.worker import TezzeretWorker
from esper.tezzeret.worker_process import TezzeretProcess, library_location

__all__ = [
    "BlueprintValidationError",
    "CompiledKernel",
    "KernelLookup",
    "KernelRequest",
    "KernelUnavailableError",
    "RegistryCatalog",
    "TezzeretProcess",
    "TezzeretWorker",
    "compile_blueprint",
    "example_input",
    "find_or_enqueue",
    "jobs_in_flight",
    "library_location",
    "wait_for_jobs",
    "wait_for_kernel",
]
