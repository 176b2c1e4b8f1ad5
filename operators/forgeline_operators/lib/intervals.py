"""Paired bootstrap intervals for comparing two models scored on the same rows.

Evaluation gates compare a candidate with a baseline (the base model, a parent stage) on identical
token ids, so the honest uncertainty is that of the *difference*: rows are resampled with
replacement, the same resample for both models, and each metric is recomputed from per-row sums
(token-weighted for perplexity and token accuracy, a plain mean for exact match and contains). The percentile
interval of the candidate-minus-baseline difference and of the relative regression comes out of the
same resamples, with one definition of a regression (:func:`regression`) that the evaluate stage's
gates and the promotion gates share, so both mean the same thing by it. numpy only, seeded, so a
rerun reports the same interval. The evaluate stage writes each model's per-row sums to its report's
``samples.jsonl`` (:func:`read_rows` reads them back), so a later promotion can pair a candidate with
the production version on the same rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HIGHER_IS_BETTER",
    "ROW_METRICS",
    "Interval",
    "RowStats",
    "eval_set_digest",
    "paired_bootstrap",
    "read_rows",
    "regression",
]

# Metrics where a larger value is better; every other metric (perplexity, loss) is lower-is-better.
HIGHER_IS_BETTER = frozenset({"token_accuracy", "exact_match", "contains", "accuracy", "token_agreement"})
# Metrics that per-row sums reproduce exactly, so two models' rows can be compared pairwise.
ROW_METRICS = frozenset({"loss", "perplexity", "token_accuracy", "exact_match", "contains"})


def regression(metric: str, value: float, reference: float) -> float:
    """Relative change for the worse (negative when better); 0 when the reference is 0."""
    if reference == 0:
        return 0.0 if value == reference else (math.inf if metric not in HIGHER_IS_BETTER else 0.0)
    if metric in HIGHER_IS_BETTER:
        return (reference - value) / abs(reference)
    return (value - reference) / abs(reference)


_regressions = np.vectorize(regression, otypes=[float])  # the gate's scalar rule over resamples


@dataclass(frozen=True)
class RowStats:
    """Per-row sums of one model over the same rows: graded-token NLL, graded tokens, correct, exact."""

    nll: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray
    exact: np.ndarray | None = None  # 0/1 per row; None when exact_match was not measured
    contains: np.ndarray | None = None  # 0/1 per row; None when contains was not measured

    def values(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Each metric over every resample: ``idx`` is (resamples, rows) of row indices."""
        tokens = np.maximum(self.tokens[idx].sum(axis=-1), 1)
        loss = self.nll[idx].sum(axis=-1) / tokens
        out = {
            "loss": loss,
            "perplexity": np.exp(loss),
            "token_accuracy": self.correct[idx].sum(axis=-1) / tokens,
        }
        if self.exact is not None:
            out["exact_match"] = self.exact[idx].mean(axis=-1)
        if self.contains is not None:
            out["contains"] = self.contains[idx].mean(axis=-1)
        return out


@dataclass(frozen=True)
class Interval:
    """One metric's paired comparison: point values, and percentile intervals over the resamples."""

    metric: str
    value: float
    baseline: float
    delta_low: float  # candidate - baseline
    delta_high: float
    regression: float  # relative change for the worse (negative: better), as promotion gates count it
    regression_low: float
    regression_high: float  # the interval's worst end: what a gate checks

    @property
    def delta(self) -> float:
        return self.value - self.baseline


def paired_bootstrap(
    candidate: RowStats,
    baseline: RowStats,
    metrics: list[str],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Mapping[str, Interval]:
    n = len(candidate.nll)
    if n != len(baseline.nll) or n == 0:
        raise ValueError(f"paired bootstrap needs the same non-empty rows ({n} vs {len(baseline.nll)})")
    all_rows = np.arange(n)[None, :]
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    point_c, point_b = candidate.values(all_rows), baseline.values(all_rows)
    boot_c, boot_b = candidate.values(idx), baseline.values(idx)
    tail = (1 - confidence) / 2 * 100
    out: dict[str, Interval] = {}
    for metric in metrics:
        value, base = float(point_c[metric][0]), float(point_b[metric][0])
        deltas = boot_c[metric] - boot_b[metric]
        regressions = _regressions(metric, boot_c[metric], boot_b[metric])
        d_low, d_high = np.percentile(deltas, [tail, 100 - tail])
        r_low, r_high = np.percentile(regressions, [tail, 100 - tail])
        out[metric] = Interval(
            metric=metric,
            value=value,
            baseline=base,
            delta_low=float(d_low),
            delta_high=float(d_high),
            regression=regression(metric, value, base),
            regression_low=float(r_low),
            regression_high=float(r_high),
        )
    return out


def read_rows(samples: Path) -> RowStats:
    """The evaluated model's per-row sums from an evaluate report's ``samples.jsonl``.

    Raises ``ValueError`` naming the file when a row lacks them (a report from before per-row sums
    were recorded)."""
    nll, tokens, correct, exact, found = [], [], [], [], []
    with samples.open() as f:
        for line_no, line in enumerate(f, 1):
            row: dict[str, Any] = json.loads(line)
            if "nll" not in row or "correct" not in row:
                raise ValueError(f"{samples}:{line_no}: no per-row sums (nll, correct) in this report")
            nll.append(float(row["nll"]))
            tokens.append(float(row["tokens"]))
            correct.append(float(row["correct"]))
            if "exact_match" in row:
                exact.append(float(row["exact_match"]))
                found.append(float(row["contains"]))
    if not nll:
        raise ValueError(f"{samples}: no rows")
    generated = len(exact) == len(nll)
    return RowStats(
        nll=np.asarray(nll),
        tokens=np.asarray(tokens),
        correct=np.asarray(correct),
        exact=np.asarray(exact) if generated else None,
        contains=np.asarray(found) if generated else None,
    )


def eval_set_digest(parts: Sequence[Any]) -> str:
    """sha256 of what makes two evaluations comparable row by row (token ids, graded labels,
    generation prompts and settings), as JSON."""
    return hashlib.sha256(json.dumps(list(parts), separators=(",", ":")).encode()).hexdigest()
