"""The quality gate of a quantized artifact against its parent: perplexity and greedy-token agreement.

Both models score the same held-out rows, tokenised once with :mod:`forgeline_operators.data` (the
tokenisation training and evaluation use) and scored by the evaluate operator's teacher-forced pass,
so "perplexity" here is the number an evaluate stage reports. Agreement is the fraction of graded
positions where the quantized model's greedy (argmax) next token equals the parent's, teacher-forced:
deterministic, and it does not compound one early divergence into a whole-sequence mismatch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from forgeline.runtime.context import GateFailed
from forgeline_operators.data import IGNORE_INDEX, Example, collate
from forgeline_operators.lib.scoring import score_examples

__all__ = ["GateResult", "check_gate", "compare"]

BATCH_SIZE = 8


class _ArgmaxTap:
    """Calls a model the way evaluate's scorer does, keeping each batch's greedy next tokens."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.predictions: list[torch.Tensor] = []

    def __call__(self, **inputs: Any) -> Any:
        out = self.model(**inputs)
        self.predictions.append(out.logits[:, :-1].argmax(dim=-1))
        return out


@dataclass(frozen=True)
class GateResult:
    perplexity: float
    parent_perplexity: float
    token_agreement: float
    tokens: int
    rows: int

    @property
    def perplexity_increase(self) -> float:
        """Relative change vs the parent (0.01 = 1 % worse; negative when better)."""
        return (self.perplexity - self.parent_perplexity) / self.parent_perplexity

    def metrics(self) -> dict[str, float]:
        return {
            "perplexity": self.perplexity,
            "parent_perplexity": self.parent_perplexity,
            "perplexity_increase": self.perplexity_increase,
            "token_agreement": self.token_agreement,
            "gate_tokens": float(self.tokens),
            "gate_rows": float(self.rows),
        }


def _run(model: Any, examples: Sequence[Example], pad_id: int) -> tuple[float, list[torch.Tensor]]:
    tap = _ArgmaxTap(model)
    with torch.no_grad():
        scores = score_examples(tap, examples, BATCH_SIZE, pad_id)
    return math.exp(scores.loss), tap.predictions


def compare(parent: Any, quantized: Any, examples: Sequence[Example], pad_id: int) -> GateResult:
    """Score both models on ``examples`` (any callables returning ``.logits``, torch or OpenVINO)."""
    parent_ppl, parent_pred = _run(parent, examples, pad_id)
    ppl, pred = _run(quantized, examples, pad_id)
    agree = total = 0
    for i, (a, b) in enumerate(zip(parent_pred, pred, strict=True)):
        labels = collate(examples[i * BATCH_SIZE : (i + 1) * BATCH_SIZE], pad_id)["labels"][:, 1:]
        graded = labels != IGNORE_INDEX
        agree += int(((a == b) & graded).sum())
        total += int(graded.sum())
    return GateResult(ppl, parent_ppl, agree / total, total, len(examples))


def check_gate(gate: Any, result: GateResult, fmt: str) -> None:
    """Raise :class:`GateFailed` naming every threshold missed, with the measured numbers."""
    failures: list[str] = []
    limit = gate.max_perplexity_increase
    # A hair of slack so float noise in an unchanged model never fails a 0.0 tolerance.
    if limit is not None and result.perplexity_increase > limit + 1e-12:
        failures.append(
            f"gate max_perplexity_increase={limit:g} failed: perplexity {result.perplexity:.3f} is "
            f"{result.perplexity_increase:.2%} above the parent's {result.parent_perplexity:.3f} "
            f"(allowed {limit:.2%})"
        )
    floor = gate.min_token_agreement
    if floor is not None and result.token_agreement < floor:
        failures.append(
            f"gate min_token_agreement={floor:g} failed: greedy tokens agree with the parent on "
            f"{result.token_agreement:.2%} of {result.tokens} positions (required {floor:.2%})"
        )
    if failures:
        raise GateFailed(f"{fmt}: " + "; ".join(failures), _metrics(result))


def _metrics(result: GateResult) -> Mapping[str, float]:
    return result.metrics()
