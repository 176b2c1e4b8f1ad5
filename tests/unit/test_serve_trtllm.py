"""The TensorRT-LLM Triton repositories as files: golden configs (inflight_batcher_llm and llmapi),
their cross-model wiring, and the serve stage choosing the layout on GPU or for a TRT-LLM build."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from forgeline.runtime.context import MemorySink, OperatorError, StageContext
from forgeline.spec._models import Workflow
from forgeline_operators.engines.tensorrt_llm import repository as t
from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec
from forgeline_operators.engines.tensorrt_llm.trtllm import llm_api_options
from forgeline_operators.models.tiny_llama import CHECKPOINT_DIR
from forgeline_operators.serve.operator import run as serve
from forgeline_operators.serve.spec import ServeStage

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden" / "trtllm"
SPEC = t.TrtllmRepositorySpec(
    engine_dir="/models/llama/engine",
    max_batch_size=64,
    kv_cache_free_gpu_mem_fraction=0.85,
    max_tokens_in_paged_kv_cache=131072,
    lora=True,
    lora_cache_max_adapter_size=16,
)


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("FORGELINE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; FORGELINE_UPDATE_GOLDEN=1 rewrites it after review"


@pytest.mark.parametrize(
    "name,render",
    [
        ("ensemble.pbtxt", t.ensemble_config),
        ("preprocessing.pbtxt", t.preprocessing_config),
        ("tensorrt_llm.pbtxt", t.tensorrt_llm_config),
        ("postprocessing.pbtxt", t.postprocessing_config),
        ("llmapi.pbtxt", t.llmapi_config),
    ],
)
def test_configs_golden(name: str, render: object) -> None:
    golden(name, render(SPEC))  # type: ignore[operator]


def test_llmapi_model_yaml_golden() -> None:
    options = llm_api_options(TrtllmBuildSpec(tp=2, lora={"max_rank": 16}))
    golden("llmapi-model.yaml", t.llmapi_model_yaml("/models/llama-hf", options, SPEC))


def _names(config: str, section: str) -> set[str]:
    block = config.split(f"{section} [\n", 1)[1].split("\n]\n", 1)[0]
    return set(re.findall(r'name: "([^"]+)"', block))


def test_engine_config_keys_and_ensemble_wiring() -> None:
    engine = t.tensorrt_llm_config(SPEC)
    for key, value in {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": "/models/llama/engine",
        "kv_cache_free_gpu_mem_fraction": "0.85",
        "max_tokens_in_paged_kv_cache": "131072",
        "enable_kv_cache_reuse": "true",
        "exclude_input_in_output": "true",
        "max_beam_width": "1",
        "lora_cache_max_adapter_size": "16",
    }.items():
        assert f'key: "{key}" value: {{ string_value: "{value}" }}' in engine, key
    assert 'backend: "tensorrtllm"' in engine and "decoupled: true" in engine
    assert {"lora_task_id", "lora_weights", "lora_config"} <= _names(engine, "input")
    # Every tensor the ensemble maps into or out of a step exists in that step's config.
    ensemble = t.ensemble_config(SPEC)
    steps = {
        "preprocessing": t.preprocessing_config(SPEC),
        "tensorrt_llm": engine,
        "postprocessing": t.postprocessing_config(SPEC),
    }
    for model, config in steps.items():
        step = ensemble.split(f'model_name: "{model}"', 1)[1].split("    }", 1)[0]
        assert set(re.findall(r'input_map \{ key: "([^"]+)"', step)) <= _names(config, "input"), model
        assert set(re.findall(r'output_map \{ key: "([^"]+)"', step)) <= _names(config, "output"), model
    required = {n for n, _, _, f in t.ENGINE_INPUTS if "o" not in f}
    engine_step = ensemble.split('model_name: "tensorrt_llm"', 1)[1].split("    }", 1)[0]
    assert required <= set(re.findall(r'input_map \{ key: "([^"]+)"', engine_step))
    no_lora = t.tensorrt_llm_config(SPEC.model_copy(update={"lora": False}))
    assert "lora_cache" not in no_lora


def _ctx(tmp: Path, stage: ServeStage, device: str, model_dir: Path) -> StageContext:
    workflow = Workflow.model_validate(
        {
            "name": "w",
            "model": {"base": str(model_dir)},
            "resources": {"device": device},
            "stages": [stage.model_dump(by_alias=True)],
        }
    )
    (tmp / "out").mkdir(parents=True)
    (tmp / "work").mkdir()
    return StageContext(
        stage, workflow, tmp / "out", tmp / "work", MemorySink(), lambda r: model_dir, lambda r: None, {}
    )


def _engine_artifact(tmp: Path) -> Path:
    art = tmp / "artifact"
    (art / "engine").mkdir(parents=True)
    (art / "extra_llm_api_options.yaml").write_text("tensor_parallel_size: 1\n")
    settings = TrtllmBuildSpec(max_batch_size=32, lora={"max_rank": 16}).model_dump()
    spec = {"checkpoint": str(CHECKPOINT_DIR), "trtllm_build": ["trtllm-build"], "settings": settings}
    (art / "build_spec.json").write_text(json.dumps(spec))
    return art


def test_serve_stage_renders_inflight_batcher_for_an_engine(tmp_path: Path) -> None:
    stage = ServeStage(name="serve", kind="serve", model="${stages.b.outputs.artifact}")
    art = _engine_artifact(tmp_path)
    result = serve(_ctx(tmp_path, stage, "cpu", art))  # a TRT-LLM build output picks the GPU layout
    repo = Path(result.outputs["repository"])
    manifest = json.loads((repo / "forgeline-repository.json").read_text())
    assert manifest["layout"] == "inflight_batcher_llm" and manifest["served_model"] == "ensemble"
    engine = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    assert f'string_value: "{art / "engine"}"' in engine and "max_batch_size: 32" in engine
    assert (repo / "preprocessing/1/tokenizer/tokenizer.json").is_file()
    assert (
        (repo / "postprocessing/1/model.py").read_text().startswith('"""Triton python model ``postprocessing')
    )


def test_serve_stage_on_gpu_renders_llmapi_for_hf_and_refuses_cpu_settings(tmp_path: Path) -> None:
    stage = ServeStage(name="serve", kind="serve", model="${model}")
    result = serve(_ctx(tmp_path / "a", stage, "gpu", CHECKPOINT_DIR))
    repo = Path(result.outputs["repository"])
    yaml = (repo / "tensorrt_llm/1/model.yaml").read_text()
    assert yaml.startswith(f"model: {CHECKPOINT_DIR}\nbackend: pytorch\n") and "decoupled: true" in yaml
    with_adapters = ServeStage.model_validate(
        {"name": "serve", "kind": "serve", "model": "${model}", "adapters": {"sql": "x"}}
    )
    with pytest.raises(OperatorError, match="CPU-runtime settings"):
        serve(_ctx(tmp_path / "b", with_adapters, "gpu", CHECKPOINT_DIR))
