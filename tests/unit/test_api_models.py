"""Models, promotion, rollback, history and endpoints over HTTP, against the real promotion service and
MLflow registry (no endpoint: the endpoint switch is covered by tests/integration/test_promotion.py)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from forgeline.api import ApiSettings, create_app, create_token
from forgeline.tracking import Tracker, register_version, resolve_settings

NAME = "api-model"


@pytest.fixture
def api(home: Path) -> dict[str, Any]:
    tokens = home / "api" / "tokens.json"
    raw = {
        "reader": create_token(tokens, "reader", ["read"]),
        "promoter": create_token(tokens, "pat", ["read", "promote"]),
    }
    settings = ApiSettings(
        home=home, tracking_uri=resolve_settings(None, "", home).uri, data_root=home, tokens_file=tokens
    )
    return {
        "client": TestClient(create_app(settings)),
        "tokens": raw,
        "home": home,
        "uri": settings.tracking_uri,
    }


def _h(api: dict[str, Any], who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api['tokens'][who]}"}


def _register(api: dict[str, Any], accuracy: float) -> int:
    src = api["home"] / "artifacts" / f"weights-{accuracy}"
    src.mkdir(parents=True, exist_ok=True)
    tags = {"forgeline.sha256": "0" * 64, "forgeline.metric.eval.token_accuracy": repr(accuracy)}
    mv = register_version(Tracker(api["uri"]), NAME, src.as_uri(), None, tags, alias="candidate")
    return mv.version


def test_models_versions_aliases(api: dict[str, Any]) -> None:
    c, h = api["client"], _h(api, "reader")
    assert c.get("/v1/models", headers=h).json() == []
    v1 = _register(api, 0.5)
    (model,) = c.get("/v1/models", headers=h).json()
    assert model["name"] == NAME and model["aliases"] == {"candidate": v1} and model["latest_version"] == v1
    (version,) = c.get(f"/v1/models/{NAME}/versions", headers=h).json()
    assert version["version"] == v1 and version["aliases"] == ["candidate"] and version["sha256"] == "0" * 64
    assert version["uri"].startswith("file://")
    assert c.get(f"/v1/models/{NAME}/aliases", headers=h).json() == {"candidate": v1}
    for path in ("versions", "aliases"):
        r = c.get(f"/v1/models/missing/{path}", headers=h)
        assert r.status_code == 404 and r.json()["error"]["message"] == "no registered model 'missing'"
    assert c.get("/v1/endpoints", headers=h).json() == []


def test_promote_gate_conflict_rollback_history(api: dict[str, Any]) -> None:
    c, h = api["client"], _h(api, "promoter")
    v1 = _register(api, 0.5)
    r = c.post(f"/v1/models/{NAME}/promote", json={}, headers=h)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["outcome"] == "promoted" and rec["version"] == v1 and rec["actor"] == "pat"

    v2 = _register(api, 0.4)  # 20 % worse than production
    gates = {
        "metrics": [{"stage": "eval", "metric": "token_accuracy", "vs": "production", "max_regression": 0.05}]
    }
    r = c.post(f"/v1/models/{NAME}/promote", json={"gates": gates}, headers=h)
    assert r.status_code == 412
    err = r.json()["error"]
    assert err["code"] == "gate_failed" and "0.4 vs production" in err["message"]
    (gate,) = err["details"]["gates"]
    assert gate["passed"] is False and gate["inputs"]["regression"] == pytest.approx(0.2)
    assert c.get(f"/v1/models/{NAME}/aliases", headers=h).json()["production"] == v1  # nothing moved

    # a promotion of the same model in progress elsewhere: 409
    lock = api["home"] / "locks" / f"promote-{NAME}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        r = c.post(f"/v1/models/{NAME}/promote", json={"version": v2}, headers=h)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"

    r = c.post(f"/v1/models/{NAME}/promote", json={"version": v2}, headers=h)
    assert r.status_code == 200 and r.json()["previous_version"] == v1
    r = c.post(f"/v1/models/{NAME}/rollback", headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "rolled_back" and r.json()["version"] == v1
    aliases = c.get(f"/v1/models/{NAME}/aliases", headers=h).json()
    assert aliases["production"] == v1

    hist = c.get(f"/v1/models/{NAME}/history", headers=h).json()
    assert [x["outcome"] for x in hist] == ["rolled_back", "promoted", "blocked", "promoted"]
    assert {x["actor"] for x in hist} == {"pat"}


def test_promote_refusals_and_request_checks(api: dict[str, Any]) -> None:
    c, h = api["client"], _h(api, "promoter")
    r = c.post("/v1/models/nothing/promote", json={}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "promotion_refused"
    r = c.post(f"/v1/models/{NAME}/rollback", json={}, headers=h)
    assert r.status_code in (400, 404)
    bad = {"candidate_endpoint": "file:///etc/passwd"}
    r = c.post(f"/v1/models/{NAME}/promote", json=bad, headers=h)
    assert r.status_code == 422 and "http://" in r.json()["error"]["message"]
    r = c.post(f"/v1/models/{NAME}/promote", json={"to_alias": "../x"}, headers=h)
    assert r.status_code == 422
    r = c.post(f"/v1/models/{NAME}/promote", json={"unknown": 1}, headers=h)
    assert r.status_code == 422
    r = c.post("/v1/models/..%2Fetc/promote", json={}, headers=h)
    assert r.status_code in (404, 422)
    r = c.post(f"/v1/models/{NAME}/promote", json={}, headers=_h(api, "reader"))
    assert r.status_code == 403
