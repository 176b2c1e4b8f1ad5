"""Dataset rows prepared for training, the same way by every stage that trains on them.

It owns the train/eval split (:func:`split_rows`: an explicit eval dataset, else a seeded fraction
with at least one eval row) and the SFT features (:func:`sft_features`: rows tokenised by
:mod:`forgeline_operators.data`, ``input_ids`` / completion-only ``labels``, rows with nothing left to
learn within ``max_seq_len`` dropped and counted), with the :class:`Features` record of tokenised rows
and their accounting. The finetune backends (hf, megatron, nemo) and the distill stage use it, so a
student is distilled on exactly the rows and ids a fine-tune of the same data would train on.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing this module stays cheap: the finetune job description imports it
    from forgeline.runtime.context import StageContext

__all__ = ["Feature", "Features", "sft_features", "split_rows"]

Feature = dict[str, list[int]]


@dataclass(frozen=True)
class Features:
    """Tokenised rows (``input_ids``/``labels`` for sft; ``prompt_ids``/``chosen_ids``/``rejected_ids``
    for dpo) and the row accounting that is reported, never silent."""

    train: list[Feature]
    eval: list[Feature]
    rows: int  # valid rows read from the dataset(s)
    truncated_rows: int  # cut at max_seq_len (kept, their tail is not trained on)
    dropped_rows: int  # nothing left to learn within max_seq_len (excluded)
    train_tokens: int  # non-padding tokens of one pass over the training rows
    rendering: str = "raw"  # "chat_template" | "raw": how the rows became text (data.resolve_rendering)


def split_rows(
    ctx: StageContext, dataset: str, eval_dataset: str | None, eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval rows: ``eval_dataset`` when given, else a seeded ``eval_fraction`` split
    (at least one eval row when the fraction is positive)."""
    rows = ctx.read_rows(dataset)
    if eval_dataset:
        return rows, ctx.read_rows(eval_dataset)
    n_eval = round(len(rows) * eval_fraction)
    if eval_fraction > 0 and len(rows) >= 2:
        n_eval = max(1, n_eval)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _encode(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], fmt: str, max_len: int, rendering: str
) -> tuple[list[Feature], int, int]:
    from forgeline_operators.data import IGNORE_INDEX, encode_rows

    tokenized = encode_rows(tokenizer, rows, fmt, max_len, rendering)
    kept = [
        {"input_ids": e.input_ids, "labels": e.labels}
        for e in tokenized.examples
        if any(label != IGNORE_INDEX for label in e.labels[1:])
    ]
    return kept, tokenized.truncated_rows, len(rows) - len(kept)


def sft_features(
    tokenizer: Any,
    train_rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]],
    fmt: str,
    max_seq_len: int,
    rendering: str = "auto",
) -> Features:
    """The train and eval rows of an ``sft`` or ``text`` dataset as :class:`Features`."""
    from forgeline_operators.data import resolve_rendering

    train, truncated, dropped = _encode(tokenizer, train_rows, fmt, max_seq_len, rendering)
    evals, eval_truncated, eval_dropped = _encode(tokenizer, eval_rows, fmt, max_seq_len, rendering)
    return Features(
        train=train,
        eval=evals,
        rows=len(train_rows) + len(eval_rows),
        truncated_rows=truncated + eval_truncated,
        dropped_rows=dropped + eval_dropped,
        train_tokens=sum(len(f["input_ids"]) for f in train),
        rendering=resolve_rendering(tokenizer, rendering),
    )
