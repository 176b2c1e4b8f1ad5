"""The stage's final outputs in HF formats, gathered from every rank's shards onto rank 0.

Full methods: ``merged/`` is an HF safetensors checkpoint (config and tokenizer from the base).
LoRA: ``adapter/`` in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`` ...), loadable by ``peft``, the
hf backend, serving and NIM; ``merged/`` is made by PEFT's own ``merge_and_unload`` from it (the hf
backend's :func:`merge_adapter`), so the adapter is proven loadable by the time the stage publishes.
Downstream stages never see megatron formats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from forgeline_operators.finetune.megatron import convert, lora
from forgeline_operators.finetune.megatron.engine import Session, layer_offset

__all__ = ["adapter_pieces", "export"]

_HF_PARENT = {"self_attention": "self_attn", "mlp": "mlp"}


def adapter_pieces(session: Session, tp_rank: int, offset: int) -> list[convert.Piece]:
    """This rank's LoRA tensors as PEFT-named pieces with their concat dims."""
    s = session.shape
    spec = session.settings.lora
    assert spec is not None
    chosen = lora.targets(spec)
    qpg, d = s.num_heads // s.num_kv_heads, s.head_dim
    pieces: list[convert.Piece] = []
    main = session.main_params()  # bf16: the optimizer's fp32 main copies

    def w(p: torch.Tensor) -> torch.Tensor:
        return main.get(id(p), p).detach().float()

    for path, lin in session.adapters.items():
        _, _, local, parent, linear = path.split(".", 4)
        names = chosen[f"{parent}.{linear}"]

        def key(proj: str, ab: str, layer: int = int(local) + offset, parent: str = parent) -> str:
            return f"base_model.model.model.layers.{layer}.{_HF_PARENT[parent]}.{proj}.{ab}.weight"

        a = w(lin.lora_A)
        if linear == "linear_qkv":
            g = w(lin.lora_B).reshape(-1, (qpg + 2) * d, spec.r)
            parts = dict(zip(("q_proj", "k_proj", "v_proj"), g.split([qpg * d, d, d], dim=1), strict=True))
            for proj in names:
                pieces.append((key(proj, "lora_A"), a, None, tp_rank))
                pieces.append((key(proj, "lora_B"), parts[proj].reshape(-1, spec.r), 0, tp_rank))
        elif linear == "linear_fc1":
            for proj, half in (("gate_proj", "gate"), ("up_proj", "up")):
                if proj in names:
                    pieces.append((key(proj, "lora_A"), a, None, tp_rank))
                    pieces.append((key(proj, "lora_B"), w(getattr(lin, f"lora_B_{half}")), 0, tp_rank))
        else:
            proj = names[0]
            pieces.append((key(proj, "lora_A"), a, 1, tp_rank))
            pieces.append((key(proj, "lora_B"), w(lin.lora_B), None, tp_rank))
    return pieces


def _gather(local: list[convert.Piece]) -> list[convert.Piece]:
    from megatron.core import parallel_state

    mine = local if parallel_state.get_data_parallel_rank() == 0 else []  # replicas hold equal copies
    if torch.distributed.get_world_size() == 1:
        return mine
    gathered: list[Any] = (
        [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else []
    )
    torch.distributed.gather_object(mine, gathered if torch.distributed.get_rank() == 0 else None, dst=0)
    return [p for part in gathered or [] for p in part]


def export(session: Session, base_dir: Path, dest: Path) -> list[str]:
    """Write ``merged/`` (and ``adapter/`` for LoRA) under ``dest`` on rank 0; names written."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    offset = layer_offset(session.shape, session.settings.pp)
    if session.settings.lora is not None:
        pieces = _gather(adapter_pieces(session, tp_rank, offset))
    else:
        main = session.main_params()  # bf16: export the optimizer's fp32 main weights
        state = {
            k: main.get(id(v), v).detach()
            for k, v in session.module.state_dict(keep_vars=True).items()
            if not k.endswith("_extra_state")
        }
        first = parallel_state.is_pipeline_first_stage()
        pieces = _gather(
            convert.local_to_pieces(state, session.shape, tp_rank, session.settings.tp, offset, first)
        )
    written: list[str] = []
    if torch.distributed.get_rank() == 0:
        tensors = convert.join_pieces(pieces)
        if session.settings.lora is not None:
            _write_adapter(session, tensors, base_dir, dest / "adapter")
            from forgeline_operators.finetune._train import merge_adapter
            from forgeline_operators.lib.hf_checkpoint import load_tokenizer

            merge_adapter(
                base_dir, dest / "adapter", dest / "merged", load_tokenizer(base_dir), torch.float32
            )
            written = ["adapter", "merged"]
        else:
            convert.save_hf(tensors, base_dir, dest / "merged")
            written = ["merged"]
    torch.distributed.barrier()
    return written


def _write_adapter(session: Session, tensors: dict[str, torch.Tensor], base_dir: Path, dest: Path) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    spec = session.settings.lora
    assert spec is not None
    projections = sorted({n for names in lora.targets(spec).values() for n in names})
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # annotated int; peft scales by alpha / r
        lora_dropout=spec.dropout,
        target_modules=projections,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base_dir),
    )
    dest.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(dest))
    # the fused QKV (gate/up) A is shared by its projections: one independent copy each on disk
    save_file(
        {k: v.clone().contiguous() for k, v in tensors.items()}, str(dest / "adapter_model.safetensors")
    )
    from forgeline_operators.lib.hf_checkpoint import load_tokenizer

    load_tokenizer(base_dir).save_pretrained(str(dest))
