"""A local Urza service process: start ``esper urza serve`` on a port and wait until it answers.

For tests, benchmarks and single-machine multi-process runs that want the shared service without
deploying it::

    with ServiceProcess(metadata_url="sqlite:///runs/urza/urza.sqlite3",
                        blob_url="file:///abs/runs/urza/blobs", token="s3cret") as service:
        library = HttpUrza(service.url, token="s3cret")

The process inherits the environment (S3 credentials, for instance); the token travels in
``ESPER_URZA_TOKEN``, never on the command line. Only the standard library is used here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from types import TracebackType

from esper.urza.api_models import TOKEN_ENV
from esper.urza.errors import LibraryUnavailableError


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """The Urza service in a child process, stopped when the ``with`` block ends.

    Args:
        metadata_url: SQL database the service uses.
        blob_url: blob store the service uses.
        token: bearer token clients must send.
        host: interface to listen on.
        port: TCP port; a free one when ``None``.
        env: extra environment variables for the process.
        options: further ``esper urza serve`` options, e.g. ``["--max-artifact-bytes", "4096"]``.
        startup_timeout: seconds to wait for ``/healthz`` to answer.
    """

    def __init__(
        self,
        *,
        metadata_url: str,
        blob_url: str,
        token: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        options: Sequence[str] = (),
        startup_timeout: float = 60.0,
    ) -> None:
        self.metadata_url = metadata_url
        self.blob_url = blob_url
        self.host = host
        self.port = port if port is not None else _free_port(host)
        self._env = {**os.environ, **(env or {}), TOKEN_ENV: token}
        self._options = list(options)
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        # Lives as long as the process (closed in __exit__), so no ``with`` block fits.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115

    @property
    def url(self) -> str:
        """The service's base URL."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServiceProcess:
        """Start the process and block until ``/healthz`` answers (or raise with its log)."""
        command = [
            sys.executable,
            "-m",
            "esper.cli",
            "--log-level",
            "WARNING",
            "urza",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--metadata-url",
            self.metadata_url,
            "--blob-url",
            self.blob_url,
            *self._options,
        ]
        self._process = subprocess.Popen(
            command, env=self._env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise LibraryUnavailableError(
                    f"the Urza service exited with status {self._process.returncode} while "
                    f"starting on {self.url}; its output:\n{self.output()}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1.0) as response,
            ):
                if response.status == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise LibraryUnavailableError(
            f"the Urza service did not answer on {self.url}/healthz within "
            f"{self._startup_timeout:.0f}s; its output:\n{self.output()}"
        )

    def output(self) -> str:
        """What the process wrote to stdout and stderr so far (the last 4000 characters)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        """Terminate the process (kill it after 10 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        self._log.close()
