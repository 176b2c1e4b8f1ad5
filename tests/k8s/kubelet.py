"""A fake kubelet for the ``k8s`` tier: the control plane here has no scheduler and no kubelet, so this
plays the node. It binds a pod to a node (the ``pods/binding`` subresource, as the scheduler does) and
writes the pod status a kubelet would: Running + Ready (which the ReplicaSet controller counts into a
Deployment's ``readyReplicas``), or Succeeded / Failed with a terminated container state carrying the
termination ``message`` (which the Job controller counts and the build controller reads back).

:class:`FakeKubelet` does that in a background thread for every new pod in a namespace, with a
``decide(pod) -> Outcome`` callback choosing each pod's fate; the functions work on single pods.
"""

from __future__ import annotations

import datetime
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client

NODE = "fake-node-0"


@dataclass(frozen=True)
class Outcome:
    """What happens to a pod: ``phase`` Running (ready or not), Succeeded or Failed (with a message)."""

    phase: str = "Running"
    ready: bool = True
    message: str = ""
    exit_code: int | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bind(core: client.CoreV1Api, pod: Any, node: str = NODE) -> None:
    """Set ``spec.nodeName`` through the binding subresource (nodeName is otherwise immutable)."""
    body = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod.metadata.name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    }
    # _preload_content=False: the client cannot deserialize the Status this call returns.
    core.create_namespaced_pod_binding(
        pod.metadata.name, pod.metadata.namespace, body, _preload_content=False
    )


def pod_status(pod: Any, outcome: Outcome, ip: str = "10.244.0.10") -> dict[str, Any]:
    """The status a kubelet would report for ``pod`` once ``outcome`` happened."""
    now = _now()
    containers = [c.name for c in pod.spec.containers]
    if outcome.phase == "Running":
        state: dict[str, Any] = {"running": {"startedAt": now}}
        ready = outcome.ready
    else:
        code = (
            outcome.exit_code if outcome.exit_code is not None else (0 if outcome.phase == "Succeeded" else 1)
        )
        reason = "Completed" if code == 0 else "Error"
        state = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "message": outcome.message,
                "startedAt": now,
                "finishedAt": now,
            }
        }
        ready = False
    flag = "True" if ready else "False"
    return {
        "phase": outcome.phase,
        "hostIP": "10.0.1.1",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [
            {"type": t, "status": s, "lastTransitionTime": now}
            for t, s in (
                ("PodScheduled", "True"),
                ("Initialized", "True"),
                ("ContainersReady", flag),
                ("Ready", flag),
            )
        ],
        "containerStatuses": [
            {
                "name": n,
                "image": c.image,
                "imageID": "",
                "ready": ready,
                "restartCount": 0,
                "started": outcome.phase == "Running",
                "state": state,
            }
            for n, c in zip(containers, pod.spec.containers, strict=True)
        ],
    }


def settle(core: client.CoreV1Api, pod: Any, outcome: Outcome, ip: str = "10.244.0.10") -> None:
    """Bind ``pod`` if needed and patch its status to ``outcome``."""
    if not pod.spec.node_name:
        bind(core, pod)
    core.patch_namespaced_pod_status(
        pod.metadata.name, pod.metadata.namespace, {"status": pod_status(pod, outcome, ip)}
    )


class FakeKubelet:
    """Settles every new pod of ``namespace`` by ``decide(pod)`` (None: leave it Pending) until stopped."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        decide: Callable[[Any], Outcome | None] | None = None,
        ip: str | None = None,
    ) -> None:
        """``ip``: the address every pod reports (default: a distinct fake one each); a real address of
        this machine lets the API server's pod proxy reach a server the test runs there."""
        self.ip = ip
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.decide = decide or (lambda pod: Outcome())
        self.settled: dict[str, Outcome] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"fake-kubelet-{namespace}", daemon=True)
        self._ips = 10

    def __enter__(self) -> FakeKubelet:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for pod in self.core.list_namespaced_pod(self.namespace).items:
                    if pod.metadata.name in self.settled or pod.metadata.deletion_timestamp:
                        continue
                    outcome = self.decide(pod)
                    if outcome is None:
                        continue
                    self._ips += 1
                    settle(self.core, pod, outcome, ip=self.ip or f"10.244.0.{self._ips % 250 + 2}")
                    self.settled[pod.metadata.name] = outcome
            except client.ApiException as e:  # a pod deleted between list and patch: next round
                if e.status != 404:
                    self.errors.append(f"{e.status} {e.reason}: {str(e.body)[:300]}")
            self._stop.wait(0.2)


class KubeletLogs:
    """The kubelet's container-log endpoint, for ``pods/log`` through the real API server.

    The API server finds a pod's node, then asks ``https://<InternalIP>:<daemonEndpoints.kubeletEndpoint
    .Port>/containerLogs/<ns>/<pod>/<container>`` (without ``--kubelet-certificate-authority`` it does
    not verify the kubelet's certificate). This serves the lines a test adds, honouring ``timestamps``
    and ``sinceSeconds`` as the kubelet does, and registers itself on the Node object the pods are bound
    to (created if missing). Use as a context manager.
    """

    def __init__(self, core: client.CoreV1Api, cert: Path, key: Path, node: str = NODE) -> None:
        import http.server
        import ssl
        import urllib.parse

        self.core, self.node = core, node
        self.lines: dict[tuple[str, str], list[tuple[datetime.datetime, str]]] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                owner.requests.append(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                query = urllib.parse.parse_qs(url.query)
                since = query.get("sinceSeconds")
                cutoff = (
                    datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=int(since[0]))
                    if since
                    else None
                )
                stamps = query.get("timestamps", ["false"])[0] == "true"
                body = "".join(
                    (f"{t.strftime('%Y-%m-%dT%H:%M:%S.%f')}000Z {line}\n" if stamps else f"{line}\n")
                    for t, line in list(owner.lines.get((parts[1], parts[2]), []))
                    if cutoff is None or t >= cutoff
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(str(cert), str(key))
        self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, name="kubelet-logs", daemon=True)

    def add(self, namespace: str, pod: str, lines: list[str]) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.lines.setdefault((namespace, pod), []).extend((now, line) for line in lines)

    def __enter__(self) -> KubeletLogs:
        self._thread.start()
        try:
            self.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node}})
        except client.ApiException as e:
            if e.status != 409:
                raise
        status = {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.server.server_address[1]}},
        }
        self.core.patch_node_status(self.node, {"status": status})
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
