"""Structural edits of a Llama-layout causal LM: keep chosen decoder layers, MLP channels, query heads.

Every edit works on the state dict and builds a fresh model from the edited config, so the result is
an ordinary ``from_pretrained``-loadable checkpoint with consistent module attributes (e.g. the
attention's ``num_key_value_groups``), never a model patched in place. The layout is the one HF
Llama, Mistral and Qwen2/3 share: ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and
``model.layers.{i}.mlp.{gate,up,down}_proj``. Query heads are kept per GQA group (the same count in
every group, as HF's ``repeat_kv`` maps query head ``j`` to key/value head ``j // group_size``), so
keys and values are untouched and the grouping stays consistent.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from forgeline.runtime.context import OperatorError

__all__ = ["SUPPORTED_MODEL_TYPES", "check_layout", "evenly_spaced", "rebuild"]

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def check_layout(model: Any) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OperatorError(
            f"structural edits support model types {sorted(SUPPORTED_MODEL_TYPES)} (Llama layout); "
            f"this model is {model_type!r}"
        )


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread from the first to the last of ``total`` (``keep=1``: the first)."""
    if not 1 <= keep <= total:
        raise OperatorError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def _head_rows(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def rebuild(
    model: Any,
    *,
    layers: Sequence[int] | None = None,
    mlp_channels: Mapping[int, Sequence[int]] | None = None,
    heads: Mapping[int, Sequence[int]] | None = None,
) -> Any:
    """A new model keeping ``layers`` (teacher indices, in order), per-layer MLP channel indices and
    per-layer query-head indices (keys are original layer indices). Every layer must keep the same
    count, because the HF config has one ``intermediate_size`` and one ``num_attention_heads``."""
    check_layout(model)
    config = copy.deepcopy(model.config)
    n_layers = config.num_hidden_layers
    keep_layers = list(layers) if layers is not None else list(range(n_layers))
    if any(not 0 <= i < n_layers for i in keep_layers) or len(set(keep_layers)) != len(keep_layers):
        raise OperatorError(f"layer indices {keep_layers} must be distinct and in 0..{n_layers - 1}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.head_dim = head_dim  # stays fixed when the head count changes (default would be h / heads)
    if mlp_channels:
        sizes = {len(c) for c in mlp_channels.values()}
        if len(sizes) != 1:
            raise OperatorError(f"every layer must keep the same number of MLP channels, got {sorted(sizes)}")
        config.intermediate_size = sizes.pop()
    if heads:
        counts = {len(h) for h in heads.values()}
        if len(counts) != 1:
            raise OperatorError(f"every layer must keep the same number of heads, got {sorted(counts)}")
        config.num_attention_heads = counts.pop()
    config.num_hidden_layers = len(keep_layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n_layers:
        config.layer_types = [layer_types[i] for i in keep_layers]

    new_index = {old: new for new, old in enumerate(keep_layers)}
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = value
            continue
        old, rest = int(m.group(1)), m.group(2)
        if old not in new_index:
            continue
        state[f"model.layers.{new_index[old]}.{rest}"] = _slice(
            rest, value, (mlp_channels or {}).get(old), (heads or {}).get(old), head_dim
        )
    new = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    # Tied lm_head may legitimately be absent from one side; anything else is a layout we do not know.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise OperatorError(f"rebuilt model does not match: missing {missing}, unexpected {unexpected}")
    new.generation_config = copy.deepcopy(model.generation_config)
    new.eval()
    return new


def _slice(
    rest: str,
    value: torch.Tensor,
    channels: Sequence[int] | None,
    heads: Sequence[int] | None,
    head_dim: int,
) -> torch.Tensor:
    if channels is not None:
        idx = torch.as_tensor(sorted(channels))
        if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            return value.index_select(0, idx).clone()  # rows are channels (bias too)
        if rest == "mlp.down_proj.weight":
            return value.index_select(1, idx).clone()
    if heads is not None:
        rows = _head_rows(sorted(heads), head_dim)
        if rest.startswith("self_attn.q_proj."):
            return value.index_select(0, rows).clone()
        if rest == "self_attn.o_proj.weight":
            return value.index_select(1, rows).clone()
    return value
