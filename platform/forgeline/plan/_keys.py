"""Cache keys: sha256 over what determines a stage's result.

A key covers the stage kind, backend and operator version, its resolved params (everything that
changes what it computes; not its name, ``needs``, caching or timeouts), the sha256 of every dataset
it reads, the fingerprint of the base model, and the content digest of every upstream output it
depends on. Because upstream *content* is hashed (not upstream keys), a stage whose upstream reran
but produced identical bytes is still a cache hit (early cutoff), and a key for a stage below a
not-yet-run stage is unknown until that stage finishes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

_EXCLUDED_PARAMS = {"name", "needs", "cache", "timeout_minutes", "resources"}


def stage_params(stage: Any) -> dict[str, Any]:
    """The params that enter the key (and are logged to MLflow), by alias, JSON-typed."""
    data: dict[str, Any] = stage.model_dump(mode="json", by_alias=True, exclude=_EXCLUDED_PARAMS)
    return data


@dataclass
class KeyInputs:
    """Every component of a key, kept so ``plan --explain`` can say what changed."""

    kind: str
    backend: str | None
    operator_version: str
    params: dict[str, Any]
    datasets: dict[str, str] = field(default_factory=dict)  # field -> sha256
    models: dict[str, str] = field(default_factory=dict)  # field -> base model fingerprint
    upstream: dict[str, str] = field(default_factory=dict)  # "field" or "after:stage" -> digest

    def components(self) -> dict[str, str]:
        out = {
            "kind": self.kind,
            "backend": str(self.backend),
            "operator_version": self.operator_version,
            "params": _digest(self.params),
        }
        for k, v in self.datasets.items():
            out[f"dataset:{k}"] = v
        for k, v in self.models.items():
            out[f"model:{k}"] = v
        for k, v in self.upstream.items():
            out[f"upstream:{k}"] = v
        return out

    def key(self) -> str:
        return _digest(self.components())


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def diff_components(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Human reasons a key changed: which components differ."""
    reasons = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            if k not in old:
                reasons.append(f"{k} added")
            elif k not in new:
                reasons.append(f"{k} removed")
            else:
                reasons.append(f"{k} changed")
    return reasons
