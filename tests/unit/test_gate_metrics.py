"""Gate measurements (deploy/gate_metrics.py) from real Prometheus text written by prometheus_client with
the front's own metric definitions, and the Prometheus HTTP API path against a local HTTP server that
answers like Prometheus' ``/api/v1/query`` (a stand-in: no Prometheus server runs here)."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from forgeline_operators.deploy import gate_metrics
from forgeline_operators.deploy.front import _Metrics


def exposition(ttfts_s: list[float], statuses: dict[str, int]) -> str:
    m = _Metrics()  # the front's real registry and metric definitions
    for t in ttfts_s:
        m.ttft.observe(t)
    for status, n in statuses.items():
        m.requests.labels("/v1/completions", status).inc(n)
    return generate_latest(m.registry).decode()


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    q = gate_metrics.histogram_quantile
    # 100 observations: 50 in (0, 0.1], 50 in (0.1, 0.5]; rank 95 sits 45/50 into the second bucket.
    assert q(0.95, [(0.1, 50), (0.5, 100), (float("inf"), 100)]) == pytest.approx(0.1 + 0.4 * 45 / 50)
    assert q(0.95, [(0.1, 0), (float("inf"), 10)]) == 0.1  # in +Inf: the largest finite bound
    assert q(0.95, [(0.1, 0), (float("inf"), 0)]) is None


def test_from_text_sums_pods_and_counts_only_5xx_as_errors() -> None:
    pod_a = exposition([0.02] * 90, {"200": 90, "429": 5})
    pod_b = exposition([0.3] * 10, {"200": 8, "500": 2})
    m = gate_metrics.from_text([pod_a, pod_b])
    assert m.requests == 105
    assert m.error_rate == pytest.approx(2 / 105)
    # 100 TTFTs: 90 in (0.01, 0.025], 10 in (0.25, 0.5]; rank 95 -> 5/10 into (0.25, 0.5] = 375 ms.
    assert m.p95_ttft_ms == pytest.approx(375.0)


def test_from_text_without_traffic() -> None:
    m = gate_metrics.from_text([exposition([], {})])
    assert m.requests == 0 and m.p95_ttft_ms is None and m.error_rate is None


@pytest.fixture
def prometheus_api() -> Iterator[tuple[str, list[str]]]:
    queries: list[str] = []
    answers = {"histogram_quantile": 0.42, 'status=~"5.."': 3.0, "increase": 60.0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urllib.parse.urlparse(self.path)
            query = urllib.parse.parse_qs(url.query)["query"][0]
            queries.append(query)
            value = next(v for k, v in answers.items() if k in query)
            result = [{"metric": {}, "value": [0, str(value)]}]
            body = {"status": "success", "data": {"resultType": "vector", "result": result}}
            data = json.dumps(body).encode()
            self.send_response(200 if url.path == "/api/v1/query" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", queries
    server.shutdown()


def test_from_prometheus_queries_the_revision_pods(prometheus_api: tuple[str, list[str]]) -> None:
    url, queries = prometheus_api
    m = gate_metrics.from_prometheus(url, "prod", "chat-0123456789", 60)
    assert m.p95_ttft_ms == pytest.approx(420.0) and m.requests == 60 and m.error_rate == pytest.approx(0.05)
    sel = 'namespace="prod",pod=~"chat-0123456789-.*"'
    assert queries[0] == (
        "histogram_quantile(0.95, sum by (le) "
        f"(rate(forgeline_time_to_first_token_seconds_bucket{{{sel}}}[60s])))"
    )
    assert queries[2] == f'sum(increase(forgeline_requests_total{{{sel},status=~"5.."}}[60s]))'


# Triton's own exposition (its metrics port, no front), as Triton writes it: counters without `_total`,
# the first-response histogram in milliseconds (with --metrics-config histogram_latencies=true).
TRITON_TEXT = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="ensemble",version="1"} 57
nv_inference_request_success{model="tensorrt_llm",version="1"} 57
# HELP nv_inference_request_failure Number of failed inference requests, all batch sizes
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="ensemble",reason="OTHER",version="1"} 3
# HELP nv_inference_first_response_histogram_ms Duration from request to first response in milliseconds
# TYPE nv_inference_first_response_histogram_ms histogram
nv_inference_first_response_histogram_ms_count{model="ensemble",version="1"} 60
nv_inference_first_response_histogram_ms_sum{model="ensemble",version="1"} 6000
nv_inference_first_response_histogram_ms_bucket{model="ensemble",version="1",le="100"} 50
nv_inference_first_response_histogram_ms_bucket{model="ensemble",version="1",le="500"} 60
nv_inference_first_response_histogram_ms_bucket{model="ensemble",version="1",le="+Inf"} 60
"""


def test_from_text_reads_triton_series_without_a_front() -> None:
    m = gate_metrics.from_text([TRITON_TEXT])
    # Each model of the ensemble counts the same requests: the entry model (most requests) is judged.
    assert m.requests == 60 and m.error_rate == pytest.approx(3 / 60)
    # rank 57 of 60: 7/10 into (100, 500] ms.
    assert m.p95_ttft_ms == pytest.approx(100 + 400 * 7 / 10)
