"""Process helpers for tests that start drivers or servers: poll with deadlines, kill whole sessions."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any


def wait_for(
    predicate: Callable[[], bool],
    what: str,
    deadline_s: float = 120,
    proc: subprocess.Popen[str] | None = None,
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` at the deadline or when ``proc`` exits first."""
    end = time.time() + deadline_s
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{output}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {deadline_s:g} s waiting for {what}")


def kill_session(sid: int) -> None:
    """SIGKILL every process of a session (Ray gives its workers their own process groups)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        pid, s = (int(x) for x in line.split())
        if s == sid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def terminate(proc: subprocess.Popen[Any], grace_s: float = 15) -> None:
    """SIGTERM ``proc``, then SIGKILL it if it has not exited within ``grace_s``; reap it either way."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
