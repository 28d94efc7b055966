"""Kernel fetch latency, embedded Urza (SQLite + folder) vs the HTTP service on loopback.

Run: ``python benchmarks/urza_fetch.py [--size 100000] [--trials 31] [--fetches 20]``.

One real artifact of about ``--size`` bytes is stored in an embedded library in a temporary folder;
the same storage is then served by ``esper urza serve`` in a subprocess on 127.0.0.1. Each
trial fetches the kernel ``--fetches`` times through :class:`UrzaArtifactSource` (what the kernel
cache calls, digest check included) from each of three sources, in an order that rotates from
trial to trial: the embedded library, a second embedded handle (the A/A control: its ratio to the
first shows the noise floor), and :class:`HttpUrza`; an unauthenticated ``GET /healthz`` round
trip on the same connection pool is timed alongside as the floor of any HTTP request. Printed:
p50/p99 latency per source over every fetch, and the ratio of each median to the embedded median.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, KernelMetadata, KernelTarget, LayerKind
from esper.urza import HttpUrza, ServiceProcess, UrzaArtifactSource, open_storage_library


def make_artifact(size: int) -> tuple[bytes, KernelMetadata]:
    """A real kernel artifact of about ``size`` bytes (a residual MLP on a 64->64 layer, whose
    width sets the size), with its metadata: the library refuses bytes that are no artifact."""
    target = KernelTarget(
        layer_kind=LayerKind.LINEAR, in_features=64, out_features=64, channel_dim=-1, spatial_dims=0
    )
    hidden = max(1, min(65536, (size // 4 - 64) // 129))  # 129 * hidden + 64 parameters
    return create_artifact(BlueprintSpec(family="residual_mlp", params={"hidden": hidden}), target)


def time_fetches(fetch: Callable[[str], bytes], kernel_id: str, count: int) -> list[float]:
    """Latencies in milliseconds of ``count`` consecutive fetches."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        fetch(kernel_id)
        latencies.append((time.perf_counter() - started) * 1e3)
    return latencies


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="artifact bytes")
    parser.add_argument("--trials", type=int, default=31)
    parser.add_argument("--fetches", type=int, default=20, help="fetches per source per trial")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder)
        embedded = open_storage_library(run_dir=run_dir)
        control = open_storage_library(run_dir=run_dir)
        artifact, metadata = make_artifact(args.size)
        embedded.put_kernel(artifact, metadata)
        token = secrets.token_urlsafe(16)
        with ServiceProcess(
            metadata_url=f"sqlite:///{run_dir / 'urza.sqlite3'}",
            blob_url=str(run_dir / "blobs"),
            token=token,
        ) as service:
            remote = HttpUrza(service.url, token=token)
            probe = httpx.Client()

            def healthz(_kernel_id: str) -> bytes:
                return probe.get(f"{service.url}/healthz").content

            sources: dict[str, Callable[[str], bytes]] = {
                "embedded (SQLite + folder)": UrzaArtifactSource(embedded).fetch,
                "embedded, 2nd handle (A/A)": UrzaArtifactSource(control).fetch,
                "HTTP service (loopback)": UrzaArtifactSource(remote).fetch,
                "HTTP GET /healthz (floor)": healthz,
            }
            for fetch in sources.values():  # warm up connections, page cache, imports
                time_fetches(fetch, metadata.kernel_id, 5)
            assert sources["HTTP service (loopback)"](metadata.kernel_id) == artifact
            latencies: dict[str, list[float]] = {name: [] for name in sources}
            names = list(sources)
            for trial in range(args.trials):
                shift = trial % len(names)
                for name in names[shift:] + names[:shift]:
                    latencies[name] += time_fetches(sources[name], metadata.kernel_id, args.fetches)
            remote.close()
            probe.close()
        embedded.close()
        control.close()

    baseline = statistics.median(latencies[names[0]])
    print(
        f"kernel fetch of a {metadata.size_bytes:,}-byte artifact (digest-checked), "
        f"{args.trials} interleaved trials x {args.fetches} fetches per source"
    )
    print(f"{'source':<30} {'p50 ms':>9} {'p99 ms':>9} {'p50 / embedded':>15}")
    for name, values in latencies.items():
        p50 = statistics.median(values)
        print(f"{name:<30} {p50:>9.3f} {percentile(values, 0.99):>9.3f} {p50 / baseline:>15.2f}")


if __name__ == "__main__":
    main()
