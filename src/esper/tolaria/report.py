"""Run report: ``report.md`` with PNG plots, built from a run folder's ``metrics.jsonl``.

``esper report runs/<id>`` (or :func:`write_report`) regenerates it at any time, also for an
unfinished run. Plots (:mod:`esper.tolaria.plots`; step-time statistics from
:mod:`esper.tolaria.step_time`):

* ``plots/loss_score.png`` — training loss per step and test loss/score per epoch, with every
  graft marked;
* ``plots/seed_timeline.png`` — the state of every seed of every layer over the steps;
* ``plots/parameters.png`` — parameter count over the steps;
* ``plots/step_time.png`` — step time over the steps, steps with a compile in flight highlighted.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esper.tolaria.metrics import read_metrics
from esper.tolaria.plots import plot_loss_score, plot_parameters, plot_seed_timeline, plot_step_time
from esper.tolaria.run_folder import RunFolder, write_text_atomic
from esper.tolaria.step_time import StepTimeStats, step_time_stats

logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """Headline numbers of a run, from its metrics."""

    run_id: str
    dataset: str = ""
    host: str = ""
    policy: str = ""
    score_name: str = "accuracy"
    epochs: int = 0
    steps: int = 0
    initial_parameters: int = 0
    final_parameters: int = 0
    initial_test_score: float | None = None
    final_test_score: float | None = None
    best_test_score: float | None = None
    final_test_loss: float | None = None
    final_train_loss: float | None = None
    germinations: int = 0
    grafts: int = 0
    fossilized: int = 0
    culled: int = 0
    refusals: int = 0
    refusals_by_gate: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    step_time: StepTimeStats | None = None
    first_graft_step: int | None = None
    test_score_before_growth: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for ``run.json`` and benchmark tables)."""
        data = asdict(self)
        if self.step_time is not None:
            data["step_time"]["p99_over_median"] = self.step_time.p99_over_median
            data["step_time"]["compiling_p99_over_median"] = (
                self.step_time.compiling_p99_over_median
            )
        return data


def summarize(folder: RunFolder) -> RunSummary:
    """The :class:`RunSummary` of a run folder (from ``run.json`` and ``metrics.jsonl``)."""
    info = folder.read_info()
    records = list(read_metrics(folder.metrics_path)) if folder.metrics_path.exists() else []
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_type[record["type"]].append(record)
    epochs = by_type["epoch"]
    steps = by_type["step"]
    grafts = by_type["graft"]
    summary = RunSummary(
        run_id=folder.run_id,
        dataset=str(info.get("dataset", "")),
        host=str(info.get("host", "")),
        policy=str(info.get("policy", "")),
        score_name=str(info.get("score_name", "accuracy")),
        epochs=len(epochs),
        steps=steps[-1]["step"] if steps else 0,
        initial_parameters=int(info.get("initial_parameters", 0)),
        germinations=sum(1 for d in by_type["decision"] if d.get("action") == "germinate"),
        grafts=len(grafts),
        fossilized=len(by_type["fossilize"]),
        culled=len(by_type["cull"]),
        refusals=len(by_type["refusal"]),
        wall_seconds=float(info.get("wall_seconds", 0.0)),
        step_time=step_time_stats(steps) if steps else None,
    )
    for refusal in by_type["refusal"]:
        gate = str(refusal.get("gate"))
        summary.refusals_by_gate[gate] = summary.refusals_by_gate.get(gate, 0) + 1
    if epochs:
        last = epochs[-1]
        summary.final_parameters = int(last["parameters"])
        summary.final_test_score = last.get("test_score")
        summary.final_test_loss = last.get("test_loss")
        summary.final_train_loss = last.get("train_loss")
        scores = [e["test_score"] for e in epochs if e.get("test_score") is not None]
        summary.best_test_score = max(scores) if scores else None
    initial = [e for e in by_type["eval"] if e.get("epoch") == 0]
    if initial:
        summary.initial_test_score = initial[0].get("test_score")
    if grafts:
        summary.first_graft_step = int(grafts[0]["step"])
        before = [e for e in epochs if e["step"] <= summary.first_graft_step]
        if before:
            summary.test_score_before_growth = before[-1].get("test_score")
    return summary


