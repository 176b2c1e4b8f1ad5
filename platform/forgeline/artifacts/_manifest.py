"""Checkpoint manifests and atomic publication.

A published directory holds ``forgeline-manifest.json``: every file's size and sha256 plus a digest
over them. Publication writes into a staging directory on the same filesystem, fsyncs every file and
the manifest, then renames the staging directory into place and fsyncs the parent -- so a reader sees
either nothing or a complete, verified directory, and a ``kill -9`` mid-write leaves only a staging
directory that the next run deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline.artifacts._confine import PathEscapeError, confined

MANIFEST_NAME = "forgeline-manifest.json"
STAGING_PREFIX = ".staging-"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> Iterator[Path]:
    base = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.name == MANIFEST_NAME and p.parent == root:
                continue
            # A published directory vouches for its bytes: a symlink out of it would let a later
            # reader (or a copy) take some other file's content under this digest.
            if p.is_symlink() and not p.resolve().is_relative_to(base):
                raise PathEscapeError(
                    f"{root}: {p.relative_to(root).as_posix()!r} is a symlink pointing outside"
                )
            yield p


def file_table(root: Path) -> dict[str, dict[str, Any]]:
    """``relative path -> {sha256, size}`` for every file under ``root`` (manifest excluded)."""
    return {
        p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in _files(root)
    }


def digest_of(table: dict[str, dict[str, Any]], prefix: str = "") -> str:
    """One sha256 over (path, sha256) pairs; ``prefix`` restricts to a subdirectory."""
    h = hashlib.sha256()
    for rel in sorted(table):
        if prefix and not rel.startswith(prefix.rstrip("/") + "/"):
            continue
        h.update(rel[len(prefix.rstrip("/")) + 1 if prefix else 0 :].encode())
        h.update(b"\0")
        h.update(table[rel]["sha256"].encode())
        h.update(b"\n")
    return h.hexdigest()


def dir_digest(root: Path) -> str:
    """Content digest of a directory (the same value a manifest records as ``digest``)."""
    return digest_of(file_table(root))


@dataclass
class Manifest:
    files: dict[str, dict[str, Any]]
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"version": 1, "digest": self.digest, "files": self.files, "meta": self.meta},
            indent=2,
            sort_keys=True,
        )


def read_manifest(root: Path) -> Manifest | None:
    try:
        data = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return Manifest(files=data.get("files", {}), digest=data.get("digest", ""), meta=data.get("meta", {}))


def verify(root: Path, *, deep: bool = False) -> list[str]:
    """Problems with a published directory: missing/changed files (sizes; sha256 too when ``deep``)."""
    m = read_manifest(root)
    if m is None:
        return [f"{root}: no readable {MANIFEST_NAME}"]
    problems = []
    for rel, info in m.files.items():
        try:
            p = confined(root, rel, what=f"{root}/{MANIFEST_NAME}: entry")
        except PathEscapeError as e:  # a tampered manifest must not make us stat or read elsewhere
            problems.append(str(e))
            continue
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != info["size"]:
            problems.append(f"{p}: size {p.stat().st_size} != {info['size']}")
        elif deep and sha256_file(p) != info["sha256"]:
            problems.append(f"{p}: sha256 mismatch")
    return problems


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file atomically (temp file in the same directory, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent, directory=True)


def new_staging_dir(final: Path) -> Path:
    """A fresh staging directory beside ``final`` (same filesystem, so the rename is atomic)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # The writer's pid is in the name so cleanup never removes a live writer's directory.
    staging = final.parent / f"{STAGING_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def publish(
    staging: Path, final: Path, meta: dict[str, Any] | None = None, *, replace: bool = False
) -> Manifest:
    """Seal ``staging`` with a manifest and move it to ``final`` atomically.

    If ``final`` already holds a complete publication (a concurrent identical stage), that one wins
    and ``staging`` is removed -- unless ``replace`` (a rerun the user forced), when the old one is
    renamed out of the way first, so a reader sees the old or the new publication, never a mix. One
    damaged since it was published is always replaced.
    """
    table = file_table(staging)
    for rel in table:
        _fsync_path(staging / rel)
    manifest = Manifest(files=table, digest=digest_of(table), meta=dict(meta or {}))
    manifest.meta.setdefault("published_at", time.time())
    mpath = staging / MANIFEST_NAME
    with open(mpath, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(staging):
        _fsync_path(Path(dirpath), directory=True)
    try:
        os.rename(staging, final)
    except OSError:
        existing = read_manifest(final)
        if existing is None:
            raise
        if not verify(final) and not replace:
            shutil.rmtree(staging, ignore_errors=True)
            return existing
        # Forced, or the earlier publication was damaged since (a file lost or truncated).
        doomed = final.with_name(f".trash-{final.name}-{os.getpid()}-{time.time_ns()}")
        os.rename(final, doomed)
        os.rename(staging, final)
        shutil.rmtree(doomed, ignore_errors=True)
    _fsync_path(final.parent, directory=True)
    return manifest


def pid_alive(pid: int) -> bool:
    """Whether a local process exists and is not a zombie (a killed, unreaped child counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def clean_staging(parent: Path) -> int:
    """Remove staging directories whose writer process is gone; returns how many were removed."""
    if not parent.is_dir():
        return 0
    removed = 0
    for p in parent.iterdir():
        if not (p.name.startswith(STAGING_PREFIX) and p.is_dir()):
            continue
        parts = p.name.rsplit("-", 2)
        pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
        if pid is not None and pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(p)
            removed += 1
    return removed
