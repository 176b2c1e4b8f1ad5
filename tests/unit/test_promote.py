"""Promotion without endpoints: gates on real version tags, aliases, rollback, history, conflicts.

The endpoint half (Triton version swaps under load) is in tests/integration/test_promotion.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgeline.spec._models import MetricGate, PromotionGates, QuantizationGate, SloGate
from forgeline.tracking import (
    Tracker,
    get_version,
    model_aliases,
    register_version,
    resolve_settings,
)
from forgeline_operators.promote import gates as g
from forgeline_operators.promote import service

NAME = "demo-model"


def _uri(home: Path) -> str:
    return resolve_settings(None, "", home).uri


def _register(home: Path, metrics: dict[str, float], alias: str = "candidate") -> int:
    tags = {"forgeline.sha256": "0" * 64}
    tags |= {f"forgeline.metric.{k}": repr(v) for k, v in metrics.items()}
    src = home / "weights"
    src.mkdir(exist_ok=True)
    return register_version(Tracker(_uri(home)), NAME, src.as_uri(), None, tags, alias=alias).version


# --------------------------------------------------------------------------------------- gates


def test_metric_gate_vs_production_and_parent() -> None:
    cand = {"eval": {"token_accuracy": 0.45, "perplexity": 20.0, "baseline_perplexity": 7000.0}}
    prod = {"eval": {"token_accuracy": 0.50, "perplexity": 19.0}}
    worse = g.metric_gate(MetricGate(metric="token_accuracy", max_regression=0.05), cand, prod, 3)
    assert not worse.passed
    assert "0.45 vs production (version 3) 0.5" in worse.message and "10.00% worse" in worse.message
    assert worse.inputs["regression"] == pytest.approx(0.1)
    ok = g.metric_gate(MetricGate(metric="token_accuracy", max_regression=0.10), cand, prod, 3)
    assert ok.passed
    parent = g.metric_gate(MetricGate(metric="perplexity", vs="parent"), cand, prod, 3)
    assert parent.passed and parent.inputs["reference"] == 7000.0
    first = g.metric_gate(MetricGate(metric="token_accuracy"), cand, None, None)
    assert first.passed and "no production version" in first.message


def test_metric_gate_missing_and_ambiguous_evidence_fails_clearly() -> None:
    cand = {"a": {"perplexity": 1.0}, "b": {"perplexity": 2.0}}
    amb = g.metric_gate(MetricGate(metric="perplexity"), cand, None, None)
    assert not amb.passed and "several stages (a, b)" in amb.message
    missing = g.metric_gate(MetricGate(metric="exact_match", stage="a"), cand, None, None)
    assert not missing.passed and "recorded no 'exact_match'" in missing.message
    no_base = g.metric_gate(MetricGate(metric="perplexity", stage="a", vs="parent"), cand, None, None)
    assert not no_base.passed and "max_regression_vs" in no_base.message
    prod_lacks = g.metric_gate(MetricGate(metric="perplexity", stage="a"), cand, {"x": {}}, 1)
    assert not prod_lacks.passed and "production version 1 has no a.perplexity" in prod_lacks.message


def test_quantization_and_slo_and_approval_gates() -> None:
    cand = {"quantize": {"perplexity_increase": 0.03, "token_agreement": 0.95}}
    q = g.quantization_gate(QuantizationGate(max_perplexity_increase=0.02), cand)
    assert not q.passed and "+3.00% > allowed +2.00%" in q.message
    assert g.quantization_gate(QuantizationGate(min_token_agreement=0.9), cand).passed
    assert not g.quantization_gate(QuantizationGate(), {"eval": {"perplexity": 1.0}}).passed
    report = {
        "requests": 10,
        "completed": 9,
        "errors": {"HTTP 500": 1},
        "ttft_ms": {"p95": 120.0},
        "output_tokens_per_s": 50.0,
    }
    slo = g.slo_gate(SloGate(p95_ttft_ms=100, min_tokens_per_s=60, max_error_rate=0.0), report, "http://x")
    assert not slo.passed
    for part in ("error rate 10.0%", "p95 TTFT 120.0 ms > 100 ms", "50.0 output tokens/s < 60"):
        assert part in slo.message
    assert g.slo_gate(SloGate(p95_ttft_ms=200, max_error_rate=0.2), report, "http://x").passed
    assert not g.approval_gate({}).passed
    assert g.approval_gate({g.APPROVAL_TAG: "alice"}).passed


# ------------------------------------------------------------------------------------- service


def test_promote_moves_aliases_records_history_and_rolls_back(home: Path) -> None:
    uri = _uri(home)
    tracker = Tracker(uri)
    gates = PromotionGates(metrics=[MetricGate(metric="token_accuracy", stage="eval", max_regression=0.05)])
    v1 = _register(home, {"eval.token_accuracy": 0.40})
    r1 = service.promote(home, uri, NAME, gates=gates, actor="alice")
    assert (r1.version, r1.outcome, r1.previous_version) == (v1, "promoted", None)
    assert model_aliases(tracker, NAME) == {"candidate": v1, "production": v1}

    v2 = _register(home, {"eval.token_accuracy": 0.39})  # 2.5 % worse: within 5 %
    r2 = service.promote(home, uri, NAME, version=v2, gates=gates, actor="bob")
    assert r2.outcome == "promoted" and r2.previous_version == v1
    assert model_aliases(tracker, NAME) == {"candidate": v2, "production": v2, "previous": v1}
    tags = get_version(tracker, NAME, v2).tags
    assert tags["forgeline.promoted_by"] == "bob"
    assert json.loads(tags["forgeline.gate.metric:token_accuracy:vs_production"])["passed"] is True

    again = service.promote(home, uri, NAME, version=v2, actor="bob")
    assert again.outcome == "unchanged"

    v3 = _register(home, {"eval.token_accuracy": 0.20})  # half of production: blocked
    with pytest.raises(service.GateFailed) as blocked:
        service.promote(home, uri, NAME, version=v3, gates=gates, actor="carol")
    assert "0.2 vs production (version 2) 0.39" in str(blocked.value)
    assert model_aliases(tracker, NAME)["production"] == v2  # nothing moved

    back = service.rollback(home, uri, NAME, actor="alice")
    assert (back.version, back.previous_version, back.outcome) == (v1, v2, "rolled_back")
    assert model_aliases(tracker, NAME)["production"] == v1
    assert "previous" not in model_aliases(tracker, NAME)  # v1 was the first production version
    with pytest.raises(service.PromotionError, match="no 'previous' version"):
        service.rollback(home, uri, NAME, actor="alice")

    hist = service.history(uri, NAME)
    assert [(h.action, h.version, h.outcome, h.actor) for h in hist] == [
        ("rollback", v1, "rolled_back", "alice"),
        ("promote", v3, "blocked", "carol"),
        ("promote", v2, "unchanged", "bob"),
        ("promote", v2, "promoted", "bob"),
        ("promote", v1, "promoted", "alice"),
    ]
    assert hist[1].gates[0]["inputs"]["candidate"] == 0.2


def test_approval_gate_blocks_until_approved(home: Path) -> None:
    uri = _uri(home)
    v1 = _register(home, {})
    gates = PromotionGates(approval=True)
    with pytest.raises(service.GateFailed, match="not approved yet"):
        service.promote(home, uri, NAME, gates=gates, actor="bob")
    service.approve(uri, NAME, v1, actor="alice", note="looked at the evals")
    record = service.promote(home, uri, NAME, gates=gates, actor="bob")
    assert record.outcome == "promoted" and record.gates[0]["inputs"] == {"approved_by": "alice"}


def test_concurrent_promotion_of_the_same_model_conflicts(home: Path) -> None:
    uri = _uri(home)
    _register(home, {})
    busy = "another promotion of 'demo-model' is in progress"
    # another promotion holds the model
    with service._lock(home, NAME, "someone"), pytest.raises(service.ConflictError, match=busy):
        service.promote(home, uri, NAME, actor="bob")
    assert service.promote(home, uri, NAME, actor="bob").outcome == "promoted"


def test_unknown_version_and_alias_are_clear_errors(home: Path) -> None:
    uri = _uri(home)
    _register(home, {})
    with pytest.raises(service.PromotionError, match="version 7"):
        service.promote(home, uri, NAME, version=7, actor="bob")
    with pytest.raises(service.PromotionError, match="no alias 'staging'"):
        service.promote(home, uri, NAME, from_alias="staging", actor="bob")
    with pytest.raises(service.PromotionError, match="no 'production' version to roll back"):
        service.rollback(home, uri, NAME, actor="bob")
