"""Turning dataset rows into token ids and loss labels, shared by every operator that scores or trains.

This module owns the one answer to "which tokens does the model learn or get graded on", and so the
one rendering of a conversation: finetune (hf and megatron, SFT and DPO), evaluate, quantize/prune
calibration all build their ids here, and the serving front renders chat requests with the same chat
template, so training, evaluation and the endpoint see the same prompt ids. Prompt tokens are labelled
``IGNORE_INDEX`` so loss and accuracy cover completion tokens only (every token for the ``text``
format), and ``max_seq_len`` truncation is counted and returned, never silent. It also holds the
batching helpers: right padding for scoring/training, left padding for generation.

A dataset's ``rendering`` decides how sft and preference rows become text:

* ``chat_template`` (what ``auto`` picks when the tokenizer has a chat template, as every
  instruction-tuned model does): a ``{prompt, completion}`` row is the conversation ``[user: prompt,
  assistant: completion]`` (trl's conversational prompt-completion form), rendered with the model's
  template like a ``messages`` row; the graded part is each assistant turn as the template writes it,
  end-of-turn token included, so the model learns to stop where the endpoint expects it to.
* ``raw`` (``auto`` without a template): the plain join::

    [sequence prefix, e.g. BOS] prompt completion [EOS]

  The prompt and completion are concatenated verbatim with no separator (the dataset owns its
  whitespace, e.g. ``"Q: 2+2?\\nA:"`` + ``" 4"``), each tokenised on its own so the prompt/completion
  boundary is a token boundary and the graded prompt is exactly what generation starts from. A chat
  row is joined as ``"{role}: {content}\\n"`` per message, each assistant turn being
  ``"assistant: "`` (prompt) + ``content`` + EOS (graded). The EOS is graded so the model learns to
  stop. This is the form for base models served through ``/v1/completions`` with raw prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "IGNORE_INDEX",
    "RENDERINGS",
    "Example",
    "TokenizedRows",
    "collate",
    "encode_row",
    "encode_rows",
    "generation_prompt",
    "left_pad",
    "pad_token_id",
    "reference_text",
    "resolve_rendering",
    "sequence_prefix",
]

IGNORE_INDEX = -100  # the label transformers' causal-LM loss (and ours) skips
RENDERINGS = ("auto", "chat_template", "raw")

Segment = tuple[list[int], bool]  # token ids, graded?


@dataclass(frozen=True)
class Example:
    """One tokenised row: ``labels[i]`` is ``input_ids[i]`` where graded, else ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def graded_tokens(self) -> int:
        # The first token is never predicted (nothing precedes it), so it never counts.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass(frozen=True)
class TokenizedRows:
    examples: list[Example]
    truncated_rows: int  # rows cut at max_seq_len; their tail is not graded


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def sequence_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a sequence (e.g. ``[BOS]``; ``[]`` for GPT-2).

    Derived from the tokenizer's own post-processor rather than assumed from ``bos_token``, so a
    model is scored on sequences shaped like those it was trained on; suffixes such as an EOS added by
    the post-processor are ignored because they would end the prompt.
    """
    bare = _encode(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start]
    return []


def _eos(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: completions could never end")
    return int(eos)


def pad_token_id(tokenizer: Any) -> int:
    """The pad id, falling back to EOS (padding is masked out, so its id never matters)."""
    pad = tokenizer.pad_token_id
    return int(pad) if pad is not None else _eos(tokenizer)


def _chat_segments(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
    """Split the templated conversation into masked markup/context and graded assistant turns.

    Each assistant turn is the text between the conversation rendered up to it with a generation
    prompt and the conversation rendered through it; this works for any template whose earlier turns
    render the same when later turns are added, which is checked rather than assumed.
    """

    def render(msgs: Sequence[Mapping[str, str]], generation: bool) -> str:
        text = tokenizer.apply_chat_template(
            [dict(m) for m in msgs], tokenize=False, add_generation_prompt=generation
        )
        return str(text)

    full = render(messages, False)
    texts: list[tuple[str, bool]] = []
    pos = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(messages[:k], True)
        end = render(messages[: k + 1], False)
        if not (full.startswith(start) and full.startswith(end) and pos <= len(start) <= len(end)):
            raise ValueError(
                "the tokenizer's chat template renders earlier turns differently once later turns are "
                "added, so assistant turns cannot be located for loss masking"
            )
        texts += [(full[pos : len(start)], False), (full[len(start) : len(end)], True)]
        pos = len(end)
    texts.append((full[pos:], False))
    return [(_encode(tokenizer, text), graded) for text, graded in texts if text]


def _plain_chat_segments(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[Segment]:
    segments: list[Segment] = [(sequence_prefix(tokenizer), False)]
    for message in messages:
        if message["role"] == "assistant":
            segments.append((_encode(tokenizer, "assistant: "), False))
            segments.append(([*_encode(tokenizer, message["content"]), _eos(tokenizer)], True))
        else:
            segments.append((_encode(tokenizer, f"{message['role']}: {message['content']}\n"), False))
    return segments


def resolve_rendering(tokenizer: Any, rendering: str = "auto") -> str:
    """``chat_template`` or ``raw``: what ``rendering`` means for this tokenizer (``auto`` decides)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if rendering == "auto":
        return "chat_template" if has_template else "raw"
    if rendering == "chat_template" and not has_template:
        raise ValueError(
            "rendering: chat_template, but the model's tokenizer has no chat template "
            "(set the dataset's rendering to raw or auto)"
        )
    if rendering not in RENDERINGS:
        raise ValueError(f"unknown rendering {rendering!r}: use one of {', '.join(RENDERINGS)}")
    return rendering


