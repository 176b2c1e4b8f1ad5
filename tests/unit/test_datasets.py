"""Row-level dataset validation: a corpus of malformed jsonl rows, each located by line and field."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from forgeline.artifacts import sha256_file
from forgeline.spec._datasets import read_dataset, validate_dataset
from forgeline.spec._errors import WorkflowError


def write(tmp_path: Path, lines: list[str], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(**kwargs: object) -> str:
    return json.dumps(kwargs)


def chat(*messages: tuple[str, object]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]})


GOOD_SFT = row(prompt="Q: 2+2?\nA:", completion=" 4")
GOOD_CHAT = chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."))

# (format, lines, [(line, field, substring of message or hint)]): every problem the file must produce.
BAD_CASES = {
    "invalid-json": ("sft", [GOOD_SFT, '{"prompt": "a", "completion": "b"'], [(2, "d[1]", "invalid JSON")]),
    "trailing-comma": ("text", ['{"text": "a",}'], [(1, "d[0]", "invalid JSON")]),
    "array-row": ("text", ['["a"]'], [(1, "d[0]", "must be a JSON object, got array")]),
    "string-row": ("text", ['"a"'], [(1, "d[0]", "got string")]),
    "misspelt-completion": (
        "sft",
        [GOOD_SFT, row(prompt="a", complition="b")],
        [(2, "d[1].complition", "did you mean 'completion'?")],
    ),
    "missing-completion": ("sft", [row(prompt="a")], [(1, "d[0].completion", "missing required key")]),
    "unknown-extra-key": (
        "sft",
        [row(prompt="a", completion="b", source="web")],
        [(1, "d[0].source", "unknown key 'source'")],
    ),
    "neither-shape": (
        "sft",
        [row(question="a")],
        [(1, "d[0]", "needs 'prompt' and 'completion', or 'messages'")],
    ),
    "both-shapes": (
        "sft",
        [json.dumps({"prompt": "a", "completion": "b", "messages": []})],
        [(1, "d[0]", "not both")],
    ),
    "number-prompt": (
        "sft",
        [row(prompt=3, completion="b")],
        [(1, "d[0].prompt", "must be a string, got number")],
    ),
    "null-completion": ("sft", [row(prompt="a", completion=None)], [(1, "d[0].completion", "got null")]),
    "empty-completion": (
        "sft",
        [row(prompt="a", completion="")],
        [(1, "d[0].completion", "must not be empty")],
    ),
    "blank-prompt": ("sft", [row(prompt=" \n\t", completion="b")], [(1, "d[0].prompt", "whitespace only")]),
    "messages-not-list": ("sft", [row(messages="hi")], [(1, "d[0].messages", "must be an array")]),
    "messages-empty": ("sft", [row(messages=[])], [(1, "d[0].messages", "at least one user")]),
    "message-not-object": ("sft", [row(messages=["hi"])], [(1, "d[0].messages[0]", "got string")]),
    "bad-role": (
        "sft",
        [chat(("usr", "a"), ("assistant", "b"))],
        [(1, "d[0].messages[0].role", "did you mean 'user'?")],
    ),
    "misspelt-content": (
        "sft",
        [json.dumps({"messages": [{"role": "user", "contnet": "a"}, {"role": "assistant", "content": "b"}]})],
        [(1, "d[0].messages[0].contnet", "did you mean 'content'?")],
    ),
    "no-user": ("sft", [chat(("system", "a"), ("assistant", "b"))], [(1, "d[0].messages", "'user'")]),
    "last-not-assistant": (
        "sft",
        [chat(("user", "a"), ("assistant", "b"), ("user", "c"))],
        [(1, "d[0].messages[2].role", "last message must be from 'assistant'")],
    ),
    "empty-content": (
        "sft",
        [chat(("user", "a"), ("assistant", ""))],
        [(1, "d[0].messages[1].content", "must not be empty")],
    ),
    "content-list": (
        "sft",
        [chat(("user", ["a"]), ("assistant", "b"))],
        [(1, "d[0].messages[0].content", "got array")],
    ),
    "preference-missing-rejected": (
        "preference",
        [row(prompt="a", chosen="b")],
        [(1, "d[0].rejected", "missing required key")],
    ),
    "preference-misspelt": (
        "preference",
        [row(prompt="a", chosen="b", rejectd="c")],
        [(1, "d[0].rejectd", "did you mean 'rejected'?")],
    ),
    "preference-equal": (
        "preference",
        [row(prompt="a", chosen="same", rejected="same")],
        [(1, "d[0].rejected", "must differ from 'chosen'")],
    ),
    "preference-bool": (
        "preference",
        [row(prompt="a", chosen=True, rejected="c")],
        [(1, "d[0].chosen", "got boolean")],
    ),
    "text-missing": (
        "text",
        [row(body="a")],
        [(1, "d[0].body", "unknown key 'body'"), (1, "d[0].text", "missing")],
    ),
    "text-misspelt": ("text", [row(txt="a")], [(1, "d[0].txt", "did you mean 'text'?")]),
    "text-empty": ("text", [row(text="   ")], [(1, "d[0].text", "whitespace only")]),
    "duplicate-key": ("text", ['{"text": "a", "text": "b"}'], [(1, "d[0].text", "duplicate key")]),
    "blank-lines-shift-lines-not-indices": (
        "text",
        [row(text="a"), "", "   ", row(text=1)],
        [(4, "d[1].text", "got number")],
    ),
    "several-rows-all-reported": (
        "sft",
        [row(prompt="a"), GOOD_SFT, row(prompt="a", completion=2), "nope"],
        [
            (1, "d[0].completion", "missing required key"),
            (3, "d[2].completion", "got number"),
            (4, "d[3]", "invalid JSON"),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_rows_are_located(tmp_path: Path, case: str) -> None:
    fmt, lines, expected = BAD_CASES[case]
    path = write(tmp_path, lines)
    problems = validate_dataset(path, fmt, name="d")
    got = [(p.line, p.field, str(p)) for p in problems]
    assert len(problems) == len(expected), got
    for (line, field, text), problem in zip(expected, problems, strict=True):
        assert problem.file == str(path)
        assert (problem.line, problem.field) == (line, field), got
        assert text in str(problem), got
        assert str(problem).startswith(f"{path}:{line}")


def test_invalid_json_has_column(tmp_path: Path) -> None:
    path = write(tmp_path, ['{"text": "a" "b"}'])
    (problem,) = validate_dataset(path, "text", name="d")
    assert problem.col == 14
    assert str(problem).startswith(f"{path}:1:14: d[0]: invalid JSON")


GOOD_CASES = {
    "sft-completion": ("sft", [GOOD_SFT, row(prompt="x", completion="y")]),
    "sft-chat": (
        "sft",
        [GOOD_CHAT, chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))],
    ),
    "sft-mixed-shapes": ("sft", [GOOD_SFT, GOOD_CHAT]),
    "preference": ("preference", [row(prompt="p", chosen="good", rejected="bad")]),
    "text": ("text", [row(text="Once upon a time."), row(text="ünïcödé ✓")]),
}


@pytest.mark.parametrize("case", sorted(GOOD_CASES))
def test_good_datasets_validate_and_read(tmp_path: Path, case: str) -> None:
    fmt, lines = GOOD_CASES[case]
    path = write(tmp_path, ["", *lines, ""])  # blank lines anywhere are skipped
    assert validate_dataset(path, fmt, name="d") == []
    assert read_dataset(path, fmt) == [json.loads(line) for line in lines]


def test_bom_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\r\n{"text": "b"}\r\n')
    assert read_dataset(path, "text") == [{"text": "a"}, {"text": "b"}]


def test_invalid_utf8_is_located(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    (problem,) = validate_dataset(path, "text", name="d")
    assert (problem.line, problem.field) == (2, "d[1]")
    assert "UTF-8" in problem.message


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_file(tmp_path: Path, lines: list[str]) -> None:
    (problem,) = validate_dataset(write(tmp_path, lines), "text", name="d")
    assert "empty" in problem.message


def test_missing_file(tmp_path: Path) -> None:
    (problem,) = validate_dataset(tmp_path / "nope.jsonl", "text", name="d")
    assert "does not exist" in problem.message


def test_unknown_format(tmp_path: Path) -> None:
    (problem,) = validate_dataset(write(tmp_path, [GOOD_SFT]), "stf", name="d")
    assert problem.field == "d.format"
    assert problem.hint == "did you mean 'sft'?"


def test_max_problems_counts_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, [row(text=i) for i in range(10)])
    problems = validate_dataset(path, "text", name="d", max_problems=3)
    assert [p.line for p in problems] == [1, 2, 3, 4]
    assert "7 more problem(s) omitted" in problems[-1].message
    assert len(validate_dataset(path, "text", name="d")) == 10


def test_read_dataset_raises_with_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, [row(text=""), row(text="ok"), row(txt="x")])
    with pytest.raises(WorkflowError) as info:
        read_dataset(path, "text", name="corpus")
    assert [(p.line, p.field) for p in info.value.problems] == [(1, "corpus[0].text"), (3, "corpus[2].txt")]
    assert f"{path}:3: corpus[2].txt: unknown key 'txt'" in str(info.value)


def test_sha256_file(tmp_path: Path) -> None:
    path = write(tmp_path, [GOOD_SFT])
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
