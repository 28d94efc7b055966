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
grown runs the training step time: median over all steps and p99 over the steps that ran while a
compile was in flight. A separate ``disruption`` run (a wider host and batch, so that a step takes
several milliseconds) measures the same ratio where it is meaningful.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from esper.tolaria.config import load_config
from esper.tolaria.report import summarize
from esper.tolaria.trainer import train

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


def disruption(out: Path, seed: int = 0) -> dict[str, Any]:
    """A grown run whose steps take milliseconds: step time while compiles run in the background."""
    return _run(
        "digits",
        seed,
        "disruption",
        [
            "host.hidden=[512,512]",
            "data.batch_size=256",
            "train.epochs=40",
            "growth.start_step=20",
            "growth.decide_every=10",
            "growth.graft_delay=5",
            "growth.evaluation_steps=20",
            "growth.cooldown_steps=20",
            "growth.max_seeds=6",
            "seeds.per_layer=3",
            "seeds.blend_steps=10",
        ],
        out,
    )


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
            if arm in ("grown", "disruption")
            else "-"
        )
        lines.append(
            f"| {dataset} | {arm} | {_mean_std([r['accuracy'] for r in group])} | "
            f"{round(statistics.mean(params))} ({min(params)}–{max(params)}) | "
            f"{statistics.mean(r['wall_s'] for r in group):.1f} | {grafts} |"
        )
    lines += [
        "",
        "| run | step median ms | steps during compiles | their p99 ms | p99 / median | "
        "waited at due boundaries (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["arm"] in ("grown", "disruption") and row.get("step_median_ms") is not None:
            lines.append(
                f"| {row['dataset']}-{row['arm']}-s{row['seed']} | {row['step_median_ms']:.2f} | "
                f"{row['compiling_steps']} | {row['compiling_p99_ms']:.2f} | "
                f"{row['compiling_p99_over_median']:.2f} | {row['stall_ms']} |"
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
        rows.append(disruption(args.out))
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    (args.out / "results.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten to {args.out}/results.md and results.json", file=sys.stderr)


if __name__ == "__main__":
    main()
