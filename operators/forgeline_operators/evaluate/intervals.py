"""Paired bootstrap intervals for comparing two models scored on the same rows.

Evaluation gates compare a candidate with a baseline (the base model, a parent stage) on identical
token ids, so the honest uncertainty is that of the *difference*: rows are resampled with
replacement, the same resample for both models, and each metric is recomputed from per-row sums
(token-weighted for perplexity and token accuracy, a plain mean for exact match). The percentile
interval of the candidate-minus-baseline difference and of the relative regression comes out of the
same resamples. numpy only, seeded, so a rerun reports the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["HIGHER_IS_BETTER", "Interval", "RowStats", "paired_bootstrap", "regression"]

HIGHER_IS_BETTER = frozenset({"token_accuracy", "exact_match"})


@dataclass(frozen=True)
class RowStats:
    """Per-row sums of one model over the same rows: graded-token NLL, graded tokens, correct, exact."""

    nll: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray
    exact: np.ndarray | None = None  # 0/1 per row; None when exact_match was not measured

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
        return out


@dataclass(frozen=True)
class Interval:
    """One metric's paired comparison: point values, and percentile intervals over the resamples."""

    metric: str
    value: float
    baseline: float
    delta_low: float  # candidate - baseline
    delta_high: float
    regression: float  # relative change for the worse (negative: better); see ``regression``
    regression_low: float
    regression_high: float  # the interval's worst end: what a gate checks

    @property
    def delta(self) -> float:
        return self.value - self.baseline


def regression(metric: str, value: float | np.ndarray, base: float | np.ndarray) -> np.ndarray:
    """Relative change for the worse (negative when better).

    For an accuracy whose baseline is 0 nothing can be lost, so the regression is 0 there.
    """
    value, base = np.asarray(value, dtype=float), np.asarray(base, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric in HIGHER_IS_BETTER:
            return np.where(base > 0, (base - value) / np.where(base > 0, base, 1), 0.0)
        return (value - base) / base


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
        regressions = regression(metric, boot_c[metric], boot_b[metric])
        d_low, d_high = np.percentile(deltas, [tail, 100 - tail])
        r_low, r_high = np.percentile(regressions, [tail, 100 - tail])
        point = float(regression(metric, value, base))
        out[metric] = Interval(
            metric=metric,
            value=value,
            baseline=base,
            delta_low=float(d_low),
            delta_high=float(d_high),
            regression=point if math.isfinite(point) else math.inf,
            regression_low=float(r_low),
            regression_high=float(r_high),
        )
    return out
