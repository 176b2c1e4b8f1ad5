"""Serving logic without a server: repository layout and config golden, load generator maths and
workload, operator registration, endpoint records, the CLI surface, and the OpenAI front against a
stub of Triton's generate_stream (httpx MockTransport)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline.registry import default_registry
from forgeline_operators.deploy.endpoint import EndpointRecord, _write_record, list_endpoints, pid_alive
from forgeline_operators.deploy.front import FrontSettings, create_app, sse_events
from forgeline_operators.deploy.loadgen import LoadSpec, percentile, workload
from forgeline_operators.deploy.spec import DeployStage
from forgeline_operators.deploy.triton import TritonError, load_model, repository_request
from forgeline_operators.engines import SchedulerSpec
from forgeline_operators.engines.openvino.repository import (
    INPUTS,
    MANIFEST,
    AdapterRef,
    OpenvinoModelSpec,
    SpeculativeRef,
    adapter_ref,
    build_openvino_repository,
    openvino_config,
    router_config,
)
from forgeline_operators.ports import free_port
from forgeline_operators.serve.spec import ServeStage

GOLDEN = """\
name: "llm"
backend: "python"
max_batch_size: 16
dynamic_batching { }
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "messages" data_type: TYPE_STRING dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "stop" data_type: TYPE_STRING dims: [ -1 ] optional: true allow_ragged_batch: true },
  { name: "ignore_eos" data_type: TYPE_BOOL dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "stream" data_type: TYPE_BOOL dims: [ 1 ] optional: true allow_ragged_batch: true },
  { name: "lora_name" data_type: TYPE_STRING dims: [ 1 ] optional: true allow_ragged_batch: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "output_ids" data_type: TYPE_INT32 dims: [ -1 ] },
  { name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] },
  { name: "prompt_tokens" data_type: TYPE_INT32 dims: [ 1 ] },
  { name: "completion_tokens" data_type: TYPE_INT32 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "engine_dir" value: { string_value: "engine" } }
parameters { key: "max_num_seqs" value: { string_value: "16" } }
parameters { key: "max_num_batched_tokens" value: { string_value: "512" } }
parameters { key: "enable_prefix_caching" value: { string_value: "false" } }
parameters { key: "kv_cache_gb" value: { string_value: "0" } }
parameters { key: "num_kv_blocks" value: { string_value: "512" } }
parameters { key: "num_threads" value: { string_value: "1" } }
parameters { key: "inference_precision" value: { string_value: "f32" } }
parameters { key: "kv_cache_precision" value: { string_value: "f32" } }
parameters { key: "max_stream_events_per_s" value: { string_value: "500" } }
parameters { key: "adapters" value: { string_value: ADAPTERS } }
""".replace(
    "ADAPTERS",
    json.dumps(json.dumps({"sql": {"alpha": 2.0, "path": "adapters/sql/adapter_model.safetensors"}})),
)


def _spec(tmp: Path) -> OpenvinoModelSpec:
    return OpenvinoModelSpec(
        name="llm",
        scheduler=SchedulerSpec(max_num_seqs=16, max_batched_tokens=512, prefix_caching=False),
        adapters={"sql": AdapterRef(tmp, alpha=2.0)},
    )


def test_openvino_config_golden(tmp_path: Path) -> None:
    assert openvino_config(_spec(tmp_path)) == GOLDEN


def _fake_ir(path: Path) -> Path:
    path.mkdir()
    for name in (
        "openvino_model.xml",
        "openvino_model.bin",
        "openvino_tokenizer.xml",
        "openvino_detokenizer.xml",
    ):
        (path / name).write_text(name)
    return path


ENGINE_FILES = [
    "1/engine/openvino_detokenizer.xml",
    "1/engine/openvino_model.bin",
    "1/engine/openvino_model.xml",
    "1/engine/openvino_tokenizer.xml",
    "1/model.py",
    "config.pbtxt",
]


def test_repository_layout(tmp_path: Path) -> None:
    ir = _fake_ir(tmp_path / "ir")
    repo = build_openvino_repository(tmp_path / "plain", ir, OpenvinoModelSpec(name="llm"))
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert files == [MANIFEST, *(f"llm/{f}" for f in ENGINE_FILES)]
    assert json.loads((repo / MANIFEST).read_text())["served_model"] == "llm"
    with pytest.raises(ValueError, match="not an OpenVINO IR"):
        build_openvino_repository(tmp_path / "r2", tmp_path, OpenvinoModelSpec(name="llm"))


def test_repository_with_adapters_routes_to_one_engine_per_adapter(tmp_path: Path) -> None:
    ir = _fake_ir(tmp_path / "ir")
    draft = _fake_ir(tmp_path / "draft")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    spec = OpenvinoModelSpec(
        name="llm", adapters={"sql": AdapterRef(adapter, 2.0)}, speculative=SpeculativeRef(draft, 3)
    )
    repo = build_openvino_repository(tmp_path / "repo", ir, spec)
    files = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    draft_files = [f.replace("engine", "draft") for f in ENGINE_FILES[:4]]
    engine = sorted([*ENGINE_FILES, *draft_files])
    assert files == sorted(
        [
            MANIFEST,
            "llm/1/model.py",
            "llm/config.pbtxt",
            *(f"llm__base/{f}" for f in engine),
            *(f"llm__sql/{f}" for f in engine),
            "llm__sql/1/adapters/sql/adapter_model.safetensors",
        ]
    )
    manifest = json.loads((repo / MANIFEST).read_text())
    assert manifest["models"] == ["llm", "llm__base", "llm__sql"]
    assert manifest["adapters"] == ["sql"] and manifest["speculative"] == {"num_assistant_tokens": 3}
    assert manifest["routes"] == {"": "llm__base", "sql": "llm__sql"}
    assert (repo / "llm/1/model.py").read_text().startswith('"""Triton python-backend model that routes')
    router = (repo / "llm/config.pbtxt").read_text()
    assert router == router_config("llm", {"": "llm__base", "sql": "llm__sql"}, spec.scheduler.max_num_seqs)
    routes = json.dumps(json.dumps({"": "llm__base", "sql": "llm__sql"}))
    assert f'parameters {{ key: "routes" value: {{ string_value: {routes} }} }}' in router
    sql = (repo / "llm__sql/config.pbtxt").read_text()
    assert 'name: "llm__sql"' in sql and '\\"sql\\"' in sql and "draft_model" in sql
    base = (repo / "llm__base/config.pbtxt").read_text()
    assert json.dumps(json.dumps({})) in base
    assert 'key: "num_assistant_tokens" value: { string_value: "3" }' in base
    # The IR is shared, not copied: the engines hard-link the same files.
    assert (repo / "llm__base/1/engine/openvino_model.bin").stat().st_ino == (
        ir / "openvino_model.bin"
    ).stat().st_ino


