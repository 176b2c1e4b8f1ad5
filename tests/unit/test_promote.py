"""Promotion without endpoints: gates on real version tags, aliases, rollback, history, conflicts.

The endpoint half (Triton version swaps under load) is in tests/integration/test_promotion.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forgeline.tracking import (
    Tracker,
    get_version,
    model_aliases,
    register_version,
    resolve_settings,
)
from forgeline_operators.lib.intervals import RowStats
from forgeline_operators.promote import gates as g
from forgeline_operators.promote import service
from forgeline_operators.promote.spec import MetricGate, PromotionGates, QuantizationGate, SloGate

NAME = "demo-model"


def _uri(home: Path) -> str:
    return resolve_settings(None, "", home).uri


def _register(
    home: Path, metrics: dict[str, float], alias: str = "candidate", extra: dict[str, str] | None = None
) -> int:
    tags = {"forgeline.sha256": "0" * 64, **(extra or {})}
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


def _rows(exact: list[int], nll: list[float] | None = None) -> RowStats:
    n = len(exact)
    losses = np.asarray(nll if nll is not None else [2.0] * n)
    return RowStats(
        nll=losses * 4,
        tokens=np.full(n, 4.0),
        correct=np.full(n, 2.0),
        exact=np.asarray(exact, dtype=float),
        contains=np.asarray(exact, dtype=float),
    )


def test_metric_gate_vs_production_pairs_the_rows_and_holds_the_worst_end() -> None:
    """Same point values as a tag comparison, but the verdict comes from the paired interval: a
    candidate that swaps answers with production (equal means) is within 10 % at the point value yet
    its interval's worst end is not; one that keeps every production answer and adds two passes."""
    prod_rows = _rows([1] * 10 + [0] * 10)
    swapped = _rows([0] * 3 + [1] * 7 + [1] * 3 + [0] * 7)  # same 0.5 mean, 6 rows differ
    gate = MetricGate(stage="eval", metric="exact_match", max_regression=0.1)
    tags = {"eval": {"exact_match": 0.5}}
    same = "a" * 64
    res = g.metric_gate(
        gate,
        tags,
        tags,
        4,
        {"eval": g.StageRows(same, swapped)},
        {"eval": g.StageRows(same, prod_rows)},
    )
    assert not res.passed
    assert "paired interval of the regression [" in res.message and "20 rows" in res.message
    assert "worst end is beyond the allowed 10.00%" in res.message
    low, high = res.inputs["regression_ci"]
    assert low < 0 < 0.1 < high and res.inputs["paired_rows"] == 20

    better = _rows([1] * 12 + [0] * 8)
    ok = g.metric_gate(
        gate,
        {"eval": {"exact_match": 0.6}},
        tags,
        4,
        {"eval": g.StageRows(same, better)},
        {"eval": g.StageRows(same, prod_rows)},
    )
    assert ok.passed and ok.inputs["candidate"] == 0.6 and ok.inputs["regression_ci"][1] <= 0


def test_metric_gate_refuses_different_eval_sets_and_says_when_it_is_unpaired() -> None:
    gate = MetricGate(stage="eval", metric="perplexity", max_regression=0.5)
    tags = {"eval": {"perplexity": 7.0}}
    rows = _rows([1, 0, 1, 0])
    other = g.metric_gate(
        gate, tags, tags, 2, {"eval": g.StageRows("a" * 64, rows)}, {"eval": g.StageRows("b" * 64, rows)}
    )
    assert not other.passed and "not comparable with production version 2" in other.message
    assert "different evaluation sets" in other.message and "vs: parent" in other.message

    gone = g.StageRows("a" * 64, missing="its per-row scores /x/samples.jsonl are gone")
    point = g.metric_gate(gate, tags, tags, 2, {"eval": g.StageRows("a" * 64, rows)}, {"eval": gone})
    assert point.passed
    assert "(point values: production version 2: its per-row scores /x/samples.jsonl are gone)" in (
        point.message
    )
    legacy = g.metric_gate(gate, tags, tags, 2)
    assert legacy.passed and "(point values: the candidate: no per-row scores of 'eval')" in legacy.message
    quant = g.metric_gate(
        MetricGate(stage="q", metric="perplexity_increase", max_regression=1.0),
        {"q": {"perplexity_increase": 0.01}},
        {"q": {"perplexity_increase": 0.01}},
        2,
    )
    assert "'perplexity_increase' has no per-row scores" in quant.message


def test_metric_gate_vs_parent_uses_the_evaluate_stages_interval() -> None:
    cand = {
        "eval": {
            "exact_match": 0.80,
            "baseline_exact_match": 0.82,
            "exact_match_regression_ci_low": -0.05,
            "exact_match_regression_ci_high": 0.12,
        }
    }
    point_ok = g.metric_gate(
        MetricGate(metric="exact_match", vs="parent", max_regression=0.05), cand, None, None
    )
    # 2.4 % worse at the point value, but the stage's interval reaches 12 %: blocked.
    assert not point_ok.passed and "[-5.00%, +12.00%]" in point_ok.message
    wide = g.metric_gate(MetricGate(metric="exact_match", vs="parent", max_regression=0.15), cand, None, None)
    assert wide.passed and wide.inputs["regression_ci"] == [-0.05, 0.12]


