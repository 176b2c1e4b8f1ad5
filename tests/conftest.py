"""Shared fixtures: a migrated MLflow SQLite template (copied per test), a session Ray for the
integration tier, a test operator registry, and the gpu tier's clean skip."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray workers start from the driver's environment: make the test operators (tests/opkit.py) importable.
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.pop("MLFLOW_TRACKING_URI", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated MLflow SQLite DB, created once (migrations take ~10 s)."""
    from forgeline.tracking import TrackingSettings, prepare

    d = tmp_path_factory.mktemp("mlflow-template")
    prepare(TrackingSettings(f"sqlite:///{d / 'mlflow.db'}", "template", d / "artifacts" / "mlflow"))
    return d / "mlflow.db"


@pytest.fixture
def home(tmp_path: Path, mlflow_template: Path) -> Path:
    """A fresh Forgeline home (.forgeline) with a ready MLflow store."""
    h = tmp_path / ".forgeline"
    h.mkdir()
    shutil.copy(mlflow_template, h / "mlflow.db")
    return h


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One embedded Ray for the integration tier (the driver reuses it and never shuts it down)."""
    import ray

    from forgeline.runtime._ray import RaySettings, ensure_ray

    ensure_ray(RaySettings(num_cpus=2))  # the driver's embedded settings: loopback only
    yield
    ray.shutdown()
