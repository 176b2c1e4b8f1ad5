"""The stage store: published stage results, content-addressed by cache key.

``<root>/stages/<key>/`` holds a stage's directory outputs (``merged/``, ``report/``, ...) and a
manifest whose ``meta`` records the stage, its value outputs, per-output digests, final metrics and
the components of its key. The directory's existence with a readable manifest *is* the cache entry:
publication is one atomic rename. ``<root>/stages/index/<workflow>/<stage>.json`` remembers the last
key each stage had, so ``plan --explain`` can say which component changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline.artifacts._manifest import (
    Manifest,
    digest_of,
    new_staging_dir,
    publish,
    read_manifest,
    verify,
    write_text_atomic,
)


@dataclass
class StageRecord:
    """A finished stage: where its outputs are and what they contain."""

    key: str
    path: Path
    digest: str  # digest of everything the stage published
    outputs: dict[
        str, dict[str, Any]
    ]  # name -> {"type": "dir", "digest", "path"} | {"type": "value", "value"}
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def output_digest(self, name: str) -> str | None:
        out = self.outputs.get(name)
        if out is None:
            return None
        if out["type"] == "dir":
            return str(out["digest"])
        return "value:" + json.dumps(out["value"], sort_keys=True)

    def output_path(self, name: str) -> Path | None:
        out = self.outputs.get(name)
        if out is None or out["type"] != "dir":
            return None
        return self.path / name


class StageStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.stages_dir = root / "stages"

    def path(self, key: str) -> Path:
        return self.stages_dir / key

    def lookup(self, key: str) -> StageRecord | None:
        final = self.path(key)
        m = read_manifest(final)
        if m is None or verify(final):
            return None
        return _record(key, final, m)

    def staging(self, key: str) -> Path:
        return new_staging_dir(self.path(key))

    def publish(
        self,
        key: str,
        staging: Path,
        *,
        values: dict[str, Any],
        metrics: dict[str, float],
        meta: dict[str, Any],
        replace: bool = False,
    ) -> StageRecord:
        """Seal ``staging`` (dir outputs are its top-level folders) and publish it under ``key``;
        ``replace`` swaps out an intact earlier publication instead of keeping it."""
        from forgeline.artifacts._manifest import file_table

        table = file_table(staging)
        outputs: dict[str, dict[str, Any]] = {}
        for child in sorted(p for p in staging.iterdir() if p.is_dir()):
            outputs[child.name] = {"type": "dir", "digest": digest_of(table, child.name)}
        for name, value in values.items():
            outputs[name] = {"type": "value", "value": value}
        full_meta = {**meta, "key": key, "outputs": outputs, "metrics": metrics}
        manifest = publish(staging, self.path(key), full_meta, replace=replace)
        return _record(key, self.path(key), manifest)

    # ------------------------------------------------------------ explain index
    def _index_path(self, workflow: str, stage: str) -> Path:
        return self.stages_dir / "index" / workflow / f"{stage}.json"

    def remember(self, workflow: str, stage: str, key: str, components: dict[str, str]) -> None:
        write_text_atomic(
            self._index_path(workflow, stage), json.dumps({"key": key, "components": components}, indent=1)
        )

    def last(self, workflow: str, stage: str) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self._index_path(workflow, stage).read_text())
            return data
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ gc
    def indexed_keys(self) -> set[str]:
        """The last key of every stage of every workflow (what a rerun would reuse)."""
        keys = set()
        for f in (self.stages_dir / "index").glob("*/*.json"):
            try:
                keys.add(str(json.loads(f.read_text())["key"]))
            except (OSError, ValueError, KeyError):
                continue
        return keys

    def collect(
        self, protected: set[str], older_than_s: float, dry_run: bool = True
    ) -> list[tuple[str, int]]:
        """Remove published stages that are not protected and older than ``older_than_s``.

        Returns ``(key, bytes)`` of what was (or, with ``dry_run``, would be) removed. Removal first
        renames the entry out of the key namespace, so a concurrent lookup never sees half of it.
        """
        now = time.time()
        removed: list[tuple[str, int]] = []
        if not self.stages_dir.is_dir():
            return removed
        for entry in sorted(self.stages_dir.iterdir()):
            if entry.name.startswith(".") or entry.name == "index" or entry.name in protected:
                continue
            m = read_manifest(entry)
            published = float(m.meta.get("published_at", 0)) if m else entry.stat().st_mtime
            if now - published < older_than_s:
                continue
            size = sum(int(f.get("size", 0)) for f in m.files.values()) if m else 0
            removed.append((entry.name, size))
            if not dry_run:
                doomed = entry.with_name(f".trash-{entry.name}-{os.getpid()}")
                entry.rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        return removed


def _record(key: str, path: Path, m: Manifest) -> StageRecord:
    outputs = dict(m.meta.get("outputs", {}))
    for name, out in outputs.items():
        if out["type"] == "dir":
            out["path"] = str(path / name)
    return StageRecord(
        key=key,
        path=path,
        digest=m.digest,
        outputs=outputs,
        metrics=dict(m.meta.get("metrics", {})),
        meta=m.meta,
    )
