"""The ``ModelEndpoint`` controller in-process (kopf's ``KopfRunner``) against the real API server, with a
small kubelet stand-in that binds every pod and reports it Running + Ready at this machine's address:
create -> Ready; a spec change rolls the new revision out and deletes the old one's children; a canary
whose gate fails is rolled back; a restarted operator resumes a canary at its recorded step; deleting
the endpoint garbage-collects its children; a bad spec is refused by the server with field paths.

The canary's ``/metrics`` are served by a small HTTP server in this test (Prometheus text written by the
front's own prometheus_client metrics) -- a stand-in for the pods' front -- and reached the real way,
through the API server's pod proxy at the pods' reported IP. Not proven here: real serving pods, and the
kinds Kubernetes 1.20 lacks (``autoscaling/v2`` HPA, ``policy/v1`` PDB, Gateway API ``HTTPRoute``): the
controller skips them by discovery and their manifests are validated offline (K1's unit tests)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubelet import FakeKubelet
from kubernetes import client
from prometheus_client import generate_latest

from forgeline_operators.deploy.front import _Metrics
from forgeline_operators.deploy.resources import API_VERSION, KIND, ModelEndpointSpec, revision_of, to_cr
from forgeline_operators.lib.kube_client import Kube, wait_for

pytestmark = pytest.mark.k8s
ME = (API_VERSION, KIND)


def _host_ip() -> str:
    """An address of this machine the API server can proxy to (never loopback: the server refuses it)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; this picks the outgoing interface
            ip = str(s.getsockname()[0])
    except OSError:  # no route at all: the host name's address
        ip = socket.gethostbyname(socket.gethostname())
    if ip.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address for the pod proxy to reach")
    return ip


class MetricsServer:
    """Prometheus text of the front's metrics, as a pod's ``/metrics`` would serve it."""

    def __init__(self, ip: str) -> None:
        self.text = ""
        parent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = parent.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((ip, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, ttft_s: float, ok: int, failed: int) -> None:
        m = _Metrics()
        for _ in range(ok + failed):
            m.ttft.observe(ttft_s)
        m.requests.labels("/v1/chat/completions", "200").inc(ok)
        if failed:
            m.requests.labels("/v1/chat/completions", "500").inc(failed)
        self.text = generate_latest(m.registry).decode()


@pytest.fixture
def k(api_client: client.ApiClient, crds: list[str]) -> Kube:
    assert "modelendpoints.forgeline.dev" in crds
    return Kube(api_client)


@pytest.fixture
def cluster_env(k: Kube, namespace: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsServer]:
    ip = _host_ip()
    metrics = MetricsServer(ip)
    monkeypatch.setenv("FORGELINE_ENDPOINT_RESYNC_S", "0.5")  # read when the controller is first imported
    from forgeline_operators.deploy import controller

    # The controller scrapes each canary pod's metrics port through the pod proxy: here, the test's server.
    monkeypatch.setattr(controller, "METRICS_PORT", metrics.port)
    with FakeKubelet(k.api, namespace, ip=ip):
        yield metrics
    metrics.server.shutdown()


@contextmanager
def operator(namespace: str) -> Iterator[KopfRunner]:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "forgeline_operators.deploy.controller"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-3000:]
    assert runner.exit_code == 0, runner.output[-3000:]


def _spec(ns: str, uri: str = "s3://models/llama/1", **rollout: Any) -> ModelEndpointSpec:
    kube = {"namespace": ns, "replicas": 2, "gpus": 1}
    return ModelEndpointSpec.model_validate(
        {"model": {"uri": uri, "version": "llama/1"}, "rollout": rollout, "kubernetes": kube}
    )


def _apply(kube: Kube, namespace: str, name: str, spec: ModelEndpointSpec) -> dict[str, Any]:
    return kube.apply(to_cr(name, spec))


