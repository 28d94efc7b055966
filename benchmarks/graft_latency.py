"""Graft latency: time from a load request to a BLENDING seed, cache hit vs cold local load.

Run: ``python benchmarks/graft_latency.py [--trials 50]``. A cold load fetches the artifact from a
local folder, verifies its sha256, decodes it and grafts it; a hit grafts a copy of the cached
template. Targets on a 2-core CPU: hit < 1 ms, cold < 20 ms (medians; p99 reported too).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.execution import DirectoryArtifactSource
from ratio_timer import percentile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    host = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    with tempfile.TemporaryDirectory() as folder:
        source = DirectoryArtifactSource(folder)
        model = esper.wrap(host, target_layers=["0"], seeds_per_layer=1, kernel_source=source)
        target = model.layer("0").target()
        spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})
        ids = [
            source.add(create_artifact(spec, target, init_seed=s)[0]) for s in range(args.trials)
        ]
        cold, hit = [], []
        for kernel_id in ids:
            for timings in (cold, hit):  # first request is cold, the same id again is a hit
                start = time.perf_counter()
                model.load_kernel_sync("0", seed_idx=0, kernel_artifact_id=kernel_id)
                timings.append((time.perf_counter() - start) * 1e3)
                model.unload_kernel("0", seed_idx=0)
        artifact_kb = len(source.fetch(ids[0])) / 1024
    print(f"rank-8 lowrank_adapter on Linear(512, 512), artifact {artifact_kb:.1f} KiB")
    for name, values in (("cache hit", hit), ("cold local load", cold)):
        print(
            f"{name:16s} median {statistics.median(values):7.3f} ms   "
            f"p99 {percentile(values, 0.99):7.3f} ms   (n={len(values)})"
        )
    print(model.kernel_cache.stats())


if __name__ == "__main__":
    main()
