"""Compile worker: the one owner of a run's Tezzeret worker (started with the run, stopped with it).

Which worker compiles a run's kernels is ``urza.worker``:

* ``process``: ``esper tezzeret worker`` as a child process (:class:`~esper.tezzeret.
  TezzeretProcess`) on the run's library; compiles never compete with training for the
  interpreter lock. Started before the data and the model are built, so its start-up overlaps
  the run's own.
* ``thread``: a :class:`~esper.tezzeret.TezzeretWorker` thread in the training process (ready
  sooner; a compile slows the steps it overlaps). It announces ``kernel.ready`` on the bus.
* ``none``: external workers (``esper tezzeret worker``) compile into the shared library.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from esper.errors import ConfigurationError
from esper.oona import MessageBus
from esper.tezzeret import TezzeretProcess, TezzeretWorker, library_location
from esper.urza import ArtifactLibrary

logger = logging.getLogger(__name__)

WorkerMode = Literal["process", "thread", "none"]
"""Who compiles (``urza.worker``)."""


class CompileWorker:
    """A running Tezzeret worker (or none), stopped by :meth:`stop`.

    Build it with :meth:`start`.

    Args:
        mode: which kind it is.
        thread: the worker thread (``mode="thread"``).
        process: the worker process (``mode="process"``).
    """

    def __init__(
        self,
        mode: WorkerMode,
        *,
        thread: TezzeretWorker | None = None,
        process: TezzeretProcess | None = None,
    ) -> None:
        held = {"thread": (True, False), "process": (False, True), "none": (False, False)}
        if held.get(mode) != (thread is not None, process is not None):
            raise ConfigurationError(
                f"a {mode!r} compile worker got thread={thread!r}, process={process!r}; build "
                "it with CompileWorker.start(mode, library)"
            )
        self.mode = mode
        self.thread = thread
        self.process = process

    @classmethod
    def start(
        cls,
        mode: WorkerMode,
        library: ArtifactLibrary,
        *,
        bus: MessageBus | None = None,
        location: list[str] | None = None,
        log_path: Path | None = None,
    ) -> CompileWorker:
        """Start a worker compiling the jobs queued in ``library``.

        Args:
            mode: ``process``, ``thread`` or ``none``.
            library: the run's library.
            bus: where a worker thread announces ``kernel.ready``.
            location: the ``esper`` options naming the library for a worker process (default:
                :func:`~esper.tezzeret.library_location` of ``library``).
            log_path: where a worker process writes its output.

        Raises:
            ConfigurationError: an unknown mode, or a library another process cannot open.
        """
        if mode == "thread":
            return cls(mode, thread=TezzeretWorker(library, bus).start())
        if mode == "process":
            where = location if location is not None else library_location(library)
            return cls(mode, process=TezzeretProcess(where, log_path=log_path))
        if mode == "none":
            return cls(mode)
        raise ConfigurationError(
            f"unknown compile worker {mode!r}: use 'process', 'thread' or 'none'"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (a process is asked with SIGTERM, then killed)."""
        if self.thread is not None:
            self.thread.stop(timeout)
        if self.process is not None:
            self.process.stop(timeout)
