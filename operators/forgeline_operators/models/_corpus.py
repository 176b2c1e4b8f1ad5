"""The pre-training corpus of ``builtin://tiny-llama``: how it is made, stored, read and split.

Two sources, both licence-clean and available offline: docstrings harvested with :mod:`ast` from the
standard library of the running interpreter (PSF licence; nothing is imported or executed), and
seeded templated prose plus short chat exchanges drawn from :data:`WORDS`, the same vocabulary the
shipped datasets (``workflows/data``) use, so the tokenizer and the model have seen their surface
style without ever seeing a dataset answer. Documents are stored as plain ``.txt`` files, separated
by :data:`DOC_SEPARATOR`; a fixed, content-independent rule holds every 20th document out.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from pathlib import Path

__all__ = [
    "CATEGORIES",
    "DOC_SEPARATOR",
    "NEGATIVE",
    "POSITIVE",
    "WORDS",
    "read_corpus",
    "split_documents",
    "write_corpus",
]

# Two blank lines: cleaned docstrings never keep more than one (see _clean), so this cannot occur
# inside a document.
DOC_SEPARATOR = "\n\n\n"
HELD_OUT_EVERY = 20
STDLIB_BUDGET_CHARS = 1_400_000
# Packages whose docstrings are mostly test scaffolding, generated tables or other languages.
_SKIP_PARTS = {
    "test",
    "tests",
    "idle_test",
    "lib2to3",
    "site-packages",
    "ensurepip",
    "encodings",
    "pydoc_data",
}

CATEGORIES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "gray"),
    "animal": ("dog", "cat", "horse", "bird", "fish", "mouse", "lion", "sheep", "goat", "rabbit"),
    "fruit": ("apple", "pear", "banana", "grape", "lemon", "cherry", "plum", "peach", "melon", "mango"),
    "tool": ("hammer", "saw", "drill", "wrench", "spade", "rake", "chisel", "ladder", "brush", "knife"),
}
WORDS: tuple[str, ...] = (
    *(w for group in CATEGORIES.values() for w in group),
    *("river", "stone", "house", "window", "garden", "forest", "letter", "paper", "table", "chair"),
    *("music", "light", "water", "cloud", "bread", "train", "road", "bridge", "field", "market"),
    *("small", "quiet", "bright", "cold", "warm", "early", "late", "heavy", "soft", "round"),
)
POSITIVE: tuple[str, ...] = ("wonderful", "great", "excellent", "lovely", "delightful", "superb", "pleasant")
NEGATIVE: tuple[str, ...] = ("terrible", "awful", "boring", "disappointing", "dreadful", "poor", "unpleasant")
_SUBJECTS: tuple[str, ...] = ("food", "film", "service", "hotel", "book", "concert", "room", "trip", "staff")


def _clean(doc: str) -> str:
    lines = [line.rstrip() for line in doc.splitlines()]
    text = "\n".join(line for line in lines if not line.lstrip().startswith((">>>", "...")))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _is_prose(doc: str) -> bool:
    # Keeps English-ish text: long enough to say something, mostly letters and spaces.
    if len(doc) < 60:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in doc)
    return letters / len(doc) > 0.8


def harvest_stdlib_docs(budget_chars: int = STDLIB_BUDGET_CHARS) -> list[str]:
    """Docstrings of the interpreter's stdlib, in path order, deduplicated, up to ``budget_chars``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue  # a handful of stdlib files are deliberately invalid (bad-syntax fixtures)
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef))]
        for node in nodes:
            raw = ast.get_docstring(node, clean=True)
            doc = _clean(raw) if raw else ""
            if not _is_prose(doc) or doc in seen:
                continue
            seen.add(doc)
            docs.append(doc)
            total += len(doc)
            if total >= budget_chars:
                return docs
    return docs


def style_documents(seed: int, count: int = 3000) -> list[str]:
    """Templated prose and chat exchanges over :data:`WORDS`: the datasets' words, none of their tasks."""
    rng = random.Random(seed)
    docs: list[str] = []
    for category, members in CATEGORIES.items():
        docs.append(" ".join(f"{w.capitalize()} is a kind of {category}." for w in members))
    # Unique documents only: a repeat could land on both sides of the train/held-out split.
    seen: set[str] = set(docs)
    while len(docs) < count:
        a, b, c = rng.sample(WORDS, 3)
        subject = rng.choice(_SUBJECTS)
        praise, blame = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        category = rng.choice(list(CATEGORIES))
        member = rng.choice(CATEGORIES[category])
        kind = rng.randrange(4)
        if kind == 0:
            doc = (
                f"The {a} stood near the {b}, and the {c} was not far away. "
                f"We said {a}, then {b}, then {c}, and the list ended there."
            )
        elif kind == 1:
            doc = (
                f"Last week I visited a new place. The {subject} was {praise}, but the "
                f"{rng.choice(_SUBJECTS)} was {blame}. Some people liked it and some did not."
            )
        elif kind == 2:
            doc = f"A {member} is a {category}. People often put a {member} next to a {a} or a {b}."
        else:
            # Chat exchanges teach the role tokens the template of _build uses; the requests are
            # descriptive, never the instruction templates of the datasets.
            doc = (
                f"<|user|>\nTell me something about the {a}.</s>\n"
                f"<|assistant|>\nThe {a} is often found near a {b}. Many people find it {praise}.</s>"
            )
        if doc not in seen:
            seen.add(doc)
            docs.append(doc)
    return docs


def write_corpus(corpus_dir: Path, seed: int) -> dict[str, int]:
    """Writes ``stdlib_docs.txt`` and ``style.txt``; returns document counts per file."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    parts = {"stdlib_docs.txt": harvest_stdlib_docs(), "style.txt": style_documents(seed)}
    for name, docs in parts.items():
        (corpus_dir / name).write_text(DOC_SEPARATOR.join(docs) + "\n", encoding="utf-8")
    return {name: len(docs) for name, docs in parts.items()}


def read_corpus(corpus_dir: Path) -> list[str]:
    """All documents of every ``*.txt`` in ``corpus_dir``, files in name order."""
    docs: list[str] = []
    for path in sorted(corpus_dir.glob("*.txt")):
        docs.extend(d.strip() for d in path.read_text(encoding="utf-8").split(DOC_SEPARATOR) if d.strip())
    return docs


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """(train, held_out): every :data:`HELD_OUT_EVERY`-th document is held out."""
    train = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held
