"""The build operator: golden TensorRT-LLM specs (pure functions), the documented CPU stop, the OpenVINO
build loading in OpenVINO GenAI with greedy tokens equal to HF (int8) or within the gate (int4), and
plan's up-front rejection of a GPU-only quantization format."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from test_quantize_operator import context as quantize_context

from forgeline.artifacts import ModelStore, StageStore, dir_digest
from forgeline.plan import Planner
from forgeline.registry import default_registry
from forgeline.runtime.context import MemorySink, OperatorError, StageContext
from forgeline.spec import load_workflow
from forgeline_operators.build.operator import (
    CPU_STOP,
    cached_engine,
    checkpoint_digest,
    run_openvino,
    run_tensorrt_llm,
    store_engine,
)
from forgeline_operators.build.spec import BuildStage
from forgeline_operators.engines.openvino.ir import F32_HINTS
from forgeline_operators.engines.tensorrt_llm import trtllm as t
from forgeline_operators.quantize.operator import run as quantize

torch.set_num_threads(1)
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
ISSUE_SPEC: dict[str, Any] = {  # the issue's example, verbatim
    "tp": 2, "pp": 1, "max_batch_size": 64, "max_input_len": 2048, "max_seq_len": 4096,
    "max_num_tokens": 8192, "paged_kv_cache": True, "use_paged_context_fmha": True, "gemm_plugin": "auto",
    "lora": {"max_rank": 16},
    "speculative_decoding": {"mode": "draft_tokens_external", "max_draft_len": 4},
}  # fmt: skip
HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def build_stage(engine: str, **fields: Any) -> BuildStage:
    return BuildStage.model_validate(
        {"name": "b", "kind": "build", "engine": engine, "from": "${model}", **fields}
    )


def build_context(tmp: Path, stage: BuildStage, src: Path) -> StageContext:
    out, work = tmp / "build-out", tmp / "build-work"
    out.mkdir()
    work.mkdir()
    return StageContext(stage, None, out, work, MemorySink(), lambda ref: src, lambda ref: None, {})


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FORGELINE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; FORGELINE_UPDATE_GOLDEN=1 rewrites it after review"


def test_trtllm_build_command_golden() -> None:
    spec = build_stage("tensorrt-llm", tensorrt_llm=ISSUE_SPEC).tensorrt_llm
    argv = t.trtllm_build_command(spec, "/ckpt/trtllm", "/out/engine")
    golden("trtllm-build.sh", t.shell(argv))
    assert argv[0] == "trtllm-build" and "--tp_size" not in argv  # tp/pp come from the checkpoint


def test_llm_api_options_golden_and_names() -> None:
    spec = build_stage("tensorrt-llm", tensorrt_llm=ISSUE_SPEC).tensorrt_llm
    options = t.llm_api_options(spec, kv_cache_quant_algo="FP8")
    golden("extra_llm_api_options.yaml", t.render_yaml(options))
    assert set(options) <= t.LLM_ARGS_FIELDS
    assert options["kv_cache_config"] == {
        "free_gpu_memory_fraction": 0.9,
        "enable_block_reuse": True,
        "dtype": "fp8",
    }
    assert options["speculative_config"] == {"decoding_type": "DraftTarget", "max_draft_len": 4}
    with pytest.raises(ValueError, match="not TensorRT-LLM LLM-API fields: max_batch"):
        t.validate_llm_api_options({"max_batch": 1})
    with pytest.raises(ValueError, match=r"kv_cache_config\.fraction"):
        t.validate_llm_api_options({"kv_cache_config": {"fraction": 0.5}})


def test_unknown_lora_or_speculative_keys_are_rejected() -> None:
    bad = build_stage("tensorrt-llm", tensorrt_llm={"lora": {"rank": 8}}).tensorrt_llm
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\]"):
        t.llm_api_options(bad)
    bad = build_stage("tensorrt-llm", tensorrt_llm={"speculative_decoding": {"mode": "magic"}}).tensorrt_llm
    with pytest.raises(ValueError, match=r"speculative_decoding\.mode 'magic'"):
        t.trtllm_build_command(bad, "c", "o")


@pytest.fixture(scope="module")
def trtllm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_quantize_operator import SOURCE

    tmp = tmp_path_factory.mktemp("q")
    SOURCE.materialize(tmp / "tiny")
    result = quantize(quantize_context(tmp, tmp / "tiny", format="int8_sq", export_trtllm={"tp": 2}))
    path = result.outputs["trtllm_checkpoint"]
    assert isinstance(path, Path)
    return path


@pytest.mark.skipif(HAS_TRTLLM, reason="the CPU stop applies where tensorrt_llm is missing")
def test_cpu_stops_with_the_documented_message_after_writing_the_spec(
    trtllm_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stage = build_stage("tensorrt-llm", tensorrt_llm={"tp": 2, "max_batch_size": 8})
    ctx = build_context(tmp_path, stage, trtllm_checkpoint)
    with pytest.raises(OperatorError) as info:
        run_tensorrt_llm(ctx)
    message = str(info.value)
    assert message.startswith(
        "engine: tensorrt-llm needs a CUDA GPU with the `tensorrt_llm` package importable"
    )
    assert message == CPU_STOP.format(
        version="1.2", found=message.split("this machine has ")[1].split(".")[0]
    )
    out = ctx.output_dir / "artifact"
    spec = json.loads((out / "build_spec.json").read_text())
    assert spec["checkpoint_kind"] == "trtllm" and spec["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    assert (out / "trtllm-build.sh").read_text().startswith("#!/bin/sh\nexec trtllm-build")
    assert "--max_batch_size" in capsys.readouterr().out  # the stage log keeps the spec
    # The engine cache key was computed from the declared/default version and arch, and says so.
    cache = spec["engine_cache"]
    assert cache["sources"] == {"tensorrt_llm": "default", "gpu_arch": "undeclared"}
    expected = t.engine_key(checkpoint_digest(trtllm_checkpoint), stage.tensorrt_llm,
                            installed_version=None, gpu_arch=None)  # fmt: skip
    assert cache["key"] == expected.key and cache["components"]["checkpoint"] == dir_digest(trtllm_checkpoint)


def test_engine_key_changes_with_each_component_and_only_those() -> None:
    spec = build_stage("tensorrt-llm", tensorrt_llm={"tp": 2}).tensorrt_llm

    def key(
        digest: str = "d1", version: str | None = "1.2.0", arch: str | None = "sm_90", **fields: Any
    ) -> str:
        s = spec.model_copy(update=fields)
        return t.engine_key(digest, s, installed_version=version, gpu_arch=arch).key

    base = key()
    assert base == key() and len(base) == 64
    assert len({base, key(digest="d2"), key(version="1.2.1"), key(arch="sm_89"), key(max_batch_size=8)}) == 5
    # A runtime-only knob does not invalidate engines.
    assert key(kv_cache_free_gpu_mem_fraction=0.5) == base
    detected = t.engine_key("d1", spec, installed_version="1.2.0", gpu_arch="sm_90")
    assert detected.detected and detected.components["tensorrt_llm"] == "1.2.0"


def test_engine_key_uses_declared_values_without_tensorrt_llm_and_checks_them_with_it() -> None:
    declared = build_stage("tensorrt-llm", tensorrt_llm={"version": "1.2", "gpu_arch": "sm_90"}).tensorrt_llm
    k = t.engine_key("d", declared, installed_version=None, gpu_arch=None)
    assert k.sources == {"tensorrt_llm": "declared", "gpu_arch": "declared"} and not k.detected
    assert (k.components["tensorrt_llm"], k.components["gpu_arch"]) == ("1.2", "sm_90")
    assert t.engine_key(
        "d", declared, installed_version="1.2.0rc3", gpu_arch="sm_90"
    ).detected  # same release
    with pytest.raises(ValueError, match=r"this node has TensorRT-LLM 1\.3\.0"):
        t.engine_key("d", declared, installed_version="1.3.0", gpu_arch="sm_90")
    with pytest.raises(ValueError, match=r"this node.s GPU is sm_100: engines are not portable"):
        t.engine_key("d", declared, installed_version="1.2.0", gpu_arch="sm_100")


def test_engine_cache_store_and_lookup(tmp_path: Path) -> None:
    engine = tmp_path / "built"
    engine.mkdir()
    (engine / "rank0.engine").write_bytes(b"\x00engine")
    (engine / "config.json").write_text("{}")
    root = tmp_path / "cache"
    assert cached_engine(root, "k1") is None
    stored = store_engine(root, "k1", engine, {"key": "k1"})
    assert cached_engine(root, "k1") == stored
    assert (stored / "rank0.engine").read_bytes() == b"\x00engine"
    store_engine(root, "k1", engine, {"key": "k1"})  # a second publisher of the same key is harmless
    assert sorted(p.name for p in root.iterdir()) == ["k1"]  # no temporaries left behind
    (root / "k2" / "engine").mkdir(parents=True)  # half-written: no metadata file
    assert cached_engine(root, "k2") is None


def test_plan_says_which_engine_key_inputs_are_declared(tmp_path: Path) -> None:
    registry = default_registry()
    wf = load_workflow(
        Path(__file__).resolve().parents[2] / "workflows" / "examples" / "llama3-8b-fp8-trtllm.yaml"
    )
    plan = Planner(wf, registry, ModelStore(tmp_path, registry), StageStore(tmp_path)).build()
    notes = [w for sp in plan.stages for w in sp.warnings if w.startswith("engine cache key")]
    if HAS_TRTLLM:
        assert notes == []
    else:
        assert notes and "tensorrt_llm is not installed here" in notes[0]


def test_tp_mismatch_with_the_checkpoint_is_caught(trtllm_checkpoint: Path, tmp_path: Path) -> None:
    stage = build_stage("tensorrt-llm", tensorrt_llm={"tp": 4})
    with pytest.raises(OperatorError, match="tp=4, pp=1 but the TRT-LLM checkpoint is sharded tp=2, pp=1"):
        run_tensorrt_llm(build_context(tmp_path, stage, trtllm_checkpoint))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRTLLM, reason="needs tensorrt_llm")
def test_builds_a_real_engine_on_a_gpu(trtllm_checkpoint: Path, tmp_path: Path) -> None:
    stage = build_stage("tensorrt-llm", tensorrt_llm={"tp": 2, "max_batch_size": 4, "max_input_len": 64,
                                                      "max_seq_len": 128, "max_num_tokens": 256})  # fmt: skip
    result = run_tensorrt_llm(build_context(tmp_path, stage, trtllm_checkpoint))
    assert result.metrics["engines"] == 2


def test_plan_rejects_nvfp4_on_cpu_before_running(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    (tmp_path / "wf.yaml").write_text(
        "name: q\nmodel: {base: builtin://tiny-llama}\ndata: {d: {path: d.jsonl, format: text}}\n"
        "stages:\n  - {name: q, kind: quantize, format: nvfp4, calibration: {dataset: d}}\n"
    )
    registry = default_registry()
    plan = Planner(load_workflow(tmp_path / "wf.yaml"), registry, ModelStore(tmp_path, registry),
                   StageStore(tmp_path)).build()  # fmt: skip
    problems = [str(p) for p in plan.problems()]
    assert len(problems) == 1
    assert "stages[0].format: format 'nvfp4' needs CUDA" in problems[0]
    assert "set resources.device: gpu" in problems[0]


def _hf_greedy(model_dir: Path, prompts: list[str], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        g = model.generate(**ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
        out.append(g[0, ids["input_ids"].shape[1] :].tolist())
    return out


def _teacher_forced_agreement(model_dir: Path, prompts: list[str], outputs: list[list[int]]) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    agree = total = 0
    for prompt, generated in zip(prompts, outputs, strict=True):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + generated])).logits[0]
        preds = logits[len(ids) - 1 : -1].argmax(dim=-1).tolist()
        agree += sum(a == b for a, b in zip(preds, generated, strict=True))
        total += len(generated)
    return agree / total


def _genai_greedy(ir: Path, prompts: list[str], n: int) -> list[list[int]]:
    import openvino_genai as og

    pipe = og.LLMPipeline(str(ir), "CPU", **F32_HINTS)
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = cfg.min_new_tokens = n
    cfg.do_sample = False
    cfg.apply_chat_template = False
    tok = pipe.get_tokenizer()
    return [list(pipe.generate(tok.encode(p), cfg).tokens[0]) for p in prompts]


PROMPTS = ["Returns the number of", "Repeat after me:\npeach bread dog paper", "Is the pear a fruit"]


@pytest.mark.slow
@pytest.mark.parametrize("weight_format", ["fp32", "int8", "int4"])
def test_openvino_build_loads_in_genai_and_generates_like_hf(weight_format: str, tmp_path: Path) -> None:
    from test_quantize_operator import SOURCE

    SOURCE.materialize(tmp_path / "tiny")
    stage = build_stage("openvino", openvino={"weight_format": weight_format})
    result = run_openvino(build_context(tmp_path, stage, tmp_path / "tiny"))
    ir = result.outputs["artifact"]
    assert isinstance(ir, Path)
    assert {"openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"} <= {
        p.name for p in ir.iterdir()
    }
    ov = _genai_greedy(ir, PROMPTS, 16)
    if weight_format in ("fp32", "int8"):
        assert ov == _hf_greedy(tmp_path / "tiny", PROMPTS, 16)
    else:
        # Free-running sequences diverge after one differing token; the gate's measure is teacher-forced
        # agreement: HF's greedy token after each prefix of GenAI's own output.
        assert _teacher_forced_agreement(tmp_path / "tiny", PROMPTS, ov) >= 0.7


@pytest.mark.slow
def test_openvino_build_takes_an_nncf_ir_as_is(tmp_path: Path) -> None:
    from test_quantize_operator import SOURCE

    SOURCE.materialize(tmp_path / "tiny")
    q = quantize(quantize_context(tmp_path, tmp_path / "tiny", format="nncf_int8"))
    ir = q.outputs["checkpoint"]
    assert isinstance(ir, Path)
    with pytest.raises(
        OperatorError, match=r"openvino\.weight_format='int4' but the input IR is already 'int8'"
    ):
        run_openvino(build_context(tmp_path, build_stage("openvino", openvino={"weight_format": "int4"}), ir))
    again = tmp_path / "again"
    again.mkdir()
    result = run_openvino(build_context(again, build_stage("openvino"), ir))
    artifact = result.outputs["artifact"]
    assert isinstance(artifact, Path)
    assert (artifact / "openvino_model.bin").read_bytes() == (ir / "openvino_model.bin").read_bytes()


# ------------------------------------------------------------------ EngineBuild on Kubernetes
SMALL_ENGINE = {"tp": 2, "max_batch_size": 4, "max_input_len": 64, "max_seq_len": 128, "max_num_tokens": 256}


def _job_args(checkpoint: Path, tmp: Path, expect_key: str | None = None) -> list[str]:
    settings = t_settings(SMALL_ENGINE)
    args = ["--checkpoint", str(checkpoint), "--settings", json.dumps(settings), "--out", str(tmp / "out")]
    args += ["--cache", str(tmp / "cache"), "--termination-log", str(tmp / "termination-log")]
    return args + (["--expect-key", expect_key] if expect_key else [])


def t_settings(fields: dict[str, Any]) -> dict[str, Any]:
    from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec

    return TrtllmBuildSpec.model_validate(fields).model_dump()


def test_engine_build_resource_and_job_pass_the_kubernetes_schemas() -> None:
    from forgeline_operators.build.k8s import API_VERSION, engine_build, engine_build_job
    from forgeline_operators.finetune.nemo.validate import validate_k8s

    key = "ab12" * 16
    cr = engine_build(
        "Llama3 8B FP8 engine",
        namespace="ml",
        checkpoint="/artifacts/stages/k1/checkpoint",
        checkpoint_sha256="c" * 64,
        settings=t_settings(ISSUE_SPEC),
        cache_key=key,
        output="/artifacts/engines/k1",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        workflow="llama3-8b-fp8-trtllm",
    )
    assert cr["apiVersion"] == API_VERSION and cr["kind"] == "EngineBuild"
    assert cr["metadata"]["name"] == "llama3-8b-fp8-engine" and cr["spec"]["gpus"] == 2
    job = engine_build_job(
        cr, volume_claim="forgeline-artifacts", owner_uid="0b6a1f9e-5d2c-4c1e-9a57-3f1d1c0f8e21"
    )
    assert validate_k8s([job]) == []
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert container["command"] == ["python", "-m", "forgeline_operators.build.engine_job"]
    assert container["args"][container["args"].index("--expect-key") + 1] == key
    assert (
        json.loads(container["args"][container["args"].index("--settings") + 1]) == cr["spec"]["tensorrtLLM"]
    )
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "EngineBuild",
        cr["metadata"]["name"],
        True,
    )
    assert len(job["metadata"]["name"]) <= 63 and job["metadata"]["name"].endswith(key[:10])
    # The validation is strict: a misspelt field is caught with its path.
    container["resource"] = container.pop("resources")
    problems = validate_k8s([job])
    assert problems and "resource" in problems[0]


@pytest.mark.skipif(HAS_TRTLLM, reason="checks the report of a node that cannot build")
def test_engine_job_on_a_cpu_node_reports_what_it_needs(trtllm_checkpoint: Path, tmp_path: Path) -> None:
    from forgeline_operators.build.engine_job import main

    assert main(_job_args(trtllm_checkpoint, tmp_path)) == 2
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["phase"] == "Failed" and report["reason"] == "NoGPU"
    assert "needs a CUDA GPU with the `tensorrt_llm` package" in report["message"]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging left behind"


def test_engine_job_refuses_a_node_whose_key_differs(trtllm_checkpoint: Path, tmp_path: Path) -> None:
    from forgeline_operators.build.engine_job import main

    assert main(_job_args(trtllm_checkpoint, tmp_path, expect_key="0" * 64)) == 3
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["reason"] == "KeyMismatch" and "expects 000000000000" in report["message"]


def test_engine_job_reuses_a_cached_engine_and_publishes_it(trtllm_checkpoint: Path, tmp_path: Path) -> None:
    """The reuse path (no GPU needed): the cache entry holds stand-in bytes, since no engine can be
    built here -- what is checked is the copy, the manifest and the report, not an engine."""
    from forgeline.artifacts import read_manifest
    from forgeline_operators.build.engine_job import main
    from forgeline_operators.build.operator import write_spec

    probe = write_spec(
        build_stage("tensorrt-llm", tensorrt_llm=SMALL_ENGINE), trtllm_checkpoint, tmp_path / "p"
    )
    key = probe["engine_cache"]["key"]
    built = tmp_path / "built"
    built.mkdir()
    for rank in (0, 1):
        (built / f"rank{rank}.engine").write_bytes(f"stand-in engine {rank}".encode())
    store_engine(tmp_path / "cache", key, built, probe["engine_cache"])

    assert main(_job_args(trtllm_checkpoint, tmp_path, expect_key=key)) == 0
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["phase"] == "Succeeded" and report["cache"] == "hit" and report["cacheKey"] == key
    assert report["engines"] == ["rank0.engine", "rank1.engine"]
    manifest = read_manifest(tmp_path / "out")
    assert manifest is not None and report["sha256"] == manifest.digest
    assert (tmp_path / "out" / "engine" / "rank1.engine").read_bytes() == b"stand-in engine 1"
    assert (tmp_path / "out" / "extra_llm_api_options.yaml").is_file()


def test_engine_job_for_an_hf_checkpoint_publishes_the_llm_api_profile(tmp_path: Path) -> None:
    from test_quantize_operator import SOURCE

    from forgeline_operators.build.engine_job import main

    SOURCE.materialize(tmp_path / "tiny")
    assert main(_job_args(tmp_path / "tiny", tmp_path)) == 0
    report = json.loads((tmp_path / "termination-log").read_text())
    assert report["form"] == "llm-api" and report["engines"] == []
    assert "tensor_parallel_size: 2" in (tmp_path / "out" / "extra_llm_api_options.yaml").read_text()
