"""How ``builtin://tiny-llama`` is made: tokenizer training, model config, pre-training, perplexity.

Used by ``scripts/make_tiny_llama.py`` to (re)build the shipped checkpoint and by the tests to
measure it; nothing here runs when the model is only materialized. Everything is seeded and runs in
fp32 on one CPU thread, so a rebuild from the shipped corpus gives the same tokenizer and, on the same
torch build, the same weights. torch, tokenizers and transformers are imported inside functions so
importing this module stays cheap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "PretrainConfig",
    "build_model",
    "encode_stream",
    "model_config",
    "perplexity",
    "pretrain",
    "train_tokenizer",
]

VOCAB_SIZE = 4096
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Role markers are single special tokens so a prompt's structure costs one token each and can never
# be produced by splitting user text; the corpus' chat exchanges (see _corpus) train their embeddings.
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>")
# Every turn ends with EOS, so generation after the "<|assistant|>\n" prompt stops by itself; no
# {% generation %} markers because serving engines' template renderers (minja) do not all know them.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(docs: Sequence[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE (no unknown bytes, like Llama 3 / GPT-2) that prepends BOS to every encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(tokenizer: PreTrainedTokenizerFast) -> Any:
    """The LlamaConfig of tiny-llama (~1.5M parameters)."""
    from transformers import LlamaConfig

    settings: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, so TP/export paths see distinct q and kv head counts
        max_position_embeddings=512,
        # Untied: a separate lm_head is the layout of the Llama checkpoints the platform targets, and
        # quantizers, LoRA target lists and TP sharding treat embedding and head differently; tied
        # weights would make those paths behave unlike the real models they stand in for.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # A dict rather than keywords: transformers 5's config classes hide their fields from type checkers.
    return LlamaConfig(**settings)


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly, deterministically initialised tiny-llama."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer))
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def encode_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[int]:
    """``<s> text </s>`` for each text, concatenated: documents are packed, never padded."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for batch in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        ids.extend(batch)
        ids.append(eos)
    return ids


def _blocks(ids: list[int], block_size: int) -> torch.Tensor:
    import torch

    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def perplexity(
    model: Any, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], block_size: int = 256
) -> float:
    """Token-level perplexity of ``texts`` packed into ``block_size`` windows (the tail is kept)."""
    import torch

    ids = encode_stream(tokenizer, texts)
    windows = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for window in windows:
            if len(window) < 2:
                continue
            x = torch.tensor([window], dtype=torch.long)
            logits = model(input_ids=x).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            total_nll += float(nll)
            total_tokens += len(window) - 1
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


@dataclass(frozen=True)
class PretrainConfig:
    """Hyper-parameters of the pre-training run; the defaults are what the shipped weights used."""

    steps: int = 500
    batch_size: int = 16
    block_size: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    seed: int = 0


def pretrain(
    model: Any,
    tokenizer: PreTrainedTokenizerFast,
    docs: Sequence[str],
    cfg: PretrainConfig,
    log: Callable[[str], None] = print,
) -> None:
    """Next-token pre-training with AdamW, linear warm-up and cosine decay to 10 % of ``cfg.lr``."""
    import torch

    blocks = _blocks(encode_stream(tokenizer, docs), cfg.block_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    # Decay matrices only: norms' gains are scale parameters that weight decay would pull to zero.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    log(f"pre-training on {blocks.shape[0]} blocks of {cfg.block_size} tokens for {cfg.steps} steps")
    model.train()
    order = torch.randperm(blocks.shape[0], generator=gen)
    cursor, start = 0, time.monotonic()
    for step in range(cfg.steps):
        if cursor + cfg.batch_size > len(order):
            order, cursor = torch.randperm(blocks.shape[0], generator=gen), 0
        batch = blocks[order[cursor : cursor + cfg.batch_size]]
        cursor += cfg.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            elapsed = time.monotonic() - start
            log(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {elapsed:.0f}s")
    model.eval()


def save(model: Any, tokenizer: PreTrainedTokenizerFast, out: Path) -> list[str]:
    """Writes the HF checkpoint (safetensors weights + tokenizer) and returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(out)  # transformers 5 writes safetensors only
    # The chat template goes into tokenizer_config.json rather than chat_template.jinja: older loaders
    # and engine converters read it from there, and package data ships *.json.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return sorted(p.name for p in out.iterdir())
