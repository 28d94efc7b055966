"""A training process of the multi-process deployment test (run as a subprocess).

Wraps a small MLP whose kernels come from the shared Urza service, asks for a blueprint for its
first layer (reusing a compiled kernel if the library has one, else queueing a compile for the
Tezzeret workers), keeps training while it waits for ``kernel.ready`` on Redis, grafts the kernel
without blocking, trains until the seed is ACTIVE, and writes what happened to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import esper
from esper.contracts import BlueprintSpec, KernelReady, SeedState, Topic
from esper.oona import OonaTelemetrySink, open_bus
from esper.tezzeret import find_or_enqueue
from esper.urza import UrzaArtifactSource, open_library

SPEC = BlueprintSpec(family="residual_mlp", params={"hidden": 16, "activation": "gelu"})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--urza", required=True)
    parser.add_argument("--bus", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    library = open_library(args.urza)  # token from ESPER_URZA_TOKEN
    bus = open_bus(args.bus)
    ready = bus.subscribe(Topic.KERNEL_READY, f"trainer-{args.run_id}", "c", start="earliest")
    sink = OonaTelemetrySink(bus, run_id=args.run_id)
    torch.manual_seed(0)
    model = esper.wrap(
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
        kernel_source=UrzaArtifactSource(library),
        telemetry_sink=sink,
        blend_steps=5,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.attach_optimizer(optimizer, lr=0.05)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))

    request = find_or_enqueue(library, SPEC, model.layer("0").target())
    (args.out / f"{args.run_id}.requested").write_text("")
    kernel_id = request.kernel.kernel_id if request.kernel else None
    if kernel_id is not None:
        model.request_kernel("0", seed_idx=0, kernel_artifact_id=kernel_id)
    losses: list[float] = []
    deadline = time.monotonic() + 120
    while model.seed_state("0", 0) is not SeedState.ACTIVE and time.monotonic() < deadline:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.step()
        losses.append(float(loss.detach()))
        if kernel_id is None:
            for delivery in ready.poll(max_messages=10, block_ms=0):
                announced = delivery.decode(KernelReady)
                ready.ack(delivery)
                if request.job is not None and announced.job_id == request.job.job_id:
                    kernel_id = announced.kernel_id
                    model.request_kernel("0", seed_idx=0, kernel_artifact_id=kernel_id)
        if len(losses) % 20 == 0:
            model.collect_telemetry()
    summary = {
        "kernel_id": kernel_id,
        "reused_compiled_kernel": request.ready,
        "job_id": request.job.job_id if request.job else None,
        "state": model.seed_state("0", 0).name,
        "steps": len(losses),
        "losses_finite": all(math.isfinite(v) for v in losses),
        "cache": model.kernel_cache.stats().model_dump(),
    }
    (args.out / f"{args.run_id}.json").write_text(json.dumps(summary))
    sink.close()
    bus.close()
    library.close()


if __name__ == "__main__":
    main()
