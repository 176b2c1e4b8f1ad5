"""lm-evaluation-harness (``lm-eval``) inside the evaluate stage: this module owns everything between
the stage's ``lm_eval:`` block and the harness. It copies each task directory into the stage's work
dir with relative ``dataset_kwargs.data_files`` made absolute (relative to the YAML that names them,
so task files run offline wherever the repository is), indexes those tasks (lm-eval's own ~14k task
files only when a name is not found there), runs ``simple_evaluate`` on the model loaded in-process
(``HFLM`` over the fp32 checkpoint) or against an OpenAI-compatible endpoint (``local-chat-completions``
when prompts are chat-rendered, else ``local-completions``), and flattens the results to
``{task}/{metric}`` and ``{task}/{metric}_stderr`` (a filter other than ``none`` is appended as
``.{filter}``). Prompts use the model's chat template when its tokenizer has one, the project's one
rendering rule (``forgeline_operators.data``). Errors a user can cause name the ``lm_eval.*`` field.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

from forgeline.artifacts import UriError
from forgeline.runtime.context import OperatorError, StageContext
from forgeline.spec import parse_ref
from forgeline_operators.data import resolve_rendering

__all__ = [
    "SHIPPED_TASKS",
    "HarnessRequest",
    "HarnessResult",
    "flatten_results",
    "localize_tasks",
    "run_for_stage",
    "run_harness",
]

# The task files shipped with the repository (a source checkout: workflows/lm_eval).
SHIPPED_TASKS = Path(__file__).resolve().parents[3] / "workflows" / "lm_eval"
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")


@dataclass(frozen=True)
class HarnessRequest:
    """One harness run: tasks from ``include_paths`` on ``model_dir`` or on ``endpoint``."""

    tasks: Sequence[str]
    include_paths: Sequence[Path]
    model_dir: Path  # the weights (in-process) or, with an endpoint, its tokenizer
    endpoint: str | None = None
    limit: int | None = None
    num_fewshot: int = 0
    chat: str = "auto"  # auto | on | off
    batch_size: int = 8


@dataclass
class HarnessResult:
    metrics: dict[str, float]
    samples: dict[str, list[dict[str, Any]]]
    report: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ task files


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str):
        if "://" in value or Path(value).expanduser().is_absolute():
            return value
        return str((base / value).resolve())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, base) for k, v in value.items()}
    return value


def localize_tasks(source: Path, dest: Path) -> Path:
    """Copy the task tree ``source`` to ``dest`` with relative ``data_files`` made absolute.

    lm-eval hands ``data_files`` to ``datasets.load_dataset``, which reads relative paths from the
    current directory; resolving them against each YAML's own directory makes a task directory
    relocatable. The rest of every file (``!function`` tags, ``include:``) is kept as written.
    """
    from ruamel.yaml import YAML

    shutil.copytree(source, dest, ignore=_IGNORED)
    yaml = YAML()  # round-trip: keeps lm-eval's !function tags and comments
    yaml.preserve_quotes = True
    for path in sorted(dest.rglob("*.yaml")):
        try:
            doc = yaml.load(path.read_text())
        except Exception as e:  # ruamel raises many types; the file is lm-eval's to judge
            raise OperatorError(f"lm_eval.include_path: {source / path.relative_to(dest)}: {e}") from None
        kwargs = doc.get("dataset_kwargs") if isinstance(doc, dict) else None
        if not isinstance(kwargs, dict) or "data_files" not in kwargs:
            continue
        origin = (source / path.relative_to(dest)).parent
        kwargs["data_files"] = _absolute(kwargs["data_files"], origin)
        with path.open("w") as f:
            yaml.dump(doc, f)
    return dest


def _task_manager(include: Sequence[Path], tasks: Sequence[str]) -> Any:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        # Indexing lm-eval's own task files takes seconds: only when a name needs them.
        manager = TaskManager(include_path=[str(p) for p in include], include_defaults=True)
        missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        problems = []
        for name in missing:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            problems.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise OperatorError(
            f"lm_eval.tasks: unknown task {', '.join(problems)}; not in lm-eval's tasks nor in "
            f"{', '.join(str(p) for p in include) or 'no include_path'}"
        )
    return manager


# ---------------------------------------------------------------------------------------- models


def _chat(request: HarnessRequest, tokenizer: Any) -> bool:
    if request.chat == "off":
        return False
    try:
        rendering = resolve_rendering(tokenizer, "chat_template" if request.chat == "on" else "auto")
    except ValueError:
        raise OperatorError(
            f"lm_eval.chat: on, but the tokenizer of {request.model_dir} has no chat template"
        ) from None
    return rendering == "chat_template"


def _endpoint_base(url: str) -> str:
    base = url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def _served_model(base: str) -> str:
    """The endpoint's model id (``/v1/models``); also the reachability check."""
    try:
        r = httpx.get(f"{base}/v1/models", timeout=10)
        r.raise_for_status()
        data = r.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        raise OperatorError(
            f"lm_eval.endpoint: {base} does not answer GET /v1/models like an OpenAI-compatible server: {e}"
        ) from None
    if not data:
        raise OperatorError(f"lm_eval.endpoint: {base}/v1/models lists no model")
    return str(data[0]["id"])


