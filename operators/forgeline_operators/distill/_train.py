"""The distillation objective and its training loop (student learns from a frozen teacher).

Loss per graded token (the tokens :mod:`forgeline_operators.data` labels: what sft trains on)::

    kl_weight * T² * KL(softmax(teacher/T) || softmax(student/T)) + hard_label_weight * CE(student, labels)

The T² factor (Hinton et al., 2015) keeps the soft-target gradients on the scale of the hard-label
ones when T changes. The loop is a plain AdamW loop rather than a ``transformers.Trainer`` subclass:
the Trainer's ``compute_loss_func`` hook sees only the student's outputs, not the batch the teacher
must also score, and a loop this size is easier to read than an overridden Trainer. It uses the
optimiser settings of ``training:`` (lr, scheduler, warmup, weight decay, micro-batch, grad
accumulation, epochs / max_steps, seed) the way the finetune stage does, with the Trainer's default
gradient clipping (max norm 1.0). It does not checkpoint mid-run: a killed distill stage restarts.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from forgeline.runtime.context import MetricSink
from forgeline_operators.data import IGNORE_INDEX, Example, collate
from forgeline_operators.lib.measure import kl_per_position

__all__ = ["DistillOutcome", "distill_loss", "steps_for", "train"]

MAX_GRAD_NORM = 1.0
_MAX_LOG_POINTS = 50


@dataclass
class DistillOutcome:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    tokens_per_second: float = 0.0


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    kl_weight: float,
    hard_label_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) averaged over graded positions; logits are ``[batch, seq, vocab]`` unshifted."""
    s, t, y = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    graded = y != IGNORE_INDEX
    kl = kl_per_position(s, t, temperature)[graded].mean()
    ce = F.cross_entropy(s.float().transpose(1, 2), y, ignore_index=IGNORE_INDEX)
    loss = kl_weight * temperature**2 * kl + hard_label_weight * ce
    return loss, kl.detach(), ce.detach()


def steps_for(training: Any, train_rows: int) -> int:
    """Optimizer steps, counted as the finetune stage counts them (dp = 1)."""
    per_epoch = max(1, math.ceil(math.ceil(train_rows / training.micro_batch_size) / training.grad_accum))
    return int(training.max_steps or max(1, math.ceil(training.epochs * per_epoch)))


def _batches(examples: Sequence[Example], size: int, seed: int) -> Any:
    """Micro-batches forever, reshuffled each epoch (seeded, so runs repeat exactly)."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            yield [examples[i] for i in order[start : start + size]]


def train(
    student: Any,
    teacher: Any,
    examples: Sequence[Example],
    pad_id: int,
    spec: Any,
    training: Any,
    sink: MetricSink | None,
) -> DistillOutcome:
    """Train ``student`` in place on ``examples``; the teacher stays frozen in eval mode."""
    from transformers import get_scheduler

    torch.manual_seed(training.seed)
    total = steps_for(training, len(examples))
    teacher.eval()
    teacher.requires_grad_(False)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    scheduler = get_scheduler(
        training.lr_scheduler,
        optimizer,
        num_warmup_steps=int(training.warmup_ratio * total),
        num_training_steps=total,
    )
    batches = _batches(examples, training.micro_batch_size, training.seed)
    every = max(1, total // _MAX_LOG_POINTS)
    outcome = DistillOutcome(steps=total)
    tokens, started = 0, time.perf_counter()
    for step in range(1, total + 1):
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
        for _ in range(training.grad_accum):
            enc = collate(next(batches), pad_id)
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits
            loss, kl, ce = distill_loss(
                student(**inputs).logits,
                teacher_logits,
                enc["labels"],
                temperature=spec.temperature,
                kl_weight=spec.kl_weight,
                hard_label_weight=spec.hard_label_weight,
            )
            (loss / training.grad_accum).backward()
            for key, value in (("loss", loss), ("kl", kl), ("ce", ce)):
                sums[key] += float(value.detach()) / training.grad_accum
            tokens += int(enc["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(student.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % every == 0 or step == total:
            metrics = {**sums, "learning_rate": float(scheduler.get_last_lr()[0])}
            outcome.history.append({**metrics, "step": float(step)})
            if sink is not None:
                sink.log_metrics(metrics, step=step)
    outcome.tokens_per_second = tokens / max(time.perf_counter() - started, 1e-9)
    student.eval()
    return outcome
