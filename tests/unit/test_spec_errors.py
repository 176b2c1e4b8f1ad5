"""The broken-YAML corpus: every file in tests/data/broken/ must fail with exactly the problems its
leading ``# expect:`` comments list -- all of them in one go, each located and worded as promised.

An expectation reads ``# expect: [FILE:]LINE[:COL]: FIELD: TEXT``: FILE (relative to the workflow) is
given when the problem lies in another file (a dataset row), COL is left out where the problem has
none (row-level dataset problems locate a line), FIELD may be empty (YAML syntax), and TEXT is a
substring of the problem's ``message (hint)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from forgeline.spec import Problem, WorkflowError, load_workflow

BROKEN = Path(__file__).resolve().parents[1] / "data" / "broken"
CORPUS = sorted(BROKEN.glob("*.yaml"))
EXPECT = re.compile(
    r"^# expect: (?:(?P<file>[^\s:]+\.jsonl):)?(?P<line>\d+)(?::(?P<col>\d+))?: (?P<field>\S*): (?P<text>.+)$"
)


@dataclass(frozen=True)
class Expected:
    file: Path
    line: int
    col: int | None
    field: str
    text: str

    def matches(self, p: Problem) -> bool:
        return (
            Path(p.file).resolve() == self.file
            and (p.line, p.col, p.field) == (self.line, self.col, self.field)
            and self.text in rendered(p)
        )

    def __str__(self) -> str:
        col = f":{self.col}" if self.col is not None else ""
        return f"{self.file.name}:{self.line}{col}: {self.field}: ...{self.text}..."


def rendered(p: Problem) -> str:
    return p.message + (f" ({p.hint})" if p.hint else "")


def expectations(path: Path) -> list[Expected]:
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break  # expectations live in the leading comment block only
        if not line.startswith("# expect:"):
            continue
        m = EXPECT.match(line)
        assert m, f"{path.name}: malformed expectation {line!r}"
        target = (path.parent / m["file"]).resolve() if m["file"] else path.resolve()
        col = int(m["col"]) if m["col"] else None
        out.append(Expected(target, int(m["line"]), col, m["field"], m["text"]))
    return out


def load_problems(path: Path) -> list[Problem]:
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    return info.value.problems


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 20
    for path in CORPUS:
        assert expectations(path), f"{path.name} has no '# expect:' lines"


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_broken_workflow_reports_every_expected_problem(path: Path) -> None:
    problems = load_problems(path)
    expected = expectations(path)
    listing = "\n".join(str(p) for p in problems)
    unmatched = list(problems)
    for exp in expected:
        hit = next((p for p in unmatched if exp.matches(p)), None)
        assert hit is not None, f"expected {exp}\nnot among the problems:\n{listing}"
        unmatched.remove(hit)
    assert len(problems) == len(expected), "unexpected problems:\n" + "\n".join(map(str, unmatched))


def test_dataset_row_problems_are_located_in_the_jsonl_file() -> None:
    problems = load_problems(BROKEN / "dataset_bad_rows.yaml")
    rows = BROKEN / "data" / "bad_rows.jsonl"
    assert problems and all(Path(p.file) == rows.resolve() for p in problems)
    assert str(problems[0]).startswith(f"{rows.resolve()}:2: rows[1].complition: ")


def test_problems_print_as_file_line_col_field_message_hint() -> None:
    path = BROKEN / "unknown_stage_kind.yaml"
    (problem,) = load_problems(path)
    assert str(problem) == (
        f"{path}:9:11: stages[0].kind: unknown stage kind 'evalute' (did you mean 'evaluate'?)"
    )


def test_problems_are_sorted_by_position_and_printed_one_per_line() -> None:
    path = BROKEN / "many_mistakes.yaml"
    with pytest.raises(WorkflowError) as info:
        load_workflow(path)
    problems = info.value.problems
    assert len(problems) >= 5
    assert len({p.field.split(".")[0] for p in problems}) >= 4, "mistakes span several stages"
    positions = [(p.line, p.col) for p in problems]
    assert positions == sorted(positions)
    assert str(info.value).splitlines() == [str(p) for p in problems]
    for line in str(info.value).splitlines():
        assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: stages\[\d\]\S*: \S", line), line


def test_sorting_does_not_depend_on_discovery_order() -> None:
    a = Problem("second", "w.yaml", 9, 1, "b")
    b = Problem("first", "w.yaml", 2, 5, "a")
    c = Problem("first col", "w.yaml", 2, 3, "a")
    assert [p.message for p in WorkflowError([a, b, c]).problems] == ["first col", "first", "second"]


def test_problem_without_position_or_field_still_renders() -> None:
    assert str(Problem("cannot read workflow", "w.yaml")) == "w.yaml: cannot read workflow"
    assert str(Problem("m", "w.yaml", 3, None, "f", "h")) == "w.yaml:3: f: m (h)"


def test_unreadable_workflow_is_one_problem(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError) as info:
        load_workflow(tmp_path / "absent.yaml")
    (problem,) = info.value.problems
    assert "cannot read workflow" in problem.message
