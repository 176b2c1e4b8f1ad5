"""Paired bootstrap intervals for comparing two models scored on the same rows.

Evaluation gates compare a candidate with a baseline (the base model, a parent stage) on identical
token ids, so the honest uncertainty is that of the *difference*: rows are resampled with
replacement, the same resample for both models, and each metric is recomputed from per-row sums
(token-weighted for perplexity and token accuracy, a plain mean for exact match and contains). The percentile
interval of the candidate-minus-baseline difference and of the relative regression comes out of the
same resamples, with the promotion gates' own definition of a regression
(:func:`forgeline_operators.promote.gates.regression`), so both gates mean the same thing by it. numpy
only, seeded, so a rerun reports the same interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from forgeline_operators.promote.gates import regression

__all__ = ["Interval", "RowStats", "paired_bootstrap"]

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
