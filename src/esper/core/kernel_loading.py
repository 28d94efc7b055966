"""Kernel loading for a MorphableModel: a kernel named, fetched off-thread, grafted, activated.

What :meth:`~esper.core.MorphableModel.load_kernel` and its blocking twin do, in order:

1. **Name → id.** A 64-hex kernel id is used as is (no lookup). Any other name (a unique id
   prefix of 6+ hex digits, or an alias such as ``kernel-001``) is resolved by the kernel source
   (``source.resolve(name)``: Urza libraries, the in-memory source); resolution is logged, and an
   unknown or ambiguous name fails before the seed changes, naming the name.
2. **Fetch.** The seed is LOADING while the kernel cache fetches and verifies the artifact on its
   own threads (awaiting never blocks the event loop).
3. **Graft.** The kernel joins the seed at alpha 0 (BLENDING): the output is unchanged.
4. **Activate** (``activate=True``): alpha 1 and ACTIVE at once, so the very next output includes
   the kernel (inference-time grafting). Without it the training loop's ``model.step()`` ramps
   alpha over the layer's ``blend_steps``.

A failed load leaves the seed DORMANT and raises :class:`~esper.errors.KernelLoadError`; the
asyncio future of a failed load is always retrieved, so asyncio never logs "Future exception was
never retrieved".
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait

from torch import nn

from esper.contracts import SeedState
from esper.errors import ArgumentTypeError, ConfigurationError, KernelLoadError
from esper.execution import CachedKernel, KasminaLayer, KernelCache
from esper.execution.arguments import check_name, shown

logger = logging.getLogger(__name__)

_KERNEL_ID = re.compile(r"[0-9a-f]{64}")
MAX_KERNEL_NAME_CHARS = 200
"""Longest kernel name accepted from a caller (ids are 64 characters, aliases at most 128)."""


def is_kernel_id(name: str) -> bool:
    """Whether ``name`` is a full kernel id (used as is, without asking the source)."""
    return _KERNEL_ID.fullmatch(name) is not None


def check_kernel_name(name: object) -> str:
    """``name`` if it is a string a kernel can go by (printable, at most 200 characters).

    Raises:
        ArgumentTypeError: not a string.
        ConfigurationError: empty, too long, or with control characters or spaces.
    """
    name = check_name("kernel_artifact_id", name)
    if not 0 < len(name) <= MAX_KERNEL_NAME_CHARS or not name.isprintable() or " " in name:
        raise ConfigurationError(
            f"kernel_artifact_id {shown(name)} is not a kernel name: give a kernel id (64 hex "
            "digits), a unique id prefix or an alias (letters, digits, '._:+-')"
        )
    return name


def resolve_kernel_name(cache: KernelCache, name: object) -> str:
    """The kernel id ``name`` stands for, asking the cache's source unless it is an id.

    Raises:
        KernelNotFoundError: the source knows no kernel by that name (raised by the source).
        AmbiguousKernelNameError: the name is a prefix of several ids (raised by the source).
        ConfigurationError: the name is malformed, or the source cannot resolve names.
    """
    name = check_kernel_name(name)
    if is_kernel_id(name):
        return name
    resolve = getattr(cache.source, "resolve", None)
    if not callable(resolve):
        raise ConfigurationError(
            f"kernel {name!r} is not a kernel id (64 hex digits) and the kernel source "
            f"({type(cache.source).__name__}) cannot resolve names; pass the kernel's id, or "
            "load from an Urza library, which keeps aliases (`esper kernel tag NAME ID`)"
        )
    kernel_id = resolve(name)
    if not isinstance(kernel_id, str) or not is_kernel_id(kernel_id):
        raise ConfigurationError(
            f"the kernel source resolved {name!r} to {shown(kernel_id)}, not a kernel id"
        )
    logger.info("loading kernel %r: resolved to %s", name, kernel_id)
    return kernel_id


def check_activate(activate: object) -> bool:
    """``activate`` if it is a bool, else :class:`ArgumentTypeError`."""
    if not isinstance(activate, bool):
        raise ArgumentTypeError(f"activate must be True or False, got {shown(activate)}")
    return activate


async def load_async(
    layer: KasminaLayer, seed_idx: int, name: object, cache: KernelCache, *, activate: bool
) -> nn.Module:
    """Resolve, fetch (awaiting off-thread), graft and optionally activate; see the module."""
    seed_idx = layer._seed(seed_idx)
    activate = check_activate(activate)
    name = check_kernel_name(name)
    kernel_id = (
        name if is_kernel_id(name) else await asyncio.to_thread(resolve_kernel_name, cache, name)
    )
    future = layer.request_kernel(seed_idx, kernel_id)
    waited = asyncio.wrap_future(future)
    try:
        await asyncio.wait({waited})  # success or failure: both finish
    except asyncio.CancelledError:
        waited.add_done_callback(_retrieve_outcome)
        if layer.seed_layout.slots[seed_idx].state is SeedState.LOADING:
            layer.unload(seed_idx)  # the caller gave up on this load
        raise
    _retrieve_outcome(waited)
    return finish_load(layer, seed_idx, future, activate=activate)


def load_blocking(
    layer: KasminaLayer,
    seed_idx: int,
    name: object,
    cache: KernelCache,
    *,
    activate: bool,
    timeout: float | None,
) -> nn.Module:
    """:func:`load_async` for callers without an event loop; gives up after ``timeout`` s."""
    seed_idx = layer._seed(seed_idx)
    activate = check_activate(activate)
    kernel_id = resolve_kernel_name(cache, name)
    future = layer.request_kernel(seed_idx, kernel_id)
    _, not_done = futures_wait([future], timeout=timeout)
    if not_done:
        layer.unload(seed_idx)
        raise KernelLoadError(
            f"loading kernel {kernel_id} into {layer.layer_name!r} seed {seed_idx} took "
            f"longer than {timeout}s; the seed is DORMANT again"
        )
    return finish_load(layer, seed_idx, future, activate=activate)


def finish_load(
    layer: KasminaLayer, seed_idx: int, future: Future[CachedKernel], *, activate: bool
) -> nn.Module:
    """Graft a finished load (and activate it when asked); raise if the seed is DORMANT."""
    layer.complete_load(seed_idx)
    exc = future.exception() or layer.last_errors.get(seed_idx)
    module = layer.kernel(seed_idx)
    if module is None or layer.seed_layout.slots[seed_idx].state is SeedState.DORMANT:
        raise KernelLoadError(
            f"could not load a kernel into layer {layer.layer_name!r} seed {seed_idx}: {exc}; "
            "the seed is DORMANT and training can continue"
        ) from exc
    if activate and layer.seed_layout.slots[seed_idx].state is SeedState.BLENDING:
        layer.activate(seed_idx)
    return module


def _retrieve_outcome(waited: asyncio.Future[CachedKernel]) -> None:
    """Mark a finished asyncio future's exception as retrieved (the concurrent future keeps it
    for :func:`finish_load`), so asyncio does not log it as never retrieved."""
    if waited.done() and not waited.cancelled():
        waited.exception()
