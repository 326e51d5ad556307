"""Run a command in its own process group and SIGKILL it the moment a condition holds.

Shared by the crash-and-resume tests (cache locally and on S3, 2-process training).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_and_kill_when(
    argv: list[str],
    ready: Callable[[], bool],
    log: Path,
    timeout: float,
    poll: float = 0.01,
    **popen: Any,
) -> int:
    """Start ``argv`` (output to ``log``), SIGKILL its whole group once ``ready()`` is true;
    returns its exit code (``-SIGKILL`` when the kill landed). Nothing it started may outlive
    the call, whatever happens."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **popen,
        )
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if ready():
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(poll)
            proc.wait(timeout=60)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc.returncode
