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
from kubelet import FakeKubelet, KubeletLogs
from kubernetes import client

from forgeline.runtime.context import DatasetInput, MemorySink, OperatorError, StageContext
from forgeline.spec import Workflow
from forgeline_operators.finetune.nemo import operator as nemo_operator
from forgeline_operators.finetune.nemo.validate import validate_rayjob
from forgeline_operators.lib.kube_client import Kube, wait_for

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
            # raw: the hub model's tokenizer is not here to decide `auto`
            "data": {"prefs": {"path": str(PREFS), "format": "preference", "rendering": "raw"}},
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
        datasets={"prefs": DatasetInput("prefs", PREFS, "preference", digest, "raw")},
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


def test_trainer_metrics_are_tailed_from_the_submitter_pod_log(
    kube: Any,
    api_client: client.ApiClient,
    namespace: str,
    kuberay_crd: None,
    fast_poll: None,
    tmp_path: Path,
) -> None:
    """NeMo-RL's per-step output, read through the API server's ``pods/log`` (served by the test's
    kubelet endpoint) while the stage waits, lands in the stage's run at the trainer's steps; lines
    that arrive in two reads, one of them cutting a results block, are each logged once."""
    k = Kube(api_client)
    core = client.CoreV1Api(api_client)
    ctx = _context(tmp_path, namespace)
    lines = (ROOT / "tests" / "data" / "golden" / "nemo" / "nemo_rl_dpo_v0.7.0.log").read_text().splitlines()
    cut = lines.index("  • accuracy: 0.6000")
    pod = "wf-align-submitter"
    with (
        KubeletLogs(core, kube.pki / "apiserver.crt", kube.pki / "apiserver.key") as logs,
        FakeKubelet(api_client, namespace),
    ):

        def act() -> None:
            job = wait_for(lambda: k.get("ray.io/v1", "RayJob", "wf-align", namespace), 60, "the RayJob")
            # KubeRay's submitter: a pod of the Job it names after the RayJob (label job-name).
            core.create_namespaced_pod(
                namespace,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": pod, "labels": {"job-name": "wf-align"}},
                    "spec": {"containers": [{"name": "ray-job-submitter", "image": "rayproject/ray:2.46.0"}]},
                },
            )
            wait_for(
                lambda: core.read_namespaced_pod(pod, namespace).status.phase == "Running" or None,
                30,
                "the submitter pod running",
            )
            logs.add(namespace, pod, lines[:cut])
            wait_for(lambda: len(logs.requests) >= 2 or None, 30, "the stage reading the log")
            logs.add(namespace, pod, lines[cut:])
            shutil.copytree(TINY, tmp_path / "shared" / "out" / "merged")
            k.patch_status(job, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})

        actor = threading.Thread(target=act, daemon=True)
        actor.start()
        result = nemo_operator.run(ctx)
        actor.join(timeout=30)
    sink = ctx.sink
    assert isinstance(sink, MemorySink)
    losses = [(step, m["loss"]) for m, step in sink.metrics if "loss" in m]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert losses[0][1] == pytest.approx(0.65)
    accuracies = [step for m, step in sink.metrics if "rewards/accuracies" in m]
    assert accuracies == [1, 2, 3, 4]  # step 1's block was split across two reads: logged once, whole
    assert [step for m, step in sink.metrics if "eval_loss" in m] == [3]
    assert any(r.startswith(f"/containerLogs/{namespace}/{pod}/") for r in logs.requests)
    assert result.metrics["trainer_metrics_logged"] == sum(len(m) for m, _ in sink.metrics)
