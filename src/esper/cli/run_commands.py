"""``esper train``, ``esper report`` and ``esper runs``: training runs and their folders.

The config (or the resumed run folder) is read and checked before torch is imported, so a
misspelt key, a completed run or a missing checkpoint is answered at once; the run itself is
:func:`esper.tolaria.trainer.train`.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from rich import box
from rich.markup import escape
from rich.table import Table

from esper.cli.output import console, print_line, print_warning
from esper.cli.parsing import OneLineArgumentParser, positive_int
from esper.errors import ConfigurationError
from esper.tolaria.launcher import INTERRUPTED_EXIT_CODE

if TYPE_CHECKING:
    from esper.tolaria.run_folder import RunListing
    from esper.tolaria.trainer import RunResult

SCORE_ABBREVIATIONS = {"accuracy": "acc", "r2": "R²"}


def add_parsers(commands: argparse._SubParsersAction[OneLineArgumentParser]) -> None:
    """Add ``train``, ``report`` and ``runs`` to the ``esper`` sub-commands."""
    train = commands.add_parser(
        "train", help="train (and grow) a model from a run config; writes runs/<run-id>/"
    )
    train.add_argument("--config", default=None, help="a run config, e.g. configs/digits.yaml")
    train.add_argument("--resume", default=None, help="continue the run folder runs/<run-id>")
    train.add_argument(
        "--epoch",
        type=positive_int,
        default=None,
        help="with --resume: continue from this epoch's checkpoint (default: the latest intact)",
    )
    train.add_argument(
        "--stop-after-epoch",
        type=positive_int,
        default=None,
        help="stop after this epoch's checkpoint",
    )
    train.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="train on N ranks under torch.distributed (DDP on CPU via gloo), growing in lockstep",
    )
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=2")
    train.set_defaults(handler=_train)

    report = commands.add_parser("report", help="regenerate a run's report.md and plots")
    report.add_argument("run", help="the run folder, runs/<run-id>")
    report.add_argument("--compare", action="append", default=[], help="another run folder")
    report.set_defaults(handler=_report)

    runs = commands.add_parser("runs", help="list the runs in a folder")
    runs.add_argument("--dir", default="runs", help="folder of run folders (default runs)")
    runs.set_defaults(handler=_runs)


def _train(args: argparse.Namespace) -> int:
    from esper.tolaria.config import load_config
    from esper.tolaria.resume import plan_resume

    if args.config is not None and args.resume is not None:
        raise ConfigurationError(
            "esper train takes --config (a new run) or --resume (an existing one), not both"
        )
    if args.epoch is not None and args.resume is None:
        raise ConfigurationError("--epoch picks the checkpoint of --resume runs/<run-id>")
    if args.resume is not None:
        plan = plan_resume(args.resume, args.overrides, epoch=args.epoch)
        if plan.completed:
            print_line(plan.message)
            return 0
        config = plan.config
    elif args.config is not None:
        config = load_config(args.config, overrides=args.overrides)
    else:
        raise ConfigurationError(
            "esper train needs --config configs/<name>.yaml (or --resume runs/<run-id>)"
        )
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from esper.tolaria.launcher import launch

        return launch(args.nproc, args.argv)  # the config is known to be valid: once, here

    from esper.tolaria.progress import RichProgress
    from esper.tolaria.resume import RunInterrupted
    from esper.tolaria.trainer import train

    try:
        with RichProgress(console) as progress:
            result = train(
                config,
                resume=args.resume,
                resume_epoch=args.epoch,
                observer=progress,
                stop_after_epoch=args.stop_after_epoch,
            )
    except RunInterrupted as stop:
        if "RANK" not in os.environ or os.environ["RANK"] == "0":
            print_line(stop.describe())
        return INTERRUPTED_EXIT_CODE
    if result.primary:  # other ranks of a distributed run: rank 0 reports
        print_line(_result_line(result))
    return 0


def _result_line(result: RunResult) -> str:
    line = f"run {result.folder.run_id} {result.status} at epoch {result.epoch}: "
    line += f"test score {result.test_score:.4f}, {result.parameters} parameters; "
    line += f"report: {result.folder.report_path}"
    if result.status == "interrupted":
        line += f"; resume with: esper train --resume {result.folder.path}"
    return line


def _report(args: argparse.Namespace) -> int:
    from esper.tolaria.report import write_report

    path = write_report(args.run, compare=args.compare)
    print_line(f"report written to {path}")
    return 0


def _runs(args: argparse.Namespace) -> int:
    from esper.tolaria.run_folder import list_runs

    rows = list_runs(args.dir)
    if not rows:
        print_line(
            f"no runs in {args.dir} yet (esper train --config configs/digits.yaml makes one)"
        )
        return 0
    console.print(runs_table(rows, title=f"runs in {args.dir} ({len(rows)})"))
    problems = [row.problem for row in rows if row.problem]
    for problem in problems:
        print_warning(problem)
    return 2 if problems else 0


def runs_table(rows: list[RunListing], *, title: str) -> Table:
    """The ``esper runs`` table, readable at 80 columns: one row per run, its id whole on the
    first line, then what it trains, its size and its seeds on a dimmed line that wraps."""
    widest = max((len(row.run_id) for row in rows), default=3)
    table = Table(
        title=title, box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, leading=1
    )
    table.add_column("run", min_width=min(widest, 48), overflow="fold", ratio=1)
    table.add_column("status", no_wrap=True)
    table.add_column("epoch", justify="right", no_wrap=True)
    table.add_column("test", justify="right", no_wrap=True)
    for row in rows:
        score = "-"
        if row.test_score is not None:
            name = SCORE_ABBREVIATIONS.get(row.score_name, row.score_name)
            score = f"{row.test_score:.3f} {name}"
        params = f"{row.parameters} params" if row.parameters is not None else "params -"
        details = f"{row.dataset} {row.host}, {params}, seeds: {row.seeds or '-'}"
        table.add_row(
            f"{escape(row.run_id)}\n[dim]{escape(details)}[/dim]",
            escape(row.status),
            f"{row.epoch}/{row.epochs}",
            score,
        )
    return table
