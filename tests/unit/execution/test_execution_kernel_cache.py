"""Kernel cache: LRU by entries and bytes, pinning, single-flight loads, counters, templates."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from esper.blueprints import create_artifact, sha256_hex
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.errors import (
    ArtifactFormatError,
    ArtifactIntegrityError,
    ConfigurationError,
    KernelLoadError,
    KernelNotFoundError,
)
from esper.execution import InMemoryArtifactSource, KernelCache

TARGET = KernelTarget(
    layer_kind=LayerKind.LINEAR, in_features=8, out_features=16, channel_dim=-1, spatial_dims=0
)
ENTRY_BYTES = (2 * 8 + 16 * 2) * 4  # rank-2 adapter 8 -> 16 in float32: 192 bytes


def _artifacts(source: InMemoryArtifactSource, count: int) -> list[str]:
    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 2})
    return [source.add(create_artifact(spec, TARGET, init_seed=i)[0]) for i in range(count)]


@pytest.fixture
def source() -> InMemoryArtifactSource:
    return InMemoryArtifactSource()


@pytest.fixture
def ids(source: InMemoryArtifactSource) -> list[str]:
    return _artifacts(source, 4)


MakeCache = Callable[..., KernelCache]


@pytest.fixture
def make_cache(source: InMemoryArtifactSource) -> Iterator[MakeCache]:
    """``make_cache(**kwargs)``: a cache over ``source`` (by default), closed after the test."""
    caches: list[KernelCache] = []

    def make(**kwargs: object) -> KernelCache:
        kwargs.setdefault("source", source)
        cache = KernelCache(**kwargs)  # type: ignore[arg-type]
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()


def _load(cache: KernelCache, *kernel_ids: str) -> None:
    for kernel_id in kernel_ids:
        cache.get(kernel_id).result(timeout=30)


class GatedSource:
    """A slow artifact source: every fetch blocks until the test opens the gate."""

    def __init__(self, inner: InMemoryArtifactSource) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.fetches = 0
        self._lock = threading.Lock()

    def fetch(self, kernel_id: str) -> bytes:
        with self._lock:
            self.fetches += 1
        assert self.gate.wait(timeout=30), "test never opened the gate"
        return self.inner.fetch(kernel_id)


class BrokenSource:
    """A source whose backend fails with a non-Esper error (a dropped connection, say)."""

    def fetch(self, kernel_id: str) -> bytes:
        raise ConnectionError("connection reset by peer")


def test_miss_then_hit(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache()

    first = cache.get(ids[0]).result(timeout=30)
    second = cache.get(ids[0]).result(timeout=30)

    assert second is first
    assert first.metadata.kernel_id == ids[0]
    assert first.nbytes == ENTRY_BYTES
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.coalesced, stats.evictions) == (1, 1, 0, 0)
    assert (stats.entries, stats.bytes) == (1, ENTRY_BYTES)
    assert stats.hit_rate == 0.5
    assert ids[0] in cache
    assert len(cache) == 1


def test_latency_statistics_are_recorded(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache()
    assert cache.stats().load_latency_ms_mean is None

    _load(cache, ids[0], ids[1])

    stats = cache.stats()
    assert stats.load_latency_ms_mean is not None and stats.load_latency_ms_mean > 0
    assert stats.load_latency_ms_p50 is not None and stats.load_latency_ms_p50 > 0
    assert stats.load_latency_ms_p99 is not None
    assert stats.load_latency_ms_p99 >= stats.load_latency_ms_p50


def test_entry_limit_evicts_least_recently_used(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache(max_entries=2)
    _load(cache, ids[0], ids[1])
    _load(cache, ids[0])  # touch: ids[1] is now least recently used
    assert cache.keys() == [ids[1], ids[0]]

    _load(cache, ids[2])

    assert cache.keys() == [ids[0], ids[2]]
    stats = cache.stats()
    assert (stats.entries, stats.evictions, stats.bytes) == (2, 1, 2 * ENTRY_BYTES)


def test_byte_limit_evicts_least_recently_used(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache(max_bytes=2 * ENTRY_BYTES + ENTRY_BYTES // 2)
    _load(cache, ids[0], ids[1], ids[2])

    assert cache.keys() == [ids[1], ids[2]]
    assert cache.stats().bytes == 2 * ENTRY_BYTES
    assert cache.stats().evictions == 1


def test_an_entry_larger_than_the_byte_bound_is_served_but_not_cached(
    make_cache: MakeCache, ids: list[str]
) -> None:
    cache = make_cache(max_bytes=ENTRY_BYTES - 1)

    entry = cache.get(ids[0]).result(timeout=30)

    assert entry.metadata.kernel_id == ids[0]
    assert len(cache) == 0
    assert cache.stats().bytes == 0


def test_pinned_entries_are_never_evicted(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache(max_entries=2)
    _load(cache, ids[0], ids[1])
    cache.pin(ids[0])  # ids[0] is the least recently used, but pinned

    _load(cache, ids[2])

    assert cache.keys() == [ids[0], ids[2]]
    assert cache.stats().pinned == 1
    assert not cache.evict(ids[0])
    cache.clear()
    assert cache.keys() == [ids[0]]


def test_pins_nest_and_unpin_evicts_when_over_bounds(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache(max_entries=1)
    _load(cache, ids[0])
    cache.pin(ids[0])
    cache.pin(ids[0])
    cache.pin(ids[1])
    _load(cache, ids[1])  # both pinned: the cache is over its bound
    assert sorted(cache.keys()) == sorted(ids[:2])

    cache.unpin(ids[0])
    assert sorted(cache.keys()) == sorted(ids[:2])  # still pinned once
    cache.unpin(ids[0])

    assert cache.keys() == [ids[1]]
    assert cache.stats().evictions == 1
    with pytest.raises(ConfigurationError, match="not pinned"):
        cache.unpin(ids[0])


def test_evict_and_clear(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache()
    _load(cache, ids[0], ids[1], ids[2])

    assert cache.evict(ids[1])
    assert not cache.evict(ids[1])
    assert cache.keys() == [ids[0], ids[2]]
    cache.clear()
    assert len(cache) == 0
    assert cache.stats().bytes == 0
    # Explicit removal is not an eviction under pressure.
    assert cache.stats().evictions == 0


def test_single_flight_under_threads(source: InMemoryArtifactSource, ids: list[str]) -> None:
    gated = GatedSource(source)
    cache = KernelCache(gated, max_workers=4)
    barrier = threading.Barrier(8)
    futures = []
    lock = threading.Lock()

    def request() -> None:
        barrier.wait(timeout=30)
        future = cache.get(ids[0])
        with lock:
            futures.append(future)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(futures) == 8
    assert not any(f.done() for f in futures)  # the fetch is still blocked
    gated.gate.set()
    entries = {id(f.result(timeout=30)) for f in futures}
    cache.close()

    assert gated.fetches == 1
    assert len(entries) == 1
    stats = cache.stats()
    assert (stats.misses, stats.coalesced, stats.hits) == (1, 7, 0)


def test_get_never_blocks_on_a_slow_source(source: InMemoryArtifactSource, ids: list[str]) -> None:
    gated = GatedSource(source)
    cache = KernelCache(gated)

    future = cache.get(ids[0])

    assert not future.done()
    assert ids[0] not in cache
    gated.gate.set()
    future.result(timeout=30)
    cache.close()
    assert ids[0] in cache


def test_a_missing_artifact_fails_the_future_and_is_counted(make_cache: MakeCache) -> None:
    cache = make_cache()

    future = cache.get("0" * 64)

    with pytest.raises(KernelNotFoundError):
        future.result(timeout=30)
    assert cache.stats().load_failures == 1
    # A failed load is not remembered: the next request tries again.
    with pytest.raises(KernelNotFoundError):
        cache.get("0" * 64).result(timeout=30)
    stats = cache.stats()
    assert (stats.misses, stats.load_failures, stats.entries) == (2, 2, 0)


def test_a_backend_error_becomes_a_kernel_load_error(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache(source=BrokenSource())

    with pytest.raises(KernelLoadError, match="connection reset") as info:
        cache.get(ids[0]).result(timeout=30)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert cache.stats().load_failures == 1


def test_no_source_is_a_kernel_load_error(ids: list[str]) -> None:
    cache = KernelCache()

    with pytest.raises(KernelLoadError, match="no artifact source"):
        cache.get(ids[0]).result(timeout=30)
    cache.close()


def test_corrupt_and_malformed_bytes_are_load_failures() -> None:
    data, meta = create_artifact(BlueprintSpec(family="lowrank_adapter"), TARGET)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    junk = b"\x00" * 4  # stored under its own, correct sha256: intact but not an artifact

    class Tampered:
        def fetch(self, kernel_id: str) -> bytes:
            return bytes(corrupt) if kernel_id == meta.kernel_id else junk

    cache = KernelCache(Tampered())
    with pytest.raises(ArtifactIntegrityError):
        cache.get(meta.kernel_id).result(timeout=30)
    with pytest.raises(ArtifactFormatError):
        cache.get(sha256_hex(junk)).result(timeout=30)
    cache.close()

    assert cache.stats().load_failures == 2
    assert len(cache) == 0


def test_bad_kernel_id_is_refused_synchronously(make_cache: MakeCache) -> None:
    cache = make_cache()

    with pytest.raises(ConfigurationError, match="invalid kernel id"):
        cache.get("not-a-sha")
    with pytest.raises(ConfigurationError):
        cache.pin("../etc/passwd")


@pytest.mark.parametrize("bounds", [{"max_bytes": 0}, {"max_entries": 0}, {"max_entries": -1}])
def test_bounds_must_be_positive(bounds: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError, match=f"{next(iter(bounds))} must be within 1"):
        KernelCache(**bounds)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_templates_live_on_the_configured_device(
    make_cache: MakeCache, ids: list[str], device: str
) -> None:
    cache = make_cache(device=device)

    entry = cache.get(ids[0]).result(timeout=30)

    assert cache.device == torch.device(device)
    assert {p.device.type for p in entry.template.parameters()} == {device}
    assert not any(p.requires_grad for p in entry.template.parameters())


def test_instantiate_gives_independent_trainable_copies(
    make_cache: MakeCache, ids: list[str]
) -> None:
    cache = make_cache()
    entry = cache.get(ids[0]).result(timeout=30)
    template_weights = {k: v.clone() for k, v in entry.template.state_dict().items()}

    first = entry.instantiate(device=torch.device("cpu"), dtype=torch.float32)
    second = entry.instantiate(device=torch.device("cpu"), dtype=torch.float64)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)

    assert all(p.requires_grad for p in first.parameters())
    assert {p.dtype for p in second.parameters()} == {torch.float64}
    for name, tensor in entry.template.state_dict().items():
        assert torch.equal(tensor, template_weights[name]), name
        assert torch.equal(second.state_dict()[name], tensor.double()), name
        assert not torch.equal(first.state_dict()[name], tensor), name
    assert all(
        a.data_ptr() != b.data_ptr()
        for a, b in zip(first.parameters(), entry.template.parameters(), strict=True)
    )


def test_peek_does_not_touch_statistics_or_order(make_cache: MakeCache, ids: list[str]) -> None:
    cache = make_cache()
    _load(cache, ids[0], ids[1])

    assert cache.peek(ids[0]) is not None
    assert cache.peek(ids[2]) is None
    assert cache.keys() == [ids[0], ids[1]]
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (0, 2)


def test_deep_copy_shares_the_cache(make_cache: MakeCache) -> None:
    cache = make_cache()

    assert copy.deepcopy(cache) is cache