# -- plots -----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "-"
    return str(value)


def _cache_line(cache: Any) -> list[str]:
    """The kernel cache's counters of the run (``run.json``'s ``kernel_cache``), if recorded."""
    if not isinstance(cache, dict) or "hits" not in cache:
        return []
    requests = cache["hits"] + cache["misses"] + cache.get("coalesced", 0)
    return [
        "",
        f"Kernel cache: {requests} requests, {cache['hits']} hits, {cache['misses']} misses, "
        f"{cache.get('coalesced', 0)} joined a load in flight (hit rate "
        f"{_fmt(cache.get('hit_rate'), 3)}), {cache['evictions']} evictions; "
        f"{cache['bytes']} of {cache['max_bytes']} bytes held.",
    ]


def write_report(path: str | Path, *, compare: Sequence[str | Path] = ()) -> Path:
    """(Re)generate ``report.md`` and ``plots/`` of the run folder at ``path``.

    Args:
        path: the run folder.
        compare: other run folders to add to the comparison table (e.g. a static baseline).

    Returns:
        The path of ``report.md``.
    """
    folder = RunFolder.open(path)
    others = [RunFolder.open(other) for other in compare]  # all checked before writing anything
    records = list(read_metrics(folder.metrics_path)) if folder.metrics_path.exists() else []
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_type[record["type"]].append(record)
    steps, epochs, grafts = by_type["step"], by_type["epoch"], by_type["graft"]
    summary = summarize(folder)
    info = folder.read_info()
    folder.plots_dir.mkdir(exist_ok=True)
    last_step = steps[-1]["step"] if steps else 0
    layer_seeds = {str(k): int(v) for k, v in info.get("layer_seeds", {}).items()}
    try:
        plots = folder.plots_dir
        plot_loss_score(plots / "loss_score.png", steps, epochs, grafts, summary.score_name)
        plot_seed_timeline(plots / "seed_timeline.png", by_type["seed"], layer_seeds, last_step)
        plot_parameters(plots / "parameters.png", steps, grafts)
        plot_step_time(plots / "step_time.png", steps)
        missing_plots = ""
    except ImportError:
        logger.warning(
            "report of %s written without plots: matplotlib is not installed "
            "(pip install 'esper-morphogenetic[report]')",
            folder.run_id,
        )
        missing_plots = "Plots need matplotlib: `pip install 'esper-morphogenetic[report]'`."

    name = summary.score_name
    lines = [
        f"# Run {folder.run_id}",
        "",
        *([missing_plots, ""] if missing_plots else []),
        f"- status: **{info.get('status', 'unknown')}**, {summary.epochs} epochs, "
        f"{summary.steps} steps, {summary.wall_seconds:.1f} s",
        f"- dataset: {summary.dataset}; host: {summary.host}; policy: {summary.policy or '-'}",
        f"- command: `{info.get('command', '-')}`",
        "",
        "## Result",
        "",
        f"| model | parameters | test {name} | test loss |",
        "|---|---:|---:|---:|",
        f"| host at start | {summary.initial_parameters} | "
        f"{_fmt(summary.initial_test_score)} | - |",
    ]
    if summary.first_graft_step is not None:
        lines.append(
            f"| before the first graft (step {summary.first_graft_step}) | "
            f"{summary.initial_parameters} | {_fmt(summary.test_score_before_growth)} | - |"
        )
    lines.append(
        f"| **final** | **{summary.final_parameters}** | **{_fmt(summary.final_test_score)}** | "
        f"{_fmt(summary.final_test_loss)} |"
    )
    for other_folder in others:
        other = summarize(other_folder)
        lines.append(
            f"| {other.run_id} ({other.policy or 'static'}) | {other.final_parameters} | "
            f"{_fmt(other.final_test_score)} | {_fmt(other.final_test_loss)} |"
        )
    lines += [
        "",
        f"Best test {name}: {_fmt(summary.best_test_score)}. Growth: "
        f"{summary.germinations} germinations decided, {summary.grafts} grafted, "
        f"{summary.fossilized} fossilized, {summary.culled} culled, {summary.refusals} refused"
        + (
            " (" + ", ".join(f"{g}: {n}" for g, n in sorted(summary.refusals_by_gate.items())) + ")"
            if summary.refusals
            else ""
        )
        + ".",
        *_cache_line(info.get("kernel_cache")),
        "",
        "![loss and score](plots/loss_score.png)",
        "",
        "## Seeds",
        "",
        "![seed timeline](plots/seed_timeline.png)",
        "",
    ]
    lines += _seed_table(by_type)
    lines += ["", "![parameters](plots/parameters.png)", "", "## Step time", ""]
    stats = summary.step_time
    if stats is not None:
        lines += [
            f"Compile disruption: the p99 of the {stats.compiling_steps} steps that ran while a "
            f"compile was in flight, over the median of the {stats.control_steps} steps around "
            f"them without one: **{_fmt(stats.compiling_p99_over_median, 2)}** (noise floor, the "
            f"same ratio for those control steps: {_fmt(stats.control_p99_over_median, 2)}); "
            f"median over median: {_fmt(stats.compiling_median_over_control_median, 2)}.",
            "",
            "| steps | median ms | p99 ms | compiling: steps, median, p99 ms | "
            "control: steps, median, p99 ms |",
            "|---:|---:|---:|---:|---:|",
            f"| {stats.steps} | {stats.median_ms:.3f} | {stats.p99_ms:.3f} | "
            f"{stats.compiling_steps}, {_fmt(stats.compiling_median_ms, 3)}, "
            f"{_fmt(stats.compiling_p99_ms, 3)} | {stats.control_steps}, "
            f"{_fmt(stats.control_median_ms, 3)}, {_fmt(stats.control_p99_ms, 3)} |",
            "",
        ]
    lines += ["![step time](plots/step_time.png)", ""]
    lines += _decision_table(by_type)
    write_text_atomic(folder.report_path, "\n".join(lines) + "\n")
    return folder.report_path


