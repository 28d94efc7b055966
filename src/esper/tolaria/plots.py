"""Run plots: the PNG figures of a run report (matplotlib, Agg backend, imported when used)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATE_COLORS = {
    "DORMANT": "#e0e0e0",
    "LOADING": "#9ecae1",
    "BLENDING": "#fdae6b",
    "ACTIVE": "#74c476",
    "FOSSILIZED": "#31a354",
    "ERROR_RECOVERY": "#de2d26",
}
"""Colour of each seed state in the seed timeline."""


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
    for axis in (loss_axis, score_axis):
        if axis.get_legend_handles_labels()[0]:  # a run stopped before its first step has none
            axis.legend()
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
