"""``run(ctx)`` of the prune stage: structured pruning of an HF Llama by activation importance.

Importance is measured on the workflow's own calibration rows, Minitron-style (Muralidharan et al.,
2024, "Compact Language Models via Pruning and Knowledge Distillation"): for each MLP channel the
magnitude of its activation entering ``down_proj``, for each attention head the magnitude of its
output entering ``o_proj`` (L2 over the sequence, averaged over rows), and for each decoder layer its
block importance 1 - cos(input, output) of the hidden states (a layer that barely changes its input
matters least). The least important channels, heads (the same number in every GQA group, so key/value
heads and their grouping stay intact) and layers are removed and a smaller, ordinary HF checkpoint is
written (:mod:`._surgery`); recover its quality with a ``distill`` stage that takes it as student.

Why not ModelOpt's pruning API: in nvidia-modelopt 0.47 ``mtp.prune`` offers ``fastnas``, whose
torch.fx tracing of HF ``LlamaDecoderLayer`` / ``LlamaAttention`` fails ("Proxy object cannot be
iterated"), leaving attention heads and layers outside its search space, and ``mcore_minitron``, which
only accepts megatron-core ``GPTModel``s (the megatron backend's models, not HF checkpoints). Checked
on this repo's tiny Llama, CPU, 2026-11-28.

Logged: parameters and weight bytes before/after, held-out loss / perplexity before/after and the
KL of the pruned model to the original. Runs on CPU (the plan rejects ``resources.device: gpu``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from forgeline.runtime.context import OperatorError, StageContext, StageResult
from forgeline_operators.data import Example, encode_rows, pad_token_id
from forgeline_operators.lib import measure
from forgeline_operators.lib.hf_checkpoint import load_causal_lm, load_tokenizer
from forgeline_operators.lib.surgery import check_layout, rebuild
from forgeline_operators.prune.spec import PruneStage

__all__ = ["EVAL_ROWS", "META", "Importance", "importance", "plan_kept", "run"]

EVAL_ROWS = 64
META = "forgeline_prune.json"


@dataclass
class Importance:
    mlp: dict[int, torch.Tensor]  # layer -> [intermediate_size]
    heads: dict[int, torch.Tensor]  # layer -> [num_attention_heads]
    blocks: dict[int, float]  # layer -> 1 - mean cos(input, output)


def _hidden(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def importance(model: Any, calibration: Sequence[Sequence[int]]) -> Importance:
    """Activation-based importance of MLP channels, heads and layers over ``calibration`` rows."""
    check_layout(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = model.model.layers
    imp = Importance(
        mlp={i: torch.zeros(config.intermediate_size, dtype=torch.float64) for i in range(len(layers))},
        heads={i: torch.zeros(config.num_attention_heads, dtype=torch.float64) for i in range(len(layers))},
        blocks=dict.fromkeys(range(len(layers)), 0.0),
    )
    inputs: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):

        def mlp_hook(_m: Any, args: Any, i: int = i) -> None:
            imp.mlp[i] += args[0][0].double().norm(dim=0)  # [seq, I] -> L2 over the sequence

        def head_hook(_m: Any, args: Any, i: int = i) -> None:
            x = args[0][0].double()  # [seq, heads * head_dim]
            imp.heads[i] += x.view(x.shape[0], -1, head_dim).norm(dim=(0, 2))

        def block_in(_m: Any, args: Any, kwargs: Any, i: int = i) -> None:
            inputs[i] = _hidden(args[0] if args else kwargs["hidden_states"]).detach()

        def block_out(_m: Any, _args: Any, _kwargs: Any, out: Any, i: int = i) -> None:
            cos = torch.nn.functional.cosine_similarity(inputs.pop(i).double(), _hidden(out).double(), dim=-1)
            imp.blocks[i] += float(1.0 - cos.mean())

        handles += [
            layer.mlp.down_proj.register_forward_pre_hook(mlp_hook),
            layer.self_attn.o_proj.register_forward_pre_hook(head_hook),
            layer.register_forward_pre_hook(block_in, with_kwargs=True),
            layer.register_forward_hook(block_out, with_kwargs=True),
        ]
    try:
        with torch.no_grad():
            for ids in calibration:
                model(input_ids=torch.tensor([list(ids)], dtype=torch.long))
    finally:
        for h in handles:
            h.remove()
    return imp


def plan_kept(model: Any, imp: Importance, target: Any) -> dict[str, Any]:
    """Which layers, MLP channels and heads survive (``rebuild`` keyword arguments)."""
    c = model.config
    n_layers, n_heads, n_kv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
    kept: dict[str, Any] = {}
    if target.num_hidden_layers is not None:
        if target.num_hidden_layers > n_layers:
            raise OperatorError(
                f"target.num_hidden_layers={target.num_hidden_layers} exceeds the model's {n_layers}"
            )
        ranked = sorted(imp.blocks, key=lambda i: imp.blocks[i], reverse=True)
        kept["layers"] = sorted(ranked[: target.num_hidden_layers])
    if target.intermediate_size is not None:
        if target.intermediate_size > c.intermediate_size:
            raise OperatorError(
                f"target.intermediate_size={target.intermediate_size} exceeds the model's "
                f"{c.intermediate_size}"
            )
        k = target.intermediate_size
        kept["mlp_channels"] = {i: sorted(s.topk(k).indices.tolist()) for i, s in imp.mlp.items()}
    if target.num_attention_heads is not None:
        t = target.num_attention_heads
        if t > n_heads or t % n_kv:
            raise OperatorError(
                f"target.num_attention_heads={t} must be a multiple of num_key_value_heads={n_kv} and at "
                f"most {n_heads} (the same number of query heads is kept in every GQA group)"
            )
        group, per_group = n_heads // n_kv, t // n_kv
        kept["heads"] = {
            i: sorted(
                g * group + j
                for g in range(n_kv)
                for j in s[g * group : (g + 1) * group].topk(per_group).indices.tolist()
            )
            for i, s in imp.heads.items()
        }
    return kept


def _data(ctx: StageContext, stage: PruneStage, tokenizer: Any) -> tuple[list[list[int]], list[Example]]:
    calib = stage.calibration
    rows = ctx.read_rows(calib.dataset)
    source = ctx.dataset(calib.dataset)
    fmt = source.format
    used = min(calib.samples, len(rows))
    calibration = [
        ex.input_ids
        for ex in encode_rows(tokenizer, rows[:used], fmt, calib.max_seq_len, source.rendering).examples
    ]
    if stage.eval_dataset:
        held_source = ctx.dataset(stage.eval_dataset)
        held = ctx.read_rows(stage.eval_dataset)
    else:
        held_source, held = source, rows[used:]
    examples = [
        ex
        for ex in encode_rows(
            tokenizer, held[:EVAL_ROWS], held_source.format, calib.max_seq_len, held_source.rendering
        ).examples
        if ex.graded_tokens
    ]
    if not examples:
        raise OperatorError(
            f"no held-out rows to measure perplexity on: {calib.dataset!r} has {len(rows)} rows and "
            f"calibration uses the first {used}; set eval_dataset or lower calibration.samples"
        )
    return calibration, examples


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    assert isinstance(stage, PruneStage)
    torch.set_num_threads(ctx.threads)
    parent_dir = ctx.input_path(stage.model)
    tokenizer = load_tokenizer(parent_dir)
    model = load_causal_lm(parent_dir, torch.float32)
    model.eval()
    check_layout(model)
    calibration, examples = _data(ctx, stage, tokenizer)
    pad_id = pad_token_id(tokenizer)
    started = time.time()
    kept = plan_kept(model, importance(model, calibration), stage.target)
    pruned = rebuild(model, **kept)
    seconds = time.time() - started
    loss_before = measure.held_out_loss(model, examples, pad_id)
    loss_after = measure.held_out_loss(pruned, examples, pad_id)
    metrics = {
        "params_before": float(measure.parameters(model)),
        "params_after": float(measure.parameters(pruned)),
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "perplexity_before": measure.perplexity(loss_before),
        "perplexity_after": measure.perplexity(loss_after),
        "eval_kl": measure.held_out_kl(pruned, model, examples, pad_id),
        "prune_seconds": seconds,
        "calibration_rows": float(len(calibration)),
    }
    metrics["params_ratio"] = metrics["params_after"] / metrics["params_before"]
    out = ctx.output_dir / "checkpoint"
    pruned.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    metrics["size_bytes_before"] = float(measure.weight_bytes(parent_dir))
    metrics["size_bytes_after"] = float(measure.weight_bytes(out))
    c = pruned.config
    shape = {
        "num_hidden_layers": c.num_hidden_layers,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
    }
    ctx.log_params({f"pruned.{k}": v for k, v in shape.items()})
    ctx.log_metrics(metrics)
    kept_layers = kept.get("layers")
    meta = {"parent": stage.model, "shape": shape, "kept_layers": kept_layers, "metrics": metrics}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return StageResult(outputs={"checkpoint": Path(out)}, metrics=metrics)
