"""Confinement: every file Forgeline writes (or reads back) by a name that came from outside stays
inside the directory it belongs to.

Outside names are object-store keys, hub file names, archive members, manifest entries, and endpoint /
model / alias names that become file names. :func:`safe_relpath` checks such a name as text (no
``..``, absolute paths, backslashes, NUL or control characters, percent-encoded dots or separators,
over-long components); :func:`confined` then joins it to its root and resolves it, so a symlink
already on disk cannot carry the write elsewhere. :func:`single_name` is the stricter form for a name
that must be exactly one file name. :func:`check_tree` refuses a downloaded or unpacked tree holding a
symlink that points out of it, and :func:`extract_zip` unpacks an archive member by member through
:func:`confined`. Every refusal is a :class:`PathEscapeError` naming what was refused and where it
came from.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

from forgeline.errors import ForgelineError

__all__ = ["PathEscapeError", "check_tree", "confined", "extract_zip", "safe_relpath", "single_name"]

# Linux limits: NAME_MAX and PATH_MAX, in bytes.
_MAX_COMPONENT = 255
_MAX_PATH = 4096
_SINGLE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class PathEscapeError(ForgelineError, ValueError):
    """A name from outside that would reach (or is not) a path inside its root; the message names it."""


def _control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _decoded(text: str) -> str:
    """``text`` with percent-encoding undone until it no longer changes (``%252e`` is ``%2e`` is ``.``)."""
    for _ in range(8):
        nxt = unquote(text)
        if nxt == text:
            break
        text = nxt
    return text


def safe_relpath(name: str, *, what: str) -> PurePosixPath:
    """``name`` as a relative POSIX path that cannot leave its root, or :class:`PathEscapeError`.

    Empty and ``.`` components are dropped (``a//b``, ``./a``), as a filesystem would read them.
    ``what`` says where the name came from (``"s3 object key 's3://b/k'"``) for the message.
    """
    if not isinstance(name, str) or not name:
        raise PathEscapeError(f"{what}: empty name")
    shown = repr(name) if len(name) <= 200 else repr(name[:200] + "...")
    if "\0" in name or _control(name):
        raise PathEscapeError(f"{what} {shown}: contains NUL or control characters")
    if "\\" in name:
        raise PathEscapeError(f"{what} {shown}: contains a backslash (a Windows separator)")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise PathEscapeError(f"{what} {shown}: is an absolute path")
    for raw in name.split("/"):
        # A component that only becomes dangerous once decoded (by a client, a proxy, a later tool).
        dec = _decoded(raw)
        if dec == raw:
            continue
        if dec in (".", "..") or "/" in dec or "\\" in dec or _control(dec):
            raise PathEscapeError(
                f"{what} {shown}: percent-encodes '.', '..', a separator or a control character"
            )
    if len(name.encode()) > _MAX_PATH:
        raise PathEscapeError(f"{what} {shown}: longer than {_MAX_PATH} bytes")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise PathEscapeError(f"{what} {shown}: contains a '..' component (it would leave its directory)")
        if len(part.encode()) > _MAX_COMPONENT:
            raise PathEscapeError(f"{what} {shown}: a component is longer than {_MAX_COMPONENT} bytes")
        parts.append(part)
    if not parts:
        raise PathEscapeError(f"{what} {shown}: names no file")
    return PurePosixPath(*parts)


def confined(root: Path, name: str, *, what: str) -> Path:
    """``root / name``, refused unless it resolves (symlinks included) inside ``root``."""
    rel = safe_relpath(name, what=what)
    base = root.resolve()
    target = base.joinpath(*rel.parts)
    # resolve() follows every symlink that already exists on the way (a planted `sub -> /etc`).
    if not target.resolve().is_relative_to(base):
        raise PathEscapeError(f"{what} {name!r}: resolves outside {base} through a symlink")
    return target


def single_name(name: str, *, what: str) -> str:
    """``name`` when it is one plain file name (letters, digits, ``.``, ``_``, ``-``; starts with a
    letter or digit; at most 200 characters), else :class:`PathEscapeError`."""
    if not isinstance(name, str) or not _SINGLE.match(name):
        shown = repr(name)[:210]
        raise PathEscapeError(
            f"{what} {shown}: must be 1-200 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_tree(root: Path, *, what: str) -> None:
    """Refuse a tree under ``root`` with a symlink that resolves outside it or with a non-file entry
    (device, FIFO, socket): a downloaded or unpacked model is plain files and directories."""
    base = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                if not p.resolve().is_relative_to(base):
                    raise PathEscapeError(f"{what} {rel!r}: a symlink pointing outside ({os.readlink(p)!r})")
            elif not (p.is_dir() or p.is_file()):
                raise PathEscapeError(f"{what} {rel!r}: not a regular file or directory")


def extract_zip(
    archive: Path,
    dest: Path,
    *,
    select: Callable[[zipfile.ZipInfo], bool] | None = None,
    keep_mode: bool = False,
) -> list[Path]:
    """Unpack the members of ``archive`` that ``select`` accepts into ``dest``, each through
    :func:`confined`; symlink members are refused. Returns the files written."""
    written: list[Path] = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            if select is not None and not select(info):
                continue
            what = f"{archive.name} member"
            target = confined(dest, info.filename, what=what)
            mode = (info.external_attr >> 16) & 0o170777  # unix mode in the high 16 bits
            if (mode & 0o170000) == 0o120000:
                raise PathEscapeError(f"{what} {info.filename!r}: is a symlink")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            # The parent may have been made a symlink by an earlier member: re-check right before writing.
            confined(dest, info.filename, what=what)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            if keep_mode:
                target.chmod((mode & 0o777) or 0o644)
            written.append(target)
    return written