def _status_until(kube: Kube, ns: str, name: str, ok: Callable[[dict[str, Any]], bool], what: str) -> Any:
    def probe() -> dict[str, Any] | None:
        st = (kube.get(*ME, name, ns) or {}).get("status") or {}
        return st if ok(st) else None

    return wait_for(probe, 60, f"ModelEndpoint {name}: {what}", interval_s=0.2)


def _deployments(kube: Kube, ns: str, name: str) -> dict[str, dict[str, Any]]:
    items = kube.list("apps/v1", "Deployment", ns, label_selector=f"forgeline.dev/endpoint={name}")
    return {d["metadata"]["labels"]["forgeline.dev/revision"]: d for d in items}


def _conds(st: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in st.get("conditions") or []}


def test_create_rolling_update_and_delete(k: Kube, namespace: str, cluster_env: MetricsServer) -> None:
    s1, s2 = _spec(namespace), _spec(namespace, "s3://models/llama/2")
    r1, r2 = revision_of(s1), revision_of(s2)
    with operator(namespace):
        made = _apply(k, namespace, "chat", s1)
        st = _status_until(k, namespace, "chat", lambda s: s.get("phase") == "Ready", "Ready")
        assert (
            st["currentRevision"] == r1 and st["trafficSplit"] == {r1: 100} and st["observedGeneration"] == 1
        )
        assert _conds(st) == {"Ready": "True", "Progressing": "False", "Degraded": "False"}
        # No finalizer: nothing outside the cluster to clean up, so deletion never waits on the operator.
        assert not (k.get(*ME, "chat", namespace) or {})["metadata"].get("finalizers")
        dep = _deployments(k, namespace, "chat")[r1]
        assert dep["spec"]["replicas"] == 2
        assert dep["metadata"]["ownerReferences"][0]["uid"] == made["metadata"]["uid"]
        stable = k.get("v1", "Service", "chat", namespace)
        assert stable is not None and stable["spec"]["selector"]["forgeline.dev/revision"] == r1
        assert not k.has_api("autoscaling/v2", "HorizontalPodAutoscaler")  # 1.20: skipped, not applied

        _apply(k, namespace, "chat", s2)
        st = _status_until(k, namespace, "chat", lambda s: s.get("currentRevision") == r2, "rolled to r2")
        assert st["phase"] == "Ready" and st["trafficSplit"] == {r2: 100} and st["observedGeneration"] == 2
        assert set(st["revisions"]) == {r1, r2}
        wait_for(lambda: set(_deployments(k, namespace, "chat")) == {r2}, 30, "old revision deleted")
        assert k.get("v1", "Service", f"chat-{r1}", namespace) is None
        stable = k.get("v1", "Service", "chat", namespace)
        assert stable is not None and stable["spec"]["selector"]["forgeline.dev/revision"] == r2

        k.delete(*ME, "chat", namespace)
        # The garbage collector learns a new CRD's kind on its discovery resync (30 s): allow for it.
        wait_for(lambda: not _deployments(k, namespace, "chat"), 90, "children garbage-collected")
        wait_for(lambda: k.get("v1", "Service", "chat", namespace) is None, 60, "stable Service collected")


def test_canary_failing_gate_rolls_back(k: Kube, namespace: str, cluster_env: MetricsServer) -> None:
    s1 = _spec(namespace)
    gates = {"p95_ttft_ms": 200, "error_rate": 0.01}
    s2 = _spec(
        namespace, "s3://models/llama/2", strategy="canary", steps=[25, 100], step_interval_s=1, gates=gates
    )
    r1, r2 = revision_of(s1), revision_of(s2)
    cluster_env.serve(ttft_s=0.8, ok=90, failed=10)  # the canary is slow and failing
    with operator(namespace):
        _apply(k, namespace, "chat", s1)
        _status_until(k, namespace, "chat", lambda s: s.get("phase") == "Ready", "Ready")
        _apply(k, namespace, "chat", s2)
        st = _status_until(k, namespace, "chat", lambda s: s.get("phase") == "Degraded", "rolled back")
        wait_for(lambda: set(_deployments(k, namespace, "chat")) == {r1}, 30, "canary deleted")
    assert st["currentRevision"] == r1 and st["trafficSplit"] == {r1: 100} and "canaryRevision" not in st
    assert "p95 TTFT" in st["rollbackReason"] and "error rate 0.1 > 0.01" in st["rollbackReason"]
    assert st["lastGate"]["passed"] is False and st["lastGate"]["errorRate"] == pytest.approx(0.1)
    assert _conds(st)["Degraded"] == "True" and _conds(st)["Ready"] == "True"
    assert r2 in st["revisions"]


