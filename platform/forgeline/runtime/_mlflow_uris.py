"""Registered model versions as model URIs: ``mlflow://models/NAME@ALIAS``, ``mlflow://models/NAME/VERSION``
and MLflow's own ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (the same versions).

Resolved through the registry to the version's source directory; the fingerprint is the version's
recorded sha256, so moving an alias to another version changes the cache keys of stages using it, and
both spellings of one version share their cache keys. A name, alias or version that does not exist is
a :class:`~forgeline.artifacts.UriError` naming the URI and what the registry has instead.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from mlflow.exceptions import MlflowException

from forgeline.artifacts import ModelStore, ParsedUri, RegistryRef, UriError, parse_uri
from forgeline.tracking import (
    RegisteredVersion,
    Tracker,
    TrackingSettings,
    get_version,
    list_models,
    list_versions,
    model_aliases,
    version_by_alias,
)

_SHOWN = 10  # names listed in an error before "and N more"


def _listed(items: list[str], empty: str) -> str:
    if not items:
        return empty
    more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _ref(parsed: ParsedUri) -> RegistryRef:
    # parse_uri gives every mlflow URI its reference; a ParsedUri built by hand gets one here.
    ref = parsed.ref or parse_uri(f"mlflow://{parsed.target}").ref
    assert ref is not None
    return ref


class MlflowModels:
    """The ``mlflow`` scheme of a :class:`~forgeline.artifacts.ModelStore` (a ``SchemeResolver``)."""

    def __init__(self, models: ModelStore, tracking_uri: str) -> None:
        self.models = models  # a version whose source is remote (s3://, hf://) is materialized by it
        self.tracking_uri = tracking_uri
        self._tracker: Tracker | None = None

    def tracker(self) -> Tracker:
        # Lazily: opening a SQLite store creates/migrates it, which plain `plan` must not do.
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
        return self._tracker

    def version(self, parsed: ParsedUri) -> RegisteredVersion:
        ref = _ref(parsed)
        uri = parsed.uri or str(ref)
        db = TrackingSettings(self.tracking_uri, "", Path()).sqlite_path()
        if db is not None and not db.exists():
            # Opening it would create (and migrate, ~10 s) an empty store only to find nothing.
            raise UriError(f"{uri!r}: no MLflow store at {db}, so no registered models (another --home?)")
        tracker = self.tracker()
        try:
            if ref.alias is not None:
                return version_by_alias(tracker, ref.name, ref.alias)
            assert ref.version is not None
            return get_version(tracker, ref.name, ref.version)
        except MlflowException:
            raise UriError(self._missing(uri, ref)) from None

    def _missing(self, uri: str, ref: RegistryRef) -> str:
        """What exists instead of the version ``ref`` names (the registry's own message says less)."""
        tracker = self.tracker()
        try:
            aliases = model_aliases(tracker, ref.name)
        except MlflowException:
            names = [m["name"] for m in list_models(tracker)]
            return (
                f"{uri!r}: no registered model {ref.name!r} in {self.tracking_uri} "
                f"(registered: {_listed(names, 'none')})"
            )
        versions = [str(v.version) for v in sorted(list_versions(tracker, ref.name), key=lambda v: v.version)]
        if ref.alias is not None:
            pointing = _listed([f"{a} -> {v}" for a, v in sorted(aliases.items())], "none")
            return (
                f"{uri!r}: model {ref.name!r} has no alias {ref.alias!r} (aliases: {pointing}; "
                f"versions: {_listed(versions, 'none')})"
            )
        known = _listed(versions, "none")
        return f"{uri!r}: model {ref.name!r} has no version {ref.version} (versions: {known})"

    def materialize(self, parsed: ParsedUri) -> Path:
        mv = self.version(parsed)
        src = urlparse(mv.uri)
        if src.scheme in ("", "file"):
            path = Path(src.path)
            if not path.is_dir():
                uri = parsed.uri or str(_ref(parsed))
                raise UriError(f"{uri!r}: version {mv.version} source {mv.uri} is missing")
            return path
        return self.models.materialize(mv.uri)

    def fingerprint(self, parsed: ParsedUri) -> str:
        mv = self.version(parsed)
        return f"mlflow:{mv.name}/{mv.version}:{mv.tags.get('forgeline.sha256', mv.uri)}"
