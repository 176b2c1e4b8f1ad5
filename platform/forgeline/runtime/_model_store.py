"""The one way to build a :class:`~forgeline.artifacts.ModelStore`: a Forgeline home's store with every
URI scheme the platform resolves plugged in.

The artifacts layer resolves paths, ``builtin://``, ``hf://`` and ``s3://`` itself; schemes that need
another layer (``mlflow://`` and ``models:/`` need tracking) are listed in :data:`SCHEMES` and attached
here. The planner, every stage worker, ``forgeline serve`` and the REST API build their stores through
:func:`model_store`, so a URI that plans also serves (a bare store said "scheme 'mlflow' is not
resolvable here" to ``forgeline serve``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from forgeline.artifacts import ModelStore, SchemeResolver
from forgeline.registry import OperatorRegistry, default_registry
from forgeline.runtime._mlflow_uris import MlflowModels
from forgeline.tracking import resolve_settings

# scheme -> resolver for (the store it serves, the tracking URI of its registry)
SCHEMES: dict[str, Callable[[ModelStore, str], SchemeResolver]] = {"mlflow": MlflowModels}


def model_store(
    home: Path, tracking_uri: str | None = None, registry: OperatorRegistry | None = None
) -> ModelStore:
    """The store under ``home/artifacts``; registry URIs resolve against ``tracking_uri`` (default:
    the home's own store, or ``MLFLOW_TRACKING_URI``)."""
    store = ModelStore(home / "artifacts", registry or default_registry())
    uri = tracking_uri or resolve_settings(None, "", home).uri
    for scheme, resolver in SCHEMES.items():
        store.schemes[scheme] = resolver(store, uri)
    return store
