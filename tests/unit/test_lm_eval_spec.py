"""The evaluate stage's ``lm_eval:`` block: spec validation with located errors, what it adds to the
DAG and the cache key, and the harness module's pure parts (task-file localization, result
flattening, the user errors raised before lm-eval runs)."""

from __future__ import annotations

import json
import socket
import textwrap
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from forgeline.artifacts import ModelStore, StageStore
from forgeline.plan import Planner
from forgeline.registry import default_registry
from forgeline.runtime.context import OperatorError
from forgeline.spec import LoadedWorkflow, WorkflowError, load_workflow
from forgeline_operators.evaluate import harness
from forgeline_operators.evaluate.spec import EvaluateStage, LmEvalSpec

ROW = json.dumps({"prompt": "Say hi", "completion": "hi"}) + "\n"


def load(tmp_path: Path, stages: str) -> LoadedWorkflow:
    (tmp_path / "rows.jsonl").write_text(ROW)
    text = (
        "name: demo\n"
        "model: {base: builtin://tiny-llama}\n"
        "data:\n"
        "  rows: {path: rows.jsonl, format: sft}\n"
        "stages:\n" + textwrap.indent(textwrap.dedent(stages).strip() + "\n", "  ")
    )
    (tmp_path / "wf.yaml").write_text(text)
    return load_workflow(tmp_path / "wf.yaml")


def problems(tmp_path: Path, stages: str) -> list[tuple[str, str]]:
    with pytest.raises(WorkflowError) as e:
        load(tmp_path, stages)
    return [(p.field, p.message) for p in e.value.problems]


def test_defaults_and_no_extra_refs(tmp_path: Path) -> None:
    loaded = load(
        tmp_path, "- {name: eval, kind: evaluate, dataset: rows, lm_eval: {tasks: [forgeline_held_out]}}"
    )
    stage = loaded.workflow.stages[0]
    assert isinstance(stage, EvaluateStage) and stage.lm_eval is not None
    assert stage.lm_eval == LmEvalSpec(tasks=["forgeline_held_out"])
    assert (stage.lm_eval.chat, stage.lm_eval.num_fewshot, stage.lm_eval.limit) == ("auto", 0, None)
    assert stage.lm_eval.include_path is None and stage.lm_eval.endpoint is None
    assert stage.refs() == {"model": "${model}"}
    assert EvaluateStage(name="e", kind="evaluate", dataset="rows").lm_eval is None


@pytest.mark.parametrize(
    ("lm_eval", "field", "message"),
    [
        ("{tasks: []}", "stages[0].lm_eval.tasks", "at least 1 item"),
        ("{tasks: [a, a]}", "stages[0].lm_eval.tasks", "task names repeat: ['a']"),
        ("{tasks: [' ']}", "stages[0].lm_eval.tasks", "must not be empty"),
        ("{tasks: [a], taks: [b]}", "stages[0].lm_eval.taks", "unknown field 'taks'"),
        ("{tasks: [a], chat: yes}", "stages[0].lm_eval.chat", "'auto', 'on' or 'off'"),
        ("{tasks: [a], limit: 0}", "stages[0].lm_eval.limit", "greater than 0"),
        ("{tasks: [a], num_fewshot: -1}", "stages[0].lm_eval.num_fewshot", "greater than or equal to 0"),
        ("{tasks: [a], endpoint: 'localhost:8000'}", "stages[0].lm_eval.endpoint", "http(s):// base URL"),
        ("{tasks: [a], include_path: 's3://b/tasks'}", "stages[0].lm_eval.include_path", "local directory"),
    ],
)
def test_bad_values_are_located(tmp_path: Path, lm_eval: str, field: str, message: str) -> None:
    found = problems(tmp_path, f"- {{name: eval, kind: evaluate, dataset: rows, lm_eval: {lm_eval}}}")
    assert any(f == field and message in m for f, m in found), found


def test_endpoint_ref_is_a_dependency_and_checked(tmp_path: Path) -> None:
    stages = """
        - {name: serve, kind: serve, model: "${model}"}
        - {name: deploy, kind: deploy, repository: "${stages.serve.outputs.repository}"}
        - name: eval
          kind: evaluate
          dataset: rows
          needs: []
          lm_eval: {tasks: [a], endpoint: "${stages.deploy.outputs.endpoint}"}
    """
    loaded = load(tmp_path, stages)
    assert loaded.workflow.dependencies("eval") == ["deploy"]
    assert loaded.workflow.stages[2].refs()["lm_eval.endpoint"] == "${stages.deploy.outputs.endpoint}"

    found = problems(tmp_path, stages.replace("outputs.endpoint", "outputs.url"))
    assert any(f == "stages[2].lm_eval.endpoint" and "has no output 'url'" in m for f, m in found), found
    found = problems(tmp_path, stages.replace("stages.deploy.", "stages.deplyo."))
    assert ("stages[2].lm_eval.endpoint", "unknown stage 'deplyo'") in found


