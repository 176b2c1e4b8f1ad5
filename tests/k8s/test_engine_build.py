"""The ``EngineBuild`` controller in-process (kopf's ``KopfRunner``) against the real API server, the
fake kubelet playing the GPU node: build Job created with an ownerReference, a pod's termination message
becomes the status, a failed build is Failed/Degraded, deleting the resource garbage-collects the Job,
a cache hit creates no Job, and a restarted operator resumes from ``status``.

Not proven here: the Job's pod actually running ``engine_job`` on a GPU (no kubelet, no GPU); the
entrypoint itself is unit-tested, and its Job manifest is validated offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kube_cluster import Cluster
from kubelet import FakeKubelet, Outcome
from kubernetes import client

from forgeline_operators.build.k8s import engine_build, job_name
from forgeline_operators.build.operator import ENGINE_CACHE_ENV, store_engine
from forgeline_operators.lib.kube_client import Kube, wait_for
from forgeline_operators.ports import free_port

pytestmark = pytest.mark.k8s
EB = ("forgeline.dev/v1alpha1", "EngineBuild")
SETTINGS = {"tp": 1, "pp": 1, "max_batch_size": 8}


@contextmanager
def operator(namespace: str) -> Iterator[KopfRunner]:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "forgeline_operators.build.controller"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-3000:]
    assert runner.exit_code == 0, runner.output[-3000:]


def _resource(namespace: str, name: str, key: str) -> dict[str, Any]:
    return engine_build(
        name,
        namespace=namespace,
        checkpoint="/artifacts/ckpt/llama",
        checkpoint_sha256="ab" * 32,
        settings=SETTINGS,
        cache_key=key,
        output=f"/artifacts/engines/{name}",
    )


def _status_until(
    kc: Kube, namespace: str, name: str, ok: Callable[[dict[str, Any]], bool], what: str
) -> Any:
    def probe() -> dict[str, Any] | None:
        obj = kc.get(*EB, name, namespace) or {}
        status = obj.get("status") or {}
        return status if ok(status) else None

    return wait_for(probe, 60, f"EngineBuild {name}: {what}", interval_s=0.2)


def _conds(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions") or []}


@pytest.fixture
def kc(api_client: client.ApiClient, crds: list[str]) -> Kube:
    return Kube(api_client)


def _succeed(result: dict[str, Any]) -> Callable[[Any], Outcome]:
    return lambda pod: Outcome("Succeeded", message=json.dumps(result))


def test_build_job_succeeds_then_delete_collects_it(kc: Kube, namespace: str) -> None:
    key = "1" * 64
    result = {
        "phase": "Succeeded",
        "path": "/artifacts/engines/llama",
        "sha256": "cd" * 32,
        "cache": "miss",
        "form": "engine",
        "engines": ["rank0.engine"],
        "cacheKey": key,
    }
    with operator(namespace), FakeKubelet(kc.api, namespace, _succeed(result)) as kubelet:
        made = kc.apply(_resource(namespace, "llama", key))
        status = _status_until(kc, namespace, "llama", lambda s: s.get("phase") == "Succeeded", "Succeeded")
        assert not kubelet.errors
    assert status["path"] == result["path"] and status["sha256"] == result["sha256"]
    assert status["cache"] == "miss" and status["engines"] == ["rank0.engine"]
    assert status["observedGeneration"] == 1
    assert _conds(status) == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
    job = kc.get("batch/v1", "Job", job_name(made), namespace)
    assert job is not None
    (ref,) = job["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("EngineBuild", made["metadata"]["uid"], True)

    kc.delete(*EB, "llama", namespace)
    wait_for(lambda: kc.get("batch/v1", "Job", job_name(made), namespace) is None, 60, "the Job is collected")


def test_failed_build_is_failed_and_degraded(kc: Kube, namespace: str) -> None:
    failure = {"phase": "Failed", "reason": "NoGPU", "message": "engine: tensorrt-llm needs a CUDA GPU"}
    decide = lambda pod: Outcome("Failed", message=json.dumps(failure), exit_code=2)  # noqa: E731
    with operator(namespace), FakeKubelet(kc.api, namespace, decide):
        kc.apply(_resource(namespace, "nogpu", "2" * 64))
        # backoffLimit 1: two failed pods (the Job controller waits ~10 s before the retry).
        status = _status_until(kc, namespace, "nogpu", lambda s: s.get("phase") == "Failed", "Failed")
    assert status["reason"] == "NoGPU" and "CUDA GPU" in status["message"]
    assert _conds(status) == {"Ready": "False", "Progressing": "False", "Degraded": "True"}


def test_cache_hit_creates_no_job(
    kc: Kube, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "3" * 64
    engine = tmp_path / "built"
    engine.mkdir()
    (engine / "rank0.engine").write_bytes(b"engine bytes")
    store_engine(tmp_path / "cache", key, engine, {"key": key})
    monkeypatch.setenv(ENGINE_CACHE_ENV, str(tmp_path / "cache"))
    with operator(namespace):
        made = kc.apply(_resource(namespace, "cached", key))
        status = _status_until(kc, namespace, "cached", lambda s: s.get("phase") == "Succeeded", "cache hit")
    assert status["cache"] == "hit" and status["path"] == str(tmp_path / "cache" / key / "engine")
    assert status["engines"] == ["rank0.engine"] and len(status["sha256"]) == 64
    assert kc.get("batch/v1", "Job", job_name(made), namespace) is None
    assert kc.list("batch/v1", "Job", namespace) == []


def test_operator_restart_resumes_from_status(kc: Kube, namespace: str) -> None:
    key = "4" * 64
    with operator(namespace):
        made = kc.apply(_resource(namespace, "resume", key))
        _status_until(kc, namespace, "resume", lambda s: s.get("jobName") == job_name(made), "Job recorded")
    job = kc.get("batch/v1", "Job", job_name(made), namespace)
    assert job is not None
    # While no operator runs, the node finishes the build.
    result = {
        "phase": "Succeeded",
        "path": "/artifacts/engines/resume",
        "sha256": "ef" * 32,
        "cache": "miss",
        "form": "engine",
        "engines": [],
        "cacheKey": key,
    }
    with FakeKubelet(kc.api, namespace, _succeed(result)):
        wait_for(
            lambda: ((kc.get("batch/v1", "Job", job_name(made), namespace) or {}).get("status") or {}).get(
                "succeeded"
            ),
            60,
            "the Job completes",
        )
    t0 = time.monotonic()
    with operator(namespace):
        status = _status_until(kc, namespace, "resume", lambda s: s.get("phase") == "Succeeded", "resumed")
    assert status["path"] == result["path"] and status["jobName"] == job_name(made)
    jobs = kc.list("batch/v1", "Job", namespace)
    assert [j["metadata"]["uid"] for j in jobs] == [job["metadata"]["uid"]], (
        "resume must not start a new build"
    )
    assert time.monotonic() - t0 < 30


def _install_rbac(kc: Kube) -> None:
    """The operator's ServiceAccount, ClusterRole and binding exactly as ``k8s/rbac/`` ships them."""
    if kc.get("v1", "Namespace", "forgeline-system") is None:
        kc.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "forgeline-system"}})
    rbac = Path(__file__).resolve().parents[2] / "k8s" / "rbac"
    for name in yaml.safe_load((rbac / "kustomization.yaml").read_text())["resources"]:
        for doc in yaml.safe_load_all((rbac / name).read_text()):
            if doc:
                doc["metadata"].setdefault("namespace", "forgeline-system") if doc[
                    "kind"
                ] == "ServiceAccount" else None
                kc.apply(doc)


