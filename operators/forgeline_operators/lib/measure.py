"""What distill and prune report about a model: parameters, bytes on disk, held-out loss and KL.

Loss is the evaluate operator's teacher-forced NLL over graded tokens (same tokenisation, same
numbers an evaluate stage reports); KL is KL(teacher || student) of next-token distributions at
temperature 1 over the same graded positions, averaged per token: the distance distillation shrinks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from forgeline_operators.data import IGNORE_INDEX, Example, collate
from forgeline_operators.lib.scoring import score_examples

__all__ = ["EVAL_BATCH", "held_out_kl", "held_out_loss", "parameters", "perplexity", "weight_bytes"]

EVAL_BATCH = 8


def parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709; a loss that high means "useless"


def held_out_loss(model: Any, examples: Sequence[Example], pad_id: int) -> float:
    with torch.no_grad():
        return float(score_examples(model, examples, EVAL_BATCH, pad_id).loss)


def kl_per_position(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of softmax(logits / T) at each position (last dim is the vocabulary)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(dim=-1)


def held_out_kl(student: Any, teacher: Any, examples: Sequence[Example], pad_id: int) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), EVAL_BATCH):
            enc = collate(examples[start : start + EVAL_BATCH], pad_id)
            graded = enc["labels"][:, 1:] != IGNORE_INDEX
            kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            kl = kl_per_position(student(**kwargs).logits[:, :-1], teacher(**kwargs).logits[:, :-1], 1.0)
            total += float(kl[graded].double().sum())
            tokens += int(graded.sum())
    return total / max(tokens, 1)
