"""Row-level validation and reading of the jsonl datasets a workflow declares under ``data:``.

This module owns what a valid row is for each dataset format (``sft``, ``preference``, ``text``) and
turns every malformed row into a located :class:`Problem` (``file:line:col: name[row].key: message``)
so ``forgeline validate`` can report them all at once, before any compute is spent. It is pure Python
(json and hashlib only) so the control plane can check data without torch. Row indices count data rows
from 0 and skip blank lines, so ``name[i]`` is also the row's index in :func:`read_dataset`'s result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgeline.spec._errors import Problem, WorkflowError, did_you_mean

__all__ = ["DATASET_FORMATS", "read_dataset", "validate_dataset"]

DATASET_FORMATS = ("sft", "preference", "text")
CHAT_ROLES = ("system", "user", "assistant")

_SFT_COMPLETION_KEYS = ("prompt", "completion")
_SFT_CHAT_KEYS = ("messages",)
_PREFERENCE_KEYS = ("prompt", "chosen", "rejected")
_TEXT_KEYS = ("text",)
_MESSAGE_KEYS = ("role", "content")


class _DuplicateKeyError(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last duplicate; a row that says two things is a bug in the data.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass
class _Collector:
    """Collects problems up to a limit and counts the rest, so huge broken files stay readable."""

    file: str
    name: str
    max_problems: int
    problems: list[Problem] = field(default_factory=list)
    omitted: int = 0
    first_omitted_line: int | None = None

    def add(
        self,
        line: int | None,
        where: str,
        message: str,
        *,
        col: int | None = None,
        hint: str | None = None,
    ) -> None:
        if len(self.problems) >= self.max_problems:
            self.omitted += 1
            if self.first_omitted_line is None:
                self.first_omitted_line = line
            return
        self.problems.append(
            Problem(message=message, file=self.file, line=line, col=col, field=where, hint=hint)
        )

    def finish(self) -> list[Problem]:
        if self.omitted:
            self.problems.append(
                Problem(
                    message=f"{self.omitted} more problem(s) omitted (max_problems={self.max_problems})",
                    file=self.file,
                    line=self.first_omitted_line,
                    field=self.name,
                )
            )
        return self.problems


@dataclass
class _Row:
    line: int
    index: int
    where: str  # "name[index]"
    value: dict[str, Any]


def _check_string(out: _Collector, row: _Row, key: str, value: Any, where: str | None = None) -> bool:
    where = where or f"{row.where}.{key}"
    if not isinstance(value, str):
        out.add(row.line, where, f"must be a string, got {_json_type(value)}")
        return False
    if not value.strip():
        out.add(row.line, where, "must not be empty" if not value else "must not be whitespace only")
        return False
    return True


def _check_keys(
    out: _Collector, row: _Row, required: tuple[str, ...], allowed: tuple[str, ...] | None = None
) -> bool:
    """Report missing and unknown keys; a misspelt key is one problem, not 'unknown' plus 'missing'."""
    allowed = allowed or required
    present = set(row.value)
    missing = [k for k in required if k not in present]
    unknown = [k for k in row.value if k not in allowed]
    explained: set[str] = set()
    for key in unknown:
        hint = did_you_mean(key, missing) or did_you_mean(key, allowed)
        suggested = hint is not None and any(hint == f"did you mean {m!r}?" for m in missing)
        if suggested:
            target = next(m for m in missing if hint == f"did you mean {m!r}?")
            explained.add(target)
            message = f"unknown key {key!r}; required key {target!r} is missing"
        else:
            message = f"unknown key {key!r} (allowed: {', '.join(allowed)})"
        out.add(row.line, f"{row.where}.{key}", message, hint=hint)
    for key in missing:
        if key not in explained:
            out.add(row.line, f"{row.where}.{key}", f"missing required key {key!r}")
    return not missing and not unknown


def _check_messages(out: _Collector, row: _Row, messages: Any) -> None:
    where = f"{row.where}.messages"
    if not isinstance(messages, list):
        out.add(row.line, where, f"must be an array of messages, got {_json_type(messages)}")
        return
    if not messages:
        out.add(row.line, where, "must contain at least one user and one assistant message")
        return
    roles: list[str | None] = []
    for j, message in enumerate(messages):
        mwhere = f"{where}[{j}]"
        if not isinstance(message, dict):
            out.add(
                row.line,
                mwhere,
                f"must be an object with 'role' and 'content', got {_json_type(message)}",
            )
            roles.append(None)
            continue
        _check_keys(out, _Row(row.line, row.index, mwhere, message), _MESSAGE_KEYS)
        role = message.get("role")
        if "role" in message:
            if not isinstance(role, str):
                out.add(row.line, f"{mwhere}.role", f"must be a string, got {_json_type(role)}")
                role = None
            elif role not in CHAT_ROLES:
                out.add(
                    row.line,
                    f"{mwhere}.role",
                    f"unknown role {role!r} (allowed: {', '.join(CHAT_ROLES)})",
                    hint=did_you_mean(role, CHAT_ROLES),
                )
                role = None
        roles.append(role)
        if "content" in message:
            _check_string(out, row, "content", message["content"], where=f"{mwhere}.content")
    if None in roles:
        return  # the conversation shape is meaningless until every role is valid
    if "user" not in roles:
        out.add(row.line, where, "must contain at least one 'user' message")
    if roles[-1] != "assistant":
        out.add(
            row.line,
            f"{where}[{len(roles) - 1}].role",
            f"the last message must be from 'assistant' (the completion to learn), got {roles[-1]!r}",
        )


def _check_sft(out: _Collector, row: _Row) -> None:
    keys = set(row.value)
    if "messages" in keys:
        if keys & set(_SFT_COMPLETION_KEYS):
            out.add(
                row.line,
                row.where,
                "a row is either {'prompt', 'completion'} or {'messages'}, not both",
            )
            return
        if _check_keys(out, row, _SFT_CHAT_KEYS, _SFT_CHAT_KEYS + _SFT_COMPLETION_KEYS):
            _check_messages(out, row, row.value["messages"])
        return
    if not keys & set(_SFT_COMPLETION_KEYS) and not any(did_you_mean(k, _SFT_COMPLETION_KEYS) for k in keys):
        # Neither shape is recognisable: say what is expected instead of guessing one.
        hints = [did_you_mean(k, _SFT_CHAT_KEYS) for k in keys]
        out.add(
            row.line,
            row.where,
            "an sft row needs 'prompt' and 'completion', or 'messages'"
            + (f"; found keys {', '.join(map(repr, row.value))}" if keys else ""),
            hint=next((h for h in hints if h), None),
        )
        return
    _check_keys(out, row, _SFT_COMPLETION_KEYS)
    for key in _SFT_COMPLETION_KEYS:
        if key in row.value:
            _check_string(out, row, key, row.value[key])


def _check_preference(out: _Collector, row: _Row) -> None:
    _check_keys(out, row, _PREFERENCE_KEYS)
    ok = {key: _check_string(out, row, key, row.value[key]) for key in _PREFERENCE_KEYS if key in row.value}
    if ok.get("chosen") and ok.get("rejected") and row.value["chosen"] == row.value["rejected"]:
        out.add(row.line, f"{row.where}.rejected", "must differ from 'chosen' (nothing to prefer)")


def _check_text(out: _Collector, row: _Row) -> None:
    _check_keys(out, row, _TEXT_KEYS)
    if "text" in row.value:
        _check_string(out, row, "text", row.value["text"])


_CHECKS = {"sft": _check_sft, "preference": _check_preference, "text": _check_text}


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        yield from enumerate(f, start=1)


def _scan(path: Path, fmt: str, name: str, max_problems: int) -> tuple[list[dict[str, Any]], list[Problem]]:
    out = _Collector(file=str(path), name=name, max_problems=max(1, max_problems))
    check = _CHECKS.get(fmt)
    if check is None:
        out.add(
            None,
            f"{name}.format",
            f"unknown dataset format {fmt!r} (allowed: {', '.join(DATASET_FORMATS)})",
            hint=did_you_mean(fmt, DATASET_FORMATS),
        )
        return [], out.finish()
    if not path.is_file():
        out.add(None, name, "dataset file does not exist" if not path.exists() else "not a regular file")
        return [], out.finish()
    rows: list[dict[str, Any]] = []
    index = 0
    for number, raw in _lines(path):
        try:
            # utf-8-sig on the first line only: editors on Windows write a BOM there.
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            out.add(number, f"{name}[{index}]", f"not valid UTF-8 (byte {exc.start + 1})", col=exc.start + 1)
            index += 1
            continue
        if not text.strip():
            continue
        # Without its line ending, an error at the end of the row gets a column on this row.
        text = text.rstrip("\r\n")
        where = f"{name}[{index}]"
        try:
            value = json.loads(text, object_pairs_hook=_reject_duplicates)
        except json.JSONDecodeError as exc:
            out.add(number, where, f"invalid JSON: {exc.msg}", col=exc.colno)
            index += 1
            continue
        except _DuplicateKeyError as exc:
            out.add(number, f"{where}.{exc.args[0]}", f"duplicate key {exc.args[0]!r}")
            index += 1
            continue
        if not isinstance(value, dict):
            out.add(number, where, f"each line must be a JSON object, got {_json_type(value)}")
        else:
            before = len(out.problems) + out.omitted
            check(out, _Row(number, index, where, value))
            if len(out.problems) + out.omitted == before:
                rows.append(value)
        index += 1
    if index == 0:
        out.add(None, name, "dataset is empty (no rows)")
    return rows, out.finish()


def validate_dataset(path: Path, fmt: str, *, name: str, max_problems: int = 50) -> list[Problem]:
    """Every problem in the jsonl file at ``path`` read as format ``fmt``; empty when it is valid.

    At most ``max_problems`` problems are listed; a final problem says how many more were found.
    """
    return _scan(Path(path), fmt, name, max_problems)[1]


def read_dataset(path: Path, fmt: str, *, name: str | None = None) -> list[dict[str, Any]]:
    """The rows of a valid dataset, in file order; raises :class:`WorkflowError` listing every problem."""
    path = Path(path)
    rows, problems = _scan(path, fmt, name or path.stem, max_problems=50)
    if problems:
        raise WorkflowError(problems)
    return rows
