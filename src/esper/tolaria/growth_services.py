"""Growth services: what a growing run talks to besides its model, opened before the model is built.

* the Urza library kernels are found in and compiled into (embedded ``<run.dir>/urza`` unless
  ``urza.dir`` / ``urza.url`` say otherwise);
* the bus at ``growth.bus``, where decisions, refusals and rewards are published for observers;
* the run's :class:`~esper.tolaria.compile_worker.CompileWorker` (``urza.worker``), started now
  so that a worker process's start-up overlaps the data and the model being built;
* the :class:`~esper.tolaria.compile_monitor.CompileMonitor` counting compiles in flight.

The model is then built with :meth:`GrowthServices.wrap_options` (its kernels come from the
library), and the :class:`~esper.tolaria.growth.GrowthDriver` built on both owns the services
from then on (its ``close`` closes them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from esper.oona import MessageBus, open_bus
from esper.tolaria.compile_monitor import CompileMonitor
from esper.tolaria.compile_worker import CompileWorker
from esper.tolaria.config import RunConfig
from esper.tolaria.service_controller import speaks_on_bus
from esper.urza import ArtifactLibrary, UrzaArtifactSource, open_library

logger = logging.getLogger(__name__)


class GrowthServices:
    """A run's library, bus, compile worker and compile monitor (closed together).

    Args:
        library: the Urza library.
        bus: the run's bus.
        worker: the run's compile worker (or ``CompileWorker("none")``: external workers).
        monitor: counts the compiles in flight (default: a new one on ``library``).
    """

    def __init__(
        self,
        library: ArtifactLibrary,
        bus: MessageBus,
        worker: CompileWorker,
        monitor: CompileMonitor | None = None,
    ) -> None:
        self.library = library
        self.bus = bus
        self.worker = worker
        self.monitor = monitor or CompileMonitor(library)

    @classmethod
    def open(cls, config: RunConfig, *, log_dir: Path | None = None) -> GrowthServices:
        """The services a run config asks for (``urza`` and ``growth.bus``), the compile worker
        started.

        Args:
            config: the run config.
            log_dir: where a worker process writes ``tezzeret.log`` (default: the current
                folder).
        """
        if config.urza.url is not None:
            library = open_library(config.urza.url)
            location = ["--urza", config.urza.url]
        else:
            folder = config.urza.dir or Path(config.run.dir) / "urza"
            library = open_library(run_dir=folder)
            location = ["--run-dir", str(folder)]
        # ranks other than 0 keep off a shared bus: rank 0's messages are the run's
        bus = open_bus(config.growth.bus if speaks_on_bus() else "memory://")
        try:
            worker = CompileWorker.start(
                config.urza.worker,
                library,
                bus=bus,
                location=location,
                log_path=(log_dir or Path(".")) / "tezzeret.log",
            )
        except BaseException:
            bus.close()
            library.close()
            raise
        return cls(library, bus, worker)

    def wrap_options(self) -> dict[str, Any]:
        """Arguments for :func:`esper.wrap`: kernels are fetched from the library."""
        return {"kernel_source": UrzaArtifactSource(self.library)}

    def close(self) -> None:
        """Stop the compile worker and the monitor, close the bus and the library."""
        self.worker.stop()
        self.monitor.stop()
        self.bus.close()
        self.library.close()
