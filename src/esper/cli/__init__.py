"""The ``esper`` command line: parse arguments, call the library, print the result.

Run ``esper --help`` for the commands. Each command group is one module, its parsers next to
their handlers; a handler turns arguments into a library call and the result into lines:

* :mod:`esper.cli.run_commands` — ``train``, ``report``, ``runs``;
* :mod:`esper.cli.demo_command` — ``demo``;
* :mod:`esper.cli.library_commands` — ``urza serve``, ``tezzeret worker``, ``blueprint …``,
  ``kernel …``;
* :mod:`esper.cli.controller_commands` — ``tamiyo serve``.

Parsing and checking the arguments import nothing heavy (torch loads when a command runs), so
``esper --help`` and a bad argument answer at once. Every user mistake is answered with one line
on stderr and exit status 2, a Ctrl-C with one line and status 130; never with a traceback.
``python -m esper.cli`` is the same command (``torchrun`` starts ranks that way).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

import esper
from esper.cli import controller_commands, demo_command, library_commands, run_commands
from esper.cli.output import print_error, print_line
from esper.cli.parsing import CommandLineError, OneLineArgumentParser
from esper.errors import EsperError
from esper.tolaria.bounded_input import clip, excerpt
from esper.tolaria.launcher import INTERRUPTED_EXIT_CODE

logger = logging.getLogger(__name__)

USAGE_ERROR_EXIT_CODE = 2
"""Exit status of a command refused because of what the user asked (argparse's convention)."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def build_parser() -> argparse.ArgumentParser:
    """The ``esper`` argument parser."""
    parser = OneLineArgumentParser(prog="esper", description="Morphogenetic training for PyTorch.")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=LOG_LEVELS,
        help="logging level (default WARNING)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo_command.add_parsers(commands)
    controller_commands.add_parsers(commands)
    library_commands.add_parsers(commands)
    run_commands.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``esper`` command; returns its exit status."""
    arguments = list(argv) if argv is not None else sys.argv[1:]
    try:
        args = build_parser().parse_args(arguments)
    except CommandLineError as exc:
        print_error(str(exc))
        return USAGE_ERROR_EXIT_CODE
    args.argv = arguments
    esper.configure_logging(args.log_level)
    try:
        return int(args.handler(args))
    except EsperError as exc:
        print_error(str(exc))
    except ValidationError as exc:  # a contract built from the arguments refused a value
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or exc.title
        print_error(
            f"{clip(where, limit=60)}: {clip(first['msg'], limit=200)} "
            f"(got {excerpt(first.get('input'))})"
        )
    except OSError as exc:  # a file or socket the command was pointed at
        logger.debug("%s failed", args.command, exc_info=True)
        target = f": {exc.filename}" if exc.filename else ""
        print_error(f"{exc.strerror or exc}{target}")
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per rank of a launch
            print_line("interrupted")
        return INTERRUPTED_EXIT_CODE
    return USAGE_ERROR_EXIT_CODE
