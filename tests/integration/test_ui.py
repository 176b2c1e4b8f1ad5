"""`forgeline ui` serves the MLflow UI on the embedded store (a real mlflow server process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from forgeline_operators.ports import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]


def test_ui_serves_the_embedded_store(home: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgeline.cli", "ui", "--port", str(port), "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10"
    try:
        deadline = time.time() + 120
        body = None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = json.loads(resp.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "MLflow UI did not answer within 120 s"
        assert "template" in {e["name"] for e in body["experiments"]}  # the store the fixture prepared
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
