"""Real servers for tests: free ports, waiting for a port, private redis-server processes.

Importable from any test module (``pythonpath = ["tests"]`` in pyproject.toml):
``from servers import free_port, start_redis_server``.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    """Block until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


def start_redis_server(
    port: int, workdir: Path, *, persistent: bool = False
) -> subprocess.Popen[bytes]:
    """A private ``redis-server`` on ``port``, ready to use.

    With ``persistent``, every write is appended and fsynced to ``workdir/appendonly*`` so a
    server restarted on the same folder comes back with its streams and consumer groups.
    """
    persistence = (
        ("--appendonly", "yes", "--appendfsync", "always")
        if persistent
        else (
            "--appendonly",
            "no",
        )
    )
    process = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", *persistence, "--dir", str(workdir)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, timeout=10)
    return process
