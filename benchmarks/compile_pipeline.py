"""Compile pipeline: Tezzeret throughput per worker, and training step time during compiles.

Run: ``python benchmarks/compile_pipeline.py [--jobs 12] [--steps 400]``.

1. Throughput: one worker compiles ``--jobs`` queued jobs (embedded SQLite + folder library);
   reports jobs/s and the median compile latency.
2. Zero training disruption: an MLP trains for ``--steps`` steps (a) alone and (b) while a
   Tezzeret worker compiles a queue in the background, as a thread and as a separate process;
   reports step time p50, p99 and p99/median. Target: p99/median <= 1.5 while compiles run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.tezzeret import TezzeretWorker, find_or_enqueue
from esper.urza import ArtifactLibrary, open_library
from ratio_timer import percentile


def _library(folder: Path) -> ArtifactLibrary:
    return open_library(
        metadata_url=f"sqlite:///{folder}/urza.sqlite3", blob_url=f"file://{folder}/blobs"
    )


def _enqueue(library: ArtifactLibrary, jobs: int, offset: int = 0) -> None:
    for i in range(jobs):
        width = 32 + offset + i
        target = KernelTarget(
            layer_kind=LayerKind.LINEAR,
            in_features=width,
            out_features=width,
            channel_dim=-1,
            spatial_dims=0,
        )
        find_or_enqueue(
            library, BlueprintSpec(family="residual_mlp", params={"hidden": 64}), target
        )


def throughput(jobs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        library = _library(Path(folder))
        worker = TezzeretWorker(library)
        _enqueue(library, 1, offset=1000)
        worker.run(stop_when_idle=True)  # warm-up: first torch.export is slow
        _enqueue(library, jobs)
        started = time.perf_counter()
        handled = worker.run(stop_when_idle=True)
        elapsed = time.perf_counter() - started
        library.close()
    print(
        f"compile throughput, 1 worker: {handled / elapsed:.2f} jobs/s ({handled} jobs, "
        f"{elapsed / handled * 1e3:.0f} ms per job incl. validate/export/characterize/store)"
    )


def _step_times(steps: int) -> list[float]:
    torch.manual_seed(0)
    model = esper.wrap(
        nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    )
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()
        times.append(time.perf_counter() - started)
    return times[20:]


def _report(name: str, times: list[float]) -> None:
    p50, p99 = statistics.median(times), percentile(times, 0.99)
    print(
        f"{name:34s} p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms  p99/median {p99 / p50:5.2f}"
    )


def disruption(steps: int, jobs: int) -> None:
    _report("training alone", _step_times(steps))
    with tempfile.TemporaryDirectory() as folder:
        library = _library(Path(folder))
        _enqueue(library, jobs * 4)
        worker = TezzeretWorker(library).start()
        times = _step_times(steps)
        compiled = worker.counters["compiled"]
        worker.stop()
        _report(f"worker thread ({compiled} compiles)", times)
        library.close()
    with tempfile.TemporaryDirectory() as folder:
        library = _library(Path(folder))
        _enqueue(library, jobs * 4)
        command = [sys.executable, "-m", "esper.cli", "tezzeret", "worker"]
        command += ["--metadata-url", f"sqlite:///{folder}/urza.sqlite3"]
        command += ["--blob-url", f"file://{folder}/blobs", "--stop-when-idle"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3.0)  # let it start and begin compiling
        times = _step_times(steps)
        process.terminate()
        process.wait(timeout=30)
        compiled = library.stats().kernels
        _report(f"worker process ({compiled} compiles)", times)
        library.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    throughput(args.jobs)
    disruption(args.steps, args.jobs)


if __name__ == "__main__":
    main()
