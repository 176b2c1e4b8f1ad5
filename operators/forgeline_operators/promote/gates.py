"""Promotion gates as pure functions: evidence in, :class:`GateResult` out (no MLflow, no endpoints).

The evidence is what a version carries (its ``forgeline.metric.<stage>.<metric>`` tags, written by the
register stage), the current production version's tags, a load report of a candidate endpoint, and
the approval tag. Each result keeps its inputs, so the promotion record and the version's tags show
the numbers a decision was made on, and a blocked promotion's message states them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from forgeline.spec._models import MetricGate, QuantizationGate, SloGate

__all__ = [
    "APPROVAL_TAG",
    "GateResult",
    "approval_gate",
    "metric_gate",
    "quantization_gate",
    "regression",
    "slo_gate",
]

APPROVAL_TAG = "forgeline.approved_by"
# Metrics where a larger value is better; every other metric (perplexity, loss) is lower-is-better.
HIGHER_IS_BETTER = frozenset({"token_accuracy", "exact_match", "contains", "accuracy", "token_agreement"})

Metrics = Mapping[str, Mapping[str, float]]  # {stage: {metric: value}}


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    message: str
    inputs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def regression(metric: str, value: float, reference: float) -> float:
    """Relative change for the worse (negative when better); 0 when the reference is 0."""
    if reference == 0:
        return 0.0 if value == reference else (math.inf if metric not in HIGHER_IS_BETTER else 0.0)
    if metric in HIGHER_IS_BETTER:
        return (reference - value) / abs(reference)
    return (value - reference) / abs(reference)


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
    gate: MetricGate, candidate: Metrics, production: Metrics | None, production_version: int | None
) -> GateResult:
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
        base = candidate.get(stage, {}).get(f"baseline_{gate.metric}")
        if base is None:
            return GateResult(
                name,
                False,
                f"stage {stage!r} measured no parent baseline for {gate.metric!r} (give the evaluate stage "
                "`gates: {max_regression_vs: base}` so it measures the parent too)",
                inputs,
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
    worse = regression(gate.metric, value, reference)
    inputs |= {"reference": reference, "regression": worse}
    passed = worse <= gate.max_regression + 1e-12
    verdict = "within" if passed else "beyond"
    message = (
        f"{stage}.{gate.metric} {value:.4g} vs {label} {reference:.4g}: "
        f"{abs(worse):.2%} {'worse' if worse > 0 else 'better'}, "
        f"{verdict} the allowed {gate.max_regression:.2%}"
    )
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
