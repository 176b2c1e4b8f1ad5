"""The MLflow model registry: versions registered by reference, aliases, lineage tags.

A version's weights never travel through the tracking server: its ``forgeline.uri`` tag names where
they are (and ``forgeline.sha256`` what they are). On a local store the version's ``source`` is that
directory too. A tracking server refuses a local path as a source (it would mean nothing to its other
clients), so there the version's source is a tiny pointer artifact of the registering run
(``forgeline-ref/ref.json``) and consumers read ``forgeline.uri`` -- on a cluster, shared storage mounted
at the same path everywhere, or an object-store URI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

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

    @property
    def uri(self) -> str:
        """Where the weights are (the pointer's target when the source is a pointer artifact)."""
        return self.tags.get(TAG_URI) or self.source


TAG_URI = "forgeline.uri"
TAG_METRIC_PREFIX = "forgeline.metric."  # + "<stage>.<metric>": quality evidence on a version
# + "<stage>.rows" (URI of the evaluate stage's per-row samples.jsonl) and "<stage>.set" (the digest of
# what it scored): what a promotion needs to pair a candidate with production on the same rows.
TAG_EVAL_PREFIX = "forgeline.eval."


def version_metrics(version: RegisteredVersion) -> dict[str, dict[str, float]]:
    """``{stage: {metric: value}}`` from a version's ``forgeline.metric.*`` tags."""
    out: dict[str, dict[str, float]] = {}
    for key, value in version.tags.items():
        if key.startswith(TAG_METRIC_PREFIX):
            stage, _, metric = key[len(TAG_METRIC_PREFIX) :].partition(".")
            try:
                out.setdefault(stage, {})[metric] = float(value)
            except ValueError:
                continue
    return out


def _remote(tracking_uri: str) -> bool:
    return urlparse(tracking_uri).scheme in ("http", "https", "databricks")


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
    all_tags = {**tags, TAG_URI: source}
    registered_source = source
    if _remote(tracker.uri) and urlparse(source).scheme in ("", "file"):
        if not run_id:
            raise ValueError(f"registering local {source} on tracking server {tracker.uri} needs a run id")
        client.log_dict(
            run_id, {"uri": source, "sha256": tags.get("forgeline.sha256", "")}, "forgeline-ref/ref.json"
        )
        registered_source = f"runs:/{run_id}/forgeline-ref"
    mv = client.create_model_version(
        name=name, source=registered_source, run_id=run_id, tags=all_tags, description=description
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


def list_models(tracker: Tracker) -> list[dict[str, Any]]:
    """Every registered model: name, aliases (alias → version), latest version, description."""
    out = []
    for rm in tracker.client.search_registered_models(max_results=1000):
        aliases = {str(k): int(v) for k, v in (getattr(rm, "aliases", None) or {}).items()}
        latest = max((int(v.version) for v in (rm.latest_versions or [])), default=None)
        out.append(
            {"name": rm.name, "aliases": aliases, "latest_version": latest, "description": rm.description}
        )
    return sorted(out, key=lambda m: m["name"])


def list_versions(tracker: Tracker, name: str) -> list[RegisteredVersion]:
    """Every version of ``name``, newest first (MlflowException when the model does not exist)."""
    tracker.client.get_registered_model(name)
    found = tracker.client.search_model_versions(f"name = '{_quote(name)}'", max_results=10_000)
    versions = [get_version(tracker, name, int(mv.version)) for mv in found]
    return sorted(versions, key=lambda v: -v.version)


def model_aliases(tracker: Tracker, name: str) -> dict[str, int]:
    rm: Any = tracker.client.get_registered_model(name)
    return {str(k): int(v) for k, v in (getattr(rm, "aliases", None) or {}).items()}


def alias_version(tracker: Tracker, name: str, alias: str) -> int | None:
    """The version ``alias`` points at, or None when the alias is not set."""
    return model_aliases(tracker, name).get(alias)


def set_alias(tracker: Tracker, name: str, alias: str, version: int) -> None:
    tracker.client.set_registered_model_alias(name, alias, str(version))


def delete_alias(tracker: Tracker, name: str, alias: str) -> None:
    with contextlib.suppress(MlflowException):  # not set: nothing to delete
        tracker.client.delete_registered_model_alias(name, alias)


def set_version_tags(tracker: Tracker, name: str, version: int, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        tracker.client.set_model_version_tag(name, str(version), key, value)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def model_tags(tracker: Tracker, name: str) -> dict[str, str]:
    rm: Any = tracker.client.get_registered_model(name)
    return dict(rm.tags or {})


def set_model_tag(tracker: Tracker, name: str, key: str, value: str) -> None:
    tracker.client.set_registered_model_tag(name, key, value)
