"""The main job through the real CLI in a fresh process: real Ray, real MLflow, real operators.

It must finish, register a model version with the candidate alias, and a rerun must run nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def forgeline(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forgeline.cli", *args, "--home", str(home)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=800,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_quickstart_runs_end_to_end_then_fully_cached(home: Path) -> None:
    first = forgeline("run", "workflows/quickstart.yaml", home=home)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "FINISHED" in first.stdout
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'quickstart-tiny-llama'")
    assert len(versions) == 1
    mv = client.get_model_version_by_alias("quickstart-tiny-llama", "candidate")
    assert mv.tags["forgeline.sha256"]
    assert Path(mv.source.removeprefix("file://")).is_dir()  # registered by reference, not uploaded

    second = forgeline("run", "workflows/quickstart.yaml", home=home)
    assert second.returncode == 0, second.stdout + second.stderr
    assert " cached" in second.stderr
    assert "succeeded" not in second.stdout.split("FINISHED", 1)[1].split("\n", 1)[0]
    assert len(client.search_model_versions("name = 'quickstart-tiny-llama'")) == 1

    status = forgeline("status", home=home)
    assert status.returncode == 0, status.stderr
    assert "cached" in status.stdout
