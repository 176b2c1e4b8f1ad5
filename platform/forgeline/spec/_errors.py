"""One error type for everything wrong with a workflow: a list of located problems, all at once."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from forgeline.errors import ForgelineError


@dataclass(frozen=True)
class Problem:
    """One thing wrong, located: ``file:line:col: field.path: message (did you mean 'x'?)``."""

    message: str
    file: str = "<workflow>"
    line: int | None = None  # 1-based
    col: int | None = None  # 1-based
    field: str = ""  # dotted path, e.g. "stages[1].lora.r" or "chat_sft[12].completion"
    hint: str | None = None  # a suggested fix, e.g. the "did you mean" candidate

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.col is not None:
                where += f":{self.col}"
        text = f"{where}: "
        if self.field:
            text += f"{self.field}: "
        text += self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class WorkflowError(ForgelineError):
    """Raised with every problem found; ``str()`` lists them one per line, sorted by position."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line or 0, p.col or 0, p.field, p.message))
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """``"did you mean 'x'?"`` for the closest candidate, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {matches[0]!r}?" if matches else None
