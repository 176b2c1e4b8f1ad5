"""HF Llama <-> megatron GPTModel weights, sharded for one (tp rank, pipeline stage) on load.

Megatron layouts (local spec): ``linear_qkv`` fuses Q, K and V per query group -- for each KV head
``g`` the ``heads/kv_heads`` query heads of that group, then K_g, then V_g -- and TP splits whole
groups; ``linear_fc1`` is ``[gate; up]`` and TP splits each half (rank r holds ``[gate_r; up_r]``);
``linear_proj``/``linear_fc2`` split the input dim; embedding and output layer split the vocab.
Layers are numbered locally per pipeline stage. Export is the inverse: every rank turns its shards
into HF-named pieces with the dim they concatenate on, rank 0 gathers and joins them.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import torch

from forgeline.runtime.context import OperatorError
from forgeline_operators.finetune.megatron.model import LlamaShape

__all__ = ["Piece", "hf_to_local", "join_pieces", "load_hf_state", "local_to_pieces", "save_hf"]

# (hf name, tensor, concat dim or None for replicated, tp rank)
Piece = tuple[str, torch.Tensor, int | None, int]

_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."


def load_hf_state(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise OperatorError(
            f"{model_dir} has no *.safetensors weights; backend megatron imports HF safetensors"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _qkv(hf: dict[str, torch.Tensor], p: str, s: LlamaShape) -> torch.Tensor:
    qpg = s.num_heads // s.num_kv_heads
    q = hf[p + "self_attn.q_proj.weight"].reshape(s.num_kv_heads, qpg * s.head_dim, -1)
    k = hf[p + "self_attn.k_proj.weight"].reshape(s.num_kv_heads, s.head_dim, -1)
    v = hf[p + "self_attn.v_proj.weight"].reshape(s.num_kv_heads, s.head_dim, -1)
    return torch.cat([q, k, v], dim=1)  # [groups, (qpg + 2) * d, hidden]


def hf_to_local(
    hf: dict[str, torch.Tensor],
    s: LlamaShape,
    wanted: list[str],
    tp_rank: int,
    tp: int,
    layer_offset: int,
) -> dict[str, torch.Tensor]:
    """The megatron tensors named in ``wanted`` (this rank's model keys), sliced for ``tp_rank``."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp, dim=0)[tp_rank]

    def cols(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp, dim=1)[tp_rank]

    out: dict[str, torch.Tensor] = {}
    for key in wanted:
        if key.endswith("_extra_state"):
            continue
        if key == "embedding.word_embeddings.weight":
            out[key] = rows(hf["model.embed_tokens.weight"])
        elif key == "output_layer.weight":
            out[key] = rows(hf["model.embed_tokens.weight" if s.tied else "lm_head.weight"])
        elif key == "decoder.final_layernorm.weight":
            out[key] = hf["model.norm.weight"]
        elif key.startswith("decoder.layers."):
            local, name = key[len("decoder.layers.") :].split(".", 1)
            p = _HF_LAYER.format(i=int(local) + layer_offset)
            if name == "input_layernorm.weight":
                out[key] = hf[p + "input_layernorm.weight"]
            elif name == "pre_mlp_layernorm.weight":
                out[key] = hf[p + "post_attention_layernorm.weight"]
            elif name == "self_attention.linear_qkv.weight":
                out[key] = rows(_qkv(hf, p, s)).reshape(-1, s.hidden_size)
            elif name == "self_attention.linear_proj.weight":
                out[key] = cols(hf[p + "self_attn.o_proj.weight"])
            elif name == "mlp.linear_fc1.weight":
                out[key] = torch.cat(
                    [rows(hf[p + "mlp.gate_proj.weight"]), rows(hf[p + "mlp.up_proj.weight"])]
                )
            elif name == "mlp.linear_fc2.weight":
                out[key] = cols(hf[p + "mlp.down_proj.weight"])
            else:
                raise OperatorError(f"no HF source for megatron parameter {key}")
        else:
            raise OperatorError(f"no HF source for megatron parameter {key}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def local_to_pieces(
    local: dict[str, torch.Tensor], s: LlamaShape, tp_rank: int, tp: int, layer_offset: int, first: bool
) -> list[Piece]:
    """This rank's megatron tensors as HF-named pieces (inverse of :func:`hf_to_local`)."""
    pieces: list[Piece] = []
    qpg = s.num_heads // s.num_kv_heads
    for key, value in local.items():
        if key.endswith("_extra_state") or value is None:
            continue
        t = value.detach().float().cpu()
        if key == "embedding.word_embeddings.weight":
            pieces.append(("model.embed_tokens.weight", t, 0, tp_rank))
        elif key == "output_layer.weight":
            if not s.tied:
                pieces.append(("lm_head.weight", t, 0, tp_rank))
            elif not first:  # the last stage's copy of a tied embedding: the first stage exports it
                continue
        elif key == "decoder.final_layernorm.weight":
            pieces.append(("model.norm.weight", t, None, tp_rank))
        elif key.startswith("decoder.layers."):
            local_i, name = key[len("decoder.layers.") :].split(".", 1)
            p = _HF_LAYER.format(i=int(local_i) + layer_offset)
            if name == "input_layernorm.weight":
                pieces.append((p + "input_layernorm.weight", t, None, tp_rank))
            elif name == "pre_mlp_layernorm.weight":
                pieces.append((p + "post_attention_layernorm.weight", t, None, tp_rank))
            elif name == "self_attention.linear_qkv.weight":
                g = t.reshape(-1, (qpg + 2) * s.head_dim, s.hidden_size)
                q, k, v = g.split([qpg * s.head_dim, s.head_dim, s.head_dim], dim=1)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    pieces.append(
                        (p + f"self_attn.{proj}.weight", part.reshape(-1, s.hidden_size), 0, tp_rank)
                    )
            elif name == "self_attention.linear_proj.weight":
                pieces.append((p + "self_attn.o_proj.weight", t, 1, tp_rank))
            elif name == "mlp.linear_fc1.weight":
                gate, up = t.chunk(2, dim=0)
                pieces.append((p + "mlp.gate_proj.weight", gate, 0, tp_rank))
                pieces.append((p + "mlp.up_proj.weight", up, 0, tp_rank))
            elif name == "mlp.linear_fc2.weight":
                pieces.append((p + "mlp.down_proj.weight", t, 1, tp_rank))
    return pieces


def join_pieces(pieces: list[Piece]) -> dict[str, torch.Tensor]:
    """Gathered pieces of all ranks -> full HF tensors (replicated ones taken from tp rank 0)."""
    by_name: dict[str, list[Piece]] = defaultdict(list)
    for piece in pieces:
        by_name[piece[0]].append(piece)
    out: dict[str, torch.Tensor] = {}
    for name, group in by_name.items():
        group.sort(key=lambda pc: pc[3])
        dim = group[0][2]
        if dim is None:
            out[name] = group[0][1].contiguous()
        else:
            seen: dict[int, torch.Tensor] = {}
            for _, t, _, r in group:  # dp replicas send the same shard: keep one per tp rank
                seen.setdefault(r, t)
            out[name] = torch.cat([seen[r] for r in sorted(seen)], dim=dim).contiguous()
    return out


def save_hf(state: dict[str, torch.Tensor], base_dir: Path, dest: Path) -> None:
    """A loadable HF checkpoint: the base's config and tokenizer files plus these weights."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if (
            f.is_file()
            and not f.name.endswith((".safetensors", ".bin"))
            and f.name != "model.safetensors.index.json"
        ):
            shutil.copy2(f, dest / f.name)
    config = json.loads((base_dir / "config.json").read_text())
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
