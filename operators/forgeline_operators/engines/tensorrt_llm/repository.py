"""Triton model repositories of the TensorRT-LLM engine (GPU), as pure functions of a typed spec.

Two layouts, both NVIDIA's:

* ``inflight_batcher_llm`` — ``ensemble`` (text in, text out) over ``preprocessing`` (tokenizer) →
  ``tensorrt_llm`` (``backend: "tensorrtllm"``, in-flight fused batching over a paged KV cache,
  decoupled streaming, LoRA by ``lora_task_id`` / ``lora_weights`` / ``lora_config``) →
  ``postprocessing`` (detokenizer). Tensor names, types, dims and parameter keys follow
  triton-inference-server/tensorrtllm_backend tag **v0.19.0**, ``all_models/inflight_batcher_llm/*/
  config.pbtxt`` — the last tag that ships ``all_models`` (v0.20.0 on moved them into the TensorRT-LLM
  repository). Only the text-LLM subset is rendered (no multimodal, encoder-decoder, lookahead,
  guided-decoding or disaggregated tensors). Pre/post-processing are Forgeline's own python models
  (:mod:`.trtllm_preprocessing`, :mod:`.trtllm_postprocessing`) with the upstream tensor contract.
* ``llmapi`` — one decoupled python model ``tensorrt_llm`` whose ``1/model.yaml`` holds the LLM-API
  arguments (PyTorch backend, loads HF checkpoints directly); the layout of TensorRT-LLM's
  ``triton_backend/all_models/llmapi/tensorrt_llm/`` (NVIDIA/TensorRT-LLM main; tensorrtllm_backend
  v0.19.0 ``all_models/llmapi``). Its ``1/model.py`` is NVIDIA's and ships in the Triton TRT-LLM
  image; it is not vendored here (the manifest names where to take it from).

Untested here (no GPU): the ``tensorrtllm`` backend itself and the llmapi model. What is tested: the
files (golden), and the inflight_batcher_llm ensemble loading in the real tritonserver 2.51 with the
``tensorrt_llm`` step replaced by a python model of the same config (``engine_backend="python"``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from forgeline_operators.engines import MANIFEST

__all__ = [
    "BACKEND_TAG",
    "LLMAPI_MODEL_PY",
    "TrtllmRepositorySpec",
    "build_llmapi_repository",
    "build_trtllm_repository",
    "ensemble_config",
    "llmapi_config",
    "llmapi_model_yaml",
    "postprocessing_config",
    "preprocessing_config",
    "tensorrt_llm_config",
]

BACKEND_TAG = "triton-inference-server/tensorrtllm_backend@v0.19.0"
LLMAPI_MODEL_PY = "NVIDIA/TensorRT-LLM: triton_backend/all_models/llmapi/tensorrt_llm/1/model.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
HERE = Path(__file__).parent

# (name, type, dims, flags) — flags: "o" optional, "r" allow_ragged_batch, "s" reshape to a scalar.
Tensor = tuple[str, str, str, str]

ENGINE_INPUTS: tuple[Tensor, ...] = (
    ("input_ids", "TYPE_INT32", "[ -1 ]", "ro"),
    ("input_lengths", "TYPE_INT32", "[ 1 ]", "s"),
    ("request_output_len", "TYPE_INT32", "[ 1 ]", "s"),
    ("draft_input_ids", "TYPE_INT32", "[ -1 ]", "or"),
    ("draft_acceptance_threshold", "TYPE_FP32", "[ 1 ]", "so"),
    ("end_id", "TYPE_INT32", "[ 1 ]", "so"),
    ("pad_id", "TYPE_INT32", "[ 1 ]", "so"),
    ("stop_words_list", "TYPE_INT32", "[ 2, -1 ]", "or"),
    ("bad_words_list", "TYPE_INT32", "[ 2, -1 ]", "or"),
    ("embedding_bias", "TYPE_FP32", "[ -1 ]", "or"),
    ("beam_width", "TYPE_INT32", "[ 1 ]", "so"),
    ("temperature", "TYPE_FP32", "[ 1 ]", "so"),
    ("runtime_top_k", "TYPE_INT32", "[ 1 ]", "so"),
    ("runtime_top_p", "TYPE_FP32", "[ 1 ]", "so"),
    ("len_penalty", "TYPE_FP32", "[ 1 ]", "so"),
    ("repetition_penalty", "TYPE_FP32", "[ 1 ]", "so"),
    ("min_length", "TYPE_INT32", "[ 1 ]", "so"),
    ("presence_penalty", "TYPE_FP32", "[ 1 ]", "so"),
    ("frequency_penalty", "TYPE_FP32", "[ 1 ]", "so"),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", "so"),
    ("return_log_probs", "TYPE_BOOL", "[ 1 ]", "so"),
    ("return_context_logits", "TYPE_BOOL", "[ 1 ]", "so"),
    ("return_generation_logits", "TYPE_BOOL", "[ 1 ]", "so"),
    ("exclude_input_in_output", "TYPE_BOOL", "[ 1 ]", "so"),
    ("stop", "TYPE_BOOL", "[ 1 ]", "so"),
    ("streaming", "TYPE_BOOL", "[ 1 ]", "so"),
    # LoRA: the first request of a task sends all three; later ones only lora_task_id (cached).
    ("lora_task_id", "TYPE_UINT64", "[ 1 ]", "so"),
    ("lora_weights", "TYPE_FP16", "[ -1, -1 ]", "or"),
    ("lora_config", "TYPE_INT32", "[ -1, 3 ]", "or"),
)
ENGINE_OUTPUTS: tuple[Tensor, ...] = (
    ("output_ids", "TYPE_INT32", "[ -1, -1 ]", ""),
    ("sequence_length", "TYPE_INT32", "[ -1 ]", ""),
    ("cum_log_probs", "TYPE_FP32", "[ -1 ]", ""),
    ("output_log_probs", "TYPE_FP32", "[ -1, -1 ]", ""),
    ("context_logits", "TYPE_FP32", "[ -1, -1 ]", ""),
    ("generation_logits", "TYPE_FP32", "[ -1, -1, -1 ]", ""),
    ("batch_index", "TYPE_INT32", "[ 1 ]", ""),
    ("sequence_index", "TYPE_INT32", "[ 1 ]", ""),
)
PRE_INPUTS: tuple[Tensor, ...] = (
    ("QUERY", "TYPE_STRING", "[ 1 ]", ""),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", "[ 1 ]", ""),
    ("BAD_WORDS_DICT", "TYPE_STRING", "[ -1 ]", "o"),
    ("STOP_WORDS_DICT", "TYPE_STRING", "[ -1 ]", "o"),
    ("EMBEDDING_BIAS_WORDS", "TYPE_STRING", "[ -1 ]", "o"),
    ("EMBEDDING_BIAS_WEIGHTS", "TYPE_FP32", "[ -1 ]", "o"),
    ("END_ID", "TYPE_INT32", "[ 1 ]", "o"),
    ("PAD_ID", "TYPE_INT32", "[ 1 ]", "o"),
)
PRE_OUTPUTS: tuple[Tensor, ...] = (
    ("INPUT_ID", "TYPE_INT32", "[ -1 ]", ""),
    ("REQUEST_INPUT_LEN", "TYPE_INT32", "[ 1 ]", ""),
    ("BAD_WORDS_IDS", "TYPE_INT32", "[ 2, -1 ]", ""),
    ("STOP_WORDS_IDS", "TYPE_INT32", "[ 2, -1 ]", ""),
    ("EMBEDDING_BIAS", "TYPE_FP32", "[ -1 ]", ""),
    ("REQUEST_OUTPUT_LEN", "TYPE_INT32", "[ -1 ]", ""),
    ("OUT_END_ID", "TYPE_INT32", "[ 1 ]", ""),
    ("OUT_PAD_ID", "TYPE_INT32", "[ 1 ]", ""),
)
POST_INPUTS: tuple[Tensor, ...] = (
    ("TOKENS_BATCH", "TYPE_INT32", "[ -1, -1 ]", ""),
    ("SEQUENCE_LENGTH", "TYPE_INT32", "[ -1 ]", ""),
)
POST_OUTPUTS: tuple[Tensor, ...] = (("OUTPUT", "TYPE_STRING", "[ -1 ]", ""),)

# Ensemble inputs: (name, type, dims, flags, consumer step, consumer tensor).
ENSEMBLE_INPUTS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("text_input", "TYPE_STRING", "[ 1 ]", "", "preprocessing", "QUERY"),
    ("max_tokens", "TYPE_INT32", "[ 1 ]", "", "preprocessing", "REQUEST_OUTPUT_LEN"),
    ("bad_words", "TYPE_STRING", "[ -1 ]", "o", "preprocessing", "BAD_WORDS_DICT"),
    ("stop_words", "TYPE_STRING", "[ -1 ]", "o", "preprocessing", "STOP_WORDS_DICT"),
    ("embedding_bias_words", "TYPE_STRING", "[ -1 ]", "o", "preprocessing", "EMBEDDING_BIAS_WORDS"),
    ("embedding_bias_weights", "TYPE_FP32", "[ -1 ]", "o", "preprocessing", "EMBEDDING_BIAS_WEIGHTS"),
    ("end_id", "TYPE_INT32", "[ 1 ]", "o", "preprocessing", "END_ID"),
    ("pad_id", "TYPE_INT32", "[ 1 ]", "o", "preprocessing", "PAD_ID"),
    ("exclude_input_in_output", "TYPE_BOOL", "[ 1 ]", "o", "tensorrt_llm", "exclude_input_in_output"),
    ("top_k", "TYPE_INT32", "[ 1 ]", "o", "tensorrt_llm", "runtime_top_k"),
    ("top_p", "TYPE_FP32", "[ 1 ]", "o", "tensorrt_llm", "runtime_top_p"),
    ("temperature", "TYPE_FP32", "[ 1 ]", "o", "tensorrt_llm", "temperature"),
    ("length_penalty", "TYPE_FP32", "[ 1 ]", "o", "tensorrt_llm", "len_penalty"),
    ("repetition_penalty", "TYPE_FP32", "[ 1 ]", "o", "tensorrt_llm", "repetition_penalty"),
    ("min_length", "TYPE_INT32", "[ 1 ]", "o", "tensorrt_llm", "min_length"),
    ("presence_penalty", "TYPE_FP32", "[ 1 ]", "o", "tensorrt_llm", "presence_penalty"),
    ("frequency_penalty", "TYPE_FP32", "[ 1 ]", "o", "tensorrt_llm", "frequency_penalty"),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", "o", "tensorrt_llm", "random_seed"),
    ("return_log_probs", "TYPE_BOOL", "[ 1 ]", "o", "tensorrt_llm", "return_log_probs"),
    ("return_context_logits", "TYPE_BOOL", "[ 1 ]", "o", "tensorrt_llm", "return_context_logits"),
    ("return_generation_logits", "TYPE_BOOL", "[ 1 ]", "o", "tensorrt_llm", "return_generation_logits"),
    ("beam_width", "TYPE_INT32", "[ 1 ]", "o", "tensorrt_llm", "beam_width"),
    ("stream", "TYPE_BOOL", "[ 1 ]", "o", "tensorrt_llm", "streaming"),
    ("lora_task_id", "TYPE_UINT64", "[ 1 ]", "o", "tensorrt_llm", "lora_task_id"),
    ("lora_weights", "TYPE_FP16", "[ -1, -1 ]", "or", "tensorrt_llm", "lora_weights"),
    ("lora_config", "TYPE_INT32", "[ -1, 3 ]", "or", "tensorrt_llm", "lora_config"),
)
# preprocessing output → tensorrt_llm input, through ensemble-internal tensors.
PRE_TO_ENGINE = (
    ("INPUT_ID", "input_ids"),
    ("REQUEST_INPUT_LEN", "input_lengths"),
    ("REQUEST_OUTPUT_LEN", "request_output_len"),
    ("STOP_WORDS_IDS", "stop_words_list"),
    ("BAD_WORDS_IDS", "bad_words_list"),
    ("EMBEDDING_BIAS", "embedding_bias"),
    ("OUT_END_ID", "end_id"),
    ("OUT_PAD_ID", "pad_id"),
)
ENSEMBLE_PASSTHROUGH: tuple[str, ...] = ("cum_log_probs", "output_log_probs", "context_logits")
ENSEMBLE_PASSTHROUGH += ("generation_logits", "batch_index", "sequence_index")


class TrtllmRepositorySpec(BaseModel):
    """The knobs of NVIDIA's repository that Forgeline sets (the rest keep the backend's defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine_dir: str = Field(description="gpt_model_path: the engine directory as the server sees it.")
    max_batch_size: int = Field(default=64, ge=1, description="triton_max_batch_size of every model.")
    decoupled: bool = Field(default=True, description="Stream tokens (model_transaction_policy).")
    max_beam_width: int = Field(default=1, ge=1, description="Beam width the engine was built for.")
    batching_strategy: Literal["inflight_fused_batching", "V1"] = Field(
        default="inflight_fused_batching", description="gpt_model_type."
    )
    batch_scheduler_policy: Literal["max_utilization", "guaranteed_no_evict"] = Field(
        default="guaranteed_no_evict", description="Admission policy of the in-flight batcher."
    )
    kv_cache_free_gpu_mem_fraction: float = Field(
        default=0.9, gt=0, le=1, description="GPU memory left after weights given to the paged KV cache."
    )
    max_tokens_in_paged_kv_cache: int | None = Field(
        default=None, ge=1, description="Hard cap on KV-cache tokens (unset: the memory fraction decides)."
    )
    enable_kv_cache_reuse: bool = Field(default=True, description="Reuse KV blocks of shared prefixes.")
    enable_chunked_context: bool = Field(default=True, description="Split long prompts across steps.")
    exclude_input_in_output: bool = Field(default=True, description="Return only generated tokens.")
    max_queue_delay_microseconds: int = Field(default=0, ge=0, description="Dynamic batcher delay.")
    max_queue_size: int = Field(default=0, ge=0, description="Dynamic batcher queue bound (0: unbounded).")
    lora: bool = Field(default=False, description="Engine built with the LoRA plugin: set lora_cache_*.")
    lora_cache_gpu_memory_fraction: float = Field(default=0.05, gt=0, lt=1, description="LoRA cache share.")
    lora_cache_host_memory_bytes: int = Field(default=1 << 30, ge=0, description="Host LoRA cache bytes.")
    lora_cache_max_adapter_size: int = Field(default=64, ge=1, description="Max LoRA rank in the cache.")
    lora_cache_optimal_adapter_size: int = Field(default=8, ge=1, description="Typical LoRA rank.")
    preprocessing_instances: int = Field(default=1, ge=1, description="Tokenizer model instances.")
    postprocessing_instances: int = Field(default=1, ge=1, description="Detokenizer model instances.")
    skip_special_tokens: bool = Field(default=True, description="Detokenizer drops special tokens.")
    add_special_tokens: bool = Field(default=True, description="Tokenizer adds BOS etc.")


