"""lm-evaluation-harness inside the evaluate stage, on real parts: the built-in tiny Llama, the shipped
task file over ``workflows/data/held_out.jsonl``, real Ray and MLflow, and a real tritonserver endpoint
(OpenVINO GenAI at f32 behind the OpenAI front) for lm-eval's ``local-chat-completions`` and
``local-completions`` clients.

The harness and the stage's own ``exact_match`` are defined identically for the shipped task (greedy,
32 new tokens, the model's chat template, prediction and reference compared after ``str.strip``), so
they must agree row by row; tiny-llama answers none of the held-out rows, so a second run grades rows
whose references are partly the model's own answers to get a number that is not 0.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from forgeline.runtime import RunSettings, run_workflow
from forgeline.spec import load_workflow
from forgeline_operators.evaluate.harness import SHIPPED_TASKS, HarnessRequest, run_harness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
HELD_OUT = ROOT / "workflows" / "data" / "held_out.jsonl"
TASK = "forgeline_held_out"
ROWS = 16
SERVED = "tiny"

WORKFLOW = """\
name: lm-eval-{tag}
model: {{base: builtin://tiny-llama}}
data:
  rows: {{path: {data}, format: sft}}
stages:
  - name: eval
    kind: evaluate
    dataset: rows
    metrics: [exact_match]
    max_samples: {rows}
    lm_eval: {lm_eval}
"""


def _run(tmp: Path, home: Path, tag: str, data: Path, lm_eval: dict[str, Any]) -> SimpleNamespace:
    wf = tmp / f"{tag}.yaml"
    wf.write_text(WORKFLOW.format(tag=tag, data=data, rows=ROWS, lm_eval=json.dumps(lm_eval)))
    summary = run_workflow(load_workflow(wf), RunSettings(home=home))
    outcome = summary.stages["eval"]
    assert outcome.state == "succeeded", outcome.error
    assert outcome.record is not None and outcome.run_id is not None
    report = outcome.record.output_path("report")
    assert report is not None
    return SimpleNamespace(
        mlflow=MlflowClient(summary.tracking_uri).get_run(outcome.run_id).data.metrics,
        metrics=json.loads((report / "metrics.json").read_text())["metrics"],
        stage_samples=[json.loads(line) for line in (report / "samples.jsonl").read_text().splitlines()],
        harness=json.loads((report / "lm_eval.json").read_text()),
        harness_samples=[
            json.loads(line) for line in (report / "lm_eval_samples.jsonl").read_text().splitlines()
        ],
    )


def _responses(samples: list[dict[str, Any]]) -> list[str]:
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [s["response"][0] if isinstance(s["response"], list) else s["response"] for s in ordered]


@pytest.fixture(scope="module")
def module_home(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Path:
    home = tmp_path_factory.mktemp("lm-eval") / ".forgeline"
    home.mkdir()
    shutil.copy(mlflow_template, home / "mlflow.db")
    return home


@pytest.fixture(scope="module")
def held_out_run(
    tmp_path_factory: pytest.TempPathFactory, module_home: Path, ray_session: None
) -> SimpleNamespace:
    """The shipped task (default include_path) next to the stage's exact_match on the same 16 rows."""
    return _run(
        tmp_path_factory.mktemp("wf"), module_home, "held", HELD_OUT, {"tasks": [TASK], "limit": ROWS}
    )


def test_stage_logs_harness_metric_and_stderr(held_out_run: SimpleNamespace) -> None:
    run = held_out_run
    value, stderr = run.mlflow[f"{TASK}/exact_match"], run.mlflow[f"{TASK}/exact_match_stderr"]
    assert 0.0 <= value <= 1.0 and stderr >= 0.0
    assert run.harness["metrics"] == {f"{TASK}/exact_match": value, f"{TASK}/exact_match_stderr": stderr}
    assert run.harness["results"][TASK]["exact_match,none"] == value
    assert run.harness["n-samples"][TASK]["effective"] == ROWS
    assert run.harness["chat_template"] is True  # tiny-llama's tokenizer has one
    assert run.harness["model"] == "hf" and run.harness["lm_eval_version"].startswith("0.4.")
    assert run.harness["include_paths"] == [str(SHIPPED_TASKS)]
    assert len(run.harness_samples) == ROWS
    # The prompt the harness generated from is the chat rendering of the row's prompt.
    first = json.loads(HELD_OUT.read_text().splitlines()[0])
    prompt = min(run.harness_samples, key=lambda s: s["doc_id"])["prompt"]
    assert prompt.startswith("<s><|user|>\n" + first["prompt"])


def test_harness_equals_stage_exact_match_row_by_row(held_out_run: SimpleNamespace) -> None:
    run = held_out_run
    stage = [s["prediction"].strip() for s in run.stage_samples]
    harness = [r.strip() for r in _responses(run.harness_samples)]
    assert harness == stage  # same prompts ids, same greedy decoding, same stop
    assert run.mlflow[f"{TASK}/exact_match"] == run.metrics["exact_match"]


def test_nonzero_exact_match_agrees_and_its_stderr_is_the_sample_one(
    held_out_run: SimpleNamespace, tmp_path: Path, module_home: Path
) -> None:
    """Rows whose reference is the model's own answer for every other row: both must say 8/16, and the
    harness's stderr is the sample standard error of a mean, sqrt(p(1-p)·n/(n-1)/n).

    Also: a task directory of the user's, relative to the workflow file, with a relative data file."""
    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines()[:ROWS]]
    for i, sample in enumerate(held_out_run.stage_samples):
        if i % 2 == 0:
            rows[i]["completion"] = sample["prediction"].strip()
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data").mkdir()
    (tasks / "data" / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = (SHIPPED_TASKS / f"{TASK}.yaml").read_text()
    text = text.replace(f"task: {TASK}", "task: mixed").replace("../data/held_out.jsonl", "data/mixed.jsonl")
    (tasks / "mixed.yaml").write_text(text)
    (tmp_path / "mixed.jsonl").write_text((tasks / "data" / "mixed.jsonl").read_text())

    run = _run(
        tmp_path,
        module_home,
        "mixed",
        tmp_path / "mixed.jsonl",
        {"tasks": ["mixed"], "include_path": "tasks"},
    )
    assert run.metrics["exact_match"] == 0.5
    assert run.mlflow["mixed/exact_match"] == 0.5
    n, p = ROWS, 0.5
    assert run.mlflow["mixed/exact_match_stderr"] == pytest.approx(math.sqrt(p * (1 - p) * n / (n - 1) / n))
    assert run.harness["include_paths"] == [str(tasks)]


# ------------------------------------------------------------------------------ against an endpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from forgeline_operators.models.tiny_llama import SOURCE

    d = tmp_path_factory.mktemp("tiny-hf")
    SOURCE.materialize(d)
    return d


@pytest.fixture(scope="module")
def endpoint_url(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[str]:
    from forgeline_operators.deploy.endpoint import start_detached, stop_endpoint
    from forgeline_operators.engines import SchedulerSpec
    from forgeline_operators.engines.openvino import (
        OpenvinoModelSpec,
        build_openvino_repository,
        export_openvino,
    )

    ir = export_openvino(tiny_dir, tmp_path_factory.mktemp("ov") / "ir")
    repository = build_openvino_repository(
        tmp_path_factory.mktemp("repo") / "repo",
        ir,
        OpenvinoModelSpec(name=SERVED, scheduler=SchedulerSpec(max_num_seqs=8)),
    )
    home = tmp_path_factory.mktemp("endpoint-home")
    rec = start_detached(home, repository, "lm-eval", served_name=SERVED)
    try:
        yield rec.url
    finally:
        stop_endpoint(home, "lm-eval")


def _harness(tiny_dir: Path, work: Path, chat: str, endpoint: str | None = None) -> Any:
    request = HarnessRequest(
        tasks=[TASK],
        include_paths=[SHIPPED_TASKS],
        model_dir=tiny_dir,
        endpoint=endpoint,
        limit=ROWS,
        chat=chat,
    )
    return run_harness(request, work)


@pytest.mark.parametrize("chat", ["on", "off"])
def test_endpoint_clients_give_the_in_process_numbers(
    chat: str, endpoint_url: str, tiny_dir: Path, tmp_path: Path
) -> None:
    """local-chat-completions (the endpoint applies the template) and local-completions (plain
    prompts) against the served tiny model: the answers and metrics of HFLM on the same weights."""
    import torch

    torch.set_num_threads(1)
    served = _harness(tiny_dir, tmp_path / "served", chat, endpoint=endpoint_url + "/v1")
    local = _harness(tiny_dir, tmp_path / "local", chat)
    assert served.report["model"] == ("local-chat-completions" if chat == "on" else "local-completions")
    assert served.report["served_model"] == SERVED and served.report["chat_template"] is (chat == "on")
    answers = [r.strip() for r in _responses(served.samples[TASK])]
    assert len(answers) == ROWS and len(set(answers)) >= 4  # real, varied generations
    assert answers == [r.strip() for r in _responses(local.samples[TASK])]
    assert served.metrics == local.metrics
    assert set(served.metrics) == {f"{TASK}/exact_match", f"{TASK}/exact_match_stderr"}


def test_unknown_task_names_the_field_and_the_closest_name(tiny_dir: Path, tmp_path: Path) -> None:
    from forgeline.runtime.context import OperatorError

    with pytest.raises(
        OperatorError,
        match=r"^lm_eval\.tasks: unknown task 'forgeline_held_outt' \(did you mean 'forgeline_held_out'\?\)",
    ):
        run_harness(HarnessRequest(["forgeline_held_outt"], [SHIPPED_TASKS], tiny_dir), tmp_path)
