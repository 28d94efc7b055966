"""Decision latency of the GNN growth policy on layer graphs of 10, 100 and 1000 layers.

Run: ``python benchmarks/decision_latency.py [--repeats 200] [--policy PATH]``.

One decision = build the layer graph from the model's cached structure (health, seed states,
germinate mask, globals) + encode it + the policy's forward + masking and choosing. The model is a
synthetic MLP-like chain of ``Linear(32, 32)`` + ``ReLU`` blocks, every Linear wrapped with 4
seeds; health summaries are random. The one-time structure cost (fx trace, compatibility table)
is reported separately, as is the share of the graph build in a decision. Reported as p50/p99 in
milliseconds (a controller budget is absolute: its cycle is 100 ms), single-threaded.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from torch import nn

import esper
from esper.tamiyo.graph import GlobalState, LayerHealthSummary, build_layer_graph, graph_structure
from esper.tamiyo.policy import GNNPolicy, load_gnn_policy


def chain(layers: int, width: int = 32) -> nn.Sequential:
    """``layers`` Linear(width, width) layers with ReLUs between them."""
    modules: list[nn.Module] = []
    for i in range(layers):
        modules.append(nn.Linear(width, width))
        if i < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(layers: int, policy: GNNPolicy, repeats: int) -> dict[str, float]:
    """Latency statistics (ms) of one decision on a ``layers``-layer chain."""
    model = esper.wrap(chain(layers), seeds_per_layer=4)
    started = time.perf_counter()
    structure = graph_structure(model)
    structure_ms = (time.perf_counter() - started) * 1e3
    rng = random.Random(0)
    health = {
        name: LayerHealthSummary(
            output_mean=rng.gauss(0, 1),
            output_std=abs(rng.gauss(1, 0.3)),
            dead_fraction=rng.random() * 0.2,
            log_grad_norm=rng.gauss(-3, 1),
            grad_norm_zscore=rng.gauss(0, 1),
        )
        for name in structure.layer_names
    }
    state = GlobalState(progress=0.5, loss=0.3)
    for _ in range(5):  # warm-up
        policy.act(build_layer_graph(model, health, globals=state, step=0))
    total, build = [], []
    for step in range(repeats):
        t0 = time.perf_counter()
        graph = build_layer_graph(model, health, globals=state, step=step)
        t1 = time.perf_counter()
        output = policy.act(graph)
        t2 = time.perf_counter()
        assert graph.action_mask()[output.action.index()]
        total.append((t2 - t0) * 1e3)
        build.append((t1 - t0) * 1e3)
    return {
        "layers": layers,
        "structure_once_ms": structure_ms,
        "build_p50_ms": percentile(build, 0.5),
        "decision_p50_ms": percentile(total, 0.5),
        "decision_p99_ms": percentile(total, 0.99),
        "decision_mean_ms": statistics.fmean(total),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--policy", default=None, help="saved policy (default: fresh default GNN)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy = load_gnn_policy(args.policy) if args.policy else GNNPolicy()
    print(
        f"GNN policy: {policy.config.layers} GATv2 layers, hidden {policy.config.hidden}, "
        f"{policy.config.attention_heads} heads, ensemble {policy.config.ensemble}; "
        f"{args.repeats} decisions per size, 1 thread"
    )
    header = "layers  structure(once)  build p50  decision p50  decision p99  mean"
    print(header)
    for layers in args.sizes:
        r = measure(layers, policy, args.repeats)
        print(
            f"{layers:>6}  {r['structure_once_ms']:>12.1f}ms  {r['build_p50_ms']:>7.2f}ms"
            f"  {r['decision_p50_ms']:>10.2f}ms  {r['decision_p99_ms']:>10.2f}ms"
            f"  {r['decision_mean_ms']:>6.2f}ms"
        )


if __name__ == "__main__":
    main()
