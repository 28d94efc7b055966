"""Memory per seed: host RSS of dormant seeds and of active kernels, and their tensor bytes.

Run: ``python benchmarks/seed_memory.py [--layers 64] [--seeds 4]`` (CPU; device memory per seed
and per kernel is in ``benchmarks/gpu_check.py``, issue 13). A chain of ``--layers`` Linear 256->256
layers is built (weights held), then wrapped in place with ``--seeds`` dormant seeds per layer, then
one seed per layer is given a rank-8 ``lowrank_adapter`` kernel (ACTIVE). Reported per dormant
seed and per active kernel: the growth of the process's resident set (``VmRSS``, after a
``gc.collect``; allocator rounding included, so it is an upper bound with noise of a few pages),
and the bytes of the tensors Esper added (seed-layout buffers; kernel parameters and buffers).
The peak RSS of the process (``VmHWM``) and the kernel cache's bytes against its bound close it.
"""

from __future__ import annotations

import argparse
import gc
import re
from pathlib import Path

import torch
from torch import nn

import esper
from esper.blueprints import create_artifact
from esper.contracts import BlueprintSpec
from esper.execution import InMemoryArtifactSource


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None, field
    return int(match.group(1))


def rss_kib() -> int:
    gc.collect()
    return status_kib("VmRSS")


def tensor_bytes(module: nn.Module, prefix: str) -> int:
    """Bytes of the parameters and buffers of ``module`` whose names contain ``prefix``."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return sum(t.numel() * t.element_size() for name, t in named if prefix in f".{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = InMemoryArtifactSource()
    plain = nn.Sequential(*[nn.Linear(256, 256) for _ in range(args.layers)])
    x = torch.randn(8, 256)
    with torch.no_grad():
        plain(x)
    before = rss_kib()

    model = esper.wrap(plain, seeds_per_layer=args.seeds, inplace=True, kernel_source=source)
    with torch.no_grad():
        model(x)
    after_wrap = rss_kib()
    seeds = args.layers * args.seeds
    layout_bytes = tensor_bytes(model, ".seed_state.")

    spec = BlueprintSpec(family="lowrank_adapter", params={"rank": 8})
    data, _ = create_artifact(spec, model.layer("0").target(), init_seed=0)
    kernel_id = source.add(data)  # one artifact: every layer has the same geometry
    names = model.layer_names
    half = len(names) // 2
    for name in names[:half]:  # the first grafts also pay one-time costs (code, allocator arenas)
        model.load_kernel_sync(name, seed_idx=0, kernel_artifact_id=kernel_id, activate=True)
    with torch.no_grad():
        model(x)
    dormant = rss_kib()
    for name in names[half:]:
        model.load_kernel_sync(name, seed_idx=0, kernel_artifact_id=kernel_id, activate=True)
    with torch.no_grad():
        model(x)
    active = rss_kib()
    grafted = len(names) - half
    kernel_bytes = tensor_bytes(model, ".seeds.")
    cache = model.kernel_cache.stats()

    print(
        f"{args.layers} x Linear 256->256, {args.seeds} seeds per layer; torch {torch.__version__}"
    )
    print(
        f"dormant seed: RSS +{(after_wrap - before) * 1024 / seeds:8.0f} B per seed "
        f"({seeds} seeds, +{after_wrap - before} KiB); seed-layout tensors "
        f"{layout_bytes / seeds:.0f} B per seed"
    )
    print(
        f"active kernel (rank 8): RSS +{(active - dormant) * 1024 / grafted:8.0f} B per kernel "
        f"(the last {grafted} grafts, +{active - dormant} KiB); kernel tensors "
        f"{kernel_bytes / args.layers:.0f} B per kernel"
    )
    print(f"host layer for scale: {tensor_bytes(model.layer('0').base, '')} B of weights")
    print(f"peak RSS of the process (VmHWM): {status_kib('VmHWM') / 1024:.1f} MiB")
    print(
        f"kernel cache: {cache.entries} entries, {cache.bytes} B held of max_bytes "
        f"{cache.max_bytes} B ({cache.bytes / cache.max_bytes:.4%}); hit rate {cache.hit_rate:.1%} "
        f"({cache.hits} hits, {cache.misses} misses, {cache.coalesced} coalesced)"
    )
    model.kernel_cache.close()


if __name__ == "__main__":
    main()
