"""Where the ``esper`` commands print: results on stdout, errors and warnings on stderr.

Library code never prints (it logs); the commands print through these consoles, with rich
markup in the text they write and everything that comes from the user or the library escaped.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console()
"""Results and progress (stdout)."""

error_console = Console(stderr=True)
"""Errors and warnings (stderr)."""


def print_line(message: str) -> None:
    """One line on stdout, as is (no markup, never wrapped to the terminal's width)."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """``error: <message>`` on stderr (never wrapped: one error, one line)."""
    error_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """``warning: <message>`` on stderr (never wrapped)."""
    error_console.print(
        f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True
    )
