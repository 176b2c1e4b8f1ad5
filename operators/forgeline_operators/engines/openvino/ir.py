"""The OpenVINO IR: what one is (:func:`is_ir`) and how an HF checkpoint becomes one (:func:`export_ir`).

It owns how a Hugging Face checkpoint becomes an OpenVINO IR directory (export, weight compression,
the f32 hints, loading one back for scoring). It is the only exporter: the build stage
(``build/openvino``), the quantize stage's NNCF formats and the engine's ``prepare`` (the serve stage,
promotion, ``forgeline serve``, in a subprocess: :mod:`.__main__`) all export through it, and
:func:`is_ir` is the only test of what an IR is, so none of them can drift apart.

``export_ir`` runs optimum-intel's ``main_export`` (task ``text-generation-with-past``, stateful, fp32,
tokenizer and detokenizer converted with openvino-tokenizers) and then, for int8/int4, NNCF's
``compress_weights`` on the exported model. That is what ``optimum-cli --weight-format int8|int4``
does, minus its private ``_main_quantize`` step. The directory loads in OpenVINO GenAI's
``LLMPipeline`` and ``ContinuousBatchingPipeline``.

int4 compresses every layer including the embeddings and the LM head (``all_layers``): on small models
the embeddings are most of the bytes, and leaving them int8 misses the 0.35x-of-bf16 size target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "F32_HINTS",
    "IR_FILES",
    "TOKENIZER_FILES",
    "WEIGHT_FORMATS",
    "compress_ir",
    "export_ir",
    "ir_weight_format",
    "is_ir",
    "load_ov_model",
    "smoke_load",
]

IR_FILES = ("openvino_model.xml", "openvino_model.bin")
TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_detokenizer.xml")  # openvino-tokenizers' IRs
WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
META = "forgeline_openvino.json"
# Bit-exact settings for tests and gates (defaults are bf16 / u8 KV on AVX512 machines).
F32_HINTS = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
INT4_GROUP_SIZE = 64


def is_ir(directory: Path) -> bool:
    """An IR that OpenVINO GenAI can serve: the model and its tokenizer and detokenizer IRs."""
    return all((directory / name).is_file() for name in (*IR_FILES, *TOKENIZER_FILES))


def ir_weight_format(directory: Path) -> str | None:
    meta = directory / META
    return str(json.loads(meta.read_text())["weight_format"]) if meta.is_file() else None


def _compress_kwargs(weight_format: str, group_size: int) -> dict[str, Any]:
    import nncf

    if weight_format == "int8":
        return {"mode": nncf.CompressWeightsMode.INT8_ASYM}
    return {
        "mode": nncf.CompressWeightsMode.INT4_ASYM,
        "group_size": group_size,
        "ratio": 1.0,
        "all_layers": True,
    }


def compress_ir(src: Path, dest: Path, weight_format: str) -> None:
    """Write ``dest`` = ``src`` (an fp32 IR directory) with its weights in ``weight_format``."""
    import openvino as ov

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"unknown OpenVINO weight format {weight_format!r}")
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name not in IR_FILES:
            shutil.copyfile(path, dest / path.name)
    # Read from src, write to dest: saving over the mmapped .bin being read crashes (SIGBUS).
    model = ov.Core().read_model(src / IR_FILES[0])
    if weight_format in ("int8", "int4"):
        import nncf

        model = nncf.compress_weights(model, **_compress_kwargs(weight_format, INT4_GROUP_SIZE))
    ov.save_model(model, dest / IR_FILES[0], compress_to_fp16=weight_format == "fp16")
    (dest / META).write_text(json.dumps({"weight_format": weight_format}, indent=2) + "\n")


def export_ir(hf_dir: Path, dest: Path, weight_format: str, scratch: Path) -> None:
    """HF checkpoint directory -> OpenVINO IR directory (with tokenizer IRs) in ``weight_format``."""
    from optimum.exporters.openvino import main_export
    from optimum.intel import OVConfig

    fp32 = scratch / "openvino-fp32"
    main_export(
        str(hf_dir),
        fp32,
        task="text-generation-with-past",
        ov_config=OVConfig(dtype="fp32"),
        stateful=True,
        convert_tokenizer=True,
        local_files_only=True,
    )
    missing = [name for name in TOKENIZER_FILES if not (fp32 / name).is_file()]
    if missing:
        raise RuntimeError(f"tokenizer conversion produced no {', '.join(missing)} (openvino-tokenizers)")
    compress_ir(fp32, dest, weight_format)


def load_ov_model(directory: Path) -> Any:
    """The IR as an ``OVModelForCausalLM`` with f32 hints (for teacher-forced scoring in gates)."""
    from optimum.intel import OVModelForCausalLM

    return OVModelForCausalLM.from_pretrained(str(directory), ov_config=dict(F32_HINTS), device="CPU")


def smoke_load(directory: Path) -> None:
    """Fail now, not at serving time, if OpenVINO GenAI cannot load the directory."""
    import openvino_genai

    openvino_genai.LLMPipeline(str(directory), "CPU", **F32_HINTS)
