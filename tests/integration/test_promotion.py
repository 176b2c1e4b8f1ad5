"""Promotion end to end on the embedded target, through the real CLI and a real tritonserver.

The quickstart runs twice with different SFT data: its promote stage puts version 1 on the production
endpoint, then version 2 while a load generator keeps sending requests to that endpoint (none may
fail); `forgeline rollback` returns the alias and the endpoint to version 1 (Triton serves model
version 1 again and greedy output equals version 1's); a failing gate blocks a promotion with the
numbers in the message and moves nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from forgeline_operators.ports import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "forgeline.cli"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "FORGELINE_ACTOR": "ci-bot"}
MODEL = "quickstart-tiny-llama"
PROMPT = {
    "model": "quickstart-tiny-prod",
    "prompt": "Uppercase: hello world",
    "max_tokens": 8,
    "temperature": 0,
}


def forgeline(*args: str, home: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--home", str(home)], cwd=cwd, capture_output=True, text=True, timeout=800, env=ENV
    )


@pytest.fixture
def workflow(tmp_path: Path) -> Path:
    """A copy of the quickstart on free ports, with its datasets beside it."""
    folder = tmp_path / "wf"
    shutil.copytree(ROOT / "workflows" / "data", folder / "data")
    text = (ROOT / "workflows" / "quickstart-tiny.yaml").read_text()
    staging, production = free_ports(2)
    text = text.replace("port: 8323", f"port: {staging}").replace("port: 8324", f"port: {production}")
    (folder / "quickstart.yaml").write_text(text)
    return folder / "quickstart.yaml"


@pytest.fixture
def stop_endpoints(home: Path) -> Iterator[None]:
    yield
    forgeline("endpoints", "stop", "--all", home=home)


def _endpoint(home: Path, name: str) -> dict[str, str]:
    data: dict[str, str] = json.loads((home / "endpoints" / f"{name}.json").read_text())
    return data


def _triton_version(home: Path) -> list[str]:
    rec = _endpoint(home, "quickstart-tiny-prod")
    index = httpx.post(f"{rec['triton_url']}/v2/repository/index", json={"ready": True}, timeout=10).json()
    return [m["version"] for m in index if m["name"] == "quickstart_tiny_prod" and m.get("state") == "READY"]


def _greedy(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json=PROMPT, timeout=60)
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["text"]
    return text


class Load(threading.Thread):
    """Requests one after another (2 clients, streaming and not) until stopped; every outcome kept."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []

    def _one(self, client: httpx.Client, i: int) -> None:
        body = {**PROMPT, "max_tokens": 8 + i % 8, "stream": bool(i % 2)}
        try:
            with client.stream("POST", f"{self.url}/v1/completions", json=body, timeout=60) as r:
                payload = r.read().decode()
                if r.status_code != 200:
                    self.failures.append(f"HTTP {r.status_code}: {payload[:200]}")
                elif body["stream"] and not payload.rstrip().endswith("data: [DONE]"):
                    self.failures.append(f"stream ended early: {payload[-200:]}")
                else:
                    self.ok += 1
        except httpx.HTTPError as e:
            self.failures.append(f"{type(e).__name__}: {e}")

    def run(self) -> None:
        def client_loop(offset: int) -> None:
            with httpx.Client() as client:
                i = offset
                while not self.stop.is_set():
                    self._one(client, i)
                    i += 2
                    self.stop.wait(0.05)  # paced (~40 requests/s): load, not a CPU hog starving the run

        workers = [threading.Thread(target=client_loop, args=(k,), daemon=True) for k in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


def test_quickstart_twice_promote_under_load_rollback_and_blocked_gate(
    home: Path, workflow: Path, stop_endpoints: None
) -> None:
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    first = forgeline("run", str(workflow), home=home)
    assert first.returncode == 0, first.stdout + first.stderr
    prod_url = _endpoint(home, "quickstart-tiny-prod")["url"]
    assert f"promote.endpoint = {prod_url}" in first.stdout
    assert int(client.get_model_version_by_alias(MODEL, "production").version) == 1
    assert _triton_version(home) == ["1"]
    v1_text = _greedy(prod_url)

    # Different data: the SFT set loses its last third, so every stage from sft on reruns.
    data = workflow.parent / "data" / "chat_sft.jsonl"
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows[: 2 * len(rows) // 3]) + "\n")
    load = Load(prod_url)
    load.start()
    try:
        second = forgeline("run", str(workflow), home=home)
    finally:
        load.stop.set()
        load.join(timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "promote.version = 2" in second.stdout
    assert load.failures == [], load.failures[:5]
    assert load.ok >= 20  # the load really ran through the swap
    aliases = {a: int(v) for a, v in client.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"candidate": 2, "production": 2, "previous": 1}
    assert _triton_version(home) == ["2"]
    assert _endpoint(home, "quickstart-tiny-prod")["url"] == prod_url  # same server, swapped in place

    back = forgeline("rollback", MODEL, home=home)
    assert back.returncode == 0, back.stdout + back.stderr
    assert "rolled back from version 2 to 1" in back.stdout
    assert int(client.get_model_version_by_alias(MODEL, "production").version) == 1
    assert _triton_version(home) == ["1"]
    assert _greedy(prod_url) == v1_text
    listing = json.loads(forgeline("endpoints", "--json", home=home).stdout)
    assert {e["name"]: e["serving_version"] for e in listing} == {
        "quickstart-tiny": None,
        "quickstart-tiny-prod": f"{MODEL}/1",
    }

    gates = workflow.parent / "gates.yaml"
    gates.write_text("slo: {min_tokens_per_s: 1.0e+9, concurrency: 2, requests: 4, max_tokens: 8}\n")
    blocked = forgeline("promote", MODEL, "--version", "2", "--gates", str(gates), home=home)
    assert blocked.returncode == 2, blocked.stdout + blocked.stderr
    assert "blocked" in blocked.stderr and re.search(r"output tokens/s < 1e\+09", blocked.stderr), (
        blocked.stderr
    )
    assert int(client.get_model_version_by_alias(MODEL, "production").version) == 1
    assert _triton_version(home) == ["1"]

    history = forgeline("history", MODEL, "--json", home=home)
    records = json.loads(history.stdout)
    assert [(r["action"], r["version"], r["outcome"]) for r in records] == [
        ("promote", 2, "blocked"),
        ("rollback", 1, "rolled_back"),
        ("promote", 2, "promoted"),
        ("promote", 1, "promoted"),
    ]
    assert {r["actor"] for r in records} == {"ci-bot"}
    promoted = records[2]
    assert {g["name"] for g in promoted["gates"]} == {
        "metric:token_accuracy:vs_production",
        "metric:perplexity:vs_parent",
        "quantization",
        "slo",
    }
    # Both versions carry eval-tuned's per-row scores on the same rows: v2 vs v1 is a paired comparison.
    by_name = {g["name"]: g for g in promoted["gates"]}
    paired = by_name["metric:token_accuracy:vs_production"]
    assert paired["inputs"]["paired_rows"] > 0, paired
    assert "paired interval of the regression" in paired["message"], paired
    assert "regression_ci" in by_name["metric:perplexity:vs_parent"]["inputs"]
    tags = client.get_model_version(MODEL, "2").tags
    assert tags["forgeline.eval.eval-tuned.rows"].startswith("file://")
    assert len(tags["forgeline.eval.eval-tuned.set"]) == 64
    print(f"promotion v1->v2 under load: {promoted['duration_s']:.1f}s, {load.ok} requests, 0 failed")