def test_version_rows_reads_the_registered_samples_and_says_when_they_are_gone(tmp_path: Path) -> None:
    samples = tmp_path / "samples.jsonl"
    lines = [
        {"index": 0, "tokens": 4, "nll": 8.0, "correct": 3, "exact_match": True, "contains": True},
        {"index": 1, "tokens": 2, "nll": 2.0, "correct": 1, "exact_match": False, "contains": True},
    ]
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text(json.dumps({"index": 0, "tokens": 4, "loss": 2.0}) + "\n")
    tags = {
        "forgeline.eval.eval.rows": samples.as_uri(),
        "forgeline.eval.eval.set": "d" * 64,
        "forgeline.eval.old.rows": legacy.as_uri(),
        "forgeline.eval.gone.rows": (tmp_path / "nope.jsonl").as_uri(),
    }
    rows = g.version_rows(tags)
    got = rows["eval"].rows
    assert rows["eval"].eval_set == "d" * 64 and got is not None
    point = got.values(np.arange(2)[None, :])
    assert point["loss"][0] == pytest.approx(10.0 / 6) and point["token_accuracy"][0] == pytest.approx(4 / 6)
    assert point["exact_match"][0] == 0.5 and point["contains"][0] == 1.0
    assert rows["old"].rows is None and "no per-row sums" in str(rows["old"].missing)
    assert rows["gone"].rows is None and "are gone" in str(rows["gone"].missing)


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


def test_promotion_pairs_the_candidate_with_production_from_their_tags(home: Path, tmp_path: Path) -> None:
    """The service reads both versions' per-row files from their tags: a candidate 5 % worse at the
    point value passes a 10 % tag comparison but not the paired one."""
    uri = _uri(home)

    def samples(name: str, exact: list[int]) -> dict[str, str]:
        path = tmp_path / f"{name}.jsonl"
        rows = [
            {"index": i, "tokens": 4, "nll": 8.0, "correct": 2, "exact_match": bool(e), "contains": bool(e)}
            for i, e in enumerate(exact)
        ]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return {"forgeline.eval.eval.rows": path.as_uri(), "forgeline.eval.eval.set": "e" * 64}

    gates = PromotionGates(metrics=[MetricGate(metric="exact_match", stage="eval", max_regression=0.1)])
    prod = [1] * 20 + [0] * 20
    _register(home, {"eval.exact_match": 0.5}, extra=samples("v1", prod))
    service.promote(home, uri, NAME, gates=gates, actor="alice")
    cand = [0] * 4 + [1] * 16 + [1] * 3 + [0] * 17  # 0.475: 5 % worse, 7 rows differ
    v2 = _register(home, {"eval.exact_match": 0.475}, extra=samples("v2", cand))
    with pytest.raises(service.GateFailed) as blocked:
        service.promote(home, uri, NAME, version=v2, gates=gates, actor="bob")
    assert "paired interval of the regression" in str(blocked.value) and "40 rows" in str(blocked.value)


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


def test_cached_promotion_reruns_only_to_bring_back_a_stopped_production_endpoint(home: Path) -> None:
    """The promote stage's cache check: an endpoint that is gone while the alias still names the
    version makes the stage run again; once the alias moved (a later rollback), the record stays."""
    from forgeline.artifacts import StageRecord
    from forgeline_operators.promote.operator import cache_check

    uri = _uri(home)
    tracker = Tracker(uri)
    v1 = _register(home, {})
    service.promote(home, uri, NAME, actor="alice")
    run_id = tracker.start_run(tracker.client.create_experiment("wf"), "promote", {})
    tracker.log_all(run_id, params={"registered_name": NAME, "to_alias": "production"})
    url = "http://127.0.0.1:1"  # no endpoint of this home runs there
    record = StageRecord(
        key="k",
        path=home,
        digest="d",
        outputs={"version": {"type": "value", "value": v1}, "endpoint": {"type": "value", "value": url}},
        meta={"run_id": run_id},
    )
    reason = cache_check(record, home, uri)
    assert reason == f"{NAME}@production is still version {v1}, but its endpoint {url} is no longer running"

    v2 = _register(home, {})
    service.promote(home, uri, NAME, version=v2, actor="alice")  # production moved on: keep the event
    assert cache_check(record, home, uri) is None
    no_endpoint = StageRecord(
        key="k", path=home, digest="d", outputs={"version": {"type": "value", "value": v2}}
    )
    assert cache_check(no_endpoint, home, uri) is None


def test_a_version_number_back_with_other_weights_is_restaged(tmp_path: Path) -> None:
    """Triton names versions by number: version 1 of another registered model (or of a fresh
    registry) promoted to the same endpoint must replace the old directory, not be served stale."""
    from forgeline_operators.engines import SchedulerSpec
    from forgeline_operators.promote.local import _stage_version

    def ir(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "openvino_model.xml").write_text(f"<net name='{name}'/>")
        for other in ("openvino_model.bin", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
            (path / other).write_text("<net/>")
        return path

    live = tmp_path / "live"
    live.mkdir()
    served = live / "repository" / "m" / "1" / "engine" / "openvino_model.xml"
    config = _stage_version(live, "m", 1, ir("tiny"), SchedulerSpec(), 1)
    assert "versions: [ 1 ]" in config and "tiny" in served.read_text()
    _stage_version(live, "m", 1, ir("smollm2"), SchedulerSpec(), 1)
    assert "smollm2" in served.read_text()
    before = served.stat().st_ino
    _stage_version(live, "m", 1, tmp_path / "smollm2", SchedulerSpec(), 1)
    assert served.stat().st_ino == before  # the same source again: kept, not rebuilt
