"""``run(ctx)`` of the evaluate stage: metrics of a model (and optionally its baseline) plus gates.

Rows are tokenised once with the evaluated model's tokenizer, in the dataset's rendering (the model's
chat template for instruction-tuned models, as training and the endpoint render them), and scored by
each model in turn, so a baseline comparison is made on identical tokens. Scoring is a right-padded
teacher-forced pass in fp32 (``loss``, ``perplexity``, ``token_accuracy`` over graded tokens);
``exact_match`` (the answer equals the reference) and ``contains`` (the reference appears in the answer
as whole words, case-insensitive: a key fact in a free-form chat answer) grade greedy generation from
each sft row's prompt. A comparison is paired: the same bootstrap resamples of the rows for both
models (:mod:`forgeline_operators.lib.intervals`), and a regression gate holds only at the interval's
worst end. Metrics are logged and the report written before gates are checked, so
a failed gate still leaves its numbers in the tracking run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from forgeline.runtime.context import GateFailed, OperatorError, StageContext, StageResult
from forgeline_operators.data import (
    Example,
    encode_rows,
    generation_prompt,
    left_pad,
    pad_token_id,
    reference_text,
    resolve_rendering,
)
from forgeline_operators.lib.intervals import Interval, eval_set_digest, paired_bootstrap
from forgeline_operators.lib.scoring import Scores, batches, score_examples

__all__ = ["run"]


GENERATED = ("exact_match", "contains")  # metrics that grade a greedy answer against the reference


def contains(answer: str, reference: str) -> bool:
    """``reference`` appears in ``answer`` as whole words, case-insensitive ("Paris" in "It is Paris.")."""
    words = reference.strip().split()
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return re.search(pattern, answer, flags=re.IGNORECASE) is not None


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
    for batch in batches(prompts, batch_size):
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
            pairs = list(zip(scores.predictions, references, strict=True))
            scores.row_exact = [p.strip() == r.strip() for p, r in pairs]
            scores.row_contains = [contains(p, r) for p, r in pairs]
    return scores


def _measured(stage: Any) -> list[str]:
    """Requested metrics plus any a gate needs; teacher-forced metrics cost nothing extra."""
    gates = stage.gates
    wanted = list(stage.metrics)
    for metric, threshold in (
        ("perplexity", gates.max_perplexity),
        ("token_accuracy", gates.min_token_accuracy),
        ("exact_match", gates.min_exact_match),
        ("contains", gates.min_contains),
    ):
        if threshold is not None and metric not in wanted:
            wanted.append(metric)
    wanted += [metric for metric in gates.min_improvement or {} if metric not in wanted]
    return wanted


def _fmt(metric: str, value: float) -> str:
    return f"{value:.3f}" if metric == "perplexity" else f"{value:.4f}"


def _ci(low: float, high: float, pct: bool = False) -> str:
    return f"[{low:+.2%}, {high:+.2%}]" if pct else f"[{low:+.4f}, {high:+.4f}]"


def _comparison_failures(stage: Any, intervals: Mapping[str, Interval]) -> list[str]:
    gates = stage.gates
    vs = gates.max_regression_vs
    level = f"{gates.confidence:.0%}"
    failures: list[str] = []
    regressions = [
        f"{m} {_fmt(m, i.value)} vs {vs} {_fmt(m, i.baseline)}: {i.regression:.2%} worse, "
        f"{level} interval of the regression {_ci(i.regression_low, i.regression_high, pct=True)}"
        for m, i in intervals.items()
        # A hair of slack so float noise in an identical model never fails a 0.0 tolerance.
        if i.regression_high > gates.max_regression + 1e-12
    ]
    if regressions:
        failures.append(
            f"gate max_regression_vs={vs} failed: {'; '.join(regressions)} "
            f"(allowed {gates.max_regression:.2%} at the interval's worst end)"
        )
    for metric, floor in (gates.min_improvement or {}).items():
        i = intervals[metric]
        if not i.delta_low > floor:
            failures.append(
                f"gate min_improvement.{metric}={floor:g} failed: {metric} {_fmt(metric, i.value)} vs "
                f"{vs} {_fmt(metric, i.baseline)}, improvement {i.delta:+.4f}, {level} interval "
                f"{_ci(i.delta_low, i.delta_high)} does not lie above {floor:g}"
            )
    return failures


def _gate_failures(stage: Any, metrics: Mapping[str, float], intervals: Mapping[str, Interval]) -> list[str]:
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
        ("contains", gates.min_contains),
    ):
        if threshold is not None and metrics[metric] < threshold:
            failures.append(
                f"gate min_{metric}={threshold:g} failed: "
                f"{metric} {_fmt(metric, metrics[metric])} is below {threshold:g}"
            )
    if gates.max_regression_vs is not None:
        failures += _comparison_failures(stage, intervals)
    return failures


def _check_request(stage: Any, fmt: str, measured: Sequence[str]) -> None:
    generated = [m for m in measured if m in GENERATED]
    if generated and fmt != "sft":
        raise OperatorError(
            f"{' and '.join(generated)} {'needs' if len(generated) == 1 else 'need'} an sft dataset "
            "(a prompt and a reference completion); "
            f"dataset {stage.dataset!r} is {fmt!r}"
        )
    if stage.gates.max_regression_vs is not None and not stage.gates.baseline_ref:
        raise OperatorError(
            f"gates.max_regression_vs={stage.gates.max_regression_vs!r} has no resolved baseline model"
        )


TABLE_COLUMNS = (
    "prompt",
    "reference",
    "prediction",
    "baseline_prediction",
    "exact_match",
    "baseline_exact_match",
    "contains",
    "baseline_contains",
)


def _cell(value: Any) -> Any:
    """A table cell: chat prompts (message lists) as their last user turn, the rest as they are."""
    if isinstance(value, list):
        return value[-1]["content"] if value and isinstance(value[-1], dict) else json.dumps(value)
    return value


def _samples(
    rows: Sequence[Mapping[str, Any]],
    fmt: str,
    references: Sequence[str],
    scores: Scores,
    truncated: list[bool],
    baseline: Scores | None,
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
            # Sums, not only the mean: a later comparison (promotion vs production) recomputes every
            # teacher-forced metric from them on resampled rows (lib.intervals.read_rows).
            "nll": scores.row_nll[i],
            "correct": scores.row_correct[i],
            "loss": scores.row_nll[i] / scores.row_tokens[i] if scores.row_tokens[i] else None,
            "truncated": truncated[i],
        }
        if scores.predictions is not None:
            sample["prediction"] = scores.predictions[i]
            sample["exact_match"] = scores.row_exact[i]
            sample["contains"] = scores.row_contains[i]
        if baseline is not None:
            sample["baseline_loss"] = (
                baseline.row_nll[i] / baseline.row_tokens[i] if baseline.row_tokens[i] else None
            )
            if baseline.predictions is not None:
                sample["baseline_prediction"] = baseline.predictions[i]
                sample["baseline_exact_match"] = baseline.row_exact[i]
                sample["baseline_contains"] = baseline.row_contains[i]
        samples.append(sample)
    return samples


def _eval_set(examples: Sequence[Example], prompts: Sequence[list[int]] | None, stage: Any) -> str:
    """What two evaluations must share to be compared row by row: the scored token ids and graded
    labels (so the rows, their rendering and the tokenizer), the generation prompts and how much is
    generated. Promotion pairs a candidate with production only when these digests are equal."""
    return eval_set_digest(
        [
            [[e.input_ids, e.labels] for e in examples],
            prompts,
            stage.max_new_tokens if prompts is not None else None,
        ]
    )


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
    try:
        # Plain text has one rendering; for the others this is what the stage's params record.
        rendering = "text" if dataset.format == "text" else resolve_rendering(tokenizer, dataset.rendering)
        tokenized = encode_rows(tokenizer, rows, dataset.format, stage.max_seq_len, rendering)
    except ValueError as e:
        raise OperatorError(f"dataset {stage.dataset!r}: {e}") from None
    ctx.log_params({"rendering": rendering})
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
    prompts = (
        [generation_prompt(tokenizer, row, rendering) for row in rows]
        if any(m in GENERATED for m in measured)
        else None
    )

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
        baseline = _evaluate(baseline_dir, tokenizer, examples, prompts, references, stage)
        metrics["baseline_loss"] = baseline.loss
        intervals = paired_bootstrap(
            scores.rows(),
            baseline.rows(),
            list(measured),
            resamples=gates.bootstrap_samples,
            confidence=gates.confidence,
        )
        for metric, i in intervals.items():
            metrics.update(
                {
                    f"baseline_{metric}": i.baseline,
                    f"{metric}_regression": i.regression,
                    f"{metric}_regression_ci_low": i.regression_low,
                    f"{metric}_regression_ci_high": i.regression_high,
                    f"{metric}_delta": i.delta,
                    f"{metric}_delta_ci_low": i.delta_low,
                    f"{metric}_delta_ci_high": i.delta_high,
                }
            )
    else:
        baseline, intervals = None, {}

    ctx.log_metrics(metrics)
    eval_set = _eval_set(examples, prompts, stage)
    ctx.log_params({"eval_set_sha256": eval_set})
    failures = _gate_failures(stage, metrics, intervals)
    report = ctx.output_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    summary = {
        "stage": stage.name,
        "model": stage.model,
        "baseline": gates.max_regression_vs,
        "dataset": {
            "name": dataset.name,
            "format": dataset.format,
            "rendering": rendering,
            "sha256": dataset.sha256,
        },
        "settings": {
            "max_samples": stage.max_samples,
            "batch_size": stage.batch_size,
            "max_seq_len": stage.max_seq_len,
            "max_new_tokens": stage.max_new_tokens,
            "confidence": gates.confidence,
            "bootstrap_samples": gates.bootstrap_samples,
        },
        "eval_set_sha256": eval_set,
        "metrics": metrics,
        "gates": {"passed": not failures, "failures": failures},
    }
    (report / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    truncated = [example.truncated for example in examples]
    samples = _samples(rows, dataset.format, references, scores, truncated, baseline)
    with (report / "samples.jsonl").open("w") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    if scores.predictions is not None:
        # The answers beside the baseline's, readable in the MLflow UI next to the metrics.
        columns = [c for c in TABLE_COLUMNS if c in samples[0]]
        table = {c: [_cell(sample[c]) for sample in samples] for c in columns}
        ctx.log_table(table, f"eval/{stage.name}_answers.json")
    if stage.lm_eval is not None:  # logs its own metrics, writes report/lm_eval.json
        from forgeline_operators.evaluate.harness import run_for_stage

        metrics.update(run_for_stage(ctx, model_dir, report))
    if failures:
        raise GateFailed("; ".join(failures), metrics)
    return StageResult(outputs={"report": report}, metrics=metrics)
