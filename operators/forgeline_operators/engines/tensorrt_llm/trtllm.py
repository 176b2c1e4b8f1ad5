"""TensorRT-LLM build specs as pure functions: the legacy ``trtllm-build`` command and the LLM-API profile.

It owns every TensorRT-LLM setting name Forgeline writes and the engine cache key: the build stage
renders the command and the ``extra_llm_api_options`` YAML with it, this engine's repositories write
the same options (and the build entrypoint ``engine_job`` computes the same key), so the build stage
and serving share it in the engine's folder rather than importing each other.

Names are TensorRT-LLM's own, checked against its sources for the 1.2.x line (the last with the
TensorRT engine backend):

* ``trtllm-build`` flags: ``tensorrt_llm/commands/build.py`` (``--checkpoint_dir``, ``--output_dir``,
  ``--max_batch_size``, ``--max_input_len``, ``--max_seq_len``, ``--max_num_tokens``,
  ``--kv_cache_type``, ``--workers``, ``--max_lora_rank``, ``--lora_target_modules``,
  ``--speculative_decoding_mode``, ``--max_draft_len``) and the plugin flags of
  ``tensorrt_llm/plugin/plugin.py`` (``--gemm_plugin``, ``--lora_plugin``, ``--use_paged_context_fmha``).
  TP/PP are not build flags: they come from the checkpoint's ``mapping``, so the stage checks them.
* ``extra_llm_api_options`` YAML (``trtllm-serve --extra_llm_api_options``, Triton's llmapi model):
  fields of ``tensorrt_llm/llmapi/llm_args.py`` ``BaseLlmArgs`` / ``KvCacheConfig`` / ``LoraConfig`` and
  ``DecodingBaseConfig.from_dict``'s ``decoding_type`` names.

When ``tensorrt_llm`` imports, :func:`validate_llm_api_options` also checks against the real classes.

Engines are cached by content (:func:`engine_key`): sha256 over the checkpoint's digest, the build
settings, the TensorRT-LLM version and the GPU architecture (SM), because an engine is only valid for
the exact release and SM it was built on. Where ``tensorrt_llm`` or a GPU is absent, the declared
``tensorrt_llm.version`` / ``gpu_arch`` (else the default version, and ``undeclared``) stand in and
the key records that it was not detected.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shlex
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ENGINE_KEY_SCHEMA",
    "KV_CACHE_CONFIG_FIELDS",
    "LLM_ARGS_FIELDS",
    "LORA_CONFIG_FIELDS",
    "SPECULATIVE_MODES",
    "TRTLLM_VERSION",
    "EngineKey",
    "detected_gpu_arch",
    "detected_version",
    "engine_key",
    "llm_api_options",
    "render_yaml",
    "shell",
    "trtllm_build_command",
    "validate_llm_api_options",
]

TRTLLM_VERSION = "1.2"
LLM_ARGS_FIELDS = frozenset(
    {
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "dtype",
        "max_batch_size",
        "max_input_len",
        "max_seq_len",
        "max_num_tokens",
        "kv_cache_config",
        "enable_lora",
        "lora_config",
        "speculative_config",
        "enable_chunked_prefill",
    }
)
KV_CACHE_CONFIG_FIELDS = frozenset({"free_gpu_memory_fraction", "enable_block_reuse", "dtype", "max_tokens"})
LORA_CONFIG_FIELDS = frozenset({"max_lora_rank", "max_loras", "max_cpu_loras", "lora_target_modules"})
SPEC_FIELDS = frozenset({"decoding_type", "max_draft_len", "speculative_model_dir"})
# Our mode (the trtllm-build --speculative_decoding_mode choice) -> LLM-API decoding_type.
SPECULATIVE_MODES = {
    "draft_tokens_external": "DraftTarget",
    "eagle": "Eagle",
    "medusa": "Medusa",
    "lookahead_decoding": "Lookahead",
    "explicit_draft_tokens": None,  # ReDrafter: engine path only
}
_LORA_KEYS = {"max_rank": "max_lora_rank", "max_loras": "max_loras", "max_cpu_loras": "max_cpu_loras"}
_KV_DTYPES = {"FP8": "fp8", None: "auto"}


def _lora(spec: Any) -> dict[str, int]:
    lora = dict(spec.lora or {})
    unknown = sorted(set(lora) - set(_LORA_KEYS))
    if unknown:
        raise ValueError(f"tensorrt_llm.lora: unknown keys {unknown} (known: {sorted(_LORA_KEYS)})")
    return {_LORA_KEYS[k]: int(v) for k, v in lora.items()}


def _speculative(spec: Any) -> dict[str, Any] | None:
    if not spec.speculative_decoding:
        return None
    sd = dict(spec.speculative_decoding)
    unknown = sorted(set(sd) - {"mode", "max_draft_len", "draft_model"})
    if unknown:
        raise ValueError(f"tensorrt_llm.speculative_decoding: unknown keys {unknown}")
    mode = sd.get("mode")
    if mode not in SPECULATIVE_MODES:
        raise ValueError(f"speculative_decoding.mode {mode!r}: one of {sorted(SPECULATIVE_MODES)}")
    if int(sd.get("max_draft_len", 0)) < 1:
        raise ValueError("speculative_decoding.max_draft_len must be >= 1")
    return sd


def trtllm_build_command(spec: Any, checkpoint_dir: str, output_dir: str) -> list[str]:
    """argv of ``trtllm-build`` (TRT-LLM 1.2.x) for a TRT-LLM checkpoint directory."""
    argv = [
        "trtllm-build",
        "--checkpoint_dir", checkpoint_dir,
        "--output_dir", output_dir,
        "--max_batch_size", str(spec.max_batch_size),
        "--max_input_len", str(spec.max_input_len),
        "--max_seq_len", str(spec.max_seq_len),
        "--max_num_tokens", str(spec.max_num_tokens),
        # --paged_kv_cache is deprecated in favour of --kv_cache_type.
        "--kv_cache_type", "paged" if spec.paged_kv_cache else "continuous",
        "--use_paged_context_fmha", "enable" if spec.use_paged_context_fmha else "disable",
        "--gemm_plugin", spec.gemm_plugin,
        "--workers", str(spec.tp * spec.pp),
    ]  # fmt: skip
    lora = _lora(spec)
    if lora:
        argv += ["--lora_plugin", "auto", "--max_lora_rank", str(lora.get("max_lora_rank", 64))]
        argv += ["--lora_target_modules", "attn_q", "attn_k", "attn_v", "attn_dense"]
        argv += ["mlp_h_to_4h", "mlp_4h_to_h", "mlp_gate"]
    sd = _speculative(spec)
    if sd:
        argv += ["--speculative_decoding_mode", sd["mode"], "--max_draft_len", str(sd["max_draft_len"])]
    return argv


def llm_api_options(spec: Any, kv_cache_quant_algo: str | None = None, dtype: str = "auto") -> dict[str, Any]:
    """The ``extra_llm_api_options`` mapping for the PyTorch backend (``trtllm-serve``, Triton llmapi)."""
    options: dict[str, Any] = {
        "tensor_parallel_size": spec.tp,
        "pipeline_parallel_size": spec.pp,
        "dtype": dtype,
        "max_batch_size": spec.max_batch_size,
        "max_input_len": spec.max_input_len,
        "max_seq_len": spec.max_seq_len,
        "max_num_tokens": spec.max_num_tokens,
        "kv_cache_config": {
            "free_gpu_memory_fraction": spec.kv_cache_free_gpu_mem_fraction,
            # Block reuse is prefix caching; it needs the paged cache and paged context FMHA.
            "enable_block_reuse": bool(spec.paged_kv_cache and spec.use_paged_context_fmha),
            "dtype": _KV_DTYPES.get(kv_cache_quant_algo, "auto"),
        },
    }
    lora = _lora(spec)
    if lora:
        options["enable_lora"] = True
        options["lora_config"] = lora
    sd = _speculative(spec)
    if sd:
        decoding = SPECULATIVE_MODES[sd["mode"]]
        if decoding is None:
            raise ValueError(f"speculative_decoding.mode {sd['mode']!r} has no LLM-API equivalent")
        options["speculative_config"] = {"decoding_type": decoding, "max_draft_len": int(sd["max_draft_len"])}
        if sd.get("draft_model"):
            options["speculative_config"]["speculative_model_dir"] = str(sd["draft_model"])
    validate_llm_api_options(options)
    return options


def validate_llm_api_options(options: dict[str, Any]) -> None:
    """Every key is a TRT-LLM field name (the real pydantic classes when ``tensorrt_llm`` imports)."""
    nested = {
        "kv_cache_config": KV_CACHE_CONFIG_FIELDS,
        "lora_config": LORA_CONFIG_FIELDS,
        "speculative_config": SPEC_FIELDS,
    }
    unknown = sorted(set(options) - LLM_ARGS_FIELDS)
    for key, fields in nested.items():
        unknown += [f"{key}.{k}" for k in sorted(set(options.get(key) or {}) - fields)]
    real = _real_fields()
    if real is not None:
        unknown += sorted(set(options) - real)
    if unknown:
        raise ValueError(f"not TensorRT-LLM LLM-API fields: {', '.join(unknown)}")


def _real_fields() -> set[str] | None:
    try:
        from tensorrt_llm.llmapi.llm_args import TorchLlmArgs
    except ImportError:
        return None
    return set(TorchLlmArgs.model_fields)


def render_yaml(options: dict[str, Any]) -> str:
    """Block-style YAML with keys in the order given (stable for golden files and diffs)."""
    lines: list[str] = []

    def emit(mapping: dict[str, Any], indent: int) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                lines.append(f"{' ' * indent}{key}:")
                emit(value, indent + 2)
            else:
                lines.append(f"{' ' * indent}{key}: {_scalar(value)}")

    emit(options, 0)
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    text = str(value)
    return (
        text
        if text and text.replace("_", "").replace("-", "").replace("/", "").replace(".", "").isalnum()
        else repr(text)
    )


def shell(argv: list[str]) -> str:
    """The command as a shell line, one flag (with its values) per continuation line."""
    lines: list[list[str]] = [[]]
    for arg in argv:
        if arg.startswith("--"):
            lines.append([])
        lines[-1].append(shlex.quote(arg))
    return " \\\n  ".join(" ".join(line) for line in lines) + "\n"


# ------------------------------------------------------------------------------ engine cache key

ENGINE_KEY_SCHEMA = 1  # bump when what goes into the key changes
# Not part of the engine: where it is built for, and a runtime-only knob.
_NOT_ENGINE_SETTINGS = frozenset({"version", "gpu_arch", "kv_cache_free_gpu_mem_fraction"})


@dataclass(frozen=True)
class EngineKey:
    key: str
    components: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)  # tensorrt_llm / gpu_arch: detected|declared|...

    @property
    def detected(self) -> bool:
        return self.sources.get("tensorrt_llm") == "detected" and self.sources.get("gpu_arch") == "detected"


def detected_version() -> str | None:
    """The installed TensorRT-LLM release (None when the package is absent)."""
    try:
        return importlib.metadata.version("tensorrt_llm")
    except importlib.metadata.PackageNotFoundError:
        return None


def detected_gpu_arch() -> str | None:
    """``sm_XY`` of CUDA device 0 (None without a CUDA GPU)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"


