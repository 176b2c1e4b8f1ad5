"""The nemo backend on ``target: kubernetes`` against the real API server: the DPO stage (NeMo-RL, a
KubeRay RayJob) applies its validated RayJob into the namespace, waits on the RayJob's status, and reads
the trainer's HF checkpoint back from the shared directory; a failed RayJob fails the stage with
KubeRay's message. KubeRay's CRD is installed; the test plays the KubeRay operator and the NeMo
container (it writes the status and a checkpoint): neither runs here (no container runtime, no GPU)."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from forgeline.runtime.context import DatasetInput, MemorySink, OperatorError, StageContext
from forgeline.spec import Workflow
from forgeline_operators.finetune.nemo import operator as nemo_operator
from forgeline_operators.finetune.nemo.validate import validate_rayjob
from forgeline_operators.kube.client import Kube, wait_for

ROOT = Path(__file__).resolve().parents[2]
PREFS = ROOT / "workflows" / "data" / "prefs.jsonl"
TINY = ROOT / "operators" / "forgeline_operators" / "models" / "tiny_llama"


def _context(tmp_path: Path, namespace: str) -> StageContext:
    stage = {
        "name": "align",
        "kind": "finetune",
        "backend": "nemo",
        "method": "dpo",
        "dataset": "prefs",
        "training": {"precision": "bf16"},
        "timeout_minutes": 2,  # the wait's deadline: a broken test fails instead of polling for days
        "nemo": {"shared_dir": str(tmp_path / "shared"), "namespace": namespace},
    }
    wf = Workflow.model_validate(
        {
            "name": "wf",
            "target": "kubernetes",
            "model": {"base": "hf://meta-llama/Meta-Llama-3-8B"},
            "data": {"prefs": {"path": str(PREFS), "format": "preference"}},
            "stages": [stage],
        }
    )
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    digest = hashlib.sha256(PREFS.read_bytes()).hexdigest()
    return StageContext(
        stage=wf.stages[0],
        workflow=wf,
        output_dir=out,
        work_dir=work,
        sink=MemorySink(),
        resolve=lambda ref: tmp_path / "unused",
        values=lambda ref: None,
        datasets={"prefs": DatasetInput("prefs", PREFS, "preference", digest)},
    )


def _play_kuberay(
    kube: Kube, namespace: str, status: dict[str, Any], checkpoint: Path | None
) -> threading.Thread:
    """Wait for the RayJob, then do what the trainer and KubeRay would: write the checkpoint, set status."""
    seen: list[dict[str, Any]] = []

    def act() -> None:
        job = wait_for(lambda: kube.get("ray.io/v1", "RayJob", "wf-align", namespace), 60, "the RayJob")
        seen.append(job)
        if checkpoint is not None:
            shutil.copytree(TINY, checkpoint)
        kube.patch_status(job, status)

    thread = threading.Thread(target=act, daemon=True)
    thread.seen = seen  # type: ignore[attr-defined]
    thread.start()
    return thread


@pytest.fixture
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nemo_operator, "POLL_S", 0.2)


def test_dpo_rayjob_applied_waited_and_checkpoint_read_back(
    api_client: client.ApiClient, namespace: str, kuberay_crd: None, fast_poll: None, tmp_path: Path
) -> None:
    kube = Kube(api_client)
    ctx = _context(tmp_path, namespace)
    done = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    actor = _play_kuberay(kube, namespace, done, tmp_path / "shared" / "out" / "merged")
    result = nemo_operator.run(ctx)
    actor.join(timeout=30)
    stored = actor.seen[0]  # type: ignore[attr-defined]
    assert validate_rayjob(stored) == []  # as the server stored it, against KubeRay's schema
    head = stored["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"].startswith("nvcr.io/nvidia/nemo")  # the trainer's image, not Forgeline's
    merged = Path(str(result.outputs["merged"]))
    assert (merged / "config.json").read_text() == (TINY / "config.json").read_text()


def test_failed_rayjob_fails_the_stage_with_kuberays_message(
    api_client: client.ApiClient, namespace: str, kuberay_crd: None, fast_poll: None, tmp_path: Path
) -> None:
    kube = Kube(api_client)
    ctx = _context(tmp_path, namespace)
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "OOMKilled on rank 3"}
    actor = _play_kuberay(kube, namespace, failed, None)
    with pytest.raises(OperatorError, match="RayJob ended FAILED: OOMKilled on rank 3"):
        nemo_operator.run(ctx)
    actor.join(timeout=30)
