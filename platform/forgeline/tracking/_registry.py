"""The MLflow model registry: versions registered by reference, aliases, lineage tags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException

from forgeline.tracking._runs import Tracker


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    source: str
    run_id: str | None
    aliases: tuple[str, ...]
    tags: dict[str, str]


def register_version(
    tracker: Tracker,
    name: str,
    source: str,
    run_id: str | None,
    tags: Mapping[str, str],
    alias: str | None = None,
    description: str | None = None,
) -> RegisteredVersion:
    """Create a model version pointing at ``source`` (a directory URI; nothing is uploaded)."""
    client = tracker.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine if it exists now
    mv = client.create_model_version(
        name=name, source=source, run_id=run_id, tags=dict(tags), description=description
    )
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return get_version(tracker, name, int(mv.version))


def get_version(tracker: Tracker, name: str, version: int) -> RegisteredVersion:
    mv: Any = tracker.client.get_model_version(name, str(version))
    return RegisteredVersion(
        name=name,
        version=int(mv.version),
        source=str(mv.source),
        run_id=mv.run_id,
        aliases=tuple(getattr(mv, "aliases", []) or []),
        tags=dict(mv.tags or {}),
    )


def version_by_alias(tracker: Tracker, name: str, alias: str) -> RegisteredVersion:
    mv: Any = tracker.client.get_model_version_by_alias(name, alias)
    return get_version(tracker, name, int(mv.version))
