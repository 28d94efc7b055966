"""Run report: ``report.md`` with PNG plots, built from a run folder's ``metrics.jsonl``.

``esper report runs/<id>`` (or :func:`write_report`) regenerates it at any time, also for an
unfinished run. Plots (matplotlib, Agg backend):

* ``plots/loss_score.png`` — training loss per step and test loss/score per epoch, with every
  graft marked;
* ``plots/seed_timeline.png`` — the state of every seed of every layer over the steps;
* ``plots/parameters.png`` — parameter count over the steps;
* ``plots/step_time.png`` — step time over the steps, steps with a compile in flight highlighted.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esper.tolaria.metrics import read_metrics
from esper.tolaria.run_folder import RunFolder, write_text_atomic

logger = logging.getLogger(__name__)

WARMUP_STEPS = 5
"""First steps left out of step-time statistics (allocator and cache warm-up)."""

STATE_COLORS = {
    "DORMANT": "#e0e0e0",
    "LOADING": "#9ecae1",
    "BLENDING": "#fdae6b",
    "ACTIVE": "#74c476",
    "FOSSILIZED": "#31a354",
    "ERROR_RECOVERY": "#de2d26",
}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


CONTROL_WINDOW = 50
"""Steps without a compile within this many steps of a compiling step form the control group."""


@dataclass(frozen=True)
class StepTimeStats:
    """Step-time statistics of a run, in milliseconds.

    ``compiling`` covers the steps that ran while a background compile was in flight (a wait at a
    due boundary included); ``control`` the steps without one within :data:`CONTROL_WINDOW` steps
    of them — the same model at the same time of the run, so slow drift (a grown model's steps
    get longer, a shared machine's load changes) cancels. The control's own p99/median is the
    noise floor a compile's effect must be read against.
    """

    steps: int
    median_ms: float
    p99_ms: float
    compiling_steps: int
    compiling_median_ms: float
    compiling_p99_ms: float
    control_steps: int = 0
    control_median_ms: float = float("nan")
    control_p99_ms: float = float("nan")

    @property
    def p99_over_median(self) -> float:
        """p99 / median over all steps."""
        return self.p99_ms / self.median_ms if self.median_ms else float("nan")

    @property
    def compiling_p99_over_median(self) -> float:
        """p99 of the steps run during compiles / median of the control steps (the disruption)."""
        if not self.compiling_steps or not self.control_steps:
            return float("nan")
        return self.compiling_p99_ms / self.control_median_ms

    @property
    def compiling_median_over_control_median(self) -> float:
        """Median of the steps run during compiles / median of the control steps."""
        if not self.compiling_steps or not self.control_steps:
            return float("nan")
        return self.compiling_median_ms / self.control_median_ms

    @property
    def control_p99_over_median(self) -> float:
        """p99 / median of the control steps: the noise floor of the disruption ratio."""
        if not self.control_steps:
            return float("nan")
        return self.control_p99_ms / self.control_median_ms


def step_time_stats(step_records: Iterable[Mapping[str, Any]]) -> StepTimeStats:
    """Step-time statistics of ``step`` records (the first :data:`WARMUP_STEPS` left out)."""
    timed = [
        (int(r["step"]), float(r["step_time_ms"]), bool(r.get("compiling")))
        for r in step_records
        if r["step"] > WARMUP_STEPS and r.get("step_time_ms") is not None
    ]
    times = [t for _, t, _ in timed]
    compiling = [t for _, t, busy in timed if busy]
    busy_steps = [step for step, _, busy in timed if busy]
    control = [t for step, t, busy in timed if not busy and _near(step, busy_steps, CONTROL_WINDOW)]
    return StepTimeStats(
        steps=len(times),
        median_ms=statistics.median(times) if times else float("nan"),
        p99_ms=percentile(times, 99),
        compiling_steps=len(compiling),
        compiling_median_ms=statistics.median(compiling) if compiling else float("nan"),
        compiling_p99_ms=percentile(compiling, 99),
        control_steps=len(control),
        control_median_ms=statistics.median(control) if control else float("nan"),
        control_p99_ms=percentile(control, 99),
    )


def _near(step: int, sorted_steps: Sequence[int], window: int) -> bool:
    """Whether some entry of ``sorted_steps`` is within ``window`` of ``step``."""
    index = bisect.bisect_left(sorted_steps, step)
    neighbours = sorted_steps[max(0, index - 1) : index + 1]
    return any(abs(step - other) <= window for other in neighbours)


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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_grafts(axis: Any, grafts: Sequence[Mapping[str, Any]], *, label: bool) -> None:
    for i, graft in enumerate(grafts):
        axis.axvline(
            graft["step"],
            color="tab:green",
            linestyle="--",
            linewidth=1,
            label="graft" if label and i == 0 else None,
        )


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_score(
    path: Path,
    steps: Sequence[Mapping[str, Any]],
    epochs: Sequence[Mapping[str, Any]],
    grafts: Sequence[Mapping[str, Any]],
    score_name: str,
) -> None:
    """Training loss per step (smoothed), test loss and score per epoch, grafts marked."""
    plt = _pyplot()
    fig, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        xs = [r["step"] for r in steps]
        losses = [r["loss"] if r["loss"] is not None else float("nan") for r in steps]
        loss_axis.plot(xs, losses, color="tab:blue", alpha=0.25, linewidth=0.6)
        window = max(1, len(losses) // 50)
        loss_axis.plot(xs, _smooth(losses, window), color="tab:blue", label="train (smoothed)")
    if epochs:
        loss_axis.plot(
            [e["step"] for e in epochs],
            [e.get("test_loss") for e in epochs],
            "o-",
            color="tab:orange",
            label="test",
        )
        score_axis.plot(
            [e["step"] for e in epochs],
            [e.get("test_score") for e in epochs],
            "o-",
            color="tab:purple",
            label=f"test {score_name}",
        )
    _mark_grafts(loss_axis, grafts, label=True)
    _mark_grafts(score_axis, grafts, label=True)
    loss_axis.set(xlabel="step", ylabel="loss", title="loss", yscale="log")
    score_axis.set(xlabel="step", ylabel=score_name, title=f"test {score_name}")
    loss_axis.legend()
    score_axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_intervals(
    seed_events: Sequence[Mapping[str, Any]], last_step: int
) -> dict[tuple[str, int], list[tuple[int, int, str]]]:
    """``(layer, seed) -> [(start, end, state)]`` from ``seed`` records (state changes)."""
    timelines: dict[tuple[str, int], list[tuple[int, int, str]]] = {}
    current: dict[tuple[str, int], tuple[int, str]] = {}
    for event in seed_events:
        key = (event["layer"], int(event["seed"]))
        if key in current:
            start, state = current[key]
            timelines.setdefault(key, []).append((start, event["step"], state))
        current[key] = (event["step"], event["state"])
    for key, (start, state) in current.items():
        timelines.setdefault(key, []).append((start, max(last_step, start), state))
    return timelines


def plot_seed_timeline(
    path: Path, seed_events: Sequence[Mapping[str, Any]], layer_seeds: Mapping[str, int], last: int
) -> None:
    """One row per seed (grouped by layer), coloured by lifecycle state over the steps."""
    plt = _pyplot()
    rows = [(layer, seed) for layer, count in layer_seeds.items() for seed in range(count)]
    fig, axis = plt.subplots(figsize=(11, 0.35 * max(len(rows), 4) + 1.6))
    timelines = seed_intervals(seed_events, last)
    for y, key in enumerate(rows):
        spans = timelines.get(key, [(0, last, "DORMANT")])
        if spans[0][0] > 0:
            spans = [(0, spans[0][0], "DORMANT"), *spans]
        for start, end, state in spans:
            axis.barh(y, max(end - start, 1), left=start, color=STATE_COLORS.get(state, "k"))
    axis.set_yticks(range(len(rows)), [f"{layer}:{seed}" for layer, seed in rows])
    axis.invert_yaxis()
    axis.set(xlabel="step", title="seed states per layer", xlim=(0, max(last, 1)))
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=color) for color in STATE_COLORS.values()
    ]  # legend swatches
    axis.legend(
        handles,
        [s.lower() for s in STATE_COLORS],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.3),
        fontsize=7,
        ncol=6,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_parameters(
    path: Path, steps: Sequence[Mapping[str, Any]], grafts: Sequence[Mapping[str, Any]]
) -> None:
    """Parameter count (base + grafted kernels) over the steps."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(7, 3.5))
    axis.step([r["step"] for r in steps], [r["parameters"] for r in steps], where="post")
    _mark_grafts(axis, grafts, label=True)
    axis.set(xlabel="step", ylabel="parameters", title="parameter count")
    if grafts:
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step_time(path: Path, steps: Sequence[Mapping[str, Any]]) -> None:
    """Step time per step; steps run while a compile was in flight in orange."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(7, 3.5))
    timed = [r for r in steps if r.get("step_time_ms") is not None]
    normal = [r for r in timed if not r.get("compiling")]
    busy = [r for r in timed if r.get("compiling")]
    axis.plot([r["step"] for r in normal], [r["step_time_ms"] for r in normal], ".", ms=2)
    if busy:
        axis.plot(
            [r["step"] for r in busy],
            [r["step_time_ms"] for r in busy],
            ".",
            ms=4,
            color="tab:orange",
            label="compile in flight",
        )
        axis.legend()
    axis.set(xlabel="step", ylabel="ms", title="step time", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- markdown ----------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "-"
    return str(value)


def write_report(path: str | Path, *, compare: Sequence[str | Path] = ()) -> Path:
    """(Re)generate ``report.md`` and ``plots/`` of the run folder at ``path``.

    Args:
        path: the run folder.
        compare: other run folders to add to the comparison table (e.g. a static baseline).

    Returns:
        The path of ``report.md``.
    """
    folder = RunFolder.open(path)
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
    for other_path in compare:
        other = summarize(RunFolder.open(other_path))
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
