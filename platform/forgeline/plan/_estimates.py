"""Memory and compute estimates per stage, using the standard accounting.

Per GPU (or per CPU worker), for a model of N parameters:

* full fine-tune with Adam: 16 bytes/param (2 weights + 2 grads + 4 fp32 master + 8 Adam moments in
  mixed precision; 4 + 4 + 8 in fp32),
* LoRA: the frozen weights (2 bytes/param in bf16, 4 in fp32) + 16 bytes per adapter parameter,
* QLoRA: 0.5 bytes/param (NF4) + quantization constants (0.127 bits/param with double quantization,
  0.5 bits without) + adapters,
* DPO: the above for the policy + a frozen reference (none extra when the reference is the base under
  the policy's LoRA adapters),
* activations: the tensors a Llama layer saves for backward, counted op by op on megatron-core's local
  layer spec and checked against measured runs (tests/unit/test_memory_measured.py): per token,
  ``6h`` elements that tensor parallelism does not split (both RMSNorms' inputs and normalised
  outputs, the QKV and fc1 inputs) plus ``(4h + 5I + a*s)/tp`` that it does (q, k and v -- GQA's k/v
  expanded to every head --, the attention probabilities, the projection input, the SwiGLU
  tensors), times 2 bytes in 16-bit or 4 in fp32. Fused attention (flash / cuDNN, the 16-bit GPU
  default) keeps no ``s x s`` probabilities, so the ``a*s`` term is dropped there; TE's fused norms
  keep somewhat less than the local spec, so on GPUs this is an upper bound. With activation
  checkpointing: each layer's input plus one layer's activations (recomputed in backward); the
  logits are freed before any layer is recomputed, so the stage with the output layer peaks at
  inputs + max(one layer, logits) (measured). Preference data doubles the sequences. (Korthikanti
  et al., 2022 count ``s*b*h*(34 + 5*a*s/h)`` bytes for GPT's GELU MLP with dropout; a SwiGLU layer
  without dropout saves a different set.)

Tensor/pipeline layouts follow Megatron (Korthikanti et al., 2022; Narayanan et al., 2021): each
pipeline stage holds ceil(L/pp) transformer layers, whose weight matrices are split tp ways (norms are
replicated); the vocabulary-parallel embedding (vocab*h/tp) sits on the first stage and the output layer
on the last (a tied embedding is kept on both when pp > 1). Gradients and Adam states follow their
weights (the regular optimizer; a distributed optimizer would also divide them by dp). Under 1F1B
the first stage holds pp micro-batches of its L/pp layers in flight -- L layers' worth -- while the
last holds one micro-batch plus the logits (vocab/tp per token, fp32, with their gradient). The
estimate is the busier of the first and last stage; ``notes`` says which. Compute: 6*N FLOPs per token
for full training, 4*N for adapters (no weight gradients of the frozen base), plus 2*N per token for a
DPO reference forward; GPU-hours at the declared peak TFLOP/s and MFU.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about a model; dims are None when only N is known."""

    parameters: int
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    intermediate: int | None = None
    vocab: int | None = None
    head_dim: int | None = None  # explicit in some configs (e.g. Qwen3, Gemma), else hidden // heads
    source: str = "unknown"  # where the numbers came from: config.json | builtin | declared | name

    def hidden_or_guess(self) -> int:
        # Llama-family shapes satisfy N ~ 12*L*h^2 with L ~ h/128: h ~ (N*128/12)^(1/3).
        return self.hidden or max(64, round((self.parameters * 128 / 12) ** (1 / 3)))

    def layers_or_guess(self) -> int:
        return self.layers or max(1, self.hidden_or_guess() // 128)

    def heads_or_guess(self) -> int:
        return self.heads or max(1, self.hidden_or_guess() // 128)


def shape_from_config(config: dict[str, Any], source: str = "config.json") -> ModelShape:
    h = int(config["hidden_size"])
    L = int(config["num_hidden_layers"])
    nh = int(config["num_attention_heads"])
    nkv = int(config.get("num_key_value_heads") or nh)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    hd = int(config.get("head_dim") or h // nh)
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    per_layer = attn + 3 * h * inter + 2 * h
    tied = bool(config.get("tie_word_embeddings", False))
    total = vocab * h + L * per_layer + h + (0 if tied else vocab * h)
    return ModelShape(total, h, L, nh, nkv, inter, vocab, hd, source)


def shape_from_dir(path: Path) -> ModelShape | None:
    try:
        return shape_from_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, KeyError):
        return None


_SIZE_IN_NAME = re.compile(r"(?<![0-9.])(\d+(?:\.\d+)?)\s*([bBmM])(?![a-zA-Z])")


def shape_from_name(name: str) -> ModelShape | None:
    """``meta-llama/Llama-3.1-8B-Instruct`` -> 8e9 parameters (a fallback for remote models)."""
    m = _SIZE_IN_NAME.search(name)
    if not m:
        return None
    scale = 1e9 if m.group(2) in "bB" else 1e6
    return ModelShape(int(float(m.group(1)) * scale), source="name")


def lora_params(shape: ModelShape, r: int, target_modules: list[str] | str) -> int:
    h = shape.hidden_or_guess()
    L = shape.layers_or_guess()
    if shape.heads and shape.intermediate:
        nh, nkv = shape.heads, shape.kv_heads or shape.heads
        hd = shape.head_dim or h // nh
        inter = shape.intermediate
        dims = {
            "q_proj": (h, nh * hd),
            "k_proj": (h, nkv * hd),
            "v_proj": (h, nkv * hd),
            "o_proj": (nh * hd, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }
        names = list(dims) if target_modules == "all-linear" else [m for m in target_modules if m in dims]
        return L * sum(r * (dims[n][0] + dims[n][1]) for n in names)
    # Without dims: each square-ish W of N_W params gets r*(in+out) ~ N_W * 2r/h.
    return int(shape.parameters * 2 * r / h)


@dataclass
class MemoryEstimate:
    """Bytes per device (GPU, or CPU worker) with its parts, for plan tables and fit checks."""

    per_device_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def per_device_gb(self) -> float:
        return self.per_device_bytes / GiB


@dataclass(frozen=True)
class StageParams:
    """Parameters one device holds on the first and on the last pipeline stage (equal when pp == 1)."""

    first: int
    last: int
    layers: int  # transformer layers per stage (ceil(L/pp))


def stage_params(shape: ModelShape, tp: int, pp: int) -> StageParams:
    """Megatron's split of a Llama-shaped model over tp x pp (see the module docstring)."""
    L = shape.layers_or_guess()
    per_stage = ceil_div(L, pp)
    if not (shape.hidden and shape.heads and shape.intermediate and shape.vocab and shape.layers):
        # Dims unknown: spread N evenly (no embedding placement to model).
        n = ceil_div(shape.parameters, tp * pp)
        return StageParams(n, n, per_stage)
    h, nh, inter = shape.hidden, shape.heads, shape.intermediate
    nkv, hd = shape.kv_heads or nh, shape.head_dim or h // nh
    matrices = h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 3 * h * inter
    layer = ceil_div(matrices, tp) + 2 * h  # two RMSNorm weights, replicated across tp
    emb = ceil_div(shape.vocab * h, tp)
    tied = shape.parameters == shape.vocab * h + L * (matrices + 2 * h) + h  # shape_from_config's count
    output = emb if (not tied or pp > 1) else 0
    if pp == 1:
        one = L * layer + emb + h + output
        return StageParams(one, one, L)
    return StageParams(per_stage * layer + emb, per_stage * layer + h + output, per_stage)


def _activation_elements_per_layer(
    s: int, seqs: int, shape: ModelShape, tp: int, fused_attention: bool
) -> float:
    """Elements one Llama layer saves for backward (see the module docstring), all tokens of a micro-batch."""
    h = shape.hidden_or_guess()
    inter = shape.intermediate or (8 * h) // 3  # SwiGLU's usual width when the config is unknown
    scores = 0 if fused_attention else shape.heads_or_guess() * s
    return s * seqs * (6 * h + (4 * h + 5 * inter + scores) / tp)


def finetune_memory(
    shape: ModelShape,
    method: str,
    *,
    precision: str,
    lora_r: int | None,
    lora_targets: list[str] | str,
    lora_for_dpo: bool,
    double_quant: bool,
    seq_len: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    tp: int,
    pp: int,
    stage: str = "busiest",
    fp32_grads: bool = False,
) -> MemoryEstimate:
    """Bytes per device; under pp > 1, of the busier of the first and last pipeline stage (or the one
    ``stage`` names: ``first`` | ``last``). ``fp32_grads``: 16-bit weights whose gradients are kept
    and reduced in fp32 (megatron's ``grad_reduce_in_fp32`` buffers): 18 bytes per trained parameter
    (2 weight + 4 grad + 4 main + 8 Adam) instead of 16."""
    wbytes = 4 if precision == "fp32" else 2
    trained = 18 if fp32_grads and precision != "fp32" else 16
    split = stage_params(shape, tp, pp)
    L = shape.layers_or_guess()
    h = shape.hidden_or_guess()
    seqs = micro_batch * (2 if method == "dpo" else 1)
    s = seq_len
    adapter = method in ("lora", "qlora") or (method == "dpo" and lora_for_dpo)
    adapters = (
        ceil_div(lora_params(shape, lora_r or 8, lora_targets) * split.layers, L * tp) if adapter else 0
    )

    def state(n: int) -> dict[str, int]:
        parts: dict[str, int] = {}
        if adapter:
            if method == "qlora":
                parts["weights (nf4)"] = int(n * 0.5)
                parts["quant constants"] = int(n * (0.127 if double_quant else 0.5) / 8)
            else:
                parts["weights (frozen)"] = n * wbytes
            parts["adapters + grads + adam"] = adapters * trained
        else:
            parts["weights + grads + adam"] = n * trained
            if method == "dpo":
                parts["reference model"] = n * wbytes
        return parts

    # 16-bit training runs on GPUs, whose attention kernels are fused; fp32 is the CPU's unfused math.
    fused_attention = precision != "fp32"

    def activations(layers: int) -> int:
        full = _activation_elements_per_layer(s, seqs, shape, tp, fused_attention) * wbytes
        # Full recompute keeps each layer's input, plus one layer's activations while recomputing.
        act = wbytes * s * seqs * h * layers + full if gradient_checkpointing else full * layers
        return int(act)

    # fp32 logits (the vocab-parallel softmax keeps them) plus their gradient during the backward.
    logits = {"logits": 2 * 4 * s * seqs * shape.vocab // tp} if shape.vocab else {}
    notes: list[str] = []
    if gradient_checkpointing and logits:
        # The logits and their gradient are freed before the first layer is recomputed: the stage
        # with the output layer peaks at inputs + max(one layer, logits), so only the logits' excess
        # over one recomputed layer adds (measured, tests/unit/test_memory_measured.py).
        one_layer = int(_activation_elements_per_layer(s, seqs, shape, tp, fused_attention) * wbytes)
        logits = {"logits (beyond the recomputed layer)": max(0, logits["logits"] - one_layer)}
    if pp == 1:
        parts = state(split.first) | {"activations": activations(L)} | logits
    else:
        # 1F1B: the first stage has pp micro-batches of its layers in flight, the last one plus logits.
        first = state(split.first) | {"activations": activations(split.layers * pp)}
        last = state(split.last) | {"activations": activations(split.layers)} | logits
        if stage in ("first", "last"):
            parts = first if stage == "first" else last
            notes.append(f"{stage} pipeline stage of {pp}")
        else:
            busiest = max((first, "first"), (last, "last"), key=lambda p: sum(p[0].values()))
            parts = busiest[0]
            notes.append(f"busiest device: {busiest[1]} pipeline stage of {pp}")
    if shape.source in ("name", "declared", "unknown") and shape.hidden is None:
        notes.append("model dims guessed from the parameter count")
    return MemoryEstimate(sum(parts.values()), parts, notes)


def inference_memory(shape: ModelShape, precision: str, seq_len: int, batch: int) -> MemoryEstimate:
    wbytes = 4 if precision == "fp32" else 2
    parts = {"weights": shape.parameters * wbytes}
    h = shape.hidden_or_guess()
    L = shape.layers_or_guess()
    parts["kv cache"] = 2 * L * seq_len * batch * h * wbytes
    if shape.vocab:
        parts["logits"] = 4 * seq_len * batch * shape.vocab
    return MemoryEstimate(sum(parts.values()), parts)


def training_flops(parameters: int, tokens: int, method: str, adapter: bool) -> float:
    per_token = (4 if adapter else 6) * parameters
    if method == "dpo":
        per_token += 2 * parameters  # frozen reference forward
    return float(per_token) * tokens


def gpu_hours(flops: float, tflops: float, mfu: float) -> float:
    return flops / (tflops * 1e12 * mfu) / 3600


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}K"
    return str(int(n))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else a


__all__ = [
    "GiB",
    "MemoryEstimate",
    "ModelShape",
    "StageParams",
    "ceil_div",
    "finetune_memory",
    "gpu_hours",
    "human_bytes",
    "human_count",
    "inference_memory",
    "lora_params",
    "shape_from_config",
    "shape_from_dir",
    "shape_from_name",
    "stage_params",
    "training_flops",
]
