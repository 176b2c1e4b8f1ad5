"""Regenerate the shipped datasets in ``workflows/data`` deterministically (seeded).

    PYTHONPATH=platform:operators python scripts/make_datasets.py [--out workflows/data] [--seed 0]

Five templated instruction tasks small enough for the 1.5M-parameter ``builtin://tiny-llama`` to
learn in a few hundred CPU steps and scored by exact match: repeat a word list, name its first or
last word, classify a one-sentence review, name the category of a word. Words come from the
vocabulary the model was pre-trained on (``forgeline_operators.models._corpus``). Every prompt is
unique across ``held_out``, ``chat_sft`` and ``prefs``, so held-out rows are new instances of the
same templates. ``corpus_sample`` holds documents of the corpus' held-out slice (never trained on).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from forgeline_operators.models import _corpus

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("repeat", "first_word", "last_word", "sentiment", "category")
# Rows per task in each file; small enough to train in seconds, large enough to measure accuracy.
PER_TASK = {"held_out": 16, "chat_sft": 80, "prefs": 60}
CORPUS_SAMPLE_ROWS = 100
CORPUS_SAMPLE_MAX_CHARS = 800
_REVIEW_TEMPLATES = ("The {s} was {a}.", "I found the {s} {a}.", "Honestly, the {s} felt {a}.")
_SUBJECTS = ("food", "film", "service", "hotel", "book", "concert", "room", "trip", "staff", "music")
_PLACES = (
    "river",
    "house",
    "window",
    "garden",
    "forest",
    "table",
    "chair",
    "road",
    "bridge",
    "field",
    "market",
)

Row = tuple[str, str, str]  # prompt, correct answer, plausible wrong answer


def _word_list(rng: random.Random, low: int = 3, high: int = 5) -> list[str]:
    return rng.sample(_corpus.WORDS, rng.randint(low, high))


# Words to be copied start a line in the prompt because the answer starts a line too: byte-level BPE
# spells "red" at a line start with other tokens than " red" after a space, and a copy task should
# test copying, not that re-spelling.
def _repeat(rng: random.Random) -> Row:
    words = _word_list(rng, 2, 4)
    wrong = list(words)
    i = rng.randrange(len(wrong) - 1)
    wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]  # a near miss: two neighbours swapped
    return f"Repeat after me:\n{' '.join(words)}", " ".join(words), " ".join(wrong)


def _first_word(rng: random.Random) -> Row:
    words = _word_list(rng)
    return f"What is the first word of this line?\n{' '.join(words)}", words[0], words[1]


def _last_word(rng: random.Random) -> Row:
    words = _word_list(rng)
    return "What is the last word of this list?\n" + "\n".join(words), words[-1], words[0]


def _sentiment(rng: random.Random) -> Row:
    positive = rng.random() < 0.5
    adjective = rng.choice(_corpus.POSITIVE if positive else _corpus.NEGATIVE)
    review = rng.choice(_REVIEW_TEMPLATES).format(s=rng.choice(_SUBJECTS), a=adjective)
    label, other = ("positive", "negative") if positive else ("negative", "positive")
    return f"Is this review positive or negative? {review}", label, other


def _category(rng: random.Random) -> Row:
    category = rng.choice(list(_corpus.CATEGORIES))
    word = rng.choice(_corpus.CATEGORIES[category])
    place = rng.choice(_PLACES)
    wrong = rng.choice([c for c in _corpus.CATEGORIES if c != category])
    groups = ", ".join(_corpus.CATEGORIES)
    return f"Is the {word} by the {place} a {groups.replace(', tool', ' or tool')}?", category, wrong


GENERATORS: dict[str, Callable[[random.Random], Row]] = {
    "repeat": _repeat,
    "first_word": _first_word,
    "last_word": _last_word,
    "sentiment": _sentiment,
    "category": _category,
}


def generate(seed: int) -> dict[str, list[dict[str, str]]]:
    """All four datasets; rows of each file are interleaved by task so any prefix is a fair mix."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict[str, str]]] = {name: [] for name in PER_TASK}
    for name, per_task in PER_TASK.items():  # held_out first: its prompts are reserved before training's
        for _ in range(per_task):
            for task in TASKS:
                while True:
                    prompt, good, bad = GENERATORS[task](rng)
                    if prompt not in seen:
                        break
                seen.add(prompt)
                if name == "prefs":
                    out[name].append({"prompt": prompt, "chosen": good, "rejected": bad})
                else:
                    out[name].append({"prompt": prompt, "completion": good})
    _, held_docs = _corpus.split_documents(
        _corpus.read_corpus(ROOT / "operators/forgeline_operators/models/corpus")
    )
    short = [d for d in held_docs if len(d) <= CORPUS_SAMPLE_MAX_CHARS]
    out["corpus_sample"] = [{"text": d} for d in random.Random(seed).sample(short, CORPUS_SAMPLE_ROWS)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "workflows/data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in generate(args.seed).items():
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
