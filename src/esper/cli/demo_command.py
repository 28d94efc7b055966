"""``esper demo``: grow a small MLP on digits by hand and print what happened."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from esper.cli.output import console, print_line
from esper.cli.parsing import OneLineArgumentParser, positive_int

if TYPE_CHECKING:
    from rich.table import Table

    from esper.tolaria.demo_report import TextTable


def add_parsers(commands: argparse._SubParsersAction[OneLineArgumentParser]) -> None:
    """Add ``demo`` to the ``esper`` sub-commands."""
    demo = commands.add_parser("demo", help="grow a small MLP on digits and print what happened")
    demo.add_argument("--epochs", type=positive_int, default=40)
    demo.add_argument(
        "--germinate-at", type=positive_int, default=20, help="epoch of germination (<= --epochs)"
    )
    demo.add_argument("--hidden", type=positive_int, default=8, help="hidden width of the host MLP")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from esper.tolaria.demo import run_demo
    from esper.tolaria.demo_report import closing_line, demo_tables, epoch_line

    console.print("[bold]esper demo[/bold]: an MLP on digits that grows its first layer mid-run")
    result = run_demo(
        epochs=args.epochs,
        germinate_at_epoch=args.germinate_at,
        hidden=args.hidden,
        on_epoch=lambda record: print_line(epoch_line(record)),
    )
    for table in demo_tables(result):
        console.print(_rich(table))
    print_line(closing_line(result))
    return 0


def _rich(table: TextTable) -> Table:
    from rich.markup import escape
    from rich.table import Table

    rendered = Table(title=table.title)
    for column in table.columns:
        rendered.add_column(column, justify="right" if table.numeric else "left")
    for row in table.rows:
        rendered.add_row(*map(escape, row))
    return rendered
