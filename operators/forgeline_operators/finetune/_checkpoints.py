"""Where a fine-tune keeps its resumable checkpoints, and which of them is complete.

``ctx.work_dir`` is deleted after every attempt, so checkpoints live beside the stage store instead:
``<stages>/.finetune-checkpoints/<cache key>/checkpoint-<step>/``. The cache key covers every input
of the stage (params, base model content, data sha256), so a rerun after ``kill -9`` -- same key --
finds exactly its own checkpoints and a changed stage never resumes from a stranger's. The directory
starts with a dot, so neither ``gc`` nor staging cleanup touches it; the operator removes it once the
final checkpoint has moved into the stage's published outputs.

The transformers Trainer writes ``checkpoint-<step>/`` in place; a crash mid-save leaves it half
written. After the Trainer reports a save (``on_save``, after weights, optimizer, scheduler, RNG and
trainer state are on disk) a ``forgeline-complete.json`` marker is written by temp file + rename, and
only marked checkpoints are ever resumed from.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from forgeline.artifacts import write_text_atomic

__all__ = [
    "COMPLETE_MARKER",
    "discard_incomplete",
    "durable_dir",
    "latest_complete",
    "mark_complete",
    "step_of",
]

COMPLETE_MARKER = "forgeline-complete.json"
CHECKPOINTS_DIRNAME = ".finetune-checkpoints"
# StageStore.staging(key) is "<stages>/.staging-<key>-<pid>-<8 hex>" (forgeline.artifacts).
_STAGING = re.compile(r"^\.staging-(?P<key>[A-Za-z0-9_.-]+?)-\d+-[0-9a-f]{8}$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def stage_key(output_dir: Path) -> str | None:
    """The cache key of the stage whose staging directory is ``output_dir`` (None if not a staging dir)."""
    m = _STAGING.match(output_dir.name)
    return m.group("key") if m else None


def durable_dir(output_dir: Path, fallback_identity: dict[str, Any]) -> Path:
    """The checkpoint directory of this stage, stable across attempts.

    Keyed by the stage's cache key when ``output_dir`` is a stage-store staging directory (the
    runtime's case); otherwise by a hash of ``fallback_identity`` (operator tests with a plain
    directory).
    """
    key = stage_key(output_dir)
    if key is None:
        blob = json.dumps(fallback_identity, sort_keys=True, default=str).encode()
        key = "local-" + hashlib.sha256(blob).hexdigest()[:32]
    return output_dir.parent / CHECKPOINTS_DIRNAME / key


def step_of(checkpoint: Path) -> int:
    m = _CHECKPOINT.match(checkpoint.name)
    if not m:
        raise ValueError(f"not a checkpoint directory: {checkpoint}")
    return int(m.group(1))


def mark_complete(checkpoint: Path, info: dict[str, Any]) -> None:
    """Mark a fully written checkpoint as resumable (atomically, fsynced: temp file + rename)."""
    write_text_atomic(
        checkpoint / COMPLETE_MARKER, json.dumps({"step": step_of(checkpoint), **info}, sort_keys=True)
    )


def _checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=step_of)


def latest_complete(root: Path) -> Path | None:
    """The marked checkpoint with the highest step, or None."""
    complete = [p for p in _checkpoints(root) if (p / COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


def discard_incomplete(root: Path) -> list[str]:
    """Remove checkpoints a crash left half written; returns their names."""
    removed = []
    for p in _checkpoints(root):
        if not (p / COMPLETE_MARKER).is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed
