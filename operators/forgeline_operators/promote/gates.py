"""Promotion gates as pure functions: evidence in, :class:`GateResult` out (no MLflow, no endpoints).

The evidence is what a version carries (its ``forgeline.metric.<stage>.<metric>`` tags, written by the
register stage), the current production version's tags, a load report of a candidate endpoint, and
the approval tag. Each result keeps its inputs, so the promotion record and the version's tags show
the numbers a decision was made on, and a blocked promotion's message states them.

A metric gate compares like with like where it can: vs production, when both versions carry the
evaluate stage's per-row scores (:class:`StageRows`) on the same evaluation set, it bootstraps the
rows pairwise and holds ``max_regression`` at the interval's worst end, as the evaluate stage's own
gates do; two different evaluation sets are refused, not compared. vs the parent, it reads the
interval the evaluate stage computed on identical tokens. Without per-row scores (a version
registered before they were recorded, or a metric such as a quantization delta) it compares point
values and says so in its message.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from forgeline.tracking import TAG_EVAL_PREFIX
from forgeline_operators.lib.intervals import ROW_METRICS, RowStats, paired_bootstrap, read_rows, regression
from forgeline_operators.promote.spec import MetricGate, QuantizationGate, SloGate

__all__ = [
    "APPROVAL_TAG",
    "GateResult",
    "StageRows",
    "approval_gate",
    "metric_gate",
    "quantization_gate",
    "regression",
    "slo_gate",
    "version_rows",
]

APPROVAL_TAG = "forgeline.approved_by"

Metrics = Mapping[str, Mapping[str, float]]  # {stage: {metric: value}}


@dataclass(frozen=True)
class StageRows:
    """One version's per-row scores from one evaluate stage, or why it has none (``missing``)."""

    eval_set: str | None = None
    rows: RowStats | None = None
    missing: str | None = None


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    message: str
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _find(metrics: Metrics, metric: str, stage: str | None) -> tuple[str, float] | str:
    """(stage, value), or an error message."""
    if stage is not None:
        if metric not in metrics.get(stage, {}):
            have = ", ".join(sorted(metrics.get(stage, {}))) or "none"
            return f"stage {stage!r} recorded no {metric!r} on this version (it has: {have})"
        return stage, float(metrics[stage][metric])
    stages = sorted(s for s, values in metrics.items() if metric in values)
    if not stages:
        return f"no upstream stage recorded {metric!r} on this version"
    if len(stages) > 1:
        return f"{metric!r} was recorded by several stages ({', '.join(stages)}): set `stage:` on the gate"
    return stages[0], float(metrics[stages[0]][metric])


def metric_gate(
    gate: MetricGate,
    candidate: Metrics,
    production: Metrics | None,
    production_version: int | None,
    candidate_rows: Mapping[str, StageRows] | None = None,
    production_rows: Mapping[str, StageRows] | None = None,
) -> GateResult:
    """``*_rows``: each version's per-row scores by evaluate stage (:func:`version_rows`)."""
    name = f"metric:{gate.metric}:vs_{gate.vs}"
    found = _find(candidate, gate.metric, gate.stage)
    if isinstance(found, str):
        return GateResult(name, False, found, {"metric": gate.metric, "stage": gate.stage})
    stage, value = found
    inputs: dict[str, Any] = {
        "metric": gate.metric,
        "stage": stage,
        "candidate": value,
        "max_regression": gate.max_regression,
    }
    if gate.vs == "parent":
        values = candidate.get(stage, {})
        base = values.get(f"baseline_{gate.metric}")
        if base is None:
            return GateResult(
                name,
                False,
                f"stage {stage!r} measured no parent baseline for {gate.metric!r} (give the evaluate stage "
                "`gates: {max_regression_vs: base}` so it measures the parent too)",
                inputs,
            )
        low = values.get(f"{gate.metric}_regression_ci_low")
        high = values.get(f"{gate.metric}_regression_ci_high")
        if low is not None and high is not None:
            # The evaluate stage's own paired interval (same tokens for both models, its confidence).
            worse = regression(gate.metric, value, float(base))
            inputs |= {"reference": float(base), "regression": worse, "regression_ci": [low, high]}
            return _verdict(
                name, gate, stage, value, float(base), "the parent", worse, (low, high), inputs, ""
            )
        reference, label = float(base), "the parent"
    else:
        if production is None:
            return GateResult(name, True, "no production version yet: nothing to compare with", inputs)
        ref = production.get(stage, {}).get(gate.metric)
        if ref is None:
            return GateResult(
                name,
                False,
                f"production version {production_version} has no {stage}.{gate.metric} to compare with",
                inputs | {"production_version": production_version},
            )
        reference, label = float(ref), f"production (version {production_version})"
        inputs["production_version"] = production_version
        paired = _paired(
            gate,
            stage,
            (candidate_rows or {}).get(stage),
            (production_rows or {}).get(stage),
            production_version,
            inputs,
        )
        if isinstance(paired, GateResult):
            return paired
        if paired is not None:
            (value, reference, worse, ci, rows) = paired
            inputs |= {"candidate": value, "reference": reference, "regression": worse}
            inputs |= {"regression_ci": list(ci), "paired_rows": rows}
            return _verdict(name, gate, stage, value, reference, label, worse, ci, inputs, f", {rows} rows")
    worse = regression(gate.metric, value, reference)
    inputs |= {"reference": reference, "regression": worse}
    return _verdict(name, gate, stage, value, reference, label, worse, None, inputs, "")


def version_rows(tags: Mapping[str, str]) -> dict[str, StageRows]:
    """Per-row scores by evaluate stage from a version's ``forgeline.eval.<stage>.rows|set`` tags; a
    file that is gone (``forgeline gc``) or predates per-row sums gives a :class:`StageRows` saying why."""
    out: dict[str, StageRows] = {}
    for key, uri in tags.items():
        if not (key.startswith(TAG_EVAL_PREFIX) and key.endswith(".rows")):
            continue
        stage = key[len(TAG_EVAL_PREFIX) : -len(".rows")]
        eval_set = tags.get(f"{TAG_EVAL_PREFIX}{stage}.set")
        path = Path(unquote(urlparse(uri).path))
        try:
            out[stage] = StageRows(eval_set=eval_set, rows=read_rows(path))
        except FileNotFoundError:
            out[stage] = StageRows(eval_set=eval_set, missing=f"its per-row scores {path} are gone")
        except (OSError, ValueError) as e:
            out[stage] = StageRows(eval_set=eval_set, missing=f"its per-row scores are unreadable ({e})")
    return out


def _paired(
    gate: MetricGate,
    stage: str,
    candidate: StageRows | None,
    production: StageRows | None,
    production_version: int | None,
    inputs: dict[str, Any],
) -> tuple[float, float, float, tuple[float, float], int] | GateResult | None:
    """The paired comparison vs production; a refusal when the evaluation sets differ; ``None`` (point
    values) when either side has no per-row scores, with the reason in ``inputs['unpaired']``."""
    if gate.metric not in ROW_METRICS:
        inputs["unpaired"] = f"{gate.metric!r} has no per-row scores"
        return None
    for side, rows in (
        ("the candidate", candidate),
        (f"production version {production_version}", production),
    ):
        if rows is None or rows.rows is None:
            why = rows.missing if rows is not None and rows.missing else f"no per-row scores of {stage!r}"
            inputs["unpaired"] = f"{side}: {why}"
            return None
    assert candidate is not None and production is not None
    assert candidate.rows is not None and production.rows is not None
    if candidate.eval_set != production.eval_set:
        return GateResult(
            f"metric:{gate.metric}:vs_{gate.vs}",
            False,
            f"{stage}.{gate.metric}: not comparable with production version {production_version}: the two "
            f"were scored on different evaluation sets (digest {str(candidate.eval_set)[:12]} vs "
            f"{str(production.eval_set)[:12]}: other rows, rendering, tokenizer or generation settings). "
            "Score both on the same set, compare with the parent (`vs: parent`), or promote this version "
            "by hand after review",
            inputs | {"candidate_eval_set": candidate.eval_set, "production_eval_set": production.eval_set},
        )
    if len(candidate.rows.nll) != len(production.rows.nll):  # same digest, so only a damaged file
        inputs["unpaired"] = "the two per-row files differ in length"
        return None
    iv = paired_bootstrap(candidate.rows, production.rows, [gate.metric], confidence=gate.confidence)
    i = iv[gate.metric]
    return i.value, i.baseline, i.regression, (i.regression_low, i.regression_high), len(candidate.rows.nll)


