"""A Llama-shaped megatron-core ``GPTModel`` (local, non-TransformerEngine layer spec) from an HF config.

RMSNorm, SwiGLU (gated fc1), RoPE (HF's non-interleaved halves), grouped-query attention, tied or
untied embeddings, no biases, no dropout -- the HF ``LlamaForCausalLM`` computation, so weights
converted by :mod:`.convert` give the same logits. One model object per pipeline stage: the caller
has already run ``parallel_state.initialize_model_parallel``; this module only reads the layout.
Fusions that need CUDA kernels (RoPE fusion, masked-softmax fusion) and sequence parallelism stay
off; they are performance features, not numerics. Gradient-accumulation fusion is on where CUDA is
absent (:mod:`._cpu_compat` supplies its kernel on CPU) and off on GPU (it needs APEX).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from forgeline.runtime.context import OperatorError

__all__ = ["LlamaShape", "build_model", "shape_from_hf", "transformer_config"]


@dataclass(frozen=True)
class LlamaShape:
    """The numbers of an HF Llama config that the megatron model and the converter need."""

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    tied: bool
    max_positions: int


def shape_from_hf(config: Any) -> LlamaShape:
    """Read an HF ``LlamaConfig`` (or its dict); refuse what this backend does not model."""
    c = config if isinstance(config, dict) else config.to_dict()
    if c.get("model_type") != "llama":
        raise OperatorError(
            f"backend megatron converts Llama checkpoints; this one is {c.get('model_type')!r}"
        )
    if c.get("attention_bias") or c.get("mlp_bias"):
        raise OperatorError("backend megatron: Llama checkpoints with attention/mlp biases are not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise OperatorError(f"backend megatron: hidden_act {c.get('hidden_act')!r} is not SwiGLU (silu)")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise OperatorError(
            f"backend megatron: rope_type {rope.get('rope_type')!r} is not supported yet (only 'default')"
        )
    heads = int(c["num_attention_heads"])
    return LlamaShape(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        ffn_hidden_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=int(c.get("head_dim") or c["hidden_size"] // heads),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta") or c.get("rope_theta") or 10000.0),
        tied=bool(c.get("tie_word_embeddings", False)),
        max_positions=int(c.get("max_position_embeddings", 2048)),
    )


def check_layout(shape: LlamaShape, tp: int, pp: int) -> None:
    """Clear errors for layouts the model's shape cannot be split into."""
    problems = []
    if shape.num_kv_heads % tp:
        problems.append(f"num_key_value_heads={shape.num_kv_heads} is not divisible by tp={tp}")
    if shape.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={shape.ffn_hidden_size} is not divisible by tp={tp}")
    if shape.vocab_size % tp:
        problems.append(f"vocab_size={shape.vocab_size} is not divisible by tp={tp}")
    if shape.num_layers % pp:
        problems.append(f"num_hidden_layers={shape.num_layers} is not divisible by pp={pp}")
    if problems:
        raise OperatorError("parallelism does not fit the model: " + "; ".join(problems))


def transformer_config(
    shape: LlamaShape, tp: int, pp: int, dtype: torch.dtype = torch.float32, recompute: bool = False
) -> Any:
    """The model config; ``recompute`` is megatron's full activation recompute, one layer per
    checkpoint (each layer keeps only its input; its activations are recomputed in backward), what
    ``training.gradient_checkpointing`` asks for and ``plan`` assumes."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from forgeline_operators.finetune.megatron import _cpu_compat

    check_layout(shape, tp, pp)
    _cpu_compat.apply()  # before the linears check that a gradient-accumulation kernel exists
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=True,
        perform_initialization=False,  # weights always come from an HF checkpoint (convert.py)
        # on CPU the compat layer's addmm_ kernel; on GPU it would need APEX (not installed): off
        gradient_accumulation_fusion=_cpu_compat.needed(),
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,
        attention_softmax_in_fp32=True,
        # the loss is scaled to a global per-token mean before backward (engine.loss_scale)
        calculate_per_token_loss=False,
        deallocate_pipeline_outputs=False,
        **(
            {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
            if recompute
            else {}
        ),
    )


def build_model(shape: LlamaShape, config: Any) -> Any:
    """This rank's pipeline stage of the GPT model (embedding on the first, head on the last)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_positions,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tied,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
        rotary_percent=1.0,
        parallel_output=True,
    )
    _mark_tensor_parallel(model)
    return model


def _mark_tensor_parallel(model: Any) -> None:
    """Megatron sets the TP attributes of sharded weights only inside its own init; with
    ``perform_initialization=False`` (weights come from HF) set them here, or the TP-aware grad norm
    counts a sharded weight on one rank only (measured: TP2's norm came out smaller than TP1's)."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for m in model.modules():
        weight = getattr(m, "weight", None)
        if weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(m, ColumnParallelLinear | VocabParallelEmbedding):
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(m, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)
