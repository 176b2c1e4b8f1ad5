"""The CPU serving path end to end: a real tritonserver running OpenVINO GenAI continuous batching in a
python model, behind the OpenAI-compatible front, started as a detached local endpoint.

One endpoint per module (plus a small second one for admission and auth); the tiny model is exported
to OpenVINO once. Greedy outputs are compared with HF ``generate()`` at f32.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from forgeline_operators.deploy.endpoint import EndpointRecord, list_endpoints, start_detached, stop_endpoint
from forgeline_operators.deploy.loadgen import LoadReport, LoadSpec, run_load, workload
from forgeline_operators.deploy.triton import group_members, load_model
from forgeline_operators.engines import SchedulerSpec
from forgeline_operators.engines.openvino import OpenvinoModelSpec, build_openvino_repository, export_openvino
from forgeline_operators.models.tiny_llama import SOURCE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "tiny"


def _engine_metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def _poll(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-hf")
    SOURCE.materialize(d)
    return d


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory: pytest.TempPathFactory, hf_dir: Path) -> Path:
    return export_openvino(hf_dir, tmp_path_factory.mktemp("ov") / "ir")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, ir_dir: Path) -> Path:
    return build_openvino_repository(
        tmp_path_factory.mktemp("repo") / "repo",
        ir_dir,
        OpenvinoModelSpec(name=MODEL, scheduler=SchedulerSpec(max_num_seqs=64)),
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def endpoint(repository: Path, home: Path) -> Iterator[EndpointRecord]:
    rec = start_detached(home, repository, "main", served_name=MODEL)
    try:
        yield rec
    finally:
        stop_endpoint(home, "main")


@pytest.fixture(scope="module")
def hf_greedy(hf_dir: Path) -> Callable[[str, int], str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def generate(prompt: str, max_new_tokens: int) -> str:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    return generate


def test_health_models_and_metrics(endpoint: EndpointRecord) -> None:
    assert httpx.get(f"{endpoint.url}/v1/health/live").status_code == 200
    assert httpx.get(f"{endpoint.url}/v1/health/ready").status_code == 200
    models = httpx.get(f"{endpoint.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    r = httpx.post(
        f"{endpoint.url}/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    text = httpx.get(f"{endpoint.url}/metrics").text
    for name in (
        "forgeline_time_to_first_token_seconds_bucket",
        "forgeline_inter_token_latency_seconds_bucket",
        "forgeline_queue_depth",
        "forgeline_generation_tokens_total",
        "forgeline_engine_kv_cache_usage_ratio",
        "nv_inference_request_success",
    ):
        assert name in text, name
    missing = httpx.post(f"{endpoint.url}/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    bad = httpx.post(f"{endpoint.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_64_concurrent_mixed_requests_equal_hf_greedy(
    endpoint: EndpointRecord, hf_greedy: Callable[[str, int], str]
) -> None:
    jobs = workload(LoadSpec(requests=64, prompt_words=(2, 60), output_tokens=(4, 40), seed=7))

    async def one(client: httpx.AsyncClient, i: int, prompt: str, n: int) -> str:
        body: dict[str, object] = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0}
        if i % 3 == 1:  # options that leave greedy output alone, so requests differ in what they set
            body |= {"seed": i, "stop": ["\u2603never\u2603"], "top_k": 5}
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i, p, n) for i, (p, n) in enumerate(jobs)))

    def triton_counts() -> tuple[float, float]:
        text = httpx.get(f"{endpoint.url}/metrics").text
        return _engine_metric(text, "nv_inference_count"), _engine_metric(text, "nv_inference_exec_count")

    requests0, executes0 = triton_counts()
    got = asyncio.run(all_at_once())
    requests1, executes1 = triton_counts()
    want = [hf_greedy(p, n) for p, n in jobs]
    mismatches = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    assert not mismatches, [(jobs[i][0][:40], got[i], want[i]) for i in mismatches[:3]]
    # Requests that queued while the engine stepped entered it together (Triton's dynamic batcher,
    # which batches only requests with the same inputs: the front sends every input every time).
    assert requests1 - requests0 == 64
    assert executes1 - executes0 < 64 / 2, (requests1 - requests0, executes1 - executes0)


def test_streaming_matches_non_streaming_and_openai_client(endpoint: EndpointRecord) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0}
    whole = httpx.post(f"{endpoint.url}/v1/completions", json=body).json()["choices"][0]["text"]
    pieces, reasons = [], []
    with httpx.stream("POST", f"{endpoint.url}/v1/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[6:])["choices"][0]
        pieces.append(choice["text"])
        reasons.append(choice["finish_reason"])
    assert "".join(pieces) == whole and len(pieces) > 2
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])

    from openai import OpenAI

    client = OpenAI(base_url=f"{endpoint.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content and chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert full.choices[0].message.content == content
    seeded = [
        client.completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=1.0, seed=5)
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    stopped = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0, stop=["string"]
    )
    assert "string" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_cancelled_stream_frees_engine_and_kv_blocks(endpoint: EndpointRecord) -> None:
    def engine(name: str) -> float:
        return _engine_metric(httpx.get(f"{endpoint.url}/metrics").text, f"forgeline_engine_{name}")

    tokens0, cancelled0 = engine("generated_tokens"), engine("cancelled_requests")
    # 8000 tokens is ~10 s of engine time for this model alone, so the request cannot finish before
    # the disconnect reaches the engine: the race that made this test flaky (480 tokens: ~0.5 s).
    max_tokens = 8000
    body = {"model": MODEL, "prompt": "A long story:", "max_tokens": max_tokens, "ignore_eos": True}
    with httpx.stream("POST", f"{endpoint.url}/v1/completions", json={**body, "stream": True}) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: {"))
        for _ in range(3):
            next(events)
        # Connected: the engine reports the request running and holding blocks (32 tokens each).
        _poll(
            lambda: engine("requests_running") == 1 and engine("kv_cache_usage_ratio") * 512 >= 2,
            what="the request to hold KV blocks",
        )
    # The client went away mid-stream.
    _poll(lambda: engine("cancelled_requests") > cancelled0, what="the engine to cancel the request")
    _poll(
        lambda: engine("requests_running") == 0 and engine("kv_cache_usage_ratio") == 0,
        what="the engine to drop the request and free every KV block it held",
    )
    assert engine("generated_tokens") - tokens0 < max_tokens  # stopped early, not run to the end


def _success_count(triton_url: str) -> int:
    stats = httpx.get(f"{triton_url}/v2/models/{MODEL}/stats").json()["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


def test_reload_keeps_in_flight_requests(endpoint: EndpointRecord, repository: Path) -> None:
    """A reload (new files on disk, load over gRPC) mid-stream and under a load generator: the stream on
    the old instance runs to its last token, no request fails, and requests after the switch go to the
    new instance."""
    body = {
        "model": MODEL,
        "prompt": "Reload:",
        # ~5 s of engine time: still running when the reload (~2.5 s here) has landed, with margin.
        "max_tokens": 6000,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result: dict[str, object] = {}

    def stream() -> None:
        with httpx.stream("POST", f"{endpoint.url}/v1/completions", json=body, timeout=120) as r:
            events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        result["reason"] = events[-2]["choices"][0]["finish_reason"]
        result["tokens"] = events[-1]["usage"]["completion_tokens"]
        result["pieces"] = sum(1 for e in events if e["choices"] and e["choices"][0]["text"])

    # Short streaming requests back to back (4 at a time) from before the reload until after it.
    reports: list[LoadReport] = []
    stop_load = threading.Event()

    def load() -> None:
        seed = 0
        while not stop_load.is_set():
            seed += 1
            spec = LoadSpec(requests=8, concurrency=4, output_tokens=(4, 24), seed=seed, model=MODEL)
            reports.append(run_load(endpoint.url, spec))

    warm = httpx.post(
        f"{endpoint.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    )
    assert warm.status_code == 200 and _success_count(endpoint.triton_url) >= 1  # counted on the old one
    t = threading.Thread(target=stream)
    loader = threading.Thread(target=load)
    t.start()
    loader.start()
    try:
        _poll(
            lambda: (
                _engine_metric(httpx.get(f"{endpoint.url}/metrics").text, "forgeline_engine_requests_running")
                == 1
            ),
            what="the request to start",
        )
        assert t.is_alive(), "the request ended before the reload began"
        # New weights: Triton reloads a model only when its files changed.
        (repository / MODEL / "1" / "reload-marker").write_text(str(time.time()))
        before = len(reports)
        load_model(endpoint.triton_grpc, MODEL)
        assert t.is_alive(), "the request ended before the reload finished: nothing was tested"
        swapped = len(reports)
        assert swapped > before, "no load round ran during the reload"
        # The round in flight at the swap, then one that started after it.
        _poll(lambda: len(reports) >= swapped + 2, what="a load round entirely after the reload")
    finally:
        stop_load.set()
        loader.join(timeout=120)
        t.join(timeout=120)
    sent = sum(r.requests for r in reports)
    assert sum(r.completed for r in reports) == sent and not any(r.errors for r in reports), [
        r.errors for r in reports if r.errors
    ]
    # Every token arrived, streamed in pieces (several tokens share a piece when the engine is busy).
    assert result["reason"] == "length" and result["tokens"] == 6000, result
    assert int(result["pieces"]) > 10  # type: ignore[call-overload]
    after = httpx.post(
        f"{endpoint.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}
    )
    assert after.status_code == 200
    # Statistics belong to a model object: the new instance has served the request above and the load
    # after the switch, not what the old one served (the warm-up, the long stream, the load before).
    assert 1 <= _success_count(endpoint.triton_url) < sent + 2


def test_overload_429_auth_and_no_orphans(
    repository: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORGELINE_TEST_KEY", "s3cret")
    rec = start_detached(
        home, repository, "small", served_name=MODEL, max_queue=2, api_key_env="FORGELINE_TEST_KEY"
    )
    try:
        assert {r.name for r in list_endpoints(home)} >= {"small"}
        url = f"{rec.url}/v1/completions"
        denied = httpx.post(url, json={"model": MODEL, "prompt": "x"})
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{rec.url}/v1/health/ready").status_code == 200  # probes need no token

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120, headers=auth) as client:
                body = {"model": MODEL, "prompt": "Busy", "max_tokens": 200, "ignore_eos": True}
                return await asyncio.gather(*(client.post(url, json=body) for _ in range(8)))

        codes = [r.status_code for r in asyncio.run(burst())]
        assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
        limited = next(r for r in asyncio.run(burst()) if r.status_code == 429)
        assert limited.headers["Retry-After"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
        # A rerun with the same name replaces the endpoint: no port clash, the old one is gone.
        again = start_detached(home, repository, "small", rec.port, served_name=MODEL)
        assert again.pid != rec.pid and not group_members(rec.pgid)
        rec = again
    finally:
        stop_endpoint(home, "small")
    assert not group_members(rec.pgid), "processes left behind"
    assert "small" not in {r.name for r in list_endpoints(home)}


_AGREE_JOBS = workload(LoadSpec(requests=16, prompt_words=(4, 40), output_tokens=(12, 12), seed=5))


def _greedy_outputs(url: str) -> list[str]:
    """Greedy completions of ``_AGREE_JOBS`` (12 tokens each, EOS ignored), one request at a time."""
    with httpx.Client(base_url=url, timeout=60) as client:
        got = []
        for prompt, n in _AGREE_JOBS:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == n
            got.append(str(r.json()["choices"][0]["text"]))
        return got


def _mostly_agrees_with_f32(
    endpoint: EndpointRecord, home: Path, repo: Path, name: str, threads: int = 1
) -> None:
    """Serve ``repo`` as endpoint ``name``: its greedy outputs equal the f32 endpoint's on >= 3/4 prompts."""
    rec = start_detached(home, repo, name, served_name=MODEL, threads=threads)
    try:
        got = _greedy_outputs(rec.url)
    finally:
        stop_endpoint(home, name)
    f32 = _greedy_outputs(endpoint.url)
    same = sum(a == b for a, b in zip(got, f32, strict=True))
    assert same >= len(_AGREE_JOBS) * 3 // 4, (same, list(zip(got, f32, strict=True))[:3])


