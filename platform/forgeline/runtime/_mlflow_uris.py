"""``mlflow://models/NAME@ALIAS`` and ``mlflow://models/NAME/VERSION`` as model URIs.

Resolved through the registry to the version's source directory; the fingerprint is the version's
recorded sha256, so moving an alias to another version changes the cache keys of stages using it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from forgeline.artifacts import ModelStore, ParsedUri, UriError
from forgeline.tracking import RegisteredVersion, Tracker, get_version, version_by_alias


def _version(tracker: Tracker, parsed: ParsedUri) -> RegisteredVersion:
    target = parsed.target
    if not target.startswith("models/"):
        raise UriError(
            f"mlflow://{target}: expected mlflow://models/NAME@ALIAS or mlflow://models/NAME/VERSION"
        )
    ref = target[len("models/") :]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return version_by_alias(tracker, name, alias)
        name, _, version = ref.rpartition("/")
        return get_version(tracker, name, int(version))
    except (ValueError, Exception) as e:
        raise UriError(f"mlflow://{target}: {e}") from e


def attach_mlflow(models: ModelStore, tracking_uri: str) -> ModelStore:
    trackers: list[Tracker] = []

    def tracker() -> Tracker:
        # Lazily: opening a SQLite store creates/migrates it, which plain `plan` must not do.
        if not trackers:
            trackers.append(Tracker(tracking_uri))
        return trackers[0]

    def materialize(parsed: ParsedUri) -> Path:
        mv = _version(tracker(), parsed)
        src = urlparse(mv.uri)
        if src.scheme in ("", "file"):
            path = Path(src.path)
            if not path.is_dir():
                raise UriError(f"mlflow://{parsed.target}: version {mv.version} source {mv.uri} is missing")
            return path
        return models.materialize(mv.uri)

    def fingerprint(parsed: ParsedUri) -> str:
        mv = _version(tracker(), parsed)
        return f"mlflow:{mv.name}/{mv.version}:{mv.tags.get('forgeline.sha256', mv.uri)}"

    models.extra["mlflow"] = materialize
    models.extra_fingerprint["mlflow"] = fingerprint
    return models
