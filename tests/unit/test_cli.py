"""The command line, in process: validate, schema --check and plan --json (no Ray, no MLflow store)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline.spec import schema_json

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "workflows" / "quickstart-tiny.yaml"
BROKEN = ROOT / "tests" / "data" / "broken"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_validate_a_good_file(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", str(QUICKSTART)])
    assert result.exit_code == 0, result.output
    assert f"{QUICKSTART}: ok (10 stages)" in result.output


def test_validate_a_broken_file_lists_located_problems_without_a_traceback(runner: CliRunner) -> None:
    path = BROKEN / "many_mistakes.yaml"
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    located = [ln for ln in result.output.splitlines() if re.match(rf"{re.escape(str(path))}:\d+:\d+: ", ln)]
    assert len(located) == 7
    assert f"{path}:26:11: stages[2].kind: unknown stage kind 'evalute' (did you mean 'evaluate'?)" in located
    assert "7 problems found" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_validate_several_files_reports_all_of_them(runner: CliRunner) -> None:
    a, b = BROKEN / "ref_self.yaml", BROKEN / "unknown_stage_kind.yaml"
    result = runner.invoke(app, ["validate", str(QUICKSTART), str(a), str(b)])
    assert result.exit_code == 1
    assert f"{QUICKSTART}: ok" in result.output
    assert f"{a}:11:12: " in result.output and f"{b}:9:11: " in result.output
    assert "2 problems found" in result.output


def test_validate_verbose_names_the_exception(runner: CliRunner) -> None:
    result = runner.invoke(app, ["validate", "-v", str(BROKEN / "ref_self.yaml")])
    assert result.exit_code == 1
    assert "forgeline.spec._errors.WorkflowError" in result.output
    assert "1 problem found" in result.output


def test_validate_a_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 1
    assert "cannot read workflow" in result.output and "Traceback" not in result.output


def schema_args(tmp_path: Path, schema: Path) -> list[str]:
    # Both generated files go to tmp_path: the command must never touch the checkout from a test.
    return ["schema", "-o", str(schema), "--reference", str(tmp_path / "reference.md")]


def test_schema_check_on_a_stale_file_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    stale = tmp_path / "schema.json"
    assert runner.invoke(app, schema_args(tmp_path, stale)).exit_code == 0
    stale.write_text(schema_json().replace('"Workflow name', '"An old description of the workflow name'))
    result = runner.invoke(app, [*schema_args(tmp_path, stale), "--check"])
    assert result.exit_code == 1
    assert "stale" in result.output and str(stale) in result.output
    absent = tmp_path / "absent.json"
    assert runner.invoke(app, [*schema_args(tmp_path, absent), "--check"]).exit_code == 1


def test_schema_writes_current_files(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "schema.json"
    assert runner.invoke(app, schema_args(tmp_path, out)).exit_code == 0
    assert out.read_text() == schema_json()
    result = runner.invoke(app, [*schema_args(tmp_path, out), "--check"])
    assert result.exit_code == 0 and "current" in result.output and "stale" not in result.output


def test_plan_json_lists_the_stages_and_creates_no_tracking_store(runner: CliRunner, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--json", "--home", str(home)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["workflow"] == "quickstart-tiny" and data["problems"] == []
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == [
        "eval-base", "sft", "align", "eval-tuned", "quantize", "build", "register", "serve", "deploy",
        "promote",
    ]  # fmt: skip
    assert stages["register"]["deps"] == ["eval-base", "eval-tuned", "build"]
    assert all(s["status"] == "run" for s in stages.values())
    assert stages["eval-base"]["key"] and stages["sft"]["key"]  # roots: known before anything runs
    assert stages["align"]["key"] is None  # known once sft has run (its output is part of the key)
    assert not list(tmp_path.rglob("mlflow.db")), "plan must not create an MLflow database"


def test_plan_table_with_explain(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", str(QUICKSTART), "--explain", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "eval-base" in result.output and "never ran" in result.output
    assert not list(tmp_path.rglob("mlflow.db"))


def test_plan_on_a_broken_file_exits_1_without_a_traceback(runner: CliRunner, tmp_path: Path) -> None:
    path = BROKEN / "cycle_refs.yaml"
    result = runner.invoke(app, ["plan", str(path), "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{path}:8:11: stages[0].name: dependency cycle" in result.output
    assert "Traceback" not in result.output


def test_plan_problems_exit_1_after_the_plan(runner: CliRunner, tmp_path: Path) -> None:
    wf = tmp_path / "wf.yaml"
    data = (ROOT / "workflows" / "data" / "chat_sft.jsonl").resolve()
    wf.write_text(
        "name: demo\n"
        "model: {base: builtin://tiny-llama}\n"
        f"data: {{sft: {{path: {data}, format: sft}}}}\n"
        "stages:\n"
        "  - {name: squeeze, kind: quantize, format: nvfp4}\n"
    )
    result = runner.invoke(app, ["plan", str(wf), "--json", "--home", str(tmp_path / "home")])
    assert result.exit_code == 1
    plan = json.loads(result.stdout)
    assert [s["name"] for s in plan["stages"]] == ["squeeze"]
    # nvfp4 is a GPU-only option of the quantize operator: refused on a CPU workflow, located.
    assert f"{wf}:5:45: stages[0].format: format 'nvfp4' needs CUDA" in result.output
    assert "Traceback" not in result.output


def test_plan_only_and_from_select_stages(runner: CliRunner, tmp_path: Path) -> None:
    home = ["--home", str(tmp_path / "h")]
    result = runner.invoke(
        app, ["plan", str(QUICKSTART), "--json", "--only", "eval-tuned", "--from", "align", *home]
    )
    assert result.exit_code == 0, result.output
    stages = {s["name"]: s for s in json.loads(result.output)["stages"]}
    run = {n for n, s in stages.items() if s["status"] == "run"}
    assert run == {"sft", "align", "eval-tuned"}
    assert {n for n, s in stages.items() if s["forced"]} == {"align", "eval-tuned"}
    assert stages["deploy"]["status"] == "skip" and stages["deploy"]["reasons"] == ["not selected (--only)"]

    bad = runner.invoke(app, ["plan", str(QUICKSTART), "--from", "sfft", *home])
    assert bad.exit_code == 1
    assert (
        "--from sfft: no stage of that name in workflow 'quickstart-tiny' (did you mean 'sft'?)" in bad.output
    )
    assert "Traceback" not in bad.output
