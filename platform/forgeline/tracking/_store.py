"""Where tracking lives: the embedded SQLite store, its migration, and experiment creation.

The driver calls :func:`prepare` before any worker touches the store: a fresh SQLite database is
created and migrated once (MLflow's migrations take ~10 s and fail when several processes race).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@dataclass(frozen=True)
class TrackingSettings:
    """MLflow location: a tracking URI, an experiment name, and the local artifact root."""

    uri: str
    experiment: str
    artifact_root: Path  # where run artifacts go when the store is local

    @property
    def is_sqlite(self) -> bool:
        return self.uri.startswith("sqlite:")

    @property
    def is_local(self) -> bool:
        """A store on this machine's disk (SQLite or a file store), not a tracking server."""
        return self.is_sqlite or self.uri.startswith(("file:", "/"))

    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite:
            return None
        return Path(self.uri.split("sqlite:///", 1)[1])


def default_home(cwd: Path | None = None) -> Path:
    """``.forgeline/`` under the current directory, or ``FORGELINE_HOME``."""
    env = os.environ.get("FORGELINE_HOME")
    return Path(env).resolve() if env else (cwd or Path.cwd()).resolve() / ".forgeline"


def resolve_settings(uri: str | None, experiment: str, home: Path) -> TrackingSettings:
    """MLFLOW_TRACKING_URI (the operator's override) > the workflow's URI > embedded SQLite under ``home``."""
    chosen = os.environ.get("MLFLOW_TRACKING_URI") or uri or f"sqlite:///{home / 'mlflow.db'}"
    return TrackingSettings(uri=chosen, experiment=experiment, artifact_root=home / "artifacts" / "mlflow")


def prepare(settings: TrackingSettings) -> str:
    """Create/migrate the store and the experiment; return the experiment id."""
    from mlflow.tracking import MlflowClient

    db = settings.sqlite_path()
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=settings.uri, registry_uri=settings.uri)
    exp = client.get_experiment_by_name(settings.experiment)
    if exp is not None:
        return str(exp.experiment_id)
    # A local store keeps run artifacts under the home; a tracking server decides itself (its
    # --default-artifact-root / --artifacts-destination), since a path on this machine would mean
    # nothing to the server's other clients.
    location = None
    if settings.is_local:
        settings.artifact_root.mkdir(parents=True, exist_ok=True)
        location = settings.artifact_root.as_uri()
    try:
        return str(client.create_experiment(settings.experiment, artifact_location=location))
    except Exception:
        # Another driver created it between our read and write.
        exp = client.get_experiment_by_name(settings.experiment)
        if exp is None:
            raise
        return str(exp.experiment_id)
