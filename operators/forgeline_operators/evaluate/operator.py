"""``run(ctx)`` of the evaluate stage: metrics of a model (and optionally its baseline) plus gates.

Rows are tokenised once with the evaluated model's tokenizer and scored by each model in turn, so a
baseline comparison is made on identical tokens. Scoring is a right-padded teacher-forced pass in fp32
(``loss``, ``perplexity``, ``token_accuracy`` over graded tokens); ``exact_match`` is greedy generation
from each sft row's prompt. Metrics are logged and the report written before gates are checked, so a
failed gate still leaves its numbers in the tracking run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from forgeline.runtime.context import GateFailed, OperatorError, StageContext, StageResult
from forgeline_operators.data import (
    IGNORE_INDEX,
    Example,
    collate,
    encode_rows,
    generation_prompt,
    left_pad,
    pad_token_id,
    reference_text,
)

__all__ = ["Scores", "run", "score_examples"]

_HIGHER_IS_BETTER = ("token_accuracy", "exact_match")


@dataclass
class Scores:
    """Sums over graded tokens for one model; per-row values feed ``samples.jsonl``."""

    nll: float = 0.0
    tokens: int = 0
    correct: int = 0
    row_nll: list[float] = field(default_factory=list)
    row_tokens: list[int] = field(default_factory=list)
    predictions: list[str] | None = None
    exact: int = 0

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    def metrics(self, references: int) -> dict[str, float]:
        out = {
            "loss": self.loss,
            "perplexity": math.exp(self.loss),
            "token_accuracy": self.correct / self.tokens,
        }
        if self.predictions is not None:
            out["exact_match"] = self.exact / references
        return out


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _load_model(path: Path, vocab_needed: int) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    embeddings = model.get_input_embeddings().num_embeddings
    if vocab_needed > embeddings:
        raise OperatorError(
            f"model at {path} has {embeddings} token embeddings but the tokenizer produced id "
            f"{vocab_needed - 1}: model and tokenizer do not match"
        )
    return model


def score_examples(model: Any, examples: Sequence[Example], batch_size: int, pad_id: int) -> Scores:
    """Teacher-forced NLL and next-token accuracy over graded tokens; also used by quantize gates."""
    scores = Scores()
    for batch in _batches(examples, batch_size):
        enc = collate(batch, pad_id)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
        # Position t predicts token t+1: the transformers causal-LM loss convention.
        logits, labels = logits[:, :-1], enc["labels"][:, 1:]
        graded = labels != IGNORE_INDEX
        nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        correct = (logits.argmax(dim=-1) == labels) & graded
        row_nll = nll.double().sum(dim=1)
        row_tokens = graded.sum(dim=1)
        scores.row_nll += row_nll.tolist()
        scores.row_tokens += row_tokens.tolist()
        scores.nll += float(row_nll.sum())
        scores.tokens += int(row_tokens.sum())
        scores.correct += int(correct.sum())
    return scores


def _generate(
    model: Any, tokenizer: Any, prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int
) -> list[str]:
    eos_ids = {int(tokenizer.eos_token_id)}
    model_eos = model.generation_config.eos_token_id
    eos_ids.update([model_eos] if isinstance(model_eos, int) else model_eos or [])
    pad_id = pad_token_id(tokenizer)
    # An explicit config, so a checkpoint's sampling defaults (temperature, top_p) cannot leak in.
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos_ids)
    )
    predictions: list[str] = []
    for batch in _batches(prompts, batch_size):
        input_ids, attention_mask = left_pad(batch, pad_id)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        for seq in out[:, input_ids.shape[1] :].tolist():
            stop = next((i for i, token in enumerate(seq) if token in eos_ids), len(seq))
            predictions.append(tokenizer.decode(seq[:stop], skip_special_tokens=True))
    return predictions


def _evaluate(
    model_dir: Path,
    tokenizer: Any,
    examples: Sequence[Example],
    prompts: Sequence[list[int]] | None,
    references: Sequence[str],
    stage: Any,
) -> Scores:
    max_id = max(max(example.input_ids) for example in examples)
    model = _load_model(model_dir, max_id + 1)
    with torch.no_grad():
        scores = score_examples(model, examples, stage.batch_size, pad_token_id(tokenizer))
        if prompts is not None:
            scores.predictions = _generate(model, tokenizer, prompts, stage.batch_size, stage.max_new_tokens)
            scores.exact = sum(
                p.strip() == r.strip() for p, r in zip(scores.predictions, references, strict=True)
            )
    return scores


def _measured(stage: Any) -> list[str]:
    """Requested metrics plus any a gate needs; teacher-forced metrics cost nothing extra."""
    gates = stage.gates
    wanted = list(stage.metrics)
    for metric, threshold in (
        ("perplexity", gates.max_perplexity),
        ("token_accuracy", gates.min_token_accuracy),
        ("exact_match", gates.min_exact_match),
    ):
        if threshold is not None and metric not in wanted:
            wanted.append(metric)
    return wanted


def _regression(metric: str, value: float, base: float) -> float:
    """Relative change for the worse (negative when better); 0 when the baseline is 0 accuracy."""
    if metric in _HIGHER_IS_BETTER:
        return (base - value) / base if base > 0 else 0.0
    return (value - base) / base


def _fmt(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric == "perplexity" else f"{value:.4f}"


def _gate_failures(stage: Any, metrics: Mapping[str, float], measured: Sequence[str]) -> list[str]:
    gates = stage.gates
    failures: list[str] = []
    if gates.max_perplexity is not None and metrics["perplexity"] > gates.max_perplexity:
        failures.append(
            f"gate max_perplexity={gates.max_perplexity:g} failed: "
            f"perplexity {_fmt('perplexity', metrics['perplexity'])} is above {gates.max_perplexity:g}"
        )
    for metric, threshold in (
        ("token_accuracy", gates.min_token_accuracy),
        ("exact_match", gates.min_exact_match),
    ):
        if threshold is not None and metrics[metric] < threshold:
            failures.append(
                f"gate min_{metric}={threshold:g} failed: "
                f"{metric} {_fmt(metric, metrics[metric])} is below {threshold:g}"
            )
    if gates.max_regression_vs is not None:
        vs = gates.max_regression_vs
        regressions = [
            f"{metric} {_fmt(metric, metrics[metric])} is {metrics[f'{metric}_regression']:.2%} worse than "
            f"{vs} {_fmt(metric, metrics[f'baseline_{metric}'])}"
            for metric in measured
            # A hair of slack so float noise in an identical model never fails a 0.0 tolerance.
            if metrics[f"{metric}_regression"] > gates.max_regression + 1e-12
        ]
        if regressions:
            failures.append(
                f"gate max_regression_vs={vs} failed: {', '.join(regressions)} "
                f"(allowed {gates.max_regression:.2%})"
            )
    return failures


def _check_request(stage: Any, fmt: str, measured: Sequence[str]) -> None:
    if "exact_match" in measured and fmt != "sft":
        raise OperatorError(
            f"exact_match needs an sft dataset (a prompt and a reference completion); "
            f"dataset {stage.dataset!r} is {fmt!r}"
        )
    if stage.gates.max_regression_vs is not None and not stage.gates.baseline_ref:
        raise OperatorError(
            f"gates.max_regression_vs={stage.gates.max_regression_vs!r} has no resolved baseline model"
        )


def _samples(
    rows: Sequence[Mapping[str, Any]],
    fmt: str,
    references: Sequence[str],
    scores: Scores,
    truncated: list[bool],
) -> list[dict[str, Any]]:
    samples = []
    for i, row in enumerate(rows):
        if fmt == "text":
            prompt: Any = None
        elif "messages" in row:
            prompt = row["messages"][:-1]
        else:
            prompt = row["prompt"]
        sample: dict[str, Any] = {
            "index": i,
            "prompt": prompt,
            "reference": references[i],
            "tokens": scores.row_tokens[i],
            "loss": scores.row_nll[i] / scores.row_tokens[i] if scores.row_tokens[i] else None,
            "truncated": truncated[i],
        }
        if scores.predictions is not None:
            sample["prediction"] = scores.predictions[i]
            sample["exact_match"] = scores.predictions[i].strip() == references[i].strip()
        samples.append(sample)
    return samples


def run(ctx: StageContext) -> StageResult:
    stage = ctx.stage
    gates = stage.gates
    torch.set_num_threads(ctx.threads)
    dataset = ctx.dataset(stage.dataset)
    measured = _measured(stage)
    _check_request(stage, dataset.format, measured)
    rows = ctx.read_rows(stage.dataset)
    if stage.max_samples is not None:
        rows = rows[: stage.max_samples]

    model_dir = ctx.input_path(stage.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenized = encode_rows(tokenizer, rows, dataset.format, stage.max_seq_len)
    examples = tokenized.examples
    if sum(example.graded_tokens for example in examples) == 0:
        raise OperatorError(
            f"nothing to evaluate: none of the {len(rows)} rows has a completion token within "
            f"max_seq_len={stage.max_seq_len} ({tokenized.truncated_rows} truncated)"
        )
    if tokenized.truncated_rows:
        ctx.logger.warning(
            "%d of %d rows exceed max_seq_len=%d; their tails are not scored",
            tokenized.truncated_rows,
            len(rows),
            stage.max_seq_len,
        )
    references = [reference_text(row, dataset.format) for row in rows]
    prompts = [generation_prompt(tokenizer, row) for row in rows] if "exact_match" in measured else None

    scores = _evaluate(model_dir, tokenizer, examples, prompts, references, stage)
    computed = scores.metrics(len(rows))
    metrics: dict[str, float] = {m: computed[m] for m in measured}
    metrics.update(
        loss=scores.loss,
        eval_tokens=float(scores.tokens),
        eval_rows=float(len(rows)),
        truncated_rows=float(tokenized.truncated_rows),
    )
    if gates.max_regression_vs is not None:
        baseline_dir = ctx.input_path(gates.baseline_ref)
        base_tokenizer = AutoTokenizer.from_pretrained(str(baseline_dir))
        if base_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise OperatorError(
                f"cannot compare with {gates.max_regression_vs!r}: its tokenizer differs from the evaluated "
                "model's, so per-token metrics are not comparable"
            )
        base = _evaluate(baseline_dir, tokenizer, examples, prompts, references, stage).metrics(len(rows))
        metrics["baseline_loss"] = base["loss"]
        for metric in measured:
            metrics[f"baseline_{metric}"] = base[metric]
            metrics[f"{metric}_regression"] = _regression(metric, metrics[metric], base[metric])

    ctx.log_metrics(metrics)
    failures = _gate_failures(stage, metrics, measured)
    report = ctx.output_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    summary = {
        "stage": stage.name,
        "model": stage.model,
        "baseline": gates.max_regression_vs,
        "dataset": {"name": dataset.name, "format": dataset.format, "sha256": dataset.sha256},
        "settings": {
            "max_samples": stage.max_samples,
            "batch_size": stage.batch_size,
            "max_seq_len": stage.max_seq_len,
            "max_new_tokens": stage.max_new_tokens,
        },
        "metrics": metrics,
        "gates": {"passed": not failures, "failures": failures},
    }
    (report / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    truncated = [example.truncated for example in examples]
    with (report / "samples.jsonl").open("w") as f:
        for sample in _samples(rows, dataset.format, references, scores, truncated):
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    if failures:
        raise GateFailed("; ".join(failures), metrics)
    return StageResult(outputs={"report": report}, metrics=metrics)
