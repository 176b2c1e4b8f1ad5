"""Gate measurements of one endpoint revision -- requests, p95 time to first token and error rate -- from
the OpenAI front's own Prometheus series (:mod:`forgeline_operators.deploy.front`:
``forgeline_time_to_first_token_seconds`` histogram, ``forgeline_requests_total{route,status}``).

Two sources, as ``kubernetes.metricsUrl`` says:

- a Prometheus server (``metricsUrl`` set): instant queries through its HTTP API over the last
  ``window_s`` seconds, selecting the revision's pods by name (Deployment ``N-R`` names its pods
  ``N-R-<hash>-<hash>``; the ``namespace`` and ``pod`` target labels are what the Prometheus Operator's
  PodMonitor/ServiceMonitor and the usual ``kubernetes_sd`` relabelling attach).
- no ``metricsUrl``: the revision's ready pods' ``/metrics`` (found by the revision Service's label
  selector, so every ready pod counts) scraped through the API server's pod proxy and summed. Those
  counters are cumulative since each pod started, so the figures cover the canary's whole life (it gets
  traffic only from its first step on), not only the current step.

An error is a 5xx answer; 429 (admission control shedding load) is not counted against the revision.
p95 is interpolated inside the histogram bucket as Prometheus' ``histogram_quantile`` does. A pod that
runs Triton without the front (K1's Triton Deployment serves Triton's metrics port only) is read from
Triton's own series instead: ``nv_inference_first_response_histogram_ms`` (time to the first streamed
response, which for the decoupled TensorRT-LLM model is the first token; Triton emits it only with
``--metrics-config histogram_latencies=true``) and ``nv_inference_request_success`` / ``_failure``.
The Prometheus-query path reads the front's series only.
"""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from forgeline_operators.deploy.rollout import GateMetrics

__all__ = ["REQUESTS", "TTFT", "from_prometheus", "from_text", "histogram_quantile", "scrape_revision"]

TTFT = "forgeline_time_to_first_token_seconds"
REQUESTS = "forgeline_requests_total"
# Triton's own series (a pod with no front): first-response histogram (needs
# `--metrics-config histogram_latencies=true`) and request outcome counters.
TRITON_FIRST_RESPONSE = "nv_inference_first_response_histogram_ms"
TRITON_SUCCESS = "nv_inference_request_success"
TRITON_FAILURE = "nv_inference_request_failure"


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``(upper bound, count)`` buckets, linearly interpolated within its
    bucket (Prometheus' rule: the +Inf bucket answers with the largest finite bound); None when empty."""
    bs = sorted(buckets)
    if not bs or bs[-1][1] <= 0:
        return None
    rank = q * bs[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in bs:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def from_text(texts: Iterable[str]) -> GateMetrics:
    """Gate metrics summed over the Prometheus text expositions of a revision's pods: the front's series,
    or Triton's own when a pod has no front (see the module docstring)."""
    front: dict[float, float] = {}
    total = errors = 0.0
    triton: dict[str, _TritonModel] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == f"{TTFT}_bucket":
                    front[float(s.labels["le"])] = front.get(float(s.labels["le"]), 0.0) + s.value
                elif s.name == REQUESTS:
                    total += s.value
                    errors += s.value if s.labels.get("status", "").startswith("5") else 0.0
                elif s.name.startswith("nv_inference_"):
                    triton.setdefault(s.labels.get("model", ""), _TritonModel()).add(
                        s.name, s.labels, s.value
                    )
    if front or total or not triton:
        p95_s = histogram_quantile(0.95, front.items())
        p95 = None if p95_s is None else p95_s * 1000.0
        return GateMetrics(requests=total, p95_ttft_ms=p95, error_rate=errors / total if total else None)
    # Every model of an ensemble counts the same request: judge the entry model (the most requests).
    m = max(triton.values(), key=lambda t: t.ok + t.fail)
    n = m.ok + m.fail
    p95 = histogram_quantile(0.95, m.first_response.items())  # Triton's histogram is in milliseconds
    return GateMetrics(requests=n, p95_ttft_ms=p95, error_rate=m.fail / n if n else None)


@dataclass
class _TritonModel:
    ok: float = 0.0
    fail: float = 0.0
    first_response: dict[float, float] = field(default_factory=dict)

    def add(self, name: str, labels: dict[str, str], value: float) -> None:
        name = name.removesuffix("_total")
        if name == TRITON_SUCCESS:
            self.ok += value
        elif name == TRITON_FAILURE:
            self.fail += value
        elif name == f"{TRITON_FIRST_RESPONSE}_bucket":
            le = float(labels["le"])
            self.first_response[le] = self.first_response.get(le, 0.0) + value


def _get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def _scalar(base: str, query: str, timeout_s: float) -> float | None:
    url = f"{base.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    body = _get_json(url, timeout_s)
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus at {base} refused {query!r}: {body.get('error', body)}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if math.isnan(value) else value


def from_prometheus(
    base_url: str, namespace: str, pod_prefix: str, window_s: int, timeout_s: float = 10.0
) -> GateMetrics:
    """Gate metrics of the pods named ``pod_prefix-*`` over the last ``window_s`` s from Prometheus."""
    sel = f'namespace="{namespace}",pod=~"{pod_prefix}-.*"'
    w = f"{max(window_s, 1)}s"
    p95 = _scalar(
        base_url, f"histogram_quantile(0.95, sum by (le) (rate({TTFT}_bucket{{{sel}}}[{w}])))", timeout_s
    )
    total = _scalar(base_url, f"sum(increase({REQUESTS}{{{sel}}}[{w}]))", timeout_s) or 0.0
    errors = _scalar(base_url, f'sum(increase({REQUESTS}{{{sel},status=~"5.."}}[{w}]))', timeout_s) or 0.0
    return GateMetrics(
        requests=total,
        p95_ttft_ms=None if p95 is None else p95 * 1000.0,
        error_rate=errors / total if total > 0 else None,
    )


def _ready(pod: Any) -> bool:
    conds = (pod.status.conditions if pod.status else None) or []
    return (
        any(c.type == "Ready" and c.status == "True" for c in conds) and not pod.metadata.deletion_timestamp
    )


def scrape_revision(
    api: Any, namespace: str, selector: str, port: int | str, path: str = "metrics"
) -> GateMetrics:
    """Gate metrics of the ready pods matching label ``selector`` (the revision Service's own selector),
    each scraped at ``port`` ``/path`` through the API server's pod proxy (``api``: a kubernetes
    ``ApiClient``). Pods rather than the Service: a Service proxy reaches one pod per request."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    listed: list[Any] = core.list_namespaced_pod(namespace, label_selector=selector).items
    pods = [p.metadata.name for p in listed if _ready(p)]
    if not pods:
        raise RuntimeError(f"no ready pods match {selector} in namespace {namespace} to scrape /{path} from")
    proxy: Any = core.connect_get_namespaced_pod_proxy_with_path
    # _preload_content=False: the client would otherwise mangle the text body into a Python str repr.
    texts = [proxy(f"{p}:{port}", namespace, path, _preload_content=False).data.decode() for p in pods]
    return from_text(texts)
