"""The pure EngineBuild reconciler: cache hit, Job creation with an owner, progress, success from the
termination message, failure, resume-from-status idempotence; and ``wait_for``'s deadline."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forgeline_operators.build.k8s import engine_build, job_name
from forgeline_operators.build.reconcile import EngineRecord, reconcile, termination_result
from forgeline_operators.lib.kube_client import owner_reference, wait_for

KEY = "a" * 64
NOW = "2026-11-28T12:00:00Z"


def _resource(status: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    r = engine_build(
        "llama",
        namespace="ns",
        checkpoint="/artifacts/c",
        checkpoint_sha256="b" * 64,
        settings={"tp": 1, "pp": 1},
        cache_key=KEY,
        output="/artifacts/e",
    )
    r["metadata"].update(uid="uid-1", generation=generation)
    if status is not None:
        r["status"] = status
    return r


def _job(condition: str | None) -> dict[str, Any]:
    conds = [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded", "message": "too many"}]
    return {"metadata": {"name": job_name(_resource())}, "status": {"conditions": conds if condition else []}}


def _pod(phase: str, message: str | None = None, code: int = 0) -> dict[str, Any]:
    state = (
        {"terminated": {"exitCode": code, "message": message, "finishedAt": NOW}}
        if message is not None
        else {}
    )
    return {"status": {"phase": phase, "containerStatuses": [{"name": "build", "state": state}]}}


def _step(
    resource: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], hit: Any = None
) -> Any:
    return reconcile(resource, job, pods, lookup=lambda key: hit, volume_claim="artifacts", now=NOW)


def _conds(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status["conditions"]}


def test_cache_hit_is_succeeded_without_a_job() -> None:
    out = _step(
        _resource(),
        None,
        [],
        EngineRecord("/artifacts/engine-cache/x/engine", "c" * 64, engines=("rank0.engine",)),
    )
    assert out.job is None and out.changed
    assert out.status["phase"] == "Succeeded" and out.status["cache"] == "hit"
    assert out.status["sha256"] == "c" * 64 and out.status["engines"] == ["rank0.engine"]
    assert _conds(out.status) == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
    assert out.status["observedGeneration"] == 1 and out.status["cacheKey"] == KEY


def test_miss_creates_an_owned_job_then_follows_it() -> None:
    out = _step(_resource(), None, [])
    assert out.job is not None and out.job["metadata"]["name"] == job_name(_resource())
    assert out.job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert (
        out.job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "artifacts"
    )
    assert out.status["phase"] == "Pending" and _conds(out.status)["Progressing"] == "True"
    running = _step(_resource(out.status), _job(None), [_pod("Running")])
    assert running.job is None and running.status["phase"] == "Running"


def test_success_reads_the_termination_message() -> None:
    result = {
        "phase": "Succeeded",
        "path": "/artifacts/e",
        "sha256": "d" * 64,
        "cache": "miss",
        "form": "engine",
        "engines": ["rank0.engine"],
        "cacheKey": KEY,
    }
    out = _step(_resource({"phase": "Running"}), _job("Complete"), [_pod("Succeeded", json.dumps(result))])
    assert out.status["phase"] == "Succeeded" and out.status["path"] == "/artifacts/e"
    assert out.status["sha256"] == "d" * 64 and _conds(out.status)["Ready"] == "True"
    # Resumed later with the same generation: nothing to do, no second Job.
    again = _step(_resource(out.status), _job("Complete"), [])
    assert again.job is None and not again.changed


def test_failure_carries_the_reason_and_message() -> None:
    msg = json.dumps({"phase": "Failed", "reason": "NoGPU", "message": "needs a CUDA GPU"})
    out = _step(_resource({"phase": "Running"}), _job("Failed"), [_pod("Failed", msg, code=2)])
    assert out.status["phase"] == "Failed" and out.status["reason"] == "NoGPU"
    assert _conds(out.status) == {"Ready": "False", "Progressing": "False", "Degraded": "True"}
    # No termination message at all: the Job's own condition explains it.
    bare = _step(_resource({"phase": "Running"}), _job("Failed"), [])
    assert bare.status["reason"] == "JobFailed" and "BackoffLimitExceeded" in bare.status["message"]


def test_log_fallback_message_is_a_failure_text() -> None:
    got = termination_result([_pod("Failed", "Traceback ... ImportError: tensorrt_llm", code=1)])
    assert got is not None and got["phase"] == "Failed" and "ImportError" in got["message"]


def test_owner_reference_needs_a_uid_and_wait_for_has_a_deadline() -> None:
    with pytest.raises(ValueError, match="no uid yet"):
        owner_reference({"apiVersion": "v1", "kind": "X", "metadata": {"name": "n"}})
    calls = []
    assert (
        wait_for(lambda: calls.append(1) or (len(calls) >= 3 and "ok"), 5, "three calls", interval_s=0)
        == "ok"
    )
    with pytest.raises(TimeoutError, match="waiting for never"):
        wait_for(lambda: None, 0.05, "never", interval_s=0.01)
