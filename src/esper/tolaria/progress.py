"""Run progress: what the run loop tells an observer, and the rich terminal view ``esper train``
shows (epoch and step bars, live seed-state counts, the last decision).

The loop itself never prints (library code logs); the CLI passes a :class:`RichProgress`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RunObserver(Protocol):
    """Receives the run loop's progress (all calls on the training thread; keep them cheap)."""

    def on_status(self, text: str) -> None:
        """What the run is doing before training starts (``compiling 4 catalog kernels…``);
        each call replaces the last, ``""`` clears it."""
        ...

    def on_notice(self, text: str, *, warning: bool = False) -> None:
        """A line to keep: the warm-up's result, or a ``warning`` (a damaged checkpoint
        skipped)."""
        ...

    def on_start(self, *, run_id: str, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        """The loop is about to train epochs ``start_epoch + 1 .. epochs``."""
        ...

    def on_step(self, *, step: int, loss: float | None, seeds: Mapping[str, int]) -> None:
        """One step finished; ``seeds`` counts seeds by state name. ``loss`` is read from the
        device only on the steps that log it (``train.log_every``), ``None`` on the others."""
        ...

    def on_event(self, record: Mapping[str, Any]) -> None:
        """A growth event (decision, refusal, graft, reward, fossilize, cull)."""
        ...

    def on_epoch(self, record: Mapping[str, Any]) -> None:
        """An epoch finished and was evaluated (the ``epoch`` metrics record)."""
        ...

    def on_end(self, *, status: str) -> None:
        """The loop stopped (``completed``, ``interrupted`` or ``failed``)."""
        ...


class SilentObserver:
    """An observer that ignores everything (the default of library callers)."""

    def on_status(self, text: str) -> None:
        """Ignore."""

    def on_notice(self, text: str, *, warning: bool = False) -> None:
        """Ignore."""

    def on_start(self, *, run_id: str, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        """Ignore."""

    def on_step(self, *, step: int, loss: float | None, seeds: Mapping[str, int]) -> None:
        """Ignore."""

    def on_event(self, record: Mapping[str, Any]) -> None:
        """Ignore."""

    def on_epoch(self, record: Mapping[str, Any]) -> None:
        """Ignore."""

    def on_end(self, *, status: str) -> None:
        """Ignore."""


def describe_event(record: Mapping[str, Any]) -> str:
    """One line for a growth event, e.g. ``step 300 germinate fc1:0 residual_mlp (bottleneck)``."""
    kind = record.get("type", "?")
    seed = record.get("seed")
    where = f"{record.get('layer', '?')}:{seed if seed is not None else '?'}"
    step = record.get("step", "?")
    if kind == "decision":
        blueprint = f" {record['blueprint']}" if record.get("blueprint") else ""
        return f"step {step} {record.get('action')} {where}{blueprint} ({record.get('policy')})"
    if kind == "refusal":
        return f"step {step} refused {record.get('action')} {record.get('layer')}: {record.get('gate')}"
    if kind == "reward":
        return (
            f"step {step} reward {where} {record.get('total', 0.0):+.3f} -> {record.get('outcome')}"
        )
    return f"step {step} {kind} {where}"


class RichProgress:
    """Live terminal view: an epoch bar, a step bar, seed-state counts and the last decision.

    Use as a context manager around the run; epoch summaries are printed above the bars.

    Args:
        console: where to draw (default: a new stdout console).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self._epoch_task = self._progress.add_task("epochs", total=1, info="")
        self._step_task = self._progress.add_task("steps", total=1, info="")
        self._seeds = Text("seeds: -")
        self._last = Text("last decision: -")
        self._status = Text("")
        self._live = Live(
            Group(self._status, self._progress, self._seeds, self._last),
            console=self.console,
            refresh_per_second=8,
            transient=False,
        )
        self._steps_per_epoch = 1
        self._epoch = 0
        self._seed_summary = ""

    def __enter__(self) -> RichProgress:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._live.stop()
        if not self.console.is_terminal:  # the final frame ends without a line break there
            self.console.line()

    def on_status(self, text: str) -> None:
        """Show what the run is doing above the bars (printed as a line when the output is not
        a terminal, where the live view is drawn only once, at the end)."""
        if self.console.is_terminal:
            self._status.plain = text
        elif text:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def on_notice(self, text: str, *, warning: bool = False) -> None:
        """Print a line above the bars (a warning in yellow)."""
        style = "yellow" if warning else "dim"
        prefix = "warning: " if warning else ""
        self.console.print(
            f"[{style}]{prefix}{escape(text)}[/{style}]", highlight=False, soft_wrap=True
        )

    def on_start(self, *, run_id: str, epochs: int, steps_per_epoch: int, start_epoch: int) -> None:
        """Size the bars (and clear the setup status)."""
        self._status.plain = ""
        self._steps_per_epoch = steps_per_epoch
        self._epoch = start_epoch
        self._progress.update(
            self._epoch_task, total=epochs, completed=start_epoch, info=f"run {run_id}"
        )
        self._progress.update(self._step_task, total=steps_per_epoch, completed=0)

    def on_step(self, *, step: int, loss: float | None, seeds: Mapping[str, int]) -> None:
        """Advance the step bar (its loss changes on logged steps); refresh the seed counts."""
        done = step - self._epoch * self._steps_per_epoch
        if loss is None:
            self._progress.update(self._step_task, completed=done)
        else:
            self._progress.update(self._step_task, completed=done, info=f"loss {loss:.4f}")
        summary = ", ".join(f"{n} {state.lower()}" for state, n in seeds.items() if n)
        if summary != self._seed_summary:
            self._seed_summary = summary
            self._seeds.plain = f"seeds: {summary or '-'}"

    def on_event(self, record: Mapping[str, Any]) -> None:
        """Show the latest decision (and print grafts, rewards and refusals above the bars)."""
        line = describe_event(record)
        if record.get("type") == "decision":
            self._last.plain = f"last decision: {line}"
        if record.get("type") in ("graft", "reward", "fossilize", "cull"):
            self.console.print(f"  [green]{escape(line)}[/green]", highlight=False, soft_wrap=True)

    def on_epoch(self, record: Mapping[str, Any]) -> None:
        """Print the epoch's numbers and advance the epoch bar."""
        self._epoch = int(record["epoch"])
        self._progress.update(self._epoch_task, completed=self._epoch)
        score_name = record.get("score_name", "score")
        self.console.print(
            f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  "
            f"test loss {record['test_loss']:.4f}  test {score_name} {record['test_score']:.4f}  "
            f"params {record['parameters']}",
            highlight=False,
            soft_wrap=True,
        )

    def on_end(self, *, status: str) -> None:
        """Nothing to do: the context manager stops the display."""
