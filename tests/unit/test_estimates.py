"""Memory estimates for tensor/pipeline layouts: Megatron's split of weights (layers over pp, matrices
over tp, embedding on the first stage, output layer on the last), activations per layer under TP, and
1F1B's in-flight micro-batches on the first stage."""

from __future__ import annotations

from typing import Any

import pytest

from forgeline.plan._estimates import ModelShape, finetune_memory, shape_from_config, stage_params

LLAMA3_70B = {
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def shape(config: dict[str, Any], tied: bool = False) -> ModelShape:
    return shape_from_config({**config, "tie_word_embeddings": tied})


def test_one_device_holds_the_whole_model() -> None:
    for tied in (False, True):
        s = shape(SMALL, tied)
        one = stage_params(s, 1, 1)
        assert one.first == one.last == s.parameters


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_splits_matrices_and_embeddings_but_replicates_norms(tp: int) -> None:
    s = shape(SMALL)
    h, L = 64, 4
    norms = 2 * h * L + h  # per-layer RMSNorms + the final norm
    assert tp * stage_params(s, tp, 1).first == s.parameters + (tp - 1) * norms


def test_pp_puts_embedding_first_and_output_last() -> None:
    s = shape(SMALL)
    h, vocab, L = 64, 512, 4
    first, last = stage_params(s, 1, 2).first, stage_params(s, 1, 2).last
    assert first + last == s.parameters
    layer = (s.parameters - 2 * vocab * h - h) // L
    assert first == 2 * layer + vocab * h
    assert last == 2 * layer + h + vocab * h
    tied = shape(SMALL, tied=True)
    t = stage_params(tied, 1, 2)
    assert t.first + t.last == tied.parameters + vocab * h  # the last stage keeps a copy to tie with


def memory(s: ModelShape, method: str = "sft", **kw: Any) -> Any:
    args: dict[str, Any] = dict(precision="bf16", lora_r=16, lora_targets="all-linear", lora_for_dpo=False,
                                double_quant=True, seq_len=4096, micro_batch=1, gradient_checkpointing=False,
                                tp=1, pp=1)  # fmt: skip
    return finetune_memory(s, method, **(args | kw))


def test_activations_split_by_tp_only_where_megatron_splits_them() -> None:
    """Per token and layer: 6h elements tp leaves whole (norm inputs/outputs, QKV and fc1 inputs) and
    4h + 5I (+ a*s without fused attention) it splits; 2 bytes in bf16, 4 in fp32."""
    s, sq, h, inter, a, L = shape(LLAMA3_70B), 4096, 8192, 28672, 64, 80
    for tp in (1, 2, 8):
        expected = 2 * sq * (6 * h + (4 * h + 5 * inter) / tp) * L  # bf16: fused attention, no a*s
        assert memory(s, tp=tp).parts["activations"] == pytest.approx(expected, rel=1e-9)
        fp32 = 4 * sq * (6 * h + (4 * h + 5 * inter + a * sq) / tp) * L
        assert memory(s, tp=tp, precision="fp32").parts["activations"] == pytest.approx(fp32, rel=1e-9)


def test_1f1b_first_stage_holds_pp_micro_batches_and_last_the_logits() -> None:
    s = shape(LLAMA3_70B)
    one = memory(s, tp=4)
    piped = memory(s, tp=4, pp=2)
    # pp micro-batches of L/pp layers in flight on the first stage: the same as all L layers.
    assert piped.parts["activations"] == one.parts["activations"]
    assert "logits" not in piped.parts and piped.notes == ["busiest device: first pipeline stage of 2"]
    assert piped.parts["weights + grads + adam"] < one.parts["weights + grads + adam"] * 0.55
    tiny_vocab_big_batch = memory(shape({**SMALL, "vocab_size": 200000}), pp=2, micro_batch=8)
    assert "logits" in tiny_vocab_big_batch.parts
    assert tiny_vocab_big_batch.notes == ["busiest device: last pipeline stage of 2"]


def test_llama3_70b_lora_tp4pp2_fits_80gb_but_not_on_one_gpu() -> None:
    s = shape(LLAMA3_70B)
    assert 70.5e9 < s.parameters < 70.6e9
    kw = dict(gradient_checkpointing=True)
    sharded = memory(s, "lora", tp=4, pp=2, **kw)
    assert sharded.per_device_gb < 80
    # Frozen bf16 weights: 2 bytes x (40 layers / 4 + embedding / 4) on the first stage.
    first = stage_params(s, 4, 2).first
    assert sharded.parts["weights (frozen)"] == 2 * first
    assert memory(s, "lora", **kw).per_device_gb > 130


def test_dims_unknown_spreads_parameters_evenly() -> None:
    s = ModelShape(8_000_000_000, source="declared")
    split = stage_params(s, 2, 4)
    assert split.first == split.last == 1_000_000_000


_MEGATRON_COUNTS = """
import json, os, sys, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from forgeline_operators.finetune.megatron import _cpu_compat
_cpu_compat.apply()
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state
parallel_state.initialize_model_parallel(1, 1)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig
out = {}
for tied in (False, True):
    for pp in (1, 2, 4):
        for pre, post in ([(True, True)] if pp == 1 else [(True, False), (False, True)]):
            # One pipeline stage = L/pp layers, with the embedding (pre) and/or the output layer (post).
            tc = TransformerConfig(
                num_layers=4 // pp, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
                num_query_groups=2, normalization="RMSNorm", gated_linear_unit=True,
                activation_func=torch.nn.functional.silu, add_bias_linear=False, use_cpu_initialization=True,
                perform_initialization=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
                bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False)
            m = GPTModel(config=tc, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                         vocab_size=512, max_sequence_length=128, pre_process=pre, post_process=post,
                         share_embeddings_and_output_weights=tied, position_embedding_type="rope")
            out[f"{tied}/{pp}/{'first' if pre else 'last'}"] = sum(p.numel() for p in m.parameters())
print(json.dumps(out))
"""


@pytest.mark.slow
def test_pipeline_split_matches_megatron_core_parameter_counts() -> None:
    """Each stage's parameters as megatron-core 0.16.1's GPTModel builds them (local spec, TP=1)."""
    import json
    import socket
    import subprocess
    import sys

    pytest.importorskip("megatron.core")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", _MEGATRON_COUNTS, str(port)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    for tied in (False, True):
        s = shape(SMALL, tied)
        for pp in (1, 2, 4):
            split = stage_params(s, 1, pp)
            assert counts[f"{tied}/{pp}/first"] == split.first, (tied, pp)
            last = counts[f"{tied}/{pp}/last" if pp > 1 else f"{tied}/{pp}/first"]
            assert last == split.last, (tied, pp)


def test_megatron_mixed_precision_keeps_fp32_grads() -> None:
    """megatron's bf16 keeps gradients in fp32 buffers (grad_reduce_in_fp32): 18 bytes per trained
    parameter; in fp32 the weight is the main copy either way (16)."""
    s = shape(SMALL)
    n = stage_params(s, 1, 1).first
    assert memory(s).parts["weights + grads + adam"] == 16 * n
    assert memory(s, fp32_grads=True).parts["weights + grads + adam"] == 18 * n
    assert memory(s, fp32_grads=True, precision="fp32").parts["weights + grads + adam"] == 16 * n
    lora = memory(s, "lora", fp32_grads=True).parts
    assert lora["adapters + grads + adam"] * 16 == memory(s, "lora").parts["adapters + grads + adam"] * 18