def _tensors(kind: str, rows: tuple[Tensor, ...]) -> str:
    items = []
    for name, dtype, dims, flags in rows:
        extra = ""
        if "s" in flags:
            extra += " reshape: { shape: [ ] }"
        if "o" in flags:
            extra += " optional: true"
        if "r" in flags:
            extra += " allow_ragged_batch: true"
        items.append(f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{extra} }}')
    return f"{kind} [\n" + ",\n".join(items) + "\n]\n"


def _params(values: dict[str, str]) -> str:
    return "".join(
        f'parameters: {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}\n'
        for k, v in values.items()
    )


def _batching(spec: TrtllmRepositorySpec) -> str:
    return (
        f"max_batch_size: {spec.max_batch_size}\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {spec.max_batch_size} ]\n"
        f"  max_queue_delay_microseconds: {spec.max_queue_delay_microseconds}\n"
        f"  default_queue_policy: {{ max_queue_size: {spec.max_queue_size} }}\n"
        "}\n"
    )


def _flag(value: bool) -> str:
    return "true" if value else "false"


def tensorrt_llm_config(spec: TrtllmRepositorySpec, backend: str = "tensorrtllm") -> str:
    """``tensorrt_llm/config.pbtxt``; ``backend="python"`` keeps it all but the backend (a stand-in)."""
    params = {
        "max_beam_width": str(spec.max_beam_width),
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "gpt_model_type": spec.batching_strategy,
        "gpt_model_path": spec.engine_dir,
        "batch_scheduler_policy": spec.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": f"{spec.kv_cache_free_gpu_mem_fraction:g}",
        "enable_kv_cache_reuse": _flag(spec.enable_kv_cache_reuse),
        "enable_chunked_context": _flag(spec.enable_chunked_context),
        "exclude_input_in_output": _flag(spec.exclude_input_in_output),
        "decoding_mode": "top_k_top_p" if spec.max_beam_width == 1 else "beam_search",
    }
    if spec.max_tokens_in_paged_kv_cache is not None:
        params["max_tokens_in_paged_kv_cache"] = str(spec.max_tokens_in_paged_kv_cache)
    if spec.lora:
        params |= {
            "lora_cache_optimal_adapter_size": str(spec.lora_cache_optimal_adapter_size),
            "lora_cache_max_adapter_size": str(spec.lora_cache_max_adapter_size),
            "lora_cache_gpu_memory_fraction": f"{spec.lora_cache_gpu_memory_fraction:g}",
            "lora_cache_host_memory_bytes": str(spec.lora_cache_host_memory_bytes),
        }
    return (
        'name: "tensorrt_llm"\n'
        f'backend: "{backend}"\n'
        + _batching(spec)
        + f"model_transaction_policy {{ decoupled: {_flag(spec.decoupled)} }}\n"
        + _tensors("input", ENGINE_INPUTS)
        + _tensors("output", ENGINE_OUTPUTS)
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _params(params)
    )


