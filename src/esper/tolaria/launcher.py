"""Launching a distributed run: ``esper train --nproc N`` re-executed under ``torch.distributed.run``.

This module imports nothing heavy: the launching process only parses and checks the command line
(errors are reported once, not once per rank) and waits for the ranks, each of which runs
``python -m esper.cli <argv>`` (see :mod:`esper.tolaria.distributed`).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence

from esper.errors import ConfigurationError

logger = logging.getLogger(__name__)

INTERRUPTED_EXIT_CODE = 130
"""Exit status of a command stopped by Ctrl-C (128 + SIGINT)."""


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` option (each rank runs one process)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--nproc":
            skip = True
        elif not token.startswith("--nproc="):
            kept.append(token)
    return kept


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``esper <argv>`` (``--nproc`` removed) on ``nproc`` ranks with
    ``torch.distributed.run``; returns its exit code (130 after Ctrl-C, which reaches the ranks
    too: rank 0 records where the run stopped and says how to resume it)."""
    if nproc < 1:
        raise ConfigurationError(f"--nproc must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", "-m", "esper.cli", *without_nproc(argv)]
    logger.info("launching %d ranks: %s", nproc, " ".join(command))
    process = subprocess.Popen(command)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.wait()
        return INTERRUPTED_EXIT_CODE
