"""A Tezzeret worker in a child process: ``esper tezzeret worker`` on a given library.

A worker *thread* shares the training process's interpreter lock, so its Python-heavy compiles
(validation, ``torch.export``) slow the training steps around them; a worker *process* compiles on
another core and reads and writes the same Urza library (an embedded SQLite file and blob folder,
or the shared service). The child watches its parent and exits when the parent dies, so a killed
training run never leaves a worker behind.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from esper.errors import ConfigurationError
from esper.urza import ArtifactLibrary

logger = logging.getLogger(__name__)


def library_location(library: ArtifactLibrary) -> list[str]:
    """The ``esper`` command-line options that open ``library`` in another process.

    Raises:
        ConfigurationError: the library has no URL another process could open (e.g. its
            database URL hides a password).
    """
    service_url = getattr(library, "url", None)
    metadata_url = getattr(getattr(library, "metadata", None), "url", None)
    blob_url = getattr(getattr(library, "blobs", None), "url", None)
    if isinstance(service_url, str):
        return ["--urza", service_url]  # the token comes from ESPER_URZA_TOKEN, inherited
    if isinstance(metadata_url, str) and isinstance(blob_url, str) and "***" not in metadata_url:
        return ["--metadata-url", metadata_url, "--blob-url", blob_url]
    raise ConfigurationError(
        f"a worker process cannot tell where {library!r} is: open the library from "
        "password-less URLs or an Urza service, or compile on a thread instead"
    )


class TezzeretProcess:
    """``esper tezzeret worker`` as a child process of this one.

    Args:
        location: options naming the library (see :func:`library_location`, or
            ``["--run-dir", path]`` for an embedded library).
        log_path: where the worker's output goes (discarded when ``None``).
        poll_interval_s: the worker's sleep between claims when the queue is empty.
        threads: intra-op threads of the worker (leave the other cores to training).
    """

    def __init__(
        self,
        location: list[str],
        *,
        log_path: Path | None = None,
        poll_interval_s: float = 0.05,
        threads: int = 1,
    ) -> None:
        command = [sys.executable, "-m", "esper.cli", "--log-level", "INFO", "tezzeret", "worker"]
        command += [*location, "--poll-interval", str(poll_interval_s)]
        command += ["--parent-pid", str(os.getpid())]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self._log = log_path.open("ab") if log_path is not None else None
        output = self._log if self._log is not None else subprocess.DEVNULL
        # A session of its own: a Ctrl-C meant for training reaches the worker only through stop().
        self.process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        logger.info("started Tezzeret worker process %d", self.process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to stop (SIGTERM), then kill it if it does not."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._log is not None:
            self._log.close()