def preprocessing_config(spec: TrtllmRepositorySpec) -> str:
    return (
        'name: "preprocessing"\nbackend: "python"\n'
        + _batching(spec)
        + _tensors("input", PRE_INPUTS)
        + _tensors("output", PRE_OUTPUTS)
        + _params({"tokenizer_dir": "tokenizer", "add_special_tokens": _flag(spec.add_special_tokens)})
        + f"instance_group [ {{ count: {spec.preprocessing_instances} kind: KIND_CPU }} ]\n"
    )


def postprocessing_config(spec: TrtllmRepositorySpec) -> str:
    return (
        'name: "postprocessing"\nbackend: "python"\n'
        f"max_batch_size: {spec.max_batch_size}\ndynamic_batching {{ }}\n"
        + _tensors("input", POST_INPUTS)
        + _tensors("output", POST_OUTPUTS)
        + _params({"tokenizer_dir": "tokenizer", "skip_special_tokens": _flag(spec.skip_special_tokens)})
        + f"instance_group [ {{ count: {spec.postprocessing_instances} kind: KIND_CPU }} ]\n"
    )


def _maps(kind: str, pairs: list[tuple[str, str]]) -> str:
    return "".join(f'      {kind} {{ key: "{k}" value: "{v}" }}\n' for k, v in pairs)


