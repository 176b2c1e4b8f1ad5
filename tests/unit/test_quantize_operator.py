"""The quantize operator on the shipped tiny Llama, for real: ModelOpt PTQ on CPU, its HF and TRT-LLM
exports, NNCF weight compression of the OpenVINO IR, and the gate against the parent.

Each ModelOpt format takes well under a second on the tiny model (AWQ ~3 s); the OpenVINO path (export,
compression, OpenVINO runtime scoring) ~10 s and is marked slow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from forgeline.artifacts import sha256_file
from forgeline.runtime.context import (
    DatasetInput,
    GateFailed,
    MemorySink,
    OperatorError,
    StageContext,
    StageResult,
)
from forgeline_operators.models.tiny_llama import SOURCE
from forgeline_operators.quantize.operator import run
from forgeline_operators.quantize.spec import QuantizeStage

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[2] / "workflows" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    SOURCE.materialize(d)
    return d


def context(tmp: Path, model_dir: Path, sink: MemorySink | None = None, **fields: Any) -> StageContext:
    spec: dict[str, Any] = {
        "name": "q",
        "kind": "quantize",
        "calibration": {"dataset": "corpus", "samples": 16, "max_seq_len": 128},
        **fields,
    }
    stage = QuantizeStage.model_validate(spec)
    datasets = {
        name: DatasetInput(name, DATA / file, fmt, sha256_file(DATA / file))
        for name, file, fmt in (
            ("corpus", "corpus_sample.jsonl", "text"),
            ("held_out", "held_out.jsonl", "sft"),
        )
    }
    out, work = tmp / "out", tmp / "work"
    out.mkdir(parents=True)
    work.mkdir()
    return StageContext(
        stage=stage,
        workflow=None,
        output_dir=out,
        work_dir=work,
        sink=sink or MemorySink(),
        resolve=lambda ref: model_dir,
        values=lambda ref: None,
        datasets=datasets,
    )


def quant_config(result: StageResult) -> dict[str, Any]:
    checkpoint = result.outputs["checkpoint"]
    assert isinstance(checkpoint, Path)
    return dict(json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"])


@pytest.mark.parametrize(
    ("fmt", "algo"),
    [
        ("fp8", "FP8"),
        ("int8_sq", "W8A8_SQ_PER_CHANNEL"),
        ("int8", "W8A8_SQ_PER_CHANNEL"),
        ("int4_awq", "W4A16_AWQ"),
        ("w4a8_awq", "W4A8_AWQ"),
    ],
)
def test_each_modelopt_format_exports_a_unified_hf_checkpoint(
    fmt: str, algo: str, tiny: Path, tmp_path: Path
) -> None:
    sink = MemorySink()
    result = run(context(tmp_path, tiny, sink, format=fmt))
    checkpoint = result.outputs["checkpoint"]
    assert isinstance(checkpoint, Path)
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert quant_config(result)["quant_algo"] == algo
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    meta = json.loads((checkpoint / "forgeline_quant.json").read_text())
    assert meta["format"] == fmt and meta["library"] == "nvidia-modelopt"
    # Gated against the parent, logged even without thresholds.
    for metric in ("perplexity", "parent_perplexity", "perplexity_increase", "token_agreement", "size_ratio"):
        assert sink.last(metric) is not None, metric
    assert 0.5 < result.metrics["token_agreement"] <= 1.0
    assert "trtllm_checkpoint" not in result.outputs


def _dtypes(checkpoint: Path) -> dict[str, str]:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118


def test_export_dtype_bf16_by_default_halves_the_unquantized_tensors(tiny: Path, tmp_path: Path) -> None:
    bf16 = run(context(tmp_path / "bf16", tiny, format="int8"))
    fp32 = run(context(tmp_path / "fp32", tiny, format="int8", export_dtype="fp32"))
    dirs = [r.outputs["checkpoint"] for r in (bf16, fp32)]
    assert all(isinstance(d, Path) for d in dirs)
    b, f = (_dtypes(d) for d in dirs)  # type: ignore[arg-type]
    assert b["model.embed_tokens.weight"] == "BF16" and f["model.embed_tokens.weight"] == "F32"
    assert b["lm_head.weight"] == "BF16" and b["model.norm.weight"] == "BF16"
    assert b["model.layers.0.mlp.down_proj.weight"] == f["model.layers.0.mlp.down_proj.weight"] == "I8"
    # Embeddings + lm_head are 2/3 of the tiny model: bf16 takes the file to ~0.4x the fp32 parent.
    assert bf16.metrics["size_bytes"] < 0.6 * fp32.metrics["size_bytes"]
    assert bf16.metrics["size_ratio"] < 0.45 < fp32.metrics["size_ratio"]
    meta = json.loads((dirs[0] / "forgeline_quant.json").read_text())  # type: ignore[operator]
    assert meta["export_dtype"] == "bf16"


def test_export_dtype_is_a_modelopt_option(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="export_dtype is a ModelOpt export option"):
        run(context(tmp_path, tiny, format="nncf_int8", export_dtype="fp16"))


def test_fp8_kv_cache(tiny: Path, tmp_path: Path) -> None:
    result = run(context(tmp_path, tiny, format="fp8", kv_cache_dtype="fp8"))
    q = quant_config(result)
    assert (q["quant_algo"], q["kv_cache_quant_algo"]) == ("FP8", "FP8")


def test_trtllm_checkpoint_tp2_has_two_ranks_with_half_shapes(tiny: Path, tmp_path: Path) -> None:
    result = run(context(tmp_path, tiny, format="int8_sq", export_trtllm={"tp": 2}))
    trt = result.outputs["trtllm_checkpoint"]
    assert isinstance(trt, Path)
    assert sorted(p.name for p in trt.iterdir()) == ["config.json", "rank0.safetensors", "rank1.safetensors"]
    config = json.loads((trt / "config.json").read_text())
    assert config["mapping"]["tp_size"] == 2 and config["mapping"]["world_size"] == 2
    assert config["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    ranks = []
    for i in range(2):
        with safe_open(str(trt / f"rank{i}.safetensors"), "pt") as f:
            ranks.append({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    assert ranks[0] == ranks[1]
    hidden, inter, kv = 128, 512, 2 * 32  # tiny Llama: 4 heads, 2 KV heads, head_dim 32
    shapes = ranks[0]
    # Column-parallel: output dim halved; row-parallel: input dim halved.
    assert shapes["transformer.layers.0.attention.qkv.weight"] == ((hidden + 2 * kv) // 2, hidden)
    assert shapes["transformer.layers.0.mlp.fc.weight"] == (inter // 2, hidden)
    assert shapes["transformer.layers.0.mlp.proj.weight"] == (hidden, inter // 2)
    assert shapes["transformer.layers.0.attention.dense.weight"] == (hidden, hidden // 2)


def test_trtllm_export_that_cannot_shard_says_why(tiny: Path, tmp_path: Path) -> None:
    # AWQ blocks are 128 wide; the tiny model's 128-wide rows cannot split over tp=2.
    with pytest.raises(OperatorError, match=r"tp=2, pp=1 failed: .*block size 128"):
        run(context(tmp_path, tiny, format="int4_awq", export_trtllm={"tp": 2}))


def test_int8_gate_passes_with_realistic_thresholds(tiny: Path, tmp_path: Path) -> None:
    gate = {"max_perplexity_increase": 0.05, "min_token_agreement": 0.9}
    result = run(context(tmp_path, tiny, format="int8", gate=gate))
    assert result.metrics["perplexity_increase"] <= 0.05
    assert result.metrics["token_agreement"] >= 0.9
    assert result.metrics["gate_rows"] == 64  # corpus rows 16..80, never the calibration rows


def test_gate_fails_with_the_numbers_when_impossibly_tight(tiny: Path, tmp_path: Path) -> None:
    sink = MemorySink()
    gate = {"max_perplexity_increase": 0.0, "min_token_agreement": 1.0}
    with pytest.raises(GateFailed) as info:
        run(context(tmp_path, tiny, sink, format="int4_awq", gate=gate))
    message = str(info.value)
    assert message.startswith("int4_awq: gate max_perplexity_increase=0 failed: perplexity ")
    assert "above the parent's" in message and "(allowed 0.00%)" in message
    assert "gate min_token_agreement=1 failed: greedy tokens agree with the parent on " in message
    assert info.value.metrics["perplexity_increase"] > 0
    assert sink.last("perplexity_increase") == info.value.metrics["perplexity_increase"]  # logged first
    assert not (tmp_path / "out" / "checkpoint").exists()  # nothing exported past a failed gate


def test_held_out_gate_dataset(tiny: Path, tmp_path: Path) -> None:
    result = run(context(tmp_path, tiny, format="int8", gate={"dataset": "held_out"}))
    assert result.metrics["gate_rows"] == 64


def test_no_held_out_rows_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="no held-out rows for the gate"):
        run(context(tmp_path, tiny, format="int8", calibration={"dataset": "corpus", "samples": 100}))


def test_nncf_cannot_export_trtllm(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match="export_trtllm needs a ModelOpt format"):
        run(context(tmp_path, tiny, format="nncf_int8", export_trtllm={"tp": 1}))


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "bits"), [("nncf_int8", "int8"), ("nncf_int4", "int4")])
def test_nncf_compresses_the_openvino_ir_and_gates_it_on_the_runtime(
    fmt: str, bits: str, tiny: Path, tmp_path: Path
) -> None:
    gate = {"max_perplexity_increase": 0.05 if bits == "int8" else 0.5, "min_token_agreement": 0.5}
    result = run(context(tmp_path, tiny, format=fmt, gate=gate))
    checkpoint = result.outputs["checkpoint"]
    assert isinstance(checkpoint, Path)
    files = {p.name for p in checkpoint.iterdir()}
    assert {"openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml"} <= files
    assert json.loads((checkpoint / "forgeline_openvino.json").read_text())["weight_format"] == bits
    # Real compression: int8 ~0.25x of fp32; int4 (embeddings too) ~0.13x.
    assert result.metrics["size_ratio"] < (0.3 if bits == "int8" else 0.2)
