"""Teacher-forced scoring of encoded examples: the loss, perplexity and token-accuracy numbers.

It owns how a model is scored on :class:`~forgeline_operators.data.Example` rows (right-padded batches,
position t predicting token t+1, only graded tokens counted) and the :class:`Scores` sums, per row
too, that paired intervals (:mod:`.intervals`) resample. The evaluate stage reports these numbers and
the quantize stage's gates and measurements (and the finetune stage's QAT numbers through them) use
the same scorer, so "perplexity" means one thing in every stage that reports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn.functional as F

from forgeline_operators.data import IGNORE_INDEX, Example, collate
from forgeline_operators.lib.intervals import RowStats

__all__ = ["Scores", "batches", "score_examples"]


@dataclass
class Scores:
    """Sums over graded tokens for one model; per-row values feed ``samples.jsonl``."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    row_nll: list[float] = field(default_factory=list)
    row_tokens: list[int] = field(default_factory=list)
    row_correct: list[int] = field(default_factory=list)
    predictions: list[str] | None = None
    row_exact: list[bool] = field(default_factory=list)
    row_contains: list[bool] = field(default_factory=list)

    @property
    def exact(self) -> int:
        return sum(self.row_exact)

    def rows(self) -> RowStats:
        return RowStats(
            nll=np.asarray(self.row_nll, dtype=float),
            tokens=np.asarray(self.row_tokens, dtype=float),
            correct=np.asarray(self.row_correct, dtype=float),
            exact=np.asarray(self.row_exact, dtype=float) if self.predictions is not None else None,
            contains=np.asarray(self.row_contains, dtype=float) if self.predictions is not None else None,
        )

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    def metrics(self, references: int) -> dict[str, float]:
        out = {
            "loss": self.loss,
            "perplexity": math.exp(self.loss),
            "token_accuracy": self.correct / self.tokens,
        }
        if self.predictions is not None:
            out["exact_match"] = self.exact / references
            out["contains"] = sum(self.row_contains) / references
        return out


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def score_examples(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int) -> Scores:
    """Teacher-forced NLL and next-token accuracy over graded tokens."""
    scores = Scores()
    for batch in batches(examples, batch_size):
        enc = collate(batch, pad_id)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        # Position t predicts token t+1: the transformers causal-LM loss convention.
        logits, labels = logits[:, :-1], enc["labels"][:, 1:]
        graded = labels != IGNORE_INDEX
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        correct = (logits.argmax(dim=-1) == labels) & graded
        row_nll = nll.double().sum(dim=1)
        row_tokens = graded.sum(dim=1)
        scores.row_nll += row_nll.tolist()
        scores.row_tokens += row_tokens.tolist()
        scores.row_correct += correct.sum(dim=1).tolist()
        scores.nll += float(row_nll.sum())
        scores.tokens += int(row_tokens.sum())
        scores.correct += int(correct.sum())
    return scores
