"""The runtime on real Ray and real MLflow (SQLite): caching, exact reruns, early cutoff, failures,
lineage. Operators are the small recording operators of ``tests/opkit.py``; everything else is real."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import opkit
from forgeline.runtime import RunSettings, StageFailed, run_workflow
from forgeline.spec import load_workflow
from forgeline.tracking import TAG_CACHED, TAG_ERROR, TAG_STAGE, TAG_STATE, Tracker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WORKFLOW = """\
name: rt
model: {{base: builtin://tiny-llama}}
data:
  d: {{path: d.jsonl, format: text}}
stages:
  - {{name: a, kind: evaluate, dataset: d, max_samples: 1, metrics: {a_metrics}}}
  - {{name: b, kind: evaluate, dataset: d, model: "${{stages.a.outputs.report}}", max_samples: {b_samples}}}
  - {{name: c, kind: evaluate, dataset: d, max_samples: 3, needs: []}}
  - {{name: d2, kind: evaluate, dataset: d, model: "${{stages.b.outputs.report}}", max_samples: 4}}
{extra}"""


def write(tmp: Path, a_metrics: str = "[perplexity]", b_samples: int = 2, extra: str = "") -> Path:
    (tmp / "d.jsonl").write_text('{"text": "hello world"}\n')
    wf = tmp / "wf.yaml"
    wf.write_text(WORKFLOW.format(a_metrics=a_metrics, b_samples=b_samples, extra=extra))
    return wf


def calls(tmp: Path) -> list[str]:
    log = tmp / "calls.log"
    lines = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return sorted(lines)


def run(wf: Path, home: Path, kinds: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return run_workflow(load_workflow(wf), RunSettings(home=home), registry=opkit.registry(kinds))


def stage_runs(home: Path, run_id: str) -> dict[str, object]:
    tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}")
    parent = tracker.get_run(run_id)
    return {c.data.tags[TAG_STAGE]: c for c in tracker.child_runs(parent.info.experiment_id, run_id)}


def test_cold_run_cached_rerun_and_exact_dependents(tmp_path: Path, home: Path, ray_session: None) -> None:
    wf = write(tmp_path)
    first = run(wf, home)
    assert calls(tmp_path) == ["a", "b", "c", "d2"]
    assert first.state == "FINISHED"
    assert {o.state for o in first.stages.values()} == {"succeeded"}

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    parent = client.get_run(first.run_id)
    assert parent.info.status == "FINISHED"
    children = stage_runs(home, first.run_id)
    assert set(children) == {"a", "b", "c", "d2"}
    b = children["b"]
    # Lineage: b's input digest is a's published report digest; params and metrics are logged.
    a_digest = first.stages["a"].record.output_digest("report")  # type: ignore[union-attr]
    assert b.data.tags["forgeline.input.model.sha256"] == a_digest  # type: ignore[attr-defined]
    assert b.data.params["max_samples"] == "2"  # type: ignore[attr-defined]
    assert b.data.metrics["perplexity"] == 2.0  # type: ignore[attr-defined]
    assert b.info.status == "FINISHED"  # type: ignore[attr-defined]
    artifacts = {f.path for f in client.list_artifacts(first.run_id)}
    assert {"workflow.yaml", "plan.json"} <= artifacts

    # Unchanged rerun: no operator runs, every stage reports cached with its key.
    second = run(wf, home)
    assert calls(tmp_path) == []
    assert {o.state for o in second.stages.values()} == {"cached"}
    assert second.stages["d2"].key == first.stages["d2"].key
    assert stage_runs(home, second.run_id)["a"].data.tags[TAG_CACHED] == "true"  # type: ignore[attr-defined]

    # Change b's params: exactly b and its dependent d2 rerun.
    wf = write(tmp_path, b_samples=7)
    third = run(wf, home)
    assert calls(tmp_path) == ["b", "d2"]
    assert third.stages["a"].state == "cached" and third.stages["c"].state == "cached"


def test_early_cutoff_when_upstream_output_is_identical(
    tmp_path: Path, home: Path, ray_session: None
) -> None:
    run(write(tmp_path), home)
    calls(tmp_path)
    # `metrics` changes a's key, but the test operator's output does not depend on it: a reruns,
    # publishes identical bytes, and b/d2 (keyed by a's content) stay cached.
    summary = run(write(tmp_path, a_metrics="[perplexity, token_accuracy]"), home)
    assert calls(tmp_path) == ["a"]
    assert summary.stages["b"].state == "cached"
    assert summary.stages["d2"].state == "cached"


def test_failed_stage_marks_runs_and_stops_dependents(tmp_path: Path, home: Path, ray_session: None) -> None:
    extra = (
        '  - {name: r, kind: register, model: "${stages.a.outputs.report}", registered_name: x, needs: [c]}\n'
        "  - {name: after, kind: evaluate, dataset: d, max_samples: 9, needs: [r]}\n"
    )
    wf = write(tmp_path, extra=extra)
    with pytest.raises(StageFailed) as info:
        run(wf, home, kinds={"register": "fail"})
    summary = info.value.summary
    assert summary.state == "FAILED"
    assert summary.stages["r"].state == "failed"
    assert "always fails" in (summary.stages["r"].error or "")
    assert summary.stages["after"].state == "skipped"
    assert "after" not in calls(tmp_path)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    assert client.get_run(summary.run_id).info.status == "FAILED"
    children = stage_runs(home, summary.run_id)
    r = children["r"]
    assert r.info.status == "FAILED"  # type: ignore[attr-defined]
    assert "always fails" in r.data.tags[TAG_ERROR]  # type: ignore[attr-defined]
    logs = {f.path for f in client.list_artifacts(r.info.run_id, "logs")}  # type: ignore[attr-defined]
    assert "logs/r.log" in logs and "logs/traceback.txt" in logs
    log_text = Path(client.download_artifacts(r.info.run_id, "logs/r.log", str(tmp_path))).read_text()  # type: ignore[attr-defined]
    assert "progress line printed by a library" in log_text  # stdout is captured too
    assert "always fails" in log_text
    assert children["after"].data.tags[TAG_STATE] == "skipped"  # type: ignore[attr-defined]
    # The stages that finished are kept: a rerun with a fixed operator runs r, after, and only those
    # others the failure stopped before they started (an independent stage such as d2 may or may not
    # have been scheduled before r failed, depending on timing).
    finished = {name for name, s in summary.stages.items() if s.state == "succeeded"}
    assert {"a", "c"} <= finished
    fixed = run(wf, home, kinds={"register": "version"})
    rerun = calls(tmp_path)
    assert {"after", "r"} <= set(rerun) and not set(rerun) & finished, (rerun, finished)
    assert fixed.stages["r"].record.outputs["version"]["value"] == 1  # type: ignore[union-attr]


def test_unschedulable_stage_fails_fast_instead_of_waiting(
    tmp_path: Path, home: Path, ray_session: None
) -> None:
    extra = "  - {name: g, kind: evaluate, dataset: d, max_samples: 5, needs: [], resources: {gpus: 1}}\n"
    with pytest.raises(StageFailed) as info:
        run(write(tmp_path, extra=extra), home)
    failed = info.value.summary.stages["g"]
    assert failed.state == "failed"
    assert "needs 1 GPU but the Ray cluster has" in (failed.error or "")


def test_gc_removes_only_superseded_results(tmp_path: Path, home: Path, ray_session: None) -> None:
    from typer.testing import CliRunner

    from forgeline.artifacts import StageStore
    from forgeline.cli import app

    old = run(write(tmp_path), home)
    new = run(write(tmp_path, b_samples=7), home)  # supersedes b and d2
    superseded = {old.stages["b"].key, old.stages["d2"].key}
    store = StageStore(home / "artifacts")
    runner = CliRunner()
    dry = runner.invoke(app, ["gc", "--keep-days", "0", "--dry-run", "--home", str(home)])
    assert dry.exit_code == 0, dry.output
    assert "would remove 2 stage results" in dry.output
    assert all(store.lookup(k) is not None for k in superseded)  # a dry run removes nothing
    done = runner.invoke(app, ["gc", "--keep-days", "0", "--home", str(home)])
    assert done.exit_code == 0, done.output
    assert all(store.lookup(k) is None for k in superseded)
    assert all(store.lookup(o.key or "") is not None for o in new.stages.values())
    assert calls(tmp_path) and run(write(tmp_path, b_samples=7), home).state == "FINISHED"
    assert calls(tmp_path) == []  # the kept results still serve a cached rerun


def test_stale_external_result_is_rerun_not_reused(tmp_path: Path, home: Path, ray_session: None) -> None:
    """A cached registration whose model version was deleted is redone (the operator's cache_check)."""
    from forgeline.registry import default_registry

    registry = opkit.registry()
    real_register = default_registry().operator("register")
    assert real_register is not None and real_register.cache_check
    registry.add_operator(real_register)
    extra = '  - {name: reg, kind: register, model: "${stages.a.outputs.report}", registered_name: m}\n'
    wf = write(tmp_path, extra=extra)
    loaded = load_workflow(wf)
    first = run_workflow(loaded, RunSettings(home=home), registry=registry)
    assert first.stages["reg"].state == "succeeded"
    assert run_workflow(loaded, RunSettings(home=home), registry=registry).stages["reg"].state == "cached"

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    client.delete_registered_model("m")
    third = run_workflow(loaded, RunSettings(home=home), registry=registry)
    assert third.stages["reg"].state == "succeeded"  # re-registered instead of pointing at nothing
    assert int(client.get_model_version_by_alias("m", "candidate").version) == 1
    tags = stage_runs(home, third.run_id)["reg"].data.tags  # type: ignore[attr-defined]
    assert "no longer exists" in tags["forgeline.stale_cache"]


def test_stages_with_train_workers_run_in_their_own_process(
    tmp_path: Path, home: Path, ray_session: None
) -> None:
    """Stages that start Ray Train workers (or hold GPUs) run in a worker process that exits after them,
    so what they leave behind (the Train controller they own, CUDA memory) goes with it; light stages
    keep reusing warm workers."""
    import shutil
    import time

    from forgeline.artifacts import pid_alive
    from forgeline.registry import Capabilities, OperatorSpec

    root = Path(__file__).resolve().parents[2]
    shutil.copy(root / "workflows" / "data" / "chat_sft.jsonl", tmp_path / "sft.jsonl")
    wf = tmp_path / "wf.yaml"
    wf.write_text(
        "name: iso\nmodel: {base: builtin://tiny-llama}\ndata:\n  d: {path: sft.jsonl, format: sft}\n"
        "stages:\n"
        "  - {name: t1, kind: finetune, method: sft, dataset: d, parallelism: {dp: 2}}\n"
        "  - {name: t2, kind: finetune, method: sft, dataset: d, parallelism: {dp: 2}, needs: [t1]}\n"
    )
    registry = opkit.registry()
    spawns = Capabilities(data_parallel=True, spawns_workers=True)
    registry.add_operator(  # a finetune backend: its kind's resources hook asks for a worker per rank
        OperatorSpec(
            "finetune",
            "opkit:pid_checkpoint",
            "test-1",
            backend="hf",
            capabilities=spawns,
            resources="forgeline_operators.finetune.plan:resources",
        )
    )
    summary = run_workflow(load_workflow(wf), RunSettings(home=home), registry=registry)
    assert summary.state == "FINISHED"
    lines = (tmp_path / "pids.log").read_text().split()
    pids = {name: int(pid) for name, pid in (line.split(":") for line in lines)}
    assert pids["t1"] != pids["t2"], f"two stages with Ray Train workers shared a process: {pids}"
    deadline = time.time() + 30
    while time.time() < deadline and (pid_alive(pids["t1"]) or pid_alive(pids["t2"])):
        time.sleep(0.2)
    assert not pid_alive(pids["t1"]) and not pid_alive(pids["t2"]), "an isolated stage's worker outlived it"
