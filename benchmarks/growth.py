"""Growth benchmark: does growing a small host with Esper beat training static hosts?

Run: ``python benchmarks/growth.py [--seeds 0 1 2] [--datasets digits mnist1d] [--out DIR]``
(about 10 minutes on 2 CPU cores; every run is a real ``esper train`` run in ``DIR/runs``).

For each dataset and seed, every arm trains with the same data, epochs and optimizer:

* ``grown`` — the preset's deliberately small host (``configs/<dataset>.yaml``: an MLP whose
  hidden layer has no non-linearity, a limit residual kernels can relieve), grown by Tamiyo's
  bottleneck policy; each run has its own fresh embedded Urza, so kernels really compile in the
  background while it trains;
* ``(a) small static`` — the same host, never grown;
* ``(b) same-size static`` — the host family widened to the grown model's final parameter count
  (same depth and activation as the small host);
* ``(b') same-size ReLU`` — a ReLU MLP of the grown model's final parameter count (a stronger
  static host of that size);
* ``(c) large static`` — a ReLU MLP with two hidden layers of 256.

It reports test accuracy (mean ± std over seeds), parameters and wall time per arm, and for the
grown runs the training step time: the p99 of the steps that ran while a compile was in flight
over the median of the steps around them without one, next to the same ratio for those control
steps (the noise floor of a shared machine). Separate ``disruption`` runs (a wider host and batch, so that a step takes
milliseconds) measure the same ratio where it is meaningful (see :func:`disruption`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from esper.contracts import BlueprintSpec, KernelTarget, LayerKind
from esper.tezzeret import find_or_enqueue
from esper.tolaria.config import load_config
from esper.tolaria.metrics import read_metrics
from esper.tolaria.report import summarize
from esper.tolaria.trainer import train
from esper.urza import open_library

ROOT = Path(__file__).resolve().parents[1]
LARGE = [256, 256]


def _run(dataset: str, seed: int, arm: str, overrides: list[str], out: Path) -> dict[str, Any]:
    run_id = f"{dataset}-{arm}-s{seed}"
    runs = out / "runs"
    shutil.rmtree(runs / run_id, ignore_errors=True)
    config = load_config(
        ROOT / "configs" / f"{dataset}.yaml",
        overrides=[
            f"run.dir={runs}",
            f"run.id={run_id}",
            f"run.seed={seed}",
            "train.checkpoint=false",
            f"urza.dir={out / 'urza' / run_id}",  # fresh: compiles happen during the run
            *overrides,
        ],
    )
    shutil.rmtree(out / "urza" / run_id, ignore_errors=True)
    result = train(config, command=f"benchmarks/growth.py {run_id}")
    summary = summarize(result.folder)
    wall = summary.wall_seconds  # the training loop's wall time (report writing excluded)
    row = {
        "dataset": dataset,
        "seed": seed,
        "arm": arm,
        "accuracy": result.test_score,
        "parameters": result.parameters,
        "wall_s": wall,
        "grafts": summary.grafts,
        "fossilized": summary.fossilized,
        "culled": summary.culled,
    }
    if summary.step_time is not None:
        row["step_median_ms"] = summary.step_time.median_ms
        row["compiling_steps"] = summary.step_time.compiling_steps
        row["compiling_p99_ms"] = summary.step_time.compiling_p99_ms
        row["compiling_p99_over_median"] = summary.step_time.compiling_p99_over_median
        row["control_median_ms"] = summary.step_time.control_median_ms
        row["control_p99_ms"] = summary.step_time.control_p99_ms
        row["control_p99_over_median"] = summary.step_time.control_p99_over_median
        row["compiling_median_over_control_median"] = (
            summary.step_time.compiling_median_over_control_median
        )
    info = result.folder.read_info()
    row["stall_ms"] = info.get("growth_counters", {}).get("executor.stall_ms", 0)
    print(
        f"{run_id:32s} acc {row['accuracy']:.4f}  params {row['parameters']:6d}  "
        f"{wall:6.1f} s  grafts {row['grafts']}",
        flush=True,
    )
    return row


def _mlp_width_for(parameters: int, inputs: int, outputs: int) -> int:
    """Hidden width of a one-hidden-layer MLP with about ``parameters`` parameters."""
    return max(1, round((parameters - outputs) / (inputs + 1 + outputs)))


def run_dataset(dataset: str, seeds: list[int], out: Path) -> list[dict[str, Any]]:
    """Every arm of one dataset, for every seed."""
    preset = load_config(ROOT / "configs" / f"{dataset}.yaml")
    host = preset.host.model_dump()
    inputs, outputs = {"digits": (64, 10), "mnist1d": (40, 10)}[dataset]
    rows = []
    for seed in seeds:
        grown = _run(dataset, seed, "grown", [], out)
        rows.append(grown)
        rows.append(_run(dataset, seed, "a-small", ["growth.enabled=false"], out))
        width = _mlp_width_for(grown["parameters"], inputs, outputs)
        rows.append(
            _run(
                dataset,
                seed,
                "b-same-size",
                ["growth.enabled=false", f"host.hidden=[{width}]"],
                out,
            )
        )
        rows.append(
            _run(
                dataset,
                seed,
                "b-same-size-relu",
                ["growth.enabled=false", f"host.hidden=[{width}]", "host.activation=relu"],
                out,
            )
        )
        rows.append(
            _run(
                dataset,
                seed,
                "c-large",
                ["growth.enabled=false", f"host.hidden={LARGE}", "host.activation=relu"],
                out,
            )
        )
    print(f"{dataset}: small host {host}", flush=True)
    return rows


def _enqueue_when_training(
    urza_dir: Path, run_folder: Path, jobs: int, *, after_step: int
) -> threading.Thread:
    """Once the run's metrics show step ``after_step``, queue ``jobs`` compiles of distinct layer
    shapes into its library, so its worker compiles for a while in the middle of training."""

    def reached() -> bool:
        metrics = run_folder / "metrics.jsonl"
        if not metrics.exists():
            return False
        steps = [r["step"] for r in read_metrics(metrics, "step")]
        return bool(steps) and max(steps) >= after_step

    def enqueue() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not reached():
            time.sleep(0.02)
        library = open_library(run_dir=urza_dir)
        spec = BlueprintSpec(family="residual_mlp", params={"hidden": 64})
        for i in range(jobs):
            width = 48 + i
            target = KernelTarget(
                layer_kind=LayerKind.LINEAR,
                in_features=width,
                out_features=width,
                channel_dim=-1,
                spatial_dims=0,
            )
            find_or_enqueue(library, spec, target)
        library.close()

    thread = threading.Thread(target=enqueue, daemon=True)
    thread.start()
    return thread


def disruption(out: Path, seed: int = 0, jobs: int = 40) -> list[dict[str, Any]]:
    """Grown runs whose steps take milliseconds: step time while compiles run in the background.

    The worker is a process or a thread. Each run precompiles its catalog kernels before step 1
    (the presets' default); from step 100 it gets ``jobs`` more compiles of other shapes queued
    into its library (see :func:`_enqueue_when_training`), so its worker compiles for a few
    seconds in the middle of training. Growth starts at step 400, after that window: the steps
    during the compiles and the control steps around them run the same model.
    """
    rows = []
    for worker in ("process", "thread"):
        arm = f"disruption-{worker}"
        run_id = f"digits-{arm}-s{seed}"
        for stale in (out / "urza" / run_id, out / "runs" / run_id):
            shutil.rmtree(stale, ignore_errors=True)
        helper = _enqueue_when_training(
            out / "urza" / run_id, out / "runs" / run_id, jobs, after_step=100
        )
        overrides = [
            "host.hidden=[512,512]",
            "data.batch_size=256",
            "train.epochs=100",
            "growth.start_step=400",
            "growth.decide_every=20",
            "growth.graft_delay=10",
            "growth.evaluation_steps=20",
            "growth.cooldown_steps=20",
            "growth.max_adaptations=6",
            "growth.max_parameter_fraction=5",
            "seeds.per_layer=3",
            "seeds.blend_steps=10",
            f"urza.worker={worker}",
        ]
        rows.append(_run("digits", seed, arm, overrides, out))
        helper.join(timeout=10)
    return rows


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one row per dataset and arm, means over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["arm"])].append(row)
    lines = [
        "| dataset | arm | test accuracy | parameters | wall s | grafts (kept/culled) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for (dataset, arm), group in groups.items():
        params = [r["parameters"] for r in group]
        grafts = (
            f"{sum(r['grafts'] for r in group)} ({sum(r['fossilized'] for r in group)}/"
            f"{sum(r['culled'] for r in group)})"
            if arm == "grown" or arm.startswith("disruption")
            else "-"
        )
        lines.append(
            f"| {dataset} | {arm} | {_mean_std([r['accuracy'] for r in group])} | "
            f"{round(statistics.mean(params))} ({min(params)}–{max(params)}) | "
            f"{statistics.mean(r['wall_s'] for r in group):.1f} | {grafts} |"
        )
    lines += [
        "",
        "| run | step median ms | compile steps | their p99 ms | control steps: median, p99 ms "
        "| compile p99 / control median | noise floor (control p99 / median) | compile median / "
        "control median | waited at due boundaries ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        grown = row["arm"] == "grown" or row["arm"].startswith("disruption")
        if grown and row.get("step_median_ms") is not None:
            lines.append(
                f"| {row['dataset']}-{row['arm']}-s{row['seed']} | {row['step_median_ms']:.2f} | "
                f"{row['compiling_steps']} | {row['compiling_p99_ms']:.2f} | "
                f"{row['control_median_ms']:.2f}, {row['control_p99_ms']:.2f} | "
                f"{row['compiling_p99_over_median']:.2f} | {row['control_p99_over_median']:.2f} | "
                f"{row['compiling_median_over_control_median']:.2f} | {row['stall_ms']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark-growth")
    parser.add_argument("--no-disruption", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for dataset in args.datasets:
        rows += run_dataset(dataset, args.seeds, args.out)
    if not args.no_disruption:
        rows += disruption(args.out)
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten to {args.out}/results.md and results.json", file=sys.stderr)


if __name__ == "__main__":
    main()