def test_restart_mid_canary_resumes_at_recorded_step(
    k: Kube, namespace: str, cluster_env: MetricsServer
) -> None:
    s1 = _spec(namespace)
    s2 = _spec(
        namespace,
        "s3://models/llama/2",
        strategy="canary",
        steps=[10, 50, 100],
        step_interval_s=3,
        gates={"p95_ttft_ms": 500, "error_rate": 0.05},
    )
    r2 = revision_of(s2)
    cluster_env.serve(ttft_s=0.05, ok=200, failed=0)  # a healthy canary
    with operator(namespace):
        _apply(k, namespace, "chat", s1)
        _status_until(k, namespace, "chat", lambda s: s.get("phase") == "Ready", "Ready")
        _apply(k, namespace, "chat", s2)
        at = _status_until(k, namespace, "chat", lambda s: s.get("canaryStep") == 1, "canary at step 1")
    stopped = (k.get(*ME, "chat", namespace) or {})["status"]
    assert stopped["canaryStep"] == 1 and stopped["stepStartedAt"] == at["stepStartedAt"], "stopped mid-step"
    canary_uid = _deployments(k, namespace, "chat")[r2]["metadata"]["uid"]
    assert at["trafficSplit"][r2] == 50 and at["lastGate"]["step"] == 0
    with operator(namespace):  # a new operator process: only the stored status to go on
        st = _status_until(k, namespace, "chat", lambda s: s.get("currentRevision") == r2, "promoted")
    assert st["phase"] == "Ready" and st["trafficSplit"] == {r2: 100}
    assert st["lastGate"]["step"] == 1, "the restarted operator judged step 1, not step 0 again"
    assert _deployments(k, namespace, "chat")[r2]["metadata"]["uid"] == canary_uid
    assert _deployments(k, namespace, "chat")[r2]["spec"]["replicas"] == 2


def test_bad_spec_rejected_with_field_paths(k: Kube, namespace: str) -> None:
    obj = to_cr("bad", _spec(namespace))
    obj["spec"]["runtime"] = "tgi"
    obj["spec"]["kubernetes"]["replicas"] = -1
    obj["spec"]["rollout"]["stepIntervalSeconds"] = 0
    with pytest.raises(client.ApiException) as e:
        client.CustomObjectsApi(k.api).create_namespaced_custom_object(
            "forgeline.dev", "v1alpha1", namespace, "modelendpoints", obj
        )
    assert e.value.status == 422
    body = str(e.value.body)
    for path in ("spec.runtime", "spec.kubernetes.replicas", "spec.rollout.stepIntervalSeconds"):
        assert path in body, body