def test_operator_process_with_its_rbac_runs_every_controller(
    kc: Kube, kube: Cluster, namespace: str, tmp_path: Path
) -> None:
    """``python -m forgeline_operators.kube.operator`` (what the operator Deployment runs) as a process,
    cluster-wide and authenticated as the ``forgeline-operator`` ServiceAccount, like the Deployment:
    ``k8s/rbac/`` grants all it needs (any 403 fails the test)."""
    _install_rbac(kc)
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.user_kubeconfig("system:serviceaccount:forgeline-system:forgeline-operator")),
    }
    port = free_port()
    log = tmp_path / "operator.log"
    argv = [
        sys.executable,
        "-m",
        "forgeline_operators.kube.operator",
        "--liveness",
        f"http://127.0.0.1:{port}/healthz",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:

        def live() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_for(live, 60, "the operator's liveness endpoint", interval_s=0.2)
        key = "5" * 64
        result = {
            "phase": "Succeeded",
            "path": "/artifacts/engines/proc",
            "sha256": "ab" * 32,
            "cache": "miss",
            "form": "engine",
            "engines": [],
            "cacheKey": key,
        }
        with FakeKubelet(kc.api, namespace, _succeed(result)):
            kc.apply(_resource(namespace, "proc", key))
            status = _status_until(
                kc, namespace, "proc", lambda s: s.get("phase") == "Succeeded", "Succeeded"
            )
        assert status["path"] == result["path"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    text = log.read_text()
    assert (
        "controllers: forgeline_operators.build.controller, forgeline_operators.deploy.controller" in text
    ), text[-3000:]
    assert "Forbidden" not in text and "403" not in text, text[-3000:]