def ensemble_config(spec: TrtllmRepositorySpec) -> str:
    """``ensemble/config.pbtxt``: text in → preprocessing → tensorrt_llm → postprocessing → text out."""
    inputs = tuple((n, t, d, f) for n, t, d, f, _, _ in ENSEMBLE_INPUTS)
    by_step: dict[str, list[tuple[str, str]]] = {"preprocessing": [], "tensorrt_llm": []}
    for name, _, _, _, step, tensor in ENSEMBLE_INPUTS:
        by_step[step].append((tensor, name))
    outputs = dict((n, (t, d)) for n, t, d, _ in ENGINE_OUTPUTS)
    ens_outputs: tuple[Tensor, ...] = (("text_output", "TYPE_STRING", "[ -1 ]", ""),)
    ens_outputs += tuple((n, *outputs[n], "") for n in ENSEMBLE_PASSTHROUGH)
    engine_in = by_step["tensorrt_llm"] + [(dst, f"_{src}") for src, dst in PRE_TO_ENGINE]
    engine_out = [("output_ids", "_TOKENS_BATCH"), ("sequence_length", "_SEQUENCE_LENGTH")]
    engine_out += [(n, n) for n in ENSEMBLE_PASSTHROUGH]
    steps = [
        ("preprocessing", by_step["preprocessing"], [(src, f"_{src}") for src, _ in PRE_TO_ENGINE]),
        ("tensorrt_llm", engine_in, engine_out),
        ("postprocessing", [("TOKENS_BATCH", "_TOKENS_BATCH"), ("SEQUENCE_LENGTH", "_SEQUENCE_LENGTH")],
         [("OUTPUT", "text_output")]),
    ]  # fmt: skip
    body = ",\n".join(
        f'    {{\n      model_name: "{m}"\n      model_version: -1\n'
        + _maps("input_map", i)
        + _maps("output_map", o)
        + "    }"
        for m, i, o in steps
    )  # fmt: skip
    return (
        'name: "ensemble"\nplatform: "ensemble"\n'
        f"max_batch_size: {spec.max_batch_size}\n"
        + _tensors("input", inputs)
        + _tensors("output", ens_outputs)
        + "ensemble_scheduling {\n  step [\n"
        + body
        + "\n  ]\n}\n"
    )


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    found = [n for n in TOKENIZER_FILES if (tokenizer_dir / n).is_file()]
    if "tokenizer.json" not in found:
        raise ValueError(f"{tokenizer_dir} has no tokenizer.json (an HF fast tokenizer is needed)")
    for name in found:
        shutil.copyfile(tokenizer_dir / name, dest / name)