def _conversation(prompt: str, completion: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _segments(tokenizer: Any, row: Mapping[str, Any], fmt: str, rendering: str) -> list[Segment]:
    if fmt == "text":
        return [([*sequence_prefix(tokenizer), *_encode(tokenizer, row["text"]), _eos(tokenizer)], True)]
    chat = resolve_rendering(tokenizer, rendering) == "chat_template"
    if fmt == "sft" and "messages" in row:
        if chat:
            return _chat_segments(tokenizer, row["messages"])
        return _plain_chat_segments(tokenizer, row["messages"])
    if fmt in ("sft", "preference"):
        # A preference row is scored on its chosen answer: that is the completion it endorses.
        completion = row["completion"] if fmt == "sft" else row["chosen"]
        if chat:
            return _chat_segments(tokenizer, _conversation(row["prompt"], completion))
        return [
            (sequence_prefix(tokenizer) + _encode(tokenizer, row["prompt"]), False),
            ([*_encode(tokenizer, completion), _eos(tokenizer)], True),
        ]
    raise ValueError(f"unknown dataset format {fmt!r}")


def encode_row(
    tokenizer: Any, row: Mapping[str, Any], fmt: str, max_seq_len: int, rendering: str = "auto"
) -> Example:
    """Token ids and labels of one validated row, cut to ``max_seq_len`` tokens (keeping the start)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, graded in _segments(tokenizer, row, fmt, rendering):
        input_ids += ids
        labels += ids if graded else [IGNORE_INDEX] * len(ids)
    truncated = len(input_ids) > max_seq_len
    return Example(input_ids[:max_seq_len], labels[:max_seq_len], truncated)


def encode_rows(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    fmt: str,
    max_seq_len: int,
    rendering: str = "auto",
) -> TokenizedRows:
    examples = [encode_row(tokenizer, row, fmt, max_seq_len, rendering) for row in rows]
    return TokenizedRows(examples, sum(example.truncated for example in examples))


def generation_prompt(tokenizer: Any, row: Mapping[str, Any], rendering: str = "auto") -> list[int]:
    """The ids an sft row's final completion is generated from: everything before its last graded turn.

    Built from the same segments as :func:`encode_row`, so the prompt tokens are identical to those
    the completion is scored after; under ``chat_template`` they are the template's rendering with a
    generation prompt, which is what the serving front sends the engine for the same messages.
    """
    segments = _segments(tokenizer, row, "sft", rendering)
    last = max(i for i, (_, graded) in enumerate(segments) if graded)
    return [token for ids, _ in segments[:last] for token in ids]


def reference_text(row: Mapping[str, Any], fmt: str) -> str:
    """The text a row grades: the completion, the last assistant turn, the chosen answer, or the text."""
    if fmt == "text":
        return str(row["text"])
    if fmt == "preference":
        return str(row["chosen"])
    if "messages" in row:
        return str(row["messages"][-1]["content"])
    return str(row["completion"])


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled IGNORE_INDEX).

    Right padding keeps each row's positions starting at 0, so a causal LM scores a padded row exactly
    as it scores the row alone.
    """
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[i, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` padded on the left, so every row's generation starts at the end."""
    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            input_ids[i, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask
