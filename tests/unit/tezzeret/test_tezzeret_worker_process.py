"""A worker process compiles for its parent's library and never outlives its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from esper.contracts import BlueprintSpec, CompileJobStatus
from esper.tezzeret import TezzeretProcess, find_or_enqueue, library_location
from esper.urza import open_library
from factories import linear_target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    state = (
        Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}").exists() else "X"
    )
    return state != "Z"


def test_worker_process_compiles_the_parents_library(tmp_path: Path) -> None:
    library = open_library(
        metadata_url=f"sqlite:///{tmp_path}/urza.sqlite3", blob_url=f"file://{tmp_path}/blobs"
    )
    target = linear_target(8, 8)
    request = find_or_enqueue(library, BlueprintSpec(family="lowrank_adapter"), target)
    assert request.job is not None
    worker = TezzeretProcess(library_location(library), log_path=tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if library.get_job(request.job.job_id).status is CompileJobStatus.SUCCEEDED:
                break
            time.sleep(0.1)
        assert library.get_job(request.job.job_id).status is CompileJobStatus.SUCCEEDED
    finally:
        worker.stop()
    assert worker.process.returncode is not None
    library.close()


def test_worker_process_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    parent_script = textwrap.dedent(
        f"""
        import sys, time
        from esper.tezzeret import TezzeretProcess
        worker = TezzeretProcess(["--run-dir", {str(tmp_path)!r}], poll_interval_s=0.05)
        print(worker.process.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    worker_pid = int(parent.stdout.readline())
    assert _alive(worker_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 30
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid), "the worker outlived the process that started it"
