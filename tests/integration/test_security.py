"""Issue 24, as an attacker would try it on loopback: a `submit`-scoped token on a real ``forgeline
api`` process sends workflows whose name fields reach for another home's endpoint (each a 422 naming
the field, the other endpoint still serving, its record unchanged), and the embedded Ray listens on
loopback only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from forgeline.api import create_token
from forgeline_operators.deploy.endpoint import EndpointRecord, _is_supervisor, start_detached, stop_endpoint
from forgeline_operators.engines.openvino import OpenvinoModelSpec, build_openvino_repository, export_openvino
from forgeline_operators.models.tiny_llama import SOURCE
from forgeline_operators.ports import free_port
from processes import terminate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, EndpointRecord]]:
    """A real endpoint (tritonserver + front, tiny model) in a home of its own: the target."""
    work = tmp_path_factory.mktemp("victim")
    hf = work / "hf"
    SOURCE.materialize(hf)
    ir = export_openvino(hf, work / "ir")
    repo = build_openvino_repository(work / "repo", ir, OpenvinoModelSpec(name="victim"))
    home = work / "home" / ".forgeline"
    rec = start_detached(home, repo, "victim", served_name="victim")
    try:
        yield home, rec
    finally:
        stop_endpoint(home, "victim")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("attacker") / ".forgeline"
    home.mkdir()
    shutil.copy(mlflow_template, home / "mlflow.db")
    tokens = home / "api" / "tokens.json"
    submit = create_token(tokens, "mallory", ["read", "submit"])
    port = free_port()
    cmd = [sys.executable, "-m", "forgeline.cli", "api", "--port", str(port), "--home", str(home)]
    cmd += ["--tokens", str(tokens), "--data-root", str(ROOT / "workflows")]
    log = open(home.parent / "api.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (home.parent / "api.log").read_text()
            time.sleep(0.3)
        with httpx.Client(base_url=base, timeout=60) as client:
            yield {"client": client, "home": home, "token": submit}
    finally:
        terminate(proc)
        log.close()


def _escape(victim_home: Path, attacker_home: Path) -> str:
    """A relative climb from the attacker's endpoints folder to the victim's endpoint record."""
    return os.path.relpath(victim_home / "endpoints" / "victim", attacker_home / "endpoints")


def _workflow(field: str, value: str) -> tuple[str, str]:
    """(YAML, expected problem field) with ``value`` in ``field``; everything else valid."""
    register = {"registered_name": "m", "alias": "candidate"}
    deploy = {"endpoint_name": "mine"}
    promote = {"registered_name": "m", "from_alias": "candidate", "to_alias": "production", "ep": "prod"}
    tracking, stage_name = "mine", "deploy"
    where = {
        "endpoint_name": "stages[1].endpoint_name",
        "registered_name": "stages[0].registered_name",
        "alias": "stages[0].alias",
        "from_alias": "stages[2].from_alias",
        "to_alias": "stages[2].to_alias",
        "promote_endpoint": "stages[2].endpoint.name",
        "experiment": "tracking.experiment",
        "stage_name": "stages[1].name",
    }[field]
    if field in register:
        register[field] = value
    elif field == "endpoint_name":
        deploy["endpoint_name"] = value
    elif field == "promote_endpoint":
        promote["ep"] = value
    elif field in promote:
        promote[field] = value
    elif field == "experiment":
        tracking = value
    else:
        stage_name = value
    q = json.dumps  # YAML accepts JSON strings: every value quoted exactly
    text = f"""\
        name: escape
        model: {{base: builtin://tiny-llama}}
        tracking: {{experiment: {q(tracking)}}}
        stages:
          - name: register
            kind: register
            model: ${{model}}
            registered_name: {q(register["registered_name"])}
            alias: {q(register["alias"])}
          - name: {q(stage_name)}
            kind: deploy
            repository: ${{model}}
            endpoint_name: {q(deploy["endpoint_name"])}
          - name: promote
            kind: promote
            registered_name: {q(promote["registered_name"])}
            from_alias: {q(promote["from_alias"])}
            to_alias: {q(promote["to_alias"])}
            endpoint: {{name: {q(promote["ep"])}}}
        """
    return textwrap.dedent(text), where


FIELDS = [
    "endpoint_name",
    "registered_name",
    "alias",
    "from_alias",
    "to_alias",
    "promote_endpoint",
    "experiment",
    "stage_name",
]


def test_names_cannot_reach_another_home(
    api: dict[str, Any], victim: tuple[Path, EndpointRecord], tmp_path: Path
) -> None:
    victim_home, rec = victim
    record = victim_home / "endpoints" / "victim.json"
    before = record.read_bytes()
    climb = _escape(victim_home, api["home"])
    assert climb.startswith("..") and climb.endswith("victim")
    values = [
        climb,
        str(victim_home / "endpoints" / "victim"),
        climb.replace("/", "%2f"),
        "victim/../" + climb,
    ]
    headers = {"Authorization": f"Bearer {api['token']}", "Content-Type": "application/yaml"}
    for field in FIELDS:
        for value in values:
            text, where = _workflow(field, value)
            for params in ({"dry_run": "true"}, {}):
                r = api["client"].post("/v1/workflows", content=text, headers=headers, params=params)
                assert r.status_code == 422, (field, value, r.text)
                problems = r.json()["error"]["details"]
                assert [p["field"] for p in problems] == [where], (field, value, problems)
                assert "invalid name" in problems[0]["message"] and problems[0]["line"]
        # The same file through the CLI: located errors, nothing run.
        text, where = _workflow(field, climb)
        path = tmp_path / f"{field}.yaml"
        path.write_text(text)
        for command in ("validate", "run"):
            out = subprocess.run(
                [sys.executable, "-m", "forgeline.cli", command, str(path)],
                capture_output=True,
                text=True,
                cwd=tmp_path,
                timeout=120,
            )
            assert out.returncode == 1, (command, out.stdout, out.stderr)
            assert (
                f"{path}:" in out.stderr + out.stdout
                and f": {where}: invalid name" in out.stderr + out.stdout
            )
            assert "Traceback" not in out.stderr + out.stdout
    # The other home's endpoint never noticed: same process, same record, still serving.
    assert _is_supervisor(rec, victim_home)
    assert record.read_bytes() == before
    assert httpx.get(f"{rec.url}/v1/health/ready", timeout=5).status_code == 200
    assert not (tmp_path / ".forgeline").exists()  # `forgeline run` refused before making a home


LISTENERS = """
import json, os, sys, time
import psutil, ray
from forgeline.runtime._ray import RaySettings, ensure_ray

assert ensure_ray(RaySettings(num_cpus=2))

@ray.remote
def nested():
    return os.getpid()

@ray.remote
def outer():
    return ray.get(nested.remote())

ray.get([outer.remote() for _ in range(2)])
time.sleep(1)
found = []
for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                found.append([p.name(), c.laddr.ip, c.laddr.port])
    except psutil.Error:
        pass
ray.shutdown()
print(json.dumps(found))
"""


def test_the_embedded_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ENABLE")}
    out = subprocess.run(
        [sys.executable, "-c", LISTENERS], capture_output=True, text=True, timeout=180, env=env, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in found}
    # Not vacuous: Ray's own servers are among the sockets listed.
    assert {"gcs_server", "raylet"} <= names, found
    loopback = ("127.", "::1", "::ffff:127.")
    exposed = [f for f in found if not f[1].startswith(loopback)]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    print(f"{len(found)} listening sockets, all loopback: {sorted(names)}")