def _seed_table(by_type: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    grafts = by_type.get("graft", [])
    if not grafts:
        return ["No seed was grafted."]
    outcome: dict[tuple[str, int], str] = {}
    for kind in ("fossilize", "cull"):
        for event in by_type.get(kind, []):
            outcome[(event["layer"], int(event["seed"]))] = f"{kind} @ {event['step']}"
    rows = [
        "| layer | seed | blueprint | grafted at step | kernel params | outcome |",
        "|---|---:|---|---:|---:|---|",
    ]
    for graft in grafts:
        key = (graft["layer"], int(graft["seed"]))
        rows.append(
            f"| {graft['layer']} | {graft['seed']} | {graft.get('blueprint', '-')} | "
            f"{graft['step']} | {graft.get('kernel_parameters', '-')} | "
            f"{outcome.get(key, 'running')} |"
        )
    return rows


def _decision_table(by_type: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    decisions = by_type.get("decision", [])
    refusals = by_type.get("refusal", [])
    rewards = {r.get("decision_id"): r for r in by_type.get("reward", [])}
    lines = ["## Decisions", ""]
    if not decisions and not refusals:
        return [*lines, "No decisions."]
    lines += [
        "| step | action | layer | seed | blueprint | policy | confidence | reward |",
        "|---:|---|---|---:|---|---|---:|---:|",
    ]
    for d in decisions:
        reward = rewards.get(d.get("decision_id"))
        lines.append(
            f"| {d['step']} | {d['action']} | {d['layer']} | {d.get('seed', '-')} | "
            f"{d.get('blueprint') or '-'} | {d.get('policy', '-')} | "
            f"{_fmt(d.get('confidence'), 2)} | {_fmt(reward.get('total') if reward else None)} |"
        )
    if refusals:
        lines += ["", "| step | refused | layer | gate | reason |", "|---:|---|---|---|---|"]
        lines += [
            f"| {r['step']} | {r['action']} | {r['layer']} | {r['gate']} | {r['reason']} |"
            for r in refusals[:50]
        ]
        if len(refusals) > 50:
            lines.append(f"| … | {len(refusals) - 50} more | | | |")
    return lines
