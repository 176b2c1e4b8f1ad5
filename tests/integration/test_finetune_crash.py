"""``kill -9`` of ``forgeline run`` in the middle of a real fine-tune, then ``resume``: training
continues from the last complete checkpoint (kept beside the stage store, keyed by the stage's cache
key), not from step 0, in the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from forgeline.artifacts import StageStore
from forgeline.runtime import RunSettings, run_workflow
from forgeline.spec import load_workflow
from forgeline.tracking import TAG_ROLE, TAG_STAGE
from forgeline_operators.finetune._checkpoints import COMPLETE_MARKER
from processes import kill_session, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "workflows" / "data"
MAX_STEPS = 300
WORKFLOW = f"""\
name: ft-crash
model: {{base: builtin://tiny-llama}}
data:
  sft: {{path: {DATA}/chat_sft.jsonl, format: sft}}
stages:
  - name: tune
    kind: finetune
    method: lora
    dataset: sft
    lora: {{r: 4, alpha: 8, dropout: 0.0}}
    training: {{max_steps: {MAX_STEPS}, micro_batch_size: 4, max_seq_len: 64, lr: 1.0e-3,
                checkpoint_every_steps: 10, eval_fraction: 0.02}}
"""


def complete_steps(home: Path) -> list[int]:
    root = StageStore(home / "artifacts").stages_dir / ".finetune-checkpoints"
    return sorted(int(m.parent.name.split("-")[1]) for m in root.glob(f"*/checkpoint-*/{COMPLETE_MARKER}"))


def test_kill9_mid_training_then_resume_continues_from_the_checkpoint(
    tmp_path: Path, home: Path, ray_session: None
) -> None:
    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW)
    proc = subprocess.Popen(
        [sys.executable, "-m", "forgeline.cli", "run", str(wf), "--home", str(home)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: bool(complete_steps(home)), "a complete checkpoint", deadline_s=240, proc=proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)
    steps = complete_steps(home)
    assert steps and steps[-1] < MAX_STEPS, steps  # killed mid-training, with a checkpoint on disk
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{TAG_ROLE}` = 'workflow'",
    )
    assert len(runs) == 1 and runs[0].info.status == "RUNNING"
    run_id = runs[0].info.run_id

    summary = run_workflow(load_workflow(wf), RunSettings(home=home), resume_run_id=run_id)
    tune = summary.stages["tune"]
    assert tune.state == "succeeded"
    assert tune.metrics["resumed_from_step"] == steps[-1]
    assert tune.metrics["steps"] == MAX_STEPS
    # One child run holds both attempts: steps up to the kill, then the rest after the checkpoint.
    children = client.search_runs(
        [runs[0].info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'"
    )
    assert [c.data.tags[TAG_STAGE] for c in children] == ["tune"]
    child = children[0].info.run_id
    logged = sorted({m.step for m in client.get_metric_history(child, "loss")})
    every = int(client.get_run(child).data.params["logging_steps"])
    assert logged[0] == 1 and logged[-1] == MAX_STEPS
    assert any(steps[-1] < s <= steps[-1] + every for s in logged)
    log = (home / "logs" / child / "tune.log").read_text()
    assert f"checkpoint-{steps[-1]} (step {steps[-1]})" in log and "resuming from" in log
    assert not complete_steps(home)  # the durable checkpoints moved into the published outputs
    assert tune.record is not None and (tune.record.path / "checkpoint" / COMPLETE_MARKER).is_file()
