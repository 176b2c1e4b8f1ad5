"""Cancelling a workflow run from outside its driver: the one implementation behind ``forgeline cancel``
and ``POST /v1/runs/{id}/cancel``, which only format its :class:`CancelResult`.

The driver's Ctrl-C path cancels the running stages and marks the runs KILLED, so cancelling is a
SIGINT to the driver's pid (recorded on the run with its host), then waiting for the run to leave
RUNNING. Measured: a SIGINT that lands while the driver is still starting Ray for its first stage can
be lost (the driver then runs on), so a driver still RUNNING after the wait gets one more. A run whose
driver is gone -- before the call, or one that exited without closing its run -- is marked KILLED here.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forgeline.errors import ForgelineError

if TYPE_CHECKING:
    from forgeline.tracking import Tracker

CANCEL_WAIT_S = 5.0  # how long to wait for the driver after each SIGINT (the API's cancel_wait_s)
MAX_SIGNALS = 2  # a third would land in the Ctrl-C cleanup the second one started


class RunNotFound(ForgelineError, LookupError):
    """No workflow run with that id in the store."""


class NotCancellableHere(ForgelineError, RuntimeError):
    """The run is driven from another host: its pid means nothing here."""

    def __init__(self, run_id: str, host: str | None) -> None:
        self.host = host
        super().__init__(f"run {run_id} is driven from host {host!r}; cancel it there")


@dataclass(frozen=True)
class CancelResult:
    run_id: str
    # not_running: nothing to do | stopped: the driver closed the run after a SIGINT |
    # reaped: the driver is gone and the runs were marked KILLED here | still_running: it ignored us
    outcome: str
    status: str  # MLflow status of the run when the call returned
    pid: int | None = None
    signals: int = 0  # SIGINTs sent

    @property
    def cancelled(self) -> bool:
        """Whether the call acted on the run."""
        return self.outcome != "not_running"

    @property
    def message(self) -> str:
        sent = f"sent SIGINT to driver {self.pid} of run {self.run_id}"
        if self.signals > 1:
            sent += f" {self.signals} times (the first was lost)"
        if self.outcome == "not_running":
            return f"run {self.run_id} is {self.status}; nothing to cancel"
        if self.outcome == "stopped":
            return f"{sent}: its stages were cancelled and the runs marked {self.status}"
        if self.outcome == "still_running":
            return f"{sent}: it has not stopped yet; follow the run, or cancel again"
        if self.signals:
            return f"{sent}: it exited without closing its run; marked {self.status}"
        return f"the driver of run {self.run_id} is gone; marked {self.status}"


def _status(tracker: Tracker, run_id: str) -> str:
    return str(tracker.get_run(run_id).info.status)


def cancel_run(
    tracker: Tracker, run_id: str, *, wait_s: float = CANCEL_WAIT_S, poll_s: float = 0.2
) -> CancelResult:
    """Cancel the workflow run ``run_id``: SIGINT its driver (twice at most, ``wait_s`` apart) and
    wait for the run to leave RUNNING; a dead driver's runs are marked KILLED. Raises
    :class:`RunNotFound` and :class:`NotCancellableHere`; a driver that outlives both signals is
    ``outcome="still_running"``, not an error."""
    from mlflow.exceptions import MlflowException

    from forgeline.artifacts import pid_alive
    from forgeline.runtime._driver import reap_dead_drivers
    from forgeline.tracking import TAG_DRIVER_HOST, TAG_DRIVER_PID, TAG_ROLE

    if wait_s <= 0:
        raise ValueError(f"wait_s must be positive, got {wait_s}: two SIGINTs at once break the cleanup")
    try:
        run = tracker.get_run(run_id)
    except MlflowException:
        run = None
    if run is None or run.data.tags.get(TAG_ROLE) != "workflow":
        raise RunNotFound(f"no workflow run {run_id}")
    if run.info.status != "RUNNING":
        return CancelResult(run_id, "not_running", str(run.info.status))
    tags = run.data.tags
    if tags.get(TAG_DRIVER_HOST) != socket.gethostname():
        raise NotCancellableHere(run_id, tags.get(TAG_DRIVER_HOST))
    pid = int(tags.get(TAG_DRIVER_PID, "0") or 0)
    signals = 0
    while pid > 0 and signals < MAX_SIGNALS and pid_alive(pid):
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:  # it exited between the check and the signal
            break
        signals += 1
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            status = _status(tracker, run_id)
            if status != "RUNNING":
                return CancelResult(run_id, "stopped", status, pid, signals)
            if not pid_alive(pid):
                break
            time.sleep(poll_s)
    if pid > 0 and pid_alive(pid):
        return CancelResult(run_id, "still_running", _status(tracker, run_id), pid, signals)
    status = _status(tracker, run_id)
    if status != "RUNNING":  # it closed its run on its way out (or another cancel did)
        return CancelResult(run_id, "stopped" if signals else "not_running", status, pid, signals)
    reap_dead_drivers(tracker, run.info.experiment_id)
    return CancelResult(run_id, "reaped", _status(tracker, run_id), pid if pid > 0 else None, signals)