def test_a_plain_url_endpoint_is_a_param_not_a_ref(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        "- {name: eval, kind: evaluate, dataset: rows, lm_eval: {tasks: [a], endpoint: 'http://127.0.0.1:8321/v1'}}",
    )
    assert loaded.workflow.stages[0].refs() == {"model": "${model}"}


def test_include_path_content_keys_the_cache(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text("task: t\n")
    loaded = load(
        tmp_path, "- {name: eval, kind: evaluate, dataset: rows, lm_eval: {tasks: [t], include_path: tasks}}"
    )
    registry = default_registry()

    def key() -> str | None:
        plan = Planner(
            loaded, registry, ModelStore(tmp_path / "s", registry), StageStore(tmp_path / "s")
        ).build()
        assert not plan.stages[0].problems, plan.stages[0].problems
        return plan.stages[0].key

    before = key()
    (tmp_path / "tasks" / "t.yaml").write_text("task: t\nmetadata: {version: 2}\n")
    assert key() != before


# ------------------------------------------------------------------------------- harness module


def test_localize_makes_relative_data_files_absolute_and_keeps_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "tasks"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.yaml").write_text(
        "task: a\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files: {test: ../rows.jsonl, train: [x.jsonl, /abs/y.jsonl, 'hf://datasets/o/n/z.jsonl']}\n"
        "process_results: !function utils.score\n"
    )
    (src / "b.yaml").write_text("task: b\ndataset_kwargs: {data_files: rows.jsonl}\n")
    (src / "c.yaml").write_text("task: c\ndataset_path: gsm8k\n")
    (src / "sub" / "utils.py").write_text("def score(doc, results):\n    return {}\n")

    out = harness.localize_tasks(src, tmp_path / "out")
    yaml = YAML()
    a = yaml.load((out / "sub" / "a.yaml").read_text())
    assert a["dataset_kwargs"]["data_files"]["test"] == str((src / "rows.jsonl").resolve())
    assert list(a["dataset_kwargs"]["data_files"]["train"]) == [
        str((src / "sub" / "x.jsonl").resolve()),
        "/abs/y.jsonl",
        "hf://datasets/o/n/z.jsonl",
    ]
    assert "!function utils.score" in (out / "sub" / "a.yaml").read_text()
    assert yaml.load((out / "b.yaml").read_text())["dataset_kwargs"]["data_files"] == str(src / "rows.jsonl")
    assert (out / "c.yaml").read_text() == (src / "c.yaml").read_text()
    assert (out / "sub" / "utils.py").is_file()


def test_flatten_keeps_metrics_and_stderrs_only() -> None:
    results = {
        "t": {
            "alias": "t",
            "name": "t",
            "sample_len": 16,
            "exact_match,none": 0.25,
            "exact_match_stderr,none": 0.1118,
            "bleu,none": 3.5,
            "bleu_stderr,none": "N/A",
            "acc,flexible-extract": 0.5,
            "acc_stderr,flexible-extract": 0.05,
        }
    }
    assert harness.flatten_results(results) == {
        "t/exact_match": 0.25,
        "t/exact_match_stderr": 0.1118,
        "t/bleu": 3.5,
        "t/acc.flexible-extract": 0.5,
        "t/acc_stderr.flexible-extract": 0.05,
    }


def test_unreachable_endpoint_names_the_field() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OperatorError, match=r"^lm_eval\.endpoint: http://127\.0\.0\.1:\d+ does not answer"):
        harness._served_model(harness._endpoint_base(f"http://127.0.0.1:{port}/v1/"))


def test_chat_on_without_a_template_names_the_field(tmp_path: Path) -> None:
    class NoTemplate:
        chat_template = None

    request = harness.HarnessRequest(tasks=["t"], include_paths=[], model_dir=tmp_path, chat="on")
    with pytest.raises(OperatorError, match=r"^lm_eval\.chat: on, but the tokenizer .* has no chat template"):
        harness._chat(request, NoTemplate())
    assert harness._chat(harness.HarnessRequest(["t"], [], tmp_path, chat="auto"), NoTemplate()) is False