def _verdict(
    name: str,
    gate: MetricGate,
    stage: str,
    value: float,
    reference: float,
    label: str,
    worse: float,
    ci: tuple[float, float] | None,
    inputs: dict[str, Any],
    detail: str,
) -> GateResult:
    # A hair of slack so float noise in an identical model never fails a 0.0 tolerance.
    checked = worse if ci is None else ci[1]
    passed = checked <= gate.max_regression + 1e-12
    verdict = "within" if passed else "beyond"
    change = "no change" if worse == 0 else f"{abs(worse):.2%} {'worse' if worse > 0 else 'better'}"
    message = f"{stage}.{gate.metric} {value:.4g} vs {label} {reference:.4g}: {change}"
    if ci is not None:
        message += (
            f"; paired interval of the regression [{ci[0]:+.2%}, {ci[1]:+.2%}]{detail}: its worst end is "
            f"{verdict} the allowed {gate.max_regression:.2%}"
        )
    else:
        unpaired = inputs.get("unpaired")
        message += f", {verdict} the allowed {gate.max_regression:.2%}"
        message += f" (point values: {unpaired})" if unpaired else " (point values)"
    return GateResult(name, passed, message, inputs)


def quantization_gate(gate: QuantizationGate, candidate: Metrics) -> GateResult:
    name = "quantization"
    stages = sorted(s for s, values in candidate.items() if "perplexity_increase" in values)
    if not stages:
        return GateResult(name, False, "the version records no quantize stage (no perplexity_increase tag)")
    failures, inputs = [], {}
    for stage in stages:
        values = candidate[stage]
        increase = float(values["perplexity_increase"])
        inputs[stage] = {"perplexity_increase": increase, "token_agreement": values.get("token_agreement")}
        limit = gate.max_perplexity_increase
        if limit is not None and increase > limit + 1e-12:
            failures.append(f"{stage}: perplexity +{increase:.2%} > allowed +{limit:.2%}")
        floor = gate.min_token_agreement
        agreement = values.get("token_agreement")
        if floor is not None and (agreement is None or agreement < floor):
            failures.append(f"{stage}: token agreement {agreement} < required {floor:.2%}")
    inputs["limits"] = gate.model_dump()
    if failures:
        return GateResult(name, False, "; ".join(failures), inputs)
    summary = ", ".join(f"{s}: perplexity +{candidate[s]['perplexity_increase']:.2%}" for s in stages)
    return GateResult(name, True, summary, inputs)


def slo_gate(gate: SloGate, report: Mapping[str, Any], url: str) -> GateResult:
    """``report``: a load report (``LoadReport.to_json()``) of a benchmark against the candidate."""
    requests = int(report["requests"])
    failed = requests - int(report["completed"])
    error_rate = failed / requests if requests else 1.0
    p95 = float(report["ttft_ms"].get("p95", math.nan))
    tps = float(report["output_tokens_per_s"])
    inputs = {
        "url": url,
        "concurrency": gate.concurrency,
        "requests": requests,
        "p95_ttft_ms": p95,
        "output_tokens_per_s": tps,
        "error_rate": error_rate,
        "limits": gate.model_dump(),
    }
    failures = []
    if error_rate > gate.max_error_rate + 1e-12:
        failures.append(f"error rate {error_rate:.1%} > {gate.max_error_rate:.1%} ({report.get('errors')})")
    if gate.p95_ttft_ms is not None and not p95 <= gate.p95_ttft_ms:
        failures.append(f"p95 TTFT {p95:.1f} ms > {gate.p95_ttft_ms:g} ms")
    if gate.min_tokens_per_s is not None and tps < gate.min_tokens_per_s:
        failures.append(f"{tps:.1f} output tokens/s < {gate.min_tokens_per_s:g}")
    summary = (
        f"p95 TTFT {p95:.1f} ms, {tps:.1f} tok/s, errors {error_rate:.1%} at concurrency {gate.concurrency}"
    )
    if failures:
        return GateResult("slo", False, "; ".join(failures) + f" ({summary})", inputs)
    return GateResult("slo", True, summary, inputs)


def approval_gate(version_tags: Mapping[str, str]) -> GateResult:
    who = version_tags.get(APPROVAL_TAG)
    if not who:
        return GateResult("approval", False, "not approved yet: run `forgeline approve MODEL --version N`")
    return GateResult("approval", True, f"approved by {who}", {"approved_by": who})