def _release_matches(installed: str, declared: str) -> bool:
    return installed == declared or installed.startswith(declared + ".")


def engine_key(
    checkpoint_digest: str,
    spec: Any,
    *,
    installed_version: str | None,
    gpu_arch: str | None,
) -> EngineKey:
    """The engine's content key; raises ValueError when the declared version / SM contradict this node."""
    declared_version, declared_arch = spec.version, spec.gpu_arch
    if installed_version and declared_version and not _release_matches(installed_version, declared_version):
        raise ValueError(
            f"tensorrt_llm.version={declared_version} but this node has TensorRT-LLM {installed_version}: "
            "an engine only runs on the release it was built with; fix the version or the node image"
        )
    if gpu_arch and declared_arch and gpu_arch != declared_arch:
        raise ValueError(
            f"tensorrt_llm.gpu_arch={declared_arch} but this node's GPU is {gpu_arch}: engines are not "
            "portable across GPU architectures; run on a matching node or drop gpu_arch"
        )
    version = installed_version or declared_version or TRTLLM_VERSION
    arch = gpu_arch or declared_arch or "undeclared"
    sources = {
        "tensorrt_llm": "detected" if installed_version else ("declared" if declared_version else "default"),
        "gpu_arch": "detected" if gpu_arch else ("declared" if declared_arch else "undeclared"),
    }
    settings = {k: v for k, v in spec.model_dump(mode="json").items() if k not in _NOT_ENGINE_SETTINGS}
    components = {
        "schema": ENGINE_KEY_SCHEMA,
        "checkpoint": checkpoint_digest,
        "build": settings,
        "tensorrt_llm": version,
        "gpu_arch": arch,
    }
    blob = json.dumps(components, sort_keys=True, separators=(",", ":")).encode()
    return EngineKey(hashlib.sha256(blob).hexdigest(), components, sources)