def _adapter_dir(tmp: Path, **config: object) -> Path:
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"w")
    (tmp / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return tmp


def test_adapter_ref_scale_and_errors(tmp_path: Path) -> None:
    assert adapter_ref(_adapter_dir(tmp_path / "a", r=8, lora_alpha=16)).alpha == 2.0
    assert adapter_ref(_adapter_dir(tmp_path / "b", r=16, lora_alpha=8, use_rslora=True)).alpha == 2.0
    with pytest.raises(ValueError, match="rank_pattern"):
        adapter_ref(_adapter_dir(tmp_path / "c", r=8, lora_alpha=16, rank_pattern={"q_proj": 4}))
    with pytest.raises(ValueError, match="not a PEFT LoRA adapter"):
        adapter_ref(tmp_path)
    with pytest.raises(ValueError, match="only LoRA"):
        adapter_ref(_adapter_dir(tmp_path / "d", peft_type="IA3", r=1, lora_alpha=1))


def test_serve_stage_adapters_and_speculative_are_refs() -> None:
    stage = ServeStage.model_validate(
        {
            "name": "s",
            "kind": "serve",
            "model": "${stages.b.outputs.artifact}",
            "adapters": {"sql": "${stages.sft.outputs.adapter}"},
            "speculative": {"draft": "builtin://tiny-llama", "num_assistant_tokens": 4},
        }
    )
    assert stage.refs() == {
        "model": "${stages.b.outputs.artifact}",
        "adapters.sql": "${stages.sft.outputs.adapter}",
        "speculative.draft": "builtin://tiny-llama",
    }
    with pytest.raises(ValueError):
        ServeStage.model_validate({"name": "s", "kind": "serve", "model": "x", "adapters": {"bad name": "y"}})
    with pytest.raises(ValueError):
        ServeStage.model_validate(
            {
                "name": "s",
                "kind": "serve",
                "model": "x",
                "speculative": {"draft": "y", "num_assistant_tokens": 0},
            }
        )


def test_percentile_matches_numpy_and_workload_is_seeded() -> None:
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    a = workload(LoadSpec(requests=10, seed=3))
    assert a == workload(LoadSpec(requests=10, seed=3)) and a != workload(LoadSpec(requests=10, seed=4))
    assert all(8 <= n <= 64 for _, n in a)


def test_operators_registered() -> None:
    reg = default_registry()
    serve = reg.operator("serve")
    assert serve is not None and serve.entrypoint.endswith("serve.operator:run")
    deploy = DeployStage(name="d", kind="deploy", repository="${stages.s.outputs.repository}")
    op = reg.operator("deploy", deploy.backend_name())
    assert op is not None and op.backend == "triton"
    nim = DeployStage(name="d", kind="deploy", runtime="nim", repository="x")
    nim_op = reg.operator("deploy", nim.backend_name())  # NIM: the kubernetes target only (NIMService)
    assert nim_op is not None and nim_op.entrypoint == op.entrypoint


def test_endpoint_records_prune_dead(tmp_path: Path) -> None:
    import subprocess
    import sys

    rec = dict(url="u", port=1, pgid=1, repository="r", model="m", triton_url="t", log="l", started_at=0.0)
    # A live process with a supervisor's command line (it only sleeps); a record naming any other live
    # process (this one) is not an endpoint, and neither is a dead pid.
    argv = ["-c", "import time; time.sleep(60)", "forgeline_operators.deploy.endpoint", "--name", "alive"]
    supervisor = subprocess.Popen([sys.executable, *argv])
    try:
        _write_record(tmp_path, EndpointRecord(name="alive", pid=supervisor.pid, **rec))  # type: ignore[arg-type]
        _write_record(tmp_path, EndpointRecord(name="other", pid=os.getpid(), **rec))  # type: ignore[arg-type]
        _write_record(tmp_path, EndpointRecord(name="dead", pid=2**22 + 7, **rec))  # type: ignore[arg-type]
        assert pid_alive(os.getpid()) and not pid_alive(2**22 + 7)
        assert [r.name for r in list_endpoints(tmp_path)] == ["alive"]
        assert not (tmp_path / "endpoints" / "dead.json").exists()
        assert not (tmp_path / "endpoints" / "other.json").exists()
    finally:
        supervisor.kill()
        supervisor.wait()


def test_cli_serving_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    for args in (["serve", "--help"], ["endpoints", "--help"], ["bench", "endpoint", "--help"]):
        assert runner.invoke(app, args).exit_code == 0, args
    listed = runner.invoke(app, ["endpoints", "--home", str(tmp_path), "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []
    missing = runner.invoke(app, ["endpoints", "stop", "ghost", "--home", str(tmp_path)])
    assert missing.exit_code == 1 and "no endpoint named 'ghost'" in missing.stderr


def _fake_triton(request: httpx.Request) -> httpx.Response:
    if request.url.path.endswith("/ready"):
        return httpx.Response(200)
    body = json.loads(request.content)
    if body["messages"]:
        assert body["text_input"] == ""
        assert json.loads(body["messages"]) == [{"role": "user", "content": "Hi"}]
    else:
        assert body["text_input"] == "Hi" and body["max_tokens"] == 3 and body["stop"] == ["x"]
    events = [
        {
            "text_output": "a",
            "output_ids": 5,
            "finish_reason": "",
            "prompt_tokens": 2,
            "completion_tokens": 1,
        },
        {
            "text_output": "b",
            "output_ids": [6],
            "finish_reason": "length",
            "prompt_tokens": 2,
            "completion_tokens": 2,
        },
    ]
    text = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})


def test_front_against_stub_triton() -> None:
    settings = FrontSettings(triton_url="http://triton", triton_model="llm", served_name="m", api_key="k")
    app_ = create_app(settings)
    with TestClient(app_) as client:
        app_.state.client = httpx.AsyncClient(
            base_url="http://triton", transport=httpx.MockTransport(_fake_triton)
        )

        sent: list[dict[str, Any]] = []

        async def generate(payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            sent.append(dict(payload))
            url = "http://triton/v2/models/llm/generate_stream"
            body = _fake_triton(httpx.Request("POST", url, json=payload)).content

            async def chunks() -> AsyncIterator[bytes]:  # events split across reads, as on a socket
                for i in range(0, len(body), 7):
                    yield body[i : i + 7]

            async for event in sse_events(chunks()):
                yield event

        app_.state.generate = generate
        assert client.post("/v1/completions", json={"model": "m", "prompt": "Hi"}).status_code == 401
        auth = {"Authorization": "Bearer k"}
        body = {"model": "m", "prompt": "Hi", "max_tokens": 3, "stop": "x"}
        r = client.post("/v1/completions", json=body, headers=auth)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["text"] == "ab" and out["choices"][0]["finish_reason"] == "length"
        assert out["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
        streamed = client.post("/v1/completions", json={**body, "stream": True}, headers=auth).text
        chunks = [json.loads(x[6:]) for x in streamed.split("\n\n") if x.startswith("data: {")]
        assert [c["choices"][0]["text"] for c in chunks] == ["a", "b", ""] and streamed.endswith(
            "data: [DONE]\n\n"
        )
        assert client.get("/v1/health/ready").status_code == 200
        assert 'forgeline_requests_total{route="completions",status="200"} 2.0' in client.get("/metrics").text
        chat = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "seed": 3, "top_k": 4}
        assert client.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
        # Every request sets every input of the model (Triton batches only requests with the same set).
        assert [set(p) for p in sent] == [{name for name, _, _ in INPUTS}] * 3
        assert sent[0]["stop"] == ["x"] and sent[0]["seed"] == -1 and sent[0]["messages"] == ""
        assert sent[2]["seed"] == 3 and sent[2]["top_k"] == 4 and sent[2]["stop"] == [""]


def test_repository_request_is_the_proto_wire_format() -> None:
    # RepositoryModelLoadRequest { model_name = 2 }: tag 0x12, varint length, UTF-8 name.
    assert repository_request("tiny") == b"\x12\x04tiny"
    long = "m" * 200
    assert repository_request(long) == b"\x12\xc8\x01" + long.encode()


def test_load_model_without_server_raises_triton_error() -> None:
    with pytest.raises(TritonError, match="RepositoryModelLoad 'tiny' failed"):
        load_model(f"127.0.0.1:{free_port()}", "tiny", timeout_s=2)


def test_kv_cache_precision_reaches_the_model_config(tmp_path: Path) -> None:
    spec = OpenvinoModelSpec(name="m", scheduler=SchedulerSpec(kv_cache_precision="u8"))
    config = openvino_config(spec)
    assert 'key: "kv_cache_precision" value: { string_value: "u8" }' in config
    assert 'key: "inference_precision" value: { string_value: "f32" }' in config
    with pytest.raises(ValueError, match="kv_cache_precision"):
        SchedulerSpec(kv_cache_precision="int4")  # type: ignore[arg-type]


def test_bf16_inference_reaches_the_model_config_with_a_bf16_cache() -> None:
    spec = OpenvinoModelSpec(name="m", scheduler=SchedulerSpec(inference_precision="bf16"), threads=2)
    config = openvino_config(spec)
    assert 'key: "inference_precision" value: { string_value: "bf16" }' in config
    assert 'key: "kv_cache_precision" value: { string_value: "bf16" }' in config
    assert 'key: "num_threads" value: { string_value: "2" }' in config


def test_bf16_on_one_thread_is_refused_with_the_fix() -> None:
    # OpenVINO 2026.4 dies (SIGFPE) constructing a one-thread bf16 pipeline: refuse before Triton loads it.
    spec = OpenvinoModelSpec(name="m", scheduler=SchedulerSpec(inference_precision="bf16"), threads=1)
    with pytest.raises(ValueError, match=r"2 or more engine threads.*cpus: 2"):
        openvino_config(spec)
    with pytest.raises(ValueError, match="kv_cache_precision 'u8' needs inference_precision 'f32'"):
        SchedulerSpec(inference_precision="bf16", kv_cache_precision="u8")


def test_cli_serve_refuses_bf16_on_one_thread_before_any_work(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["serve", "builtin://tiny-llama", "--precision", "bf16", "--threads", "1", "--home", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "2 or more engine threads" in result.stderr
    assert not (tmp_path / "serving").exists()  # refused before exporting anything
    args = ["serve", "builtin://tiny-llama", "--precision", "fp8", "--home", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "--precision must be f32 or bf16" in result.stderr


def test_free_ports_are_distinct_and_avoid_the_fronts_port() -> None:
    # Picked one at a time and released, two ports could come out equal (CI once saw tritonserver
    # refuse HTTP and metrics on the same port); picked together they cannot.
    from forgeline_operators.deploy.triton import TritonPorts
    from forgeline_operators.ports import free_ports

    for _ in range(50):
        ports = free_ports(3)
        assert len(set(ports)) == 3
    front = free_ports(1)[0]
    picked = TritonPorts.pick(avoid=[front])
    assert len({picked.http, picked.grpc, picked.metrics, front}) == 4
