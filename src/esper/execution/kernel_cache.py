"""Kernel cache: one LRU of decoded, device-resident kernels shared by every layer of a model.

Requests never block: :meth:`KernelCache.get` returns a :class:`concurrent.futures.Future`; a miss
fetches, verifies and builds the kernel on a background thread pool. Concurrent requests for one
id share a single load (single flight). Entries are bounded by count and by bytes and evicted
least-recently-used first; pinned entries are never evicted. A cached entry is a *template*: each
graft takes its own trainable copy, so seeds never share weights.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from esper.blueprints import decode_artifact
from esper.contracts import CacheStats, KernelMetadata
from esper.errors import ConfigurationError, EsperError, KernelLoadError
from esper.execution.arguments import check_has_method, check_int
from esper.execution.artifact_sources import ArtifactSource, check_kernel_id

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_ENTRIES = 256


@dataclass(frozen=True)
class CachedKernel:
    """A verified kernel held by the cache: its metadata and a template module on the cache's device."""

    metadata: KernelMetadata
    template: nn.Module
    nbytes: int

    def instantiate(self, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
        """An independent, trainable copy of the kernel on ``device`` in ``dtype``."""
        module = clone_module(self.template)
        reference = next(iter((*module.parameters(), *module.buffers())), None)
        if reference is not None and (reference.device, reference.dtype) != (device, dtype):
            module = module.to(device=device, dtype=dtype)
        return module.requires_grad_(True)


def clone_module(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its own parameters and buffers (cloned tensors) and its own
    containers, sharing nothing mutable with the original.

    ``copy.deepcopy`` does the same through the generic pickle protocol, visiting every
    attribute of every submodule; this walks only what an ``nn.Module`` holds, which makes a
    cache-hit graft several times faster.
    """
    clone = module.__class__.__new__(module.__class__)
    state = {
        key: value.copy() if isinstance(value, dict | set | list) else value
        for key, value in module.__dict__.items()
    }
    parameters = module._parameters.copy()
    for name, param in parameters.items():
        if param is not None:
            parameters[name] = nn.Parameter(param.detach().clone(), param.requires_grad)
    buffers = module._buffers.copy()
    for name, buffer in buffers.items():
        if buffer is not None:
            buffers[name] = buffer.clone()
    children = module._modules.copy()
    for name, child in children.items():
        if child is not None:
            children[name] = clone_module(child)
    state.update(_parameters=parameters, _buffers=buffers, _modules=children)
    clone.__dict__.update(state)
    return clone


def _module_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class KernelCache:
    """Thread-safe LRU cache of kernels, bounded by bytes and entries, with single-flight loads.

    Args:
        source: where artifacts are fetched from (``fetch(kernel_id) -> bytes``); may be set
            later with :meth:`set_source`.
        device: where cached templates live (normally the model's device).
        max_bytes: bound on the bytes of all cached templates.
        max_entries: bound on the number of cached templates.
        max_workers: background loader threads.
    """

    def __init__(
        self,
        source: ArtifactSource | None = None,
        *,
        device: torch.device | str = "cpu",
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_workers: int = 2,
    ) -> None:
        max_bytes = check_int("max_bytes", max_bytes, minimum=1, maximum=2**62)
        max_entries = check_int("max_entries", max_entries, minimum=1, maximum=2**31 - 1)
        max_workers = check_int("max_workers", max_workers, minimum=1, maximum=256)
        if source is not None:
            check_has_method("source", source, "fetch")
        self.source = source
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="esper-kernel-loader")
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CachedKernel] = OrderedDict()
        self._inflight: dict[str, Future[CachedKernel]] = {}
        self._pins: Counter[str] = Counter()
        self._bytes = 0
        self._counters: Counter[str] = Counter()
        self._latencies_ms: deque[float] = deque(maxlen=1024)

    def __deepcopy__(self, memo: dict[int, object]) -> KernelCache:
        """A cache is a shared service: copies of a model share their cache."""
        return self

    def set_source(self, source: ArtifactSource) -> None:
        """Fetch future misses from ``source``."""
        check_has_method("source", source, "fetch")
        self.source = source

    def get(self, kernel_id: str) -> Future[CachedKernel]:
        """A future of the cached kernel; never blocks (a miss loads on a background thread)."""
        check_kernel_id(kernel_id)
        with self._lock:
            entry = self._entries.get(kernel_id)
            if entry is not None:
                self._entries.move_to_end(kernel_id)
                self._counters["hits"] += 1
                done: Future[CachedKernel] = Future()
                done.set_result(entry)
                return done
            pending = self._inflight.get(kernel_id)
            if pending is not None:
                self._counters["coalesced"] += 1
                return pending
            self._counters["misses"] += 1
            future: Future[CachedKernel] = Future()
            self._inflight[kernel_id] = future
        self._executor.submit(self._load, kernel_id, future)
        return future

    def peek(self, kernel_id: str) -> CachedKernel | None:
        """The cached entry for ``kernel_id`` without loading or touching statistics."""
        with self._lock:
            return self._entries.get(kernel_id)

    def __contains__(self, kernel_id: object) -> bool:
        with self._lock:
            return kernel_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def keys(self) -> list[str]:
        """Cached ids, least recently used first."""
        with self._lock:
            return list(self._entries)

    def pin(self, kernel_id: str) -> None:
        """Keep ``kernel_id`` from eviction (pins nest; each needs an :meth:`unpin`)."""
        with self._lock:
            self._pins[check_kernel_id(kernel_id)] += 1

    def unpin(self, kernel_id: str) -> None:
        """Undo one :meth:`pin`; evicts now if the cache is over its bounds."""
        with self._lock:
            if self._pins[kernel_id] <= 0:
                raise ConfigurationError(f"kernel {kernel_id} is not pinned")
            self._pins[kernel_id] -= 1
            if self._pins[kernel_id] == 0:
                del self._pins[kernel_id]
            self._evict_over_bounds()

    def evict(self, kernel_id: str) -> bool:
        """Drop ``kernel_id`` if cached and not pinned; return whether it was dropped."""
        with self._lock:
            if kernel_id not in self._entries or self._pins[kernel_id]:
                return False
            self._drop(kernel_id)
            return True

    def clear(self) -> None:
        """Drop every unpinned entry."""
        with self._lock:
            for kernel_id in [k for k in self._entries if not self._pins[k]]:
                self._drop(kernel_id)

    def stats(self) -> CacheStats:
        """Counters and latency percentiles since the cache was created."""
        with self._lock:
            latencies = sorted(self._latencies_ms)
            counters = dict(self._counters)
            entries, nbytes = len(self._entries), self._bytes
            pinned = sum(1 for k in self._entries if self._pins[k])
        percentile = None
        if latencies:
            percentile = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        return CacheStats(
            entries=entries,
            bytes=nbytes,
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
            pinned=pinned,
            hits=counters.get("hits", 0),
            misses=counters.get("misses", 0),
            coalesced=counters.get("coalesced", 0),
            evictions=counters.get("evictions", 0),
            load_failures=counters.get("load_failures", 0),
            load_latency_ms_mean=statistics.fmean(latencies) if latencies else None,
            load_latency_ms_p50=statistics.median(latencies) if latencies else None,
            load_latency_ms_p99=percentile,
        )

    def close(self) -> None:
        """Stop the loader threads (waits for loads in flight)."""
        self._executor.shutdown(wait=True)

    # -- background loading ------------------------------------------------------------------

    def _load(self, kernel_id: str, future: Future[CachedKernel]) -> None:
        started = time.perf_counter()
        try:
            entry = self._fetch_and_build(kernel_id)
        except Exception as exc:
            with self._lock:
                self._inflight.pop(kernel_id, None)
                self._counters["load_failures"] += 1
            logger.warning("loading kernel %s failed: %s", kernel_id, exc)
            future.set_exception(exc)
            return
        with self._lock:
            self._latencies_ms.append((time.perf_counter() - started) * 1e3)
            self._insert(kernel_id, entry)
            self._inflight.pop(kernel_id, None)
        future.set_result(entry)

    def _fetch_and_build(self, kernel_id: str) -> CachedKernel:
        if self.source is None:
            raise KernelLoadError(
                f"cannot load kernel {kernel_id}: the kernel cache has no artifact source; "
                "pass source= to KernelCache (a folder, memory, or an Urza library)"
            )
        try:
            data = self.source.fetch(kernel_id)
        except EsperError:
            raise
        except Exception as exc:
            raise KernelLoadError(
                f"fetching kernel {kernel_id} from {type(self.source).__name__} failed: {exc}"
            ) from exc
        artifact = decode_artifact(data, kernel_id)
        template = artifact.module.to(self.device).requires_grad_(False)
        return CachedKernel(artifact.metadata, template, _module_nbytes(template))

    # -- bookkeeping (call with the lock held) ------------------------------------------------

    def _insert(self, kernel_id: str, entry: CachedKernel) -> None:
        if entry.nbytes > self.max_bytes and not self._pins[kernel_id]:
            logger.info(
                "kernel %s (%d bytes) exceeds the cache's %d-byte bound; served without caching",
                kernel_id,
                entry.nbytes,
                self.max_bytes,
            )
            return
        self._entries[kernel_id] = entry
        self._bytes += entry.nbytes
        self._evict_over_bounds(keep=kernel_id)

    def _evict_over_bounds(self, keep: str | None = None) -> None:
        """Drop least recently used unpinned entries until both bounds hold.

        Each victim is the first eligible entry in LRU order, found without copying the key
        list (an insert used to copy every key: O(n) per insert, O(n²) to fill the cache).
        """
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            victim = next(
                (k for k in self._entries if k != keep and not self._pins[k]),
                None,
            )
            if victim is None:
                return
            self._drop(victim)
            self._counters["evictions"] += 1

    def _drop(self, kernel_id: str) -> None:
        entry = self._entries.pop(kernel_id)
        self._bytes -= entry.nbytes
