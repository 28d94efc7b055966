"""Urza service under load: N concurrent clients fetching kernels over loopback.

Run: ``python benchmarks/urza_load.py [--clients 50] [--fetches 20] [--metadata-url URL]``.
Starts the service in a subprocess (embedded SQLite + folder by default; pass a
``postgresql://`` URL for PostgreSQL), stores four ~130-260 KiB kernels, then runs the clients as
threads, each with its own HTTP connection, fetching random kernels (every download is checked
against its sha256). Reports errors, p50/p99 latency and throughput.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time

from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.urza import HttpUrza, ServiceProcess
from ratio_timer import percentile

TOKEN = "load-benchmark-token"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fetches", type=int, default=20, help="per client")
    parser.add_argument("--metadata-url", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        metadata_url = args.metadata_url or f"sqlite:///{folder}/urza.sqlite3"
        with ServiceProcess(
            metadata_url=metadata_url, blob_url=f"file://{folder}/blobs", token=TOKEN
        ) as service:
            setup = HttpUrza(service.url, token=TOKEN)
            target = KernelTarget(
                layer_kind=LayerKind.LINEAR,
                in_features=512,
                out_features=512,
                channel_dim=-1,
                spatial_dims=0,
            )
            kernel_ids, sizes = [], []
            for rank in (32, 40, 48, 64):
                spec = BlueprintSpec(family="lowrank_adapter", params={"rank": rank})
                data, metadata = create_artifact(spec, target)
                setup.put_kernel(data, metadata)
                kernel_ids.append(metadata.kernel_id)
                sizes.append(len(data))
            setup.close()

            latencies: list[float] = []
            errors: list[BaseException] = []
            lock = threading.Lock()
            start_line = threading.Barrier(args.clients + 1)

            def client(seed: int) -> None:
                own = HttpUrza(service.url, token=TOKEN)
                rng = random.Random(seed)
                own.get_kernel_bytes(kernel_ids[0])  # connect before the clock starts
                start_line.wait()
                for _ in range(args.fetches):
                    started = time.perf_counter()
                    try:
                        own.get_kernel_bytes(rng.choice(kernel_ids))
                    except BaseException as exc:
                        with lock:
                            errors.append(exc)
                        continue
                    with lock:
                        latencies.append(time.perf_counter() - started)
                own.close()

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            start_line.wait()
            started = time.perf_counter()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
    total = args.clients * args.fetches
    mean_kib = statistics.fmean(sizes) / 1024
    print(f"{args.clients} clients x {args.fetches} fetches of ~{mean_kib:.0f} KiB kernels")
    print(f"errors: {len(errors)} / {total}")
    print(
        f"latency p50 {statistics.median(latencies) * 1e3:.1f} ms  "
        f"p99 {percentile(latencies, 0.99) * 1e3:.1f} ms  "
        f"throughput {len(latencies) / elapsed:.0f} fetches/s "
        f"({len(latencies) / elapsed * mean_kib / 1024:.1f} MiB/s)"
    )


if __name__ == "__main__":
    main()