def test_deploy_stage_kubernetes_target(k: Kube, namespace: str, cluster_env: MetricsServer) -> None:
    """The deploy stage's ``target: kubernetes`` path: ModelEndpoint built from the stage, applied, Ready."""
    from forgeline.runtime.context import OperatorError
    from forgeline_operators.deploy.kube_target import deploy, endpoint_spec
    from forgeline_operators.deploy.spec import DeployStage

    stage = DeployStage.model_validate(
        {
            "name": "deploy",
            "kind": "deploy",
            "repository": "${stages.serve.outputs.repository}",
            "kubernetes": {
                "namespace": namespace,
                "replicas": 1,
                "gpus": 1,
                "repository": {"pvc": "models", "path": "quickstart/repo"},
            },
        }
    )
    # A PVC source here: this API server build turns an empty string in a custom resource into null
    # (422), and `repository: {uri: ...}` carries `path: ""` (reported to the lead, not worked around).
    spec = endpoint_spec(stage, "/home/me/.forgeline/artifacts/serve/repository")
    assert spec.model.uri == "pvc://models/quickstart/repo"
    lines: list[str] = []
    with operator(namespace):
        status = deploy(k, "quickstart", spec, timeout_s=60, interval_s=0.2, log=lines.append)
        assert status["url"] == f"http://quickstart.{namespace}.svc.cluster.local:8000"
        assert status["phase"] == "Ready" and lines[-1].startswith(
            f"ModelEndpoint {namespace}/quickstart: Ready"
        )
    # With no operator running, a new generation is never acted on: the deadline names what to check.
    newer = spec.model_copy(update={"model": spec.model.model_copy(update={"version": "quickstart/2"})})
    with pytest.raises(OperatorError, match="is the forgeline operator running"):
        deploy(k, "quickstart", newer, timeout_s=1, interval_s=0.2)


def test_promotion_rolls_the_endpoint_and_moves_the_alias_only_when_ready(
    k: Kube, namespace: str, cluster_env: MetricsServer, home: Any
) -> None:
    """Issue 8's Kubernetes half: ``promote`` changes the ModelEndpoint's model, waits for the canary,
    and moves ``production`` only once the new revision serves; a canary the gates roll back leaves the
    alias where it was and the resource's model restored."""
    from forgeline.tracking import Tracker, model_aliases, register_version, resolve_settings
    from forgeline_operators.promote import service
    from forgeline_operators.promote.spec import PromoteEndpointSpec

    uri = resolve_settings(None, "", home).uri
    tracker = Tracker(uri)
    versions = [
        register_version(tracker, "llama", f"s3://models/llama/{i}", None, {"forgeline.sha256": f"{i}" * 64})
        for i in (1, 2)
    ]
    canary = {"strategy": "canary", "steps": [50, 100], "step_interval_s": 1}
    gates = {"p95_ttft_ms": 300, "error_rate": 0.02}
    _apply(k, namespace, "chat", _spec(namespace, "s3://models/llama/0", **canary, gates=gates))
    endpoint = PromoteEndpointSpec(name="chat", target="kubernetes", namespace=namespace, timeout_s=60)
    cluster_env.serve(ttft_s=0.05, ok=100, failed=0)
    with operator(namespace):
        _status_until(k, namespace, "chat", lambda s: s.get("phase") == "Ready", "Ready")
        first = service.promote(
            home, uri, "llama", version=versions[0].version, endpoint=endpoint, actor="ci"
        )
        assert first.outcome == "promoted" and first.endpoint and first.endpoint["revision"]
        st = (k.get(*ME, "chat", namespace) or {})["status"]
        assert st["modelVersion"] == "llama/1" and st["trafficSplit"] == {first.endpoint["revision"]: 100}

        cluster_env.serve(ttft_s=0.8, ok=90, failed=10)  # version 2's canary is slow and failing
        with pytest.raises(service.PromotionError, match=r"rolled back: .*p95 TTFT"):
            service.promote(
                home, uri, "llama", version=versions[1].version, actor="ci"
            )  # endpoint remembered
        assert model_aliases(tracker, "llama") == {"production": 1}
        body = k.get(*ME, "chat", namespace) or {}
        assert body["spec"]["model"]["uri"] == "s3://models/llama/1"  # restored: it says what serves

        cluster_env.serve(ttft_s=0.05, ok=100, failed=0)
        second = service.promote(home, uri, "llama", version=versions[1].version, actor="ci")
        assert second.outcome == "promoted"
        assert model_aliases(tracker, "llama") == {"production": 2, "previous": 1}
        st = (k.get(*ME, "chat", namespace) or {})["status"]
        assert st["phase"] == "Ready" and st["modelVersion"] == "llama/2" and st["lastGate"]["passed"]
    outcomes = [h.outcome for h in service.history(uri, "llama")]
    assert outcomes == ["promoted", "failed", "promoted"]