def build_trtllm_repository(
    dest: Path,
    spec: TrtllmRepositorySpec,
    tokenizer_dir: Path,
    engine_model_py: Path | None = None,
) -> Path:
    """Write the inflight_batcher_llm repository. ``engine_model_py`` (tests) makes ``tensorrt_llm`` a
    python model with that source and otherwise the same config, so the pipeline loads without a GPU."""
    dest.mkdir(parents=True, exist_ok=False)
    configs = {
        "ensemble": ensemble_config(spec),
        "preprocessing": preprocessing_config(spec),
        "tensorrt_llm": tensorrt_llm_config(spec, "python" if engine_model_py else "tensorrtllm"),
        "postprocessing": postprocessing_config(spec),
    }
    for name, text in configs.items():
        (dest / name / "1").mkdir(parents=True)
        (dest / name / "config.pbtxt").write_text(text)
    for step in ("preprocessing", "postprocessing"):
        shutil.copyfile(HERE / f"trtllm_{step}.py", dest / step / "1" / "model.py")
        _copy_tokenizer(tokenizer_dir, dest / step / "1" / "tokenizer")
    if engine_model_py is not None:
        shutil.copyfile(engine_model_py, dest / "tensorrt_llm" / "1" / "model.py")
    manifest = {
        "runtime": "triton",
        "engine": "tensorrt-llm",
        "layout": "inflight_batcher_llm",
        "layout_source": BACKEND_TAG,
        "models": sorted(configs),
        "served_model": "ensemble",
        "engine_dir": spec.engine_dir,
        "engine_backend": "python (stand-in)" if engine_model_py else "tensorrtllm",
        "adapters": [],
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest


def llmapi_config(spec: TrtllmRepositorySpec) -> str:
    """``tensorrt_llm/config.pbtxt`` of the llmapi layout (python model; batching is the LLM API's)."""
    inputs: tuple[Tensor, ...] = (
        ("text_input", "TYPE_STRING", "[ -1 ]", ""),
        ("streaming", "TYPE_BOOL", "[ 1 ]", "o"),
        ("sampling_param_beam_width", "TYPE_INT32", "[ 1 ]", "o"),
        ("sampling_param_temperature", "TYPE_FP32", "[ 1 ]", "o"),
        ("sampling_param_top_k", "TYPE_INT32", "[ 1 ]", "o"),
        ("sampling_param_top_p", "TYPE_FP32", "[ 1 ]", "o"),
        ("sampling_param_frequency_penalty", "TYPE_FP32", "[ 1 ]", "o"),
        ("sampling_param_presence_penalty", "TYPE_FP32", "[ 1 ]", "o"),
        ("sampling_param_max_tokens", "TYPE_INT32", "[ 1 ]", "o"),
        ("sampling_param_stop", "TYPE_STRING", "[ -1 ]", "o"),
        ("sampling_param_seed", "TYPE_UINT64", "[ 1 ]", "o"),
        ("sampling_param_exclude_input_from_output", "TYPE_BOOL", "[ 1 ]", "o"),
        ("return_finish_reason", "TYPE_BOOL", "[ 1 ]", "o"),
        ("return_stop_reason", "TYPE_BOOL", "[ 1 ]", "o"),
        ("return_cumulative_logprob", "TYPE_BOOL", "[ 1 ]", "o"),
    )
    outputs: tuple[Tensor, ...] = (
        ("text_output", "TYPE_STRING", "[ -1 ]", ""),
        ("finish_reason", "TYPE_STRING", "[ -1 ]", ""),
        ("stop_reason", "TYPE_STRING", "[ -1 ]", ""),
        ("cumulative_logprob", "TYPE_FP32", "[ -1 ]", ""),
    )
    return (
        'name: "tensorrt_llm"\nbackend: "python"\nmax_batch_size: 0\n'
        f"model_transaction_policy {{ decoupled: {_flag(spec.decoupled)} }}\n"
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _tensors("input", inputs)
        + _tensors("output", outputs)
    )


def llmapi_model_yaml(model: str, llm_args: dict[str, Any], spec: TrtllmRepositorySpec) -> str:
    """``tensorrt_llm/1/model.yaml``: the LLM-API arguments (the build stage's profile) + triton_config."""
    from forgeline_operators.engines.tensorrt_llm.trtllm import render_yaml

    args = {"model": model, "backend": "pytorch", **llm_args}
    args["triton_config"] = {"max_batch_size": 0, "decoupled": spec.decoupled}
    return render_yaml(args)


def build_llmapi_repository(
    dest: Path, spec: TrtllmRepositorySpec, model: str, llm_args: dict[str, Any]
) -> Path:
    """Write the llmapi repository (config + model.yaml); ``1/model.py`` comes from the TRT-LLM image."""
    version = dest / "tensorrt_llm" / "1"
    version.mkdir(parents=True, exist_ok=False)
    (dest / "tensorrt_llm" / "config.pbtxt").write_text(llmapi_config(spec))
    (version / "model.yaml").write_text(llmapi_model_yaml(model, llm_args, spec))
    manifest = {
        "runtime": "triton",
        "engine": "tensorrt-llm",
        "layout": "llmapi",
        "layout_source": "NVIDIA/TensorRT-LLM triton_backend/all_models/llmapi (tensorrtllm_backend v0.19.0)",
        "model_py": LLMAPI_MODEL_PY,
        "models": ["tensorrt_llm"],
        "served_model": "tensorrt_llm",
        "adapters": [],
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return dest