def _model(request: HarnessRequest, tokenizer: Any, chat: bool) -> tuple[Any, dict[str, Any]]:
    """The lm-eval model (an ``LM`` or a registry name with its args) and what the report says of it."""
    if request.endpoint is None:
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM

        weights = AutoModelForCausalLM.from_pretrained(str(request.model_dir), dtype=torch.float32).eval()
        lm = HFLM(pretrained=weights, tokenizer=tokenizer, batch_size=request.batch_size, device="cpu")
        return lm, {"model": "hf", "pretrained": str(request.model_dir)}
    base = _endpoint_base(request.endpoint)
    served = _served_model(base)
    common: dict[str, Any] = {"model": served, "num_concurrent": 4, "max_retries": 3, "timeout": 300}
    if chat:
        # The endpoint applies the template: lm-eval sends the conversation as messages.
        name = "local-chat-completions"
        args = {**common, "base_url": f"{base}/v1/chat/completions", "tokenizer_backend": None}
    else:
        # The front takes one text prompt per request (no token ids): untokenized, batch 1.
        name = "local-completions"
        args = {
            **common,
            "base_url": f"{base}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(request.model_dir),
            "tokenized_requests": False,
        }
    return (name, args), {"model": name, "base_url": args["base_url"], "served_model": served}


# --------------------------------------------------------------------------------------- results


def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{task: {"metric,filter": v, "metric_stderr,filter": s}}`` -> ``{"task/metric": v, ...}``."""
    flat: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, sep, filt = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, int | float):
                continue  # alias, name, sample_len; a stderr lm-eval could not compute is "N/A"
            if not math.isfinite(float(value)):
                continue
            suffix = "" if filt == "none" else f".{filt}"
            flat[f"{task}/{metric}{suffix}"] = float(value)
    return flat


def _samples(raw: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for task, rows in raw.items():
        out[task] = [
            {
                "doc_id": row.get("doc_id"),
                "doc": row.get("doc"),
                "target": row.get("target"),
                "prompt": row["arguments"][0][0] if row.get("arguments") else None,
                "response": row.get("filtered_resps"),
                "filter": row.get("filter"),
                **{m: row.get(m) for m in row.get("metrics", [])},
            }
            for row in rows
        ]
    return out


def run_harness(request: HarnessRequest, work_dir: Path) -> HarnessResult:
    """Run the tasks; ``work_dir`` receives the localized task files."""
    from lm_eval import simple_evaluate
    from transformers import AutoTokenizer

    include = []
    for i, source in enumerate(request.include_paths):
        if not source.is_dir():
            raise OperatorError(f"lm_eval.include_path: {source} is not a directory")
        include.append(localize_tasks(source, work_dir / "lm_eval_tasks" / f"{i}-{source.name}"))
    manager = _task_manager(include, request.tasks)
    tokenizer = AutoTokenizer.from_pretrained(str(request.model_dir))
    chat = _chat(request, tokenizer)
    model, described = _model(request, tokenizer, chat)
    name, args = model if isinstance(model, tuple) else (model, None)
    try:
        out = simple_evaluate(
            model=name,
            model_args=args,
            tasks=list(request.tasks),
            num_fewshot=request.num_fewshot,
            limit=request.limit,
            task_manager=manager,
            apply_chat_template=chat,
            log_samples=True,
        )
    except (FileNotFoundError, ValueError) as e:  # a data file a task names, a bad task config
        raise OperatorError(f"lm_eval.tasks: {e}") from None
    if out is None:
        raise OperatorError("lm_eval: the harness returned no results (not rank 0)")
    metrics = flatten_results(out["results"])
    report = {
        "lm_eval_version": version("lm_eval"),
        **described,
        "chat_template": chat,
        "tasks": list(request.tasks),
        "include_paths": [str(p) for p in request.include_paths],
        "limit": request.limit,
        "num_fewshot": request.num_fewshot,
        "metrics": metrics,
        "results": out["results"],
        "n-samples": out.get("n-samples"),
        "versions": out.get("versions"),
        "higher_is_better": out.get("higher_is_better"),
    }
    return HarnessResult(metrics, _samples(out.get("samples", {})), report)


# ------------------------------------------------------------------------------------ the stage


def run_for_stage(ctx: StageContext, model_dir: Path, report_dir: Path) -> dict[str, float]:
    """The evaluate stage's ``lm_eval:`` block: run, log to the stage's run, write the report."""
    spec = ctx.stage.lm_eval
    if spec.include_path is not None:
        try:  # relative to the workflow file, resolved like a local model path
            include = ctx.input_path(spec.include_path)
        except UriError as e:
            raise OperatorError(f"lm_eval.include_path: {e}") from None
    elif SHIPPED_TASKS.is_dir():
        include = SHIPPED_TASKS
    else:
        raise OperatorError(
            f"lm_eval.include_path: not set, and the shipped task directory {SHIPPED_TASKS} is not "
            "here (an installed wheel has no workflows/); set include_path"
        )
    endpoint = spec.endpoint
    if endpoint is not None and parse_ref(endpoint) is not None:
        endpoint = ctx.values(endpoint)
        if not endpoint:
            raise OperatorError(f"lm_eval.endpoint: {spec.endpoint} has no value")
    request = HarnessRequest(
        tasks=spec.tasks,
        include_paths=[include],
        model_dir=model_dir,
        endpoint=str(endpoint) if endpoint is not None else None,
        limit=spec.limit,
        num_fewshot=spec.num_fewshot,
        chat=spec.chat,
        batch_size=ctx.stage.batch_size,
    )
    result = run_harness(request, ctx.work_dir)
    ctx.log_metrics(result.metrics)
    (report_dir / "lm_eval.json").write_text(json.dumps(result.report, indent=2, default=str) + "\n")
    with (report_dir / "lm_eval_samples.jsonl").open("w") as f:
        for task, rows in result.samples.items():
            for row in rows:
                f.write(json.dumps({"task": task, **row}, ensure_ascii=False, default=str) + "\n")
    return result.metrics
