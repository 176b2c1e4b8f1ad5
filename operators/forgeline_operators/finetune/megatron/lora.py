"""Tensor-parallel LoRA on megatron-core linears (megatron-core itself has none), exported as PEFT.

``ColumnParallelLinear`` (``linear_qkv``, ``linear_fc1``): A ``[r, in]`` replicated, B sharded on dim 0
like the weight; ``X·Aᵀ`` goes through ``copy_to_tensor_model_parallel_region`` so A's gradient is
all-reduced over TP. The gated fc1 keeps one B per half (``lora_B_gate``, ``lora_B_up``), so each TP
rank's slice matches its ``[gate_r; up_r]`` weight shard and checkpoints reshard correctly.
``RowParallelLinear`` (``linear_proj``, ``linear_fc2``): A ``[r, in/tp]`` sharded on dim 1, the
partial ``X·Aᵀ`` summed by ``reduce_from_tensor_model_parallel_region``, B replicated. Replicated
tensors get identical gradients on every TP rank by construction; sharded ones carry megatron's TP
attributes (grad-norm counts each element once). A is drawn from a per-layer seeded generator at full
size and then sliced, so every layout starts from the same adapter (PEFT's init: Kaiming-uniform A,
zero B). Export gathers to PEFT's per-projection layout: the fused QKV's shared A becomes the A of
q/k/v_proj and its B is split per projection (exact: ``B_q·A`` is what the fused adapter adds to Q).
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any

import torch

from forgeline.runtime.context import OperatorError
from forgeline_operators.finetune.megatron.model import LlamaShape
from forgeline_operators.finetune.spec import LoraSpec

__all__ = ["HF_NAMES", "attach", "disabled", "targets"]

# megatron linear -> the HF projections it fuses
HF_NAMES: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "self_attention.linear_proj": ("o_proj",),
    "mlp.linear_fc1": ("gate_proj", "up_proj"),
    "mlp.linear_fc2": ("down_proj",),
}
_COLUMN = ("self_attention.linear_qkv", "mlp.linear_fc1")


def targets(spec: LoraSpec) -> dict[str, tuple[str, ...]]:
    """megatron linear -> the HF projections adapted in it (``all-linear``: all of them)."""
    if spec.target_modules == "all-linear":
        return dict(HF_NAMES)
    wanted = set(spec.target_modules)
    known = {n for names in HF_NAMES.values() for n in names}
    unknown = sorted(wanted - known)
    if unknown:
        raise OperatorError(
            f"lora.target_modules {unknown} are not Llama projections; "
            f"use some of {sorted(known)} or all-linear"
        )
    return {m: tuple(n for n in names if n in wanted) for m, names in HF_NAMES.items() if wanted & set(names)}


def _row_mask(shape: LlamaShape, linear: str, names: tuple[str, ...], tp: int) -> torch.Tensor | None:
    """For partially targeted fused linears: 1 on output rows of adapted projections (this rank's)."""
    if linear == "mlp.linear_fc1" and len(names) == 1:
        half = shape.ffn_hidden_size // tp
        return torch.cat([torch.full((half,), float(p in names)) for p in ("gate_proj", "up_proj")])
    if linear != "self_attention.linear_qkv" or len(names) == 3:
        return None
    qpg, d = shape.num_heads // shape.num_kv_heads, shape.head_dim
    group = torch.cat(
        [torch.full((n * d,), float(p in names)) for p, n in (("q_proj", qpg), ("k_proj", 1), ("v_proj", 1))]
    )
    return group.repeat(shape.num_kv_heads // tp)


def _kaiming_a(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(cols)  # kaiming_uniform_(a=sqrt(5)) as PEFT/nn.Linear do
    return (torch.rand(rows, cols, generator=gen) * 2 - 1) * bound


def _sharded_state_dict(axes: dict[str, int]) -> Any:
    def fn(self: Any, prefix: str = "", sharded_offsets: Any = (), metadata: Any = None) -> Any:
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {"weight": 1 if "lora_A" in axes else 0, "bias": 0, **axes},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )

    return fn


def _hook(linear: str, scale: float, dropout: float, mask: torch.Tensor | None) -> Any:
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )

    def forward_hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        if not getattr(module, "lora_enabled", True):
            return output
        x = args[0]
        if dropout and module.training:
            x = torch.nn.functional.dropout(x, p=dropout)
        if linear in _COLUMN:
            la = copy_to_tensor_model_parallel_region(x @ module.lora_A.t())
            if linear == "mlp.linear_fc1":
                delta = torch.cat([la @ module.lora_B_gate.t(), la @ module.lora_B_up.t()], dim=-1)
            else:
                delta = la @ module.lora_B.t()
            if mask is not None:
                delta = delta * mask.to(delta.dtype)
        else:
            delta = reduce_from_tensor_model_parallel_region(x @ module.lora_A.t()) @ module.lora_B.t()
        out, bias = output
        return out + scale * delta, bias

    return forward_hook


def attach(module: Any, spec: LoraSpec, shape: LlamaShape, seed: int, offset: int) -> dict[str, Any]:
    """Freeze the stage's weights and add adapters; returns the adapted linears by local path."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for p in module.parameters():
        p.requires_grad_(False)
    r, scale = spec.r, spec.alpha / spec.r
    adapted: dict[str, Any] = {}
    for i, layer in enumerate(module.decoder.layers):
        for linear, names in targets(spec).items():
            lin = layer.get_submodule(linear)
            out_local, in_local = lin.weight.shape
            seed_i = seed * 1_000_003 + (offset + i) * 16 + list(HF_NAMES).index(linear)
            if linear in _COLUMN:
                lin.lora_A = torch.nn.Parameter(_kaiming_a(r, in_local, seed_i))
                if linear == "mlp.linear_fc1":
                    for half in ("gate", "up"):
                        b = torch.nn.Parameter(torch.zeros(out_local // 2, r))
                        set_tensor_model_parallel_attributes(b, True, 0, 1)
                        setattr(lin, f"lora_B_{half}", b)
                    axes = {"lora_B_gate": 0, "lora_B_up": 0}
                else:
                    lin.lora_B = torch.nn.Parameter(torch.zeros(out_local, r))
                    set_tensor_model_parallel_attributes(lin.lora_B, True, 0, 1)
                    axes = {"lora_B": 0}
            else:
                full = _kaiming_a(r, in_local * tp, seed_i)
                lin.lora_A = torch.nn.Parameter(full.chunk(tp, dim=1)[rank].contiguous())
                set_tensor_model_parallel_attributes(lin.lora_A, True, 1, 1)
                lin.lora_B = torch.nn.Parameter(torch.zeros(out_local, r))
                axes = {"lora_A": 1}
            lin.sharded_state_dict = types.MethodType(_sharded_state_dict(axes), lin)
            lin.register_forward_hook(_hook(linear, scale, spec.dropout, _row_mask(shape, linear, names, tp)))
            adapted[f"decoder.layers.{i}.{linear}"] = lin
    return adapted


@contextlib.contextmanager
def disabled(adapted: dict[str, Any]) -> Iterator[None]:
    """The base model: adapters bypassed (DPO's reference for LoRA, as PEFT's ``disable_adapter``)."""
    for lin in adapted.values():
        lin.lora_enabled = False
    try:
        yield
    finally:
        for lin in adapted.values():
            lin.lora_enabled = True