def test_u8_kv_cache_serves_and_mostly_agrees_with_f32(
    endpoint: EndpointRecord, ir_dir: Path, home: Path, tmp_path: Path
) -> None:
    """``scheduler.kv_cache_precision: u8`` reaches the engine, which serves with it; greedy outputs agree
    with the f32 endpoint's on most prompts (quantised keys/values may flip a close token: 31 of 32
    agreed in-process for this model)."""
    repo = build_openvino_repository(
        tmp_path / "repo",
        ir_dir,
        OpenvinoModelSpec(name=MODEL, scheduler=SchedulerSpec(max_num_seqs=64, kv_cache_precision="u8")),
    )
    assert (
        'key: "kv_cache_precision" value: { string_value: "u8" }'
        in (repo / MODEL / "config.pbtxt").read_text()
    )
    _mostly_agrees_with_f32(endpoint, home, repo, "u8")


def test_bf16_engine_from_the_cli_path_serves_and_mostly_agrees_with_f32(
    endpoint: EndpointRecord, hf_dir: Path, home: Path
) -> None:
    """``forgeline serve MODEL --threads 2 --precision bf16``'s repository: the engine settings reach the
    model config (the repository used to keep 1 thread whatever ``--threads`` said), the bf16 engine
    serves, and its greedy outputs agree with the f32 endpoint's on most prompts (16 of 16 agreed
    in-process on 16 tokens each for this model). On a CPU without bf16 support OpenVINO computes in
    f32 and they agree trivially."""
    from forgeline._cli_serving import _repository_for

    repo = _repository_for(str(hf_dir), home, threads=2, precision="bf16")
    config = (repo / "model" / "config.pbtxt").read_text()
    for key, value in (("inference_precision", "bf16"), ("kv_cache_precision", "bf16"), ("num_threads", "2")):
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in config, key
    _mostly_agrees_with_f32(endpoint, home, repo, "bf16", threads=2)
