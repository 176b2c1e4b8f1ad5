"""The build stage with ``target: kubernetes`` against the real API server: it applies an ``EngineBuild``,
the build controller (in-process, ``KopfRunner``) creates the Job, and the fake kubelet runs the Job's
real container entrypoint (``engine_job``, with the pod's own arguments) on an HF checkpoint, which
needs no GPU (the LLM-API form); the entrypoint's termination message drives the status the stage
waits on. Also: no cluster configured -> a clear stage error."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubelet import FakeKubelet, Outcome

from forgeline.runtime.context import MemorySink, OperatorError, StageContext
from forgeline_operators.build import engine_job
from forgeline_operators.build.kube_target import ARTIFACTS_ENV, NAMESPACE_ENV
from forgeline_operators.build.operator import run_tensorrt_llm
from forgeline_operators.build.spec import BuildStage

pytestmark = pytest.mark.k8s


def _context(tmp: Path, src: Path, target: str = "kubernetes") -> StageContext:
    stage = BuildStage.model_validate(
        {
            "name": "engine",
            "kind": "build",
            "engine": "tensorrt-llm",
            "from": "${model}",
            "timeout_minutes": 1,
            "tensorrt_llm": {"max_batch_size": 8, "version": "1.2", "gpu_arch": "sm_90"},
        }
    )
    out, work = tmp / "stage-out", tmp / "stage-work"
    out.mkdir()
    work.mkdir()
    workflow = SimpleNamespace(name="wf", target=target)
    return StageContext(stage, workflow, out, work, MemorySink(), lambda ref: src, lambda ref: None, {})


def _checkpoint(root: Path) -> Path:
    ckpt = root / "checkpoints" / "tiny"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    (ckpt / "model.safetensors").write_bytes(b"weights")
    return ckpt


def _run_entrypoint(tmp: Path) -> Any:
    """What the build pod does: the entrypoint with the Job's arguments, its termination message read back."""

    def decide(pod: Any) -> Outcome:
        log = tmp / f"{pod.metadata.name}.termination-log"
        code = engine_job.main([*pod.spec.containers[0].args, "--termination-log", str(log)])
        return Outcome("Succeeded" if code == 0 else "Failed", message=log.read_text(), exit_code=code)

    return decide


def test_build_stage_applies_engine_build_and_waits(
    api_client: Any, crds: list[str], namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    artifacts = tmp_path / "artifacts"
    src = _checkpoint(artifacts)
    monkeypatch.setenv(ARTIFACTS_ENV, str(artifacts))
    monkeypatch.setenv(NAMESPACE_ENV, namespace)
    ctx = _context(tmp_path, src)
    args = ["run", "--standalone", "--namespace", namespace, "-m", "forgeline_operators.build.controller"]
    with (
        KopfRunner(args, timeout=60) as runner,
        FakeKubelet(api_client, namespace, _run_entrypoint(tmp_path)) as k,
    ):
        result = run_tensorrt_llm(ctx)
    assert runner.exception is None and not k.errors, (runner.output[-2000:], k.errors)
    assert [o.phase for o in k.settled.values()] == ["Succeeded"]
    tags = ctx.sink.tags  # type: ignore[attr-defined]
    assert tags["forgeline.build.engine_build"] == f"{namespace}/wf-engine"
    assert tags["forgeline.build.form"] == "llm-api" and len(tags["forgeline.build.engine_sha256"]) == 64
    assert result.outputs["artifact"] == ctx.output_dir / "artifact"
    assert (ctx.output_dir / "artifact" / "extra_llm_api_options.yaml").is_file()
    # The entrypoint really published the profile on the "shared volume", where the status points.
    published = list((artifacts / "engines" / "wf").iterdir())
    assert len(published) == 1 and (published[0] / "build_spec.json").is_file()


def test_no_cluster_is_a_clear_stage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    artifacts = tmp_path / "artifacts"
    src = _checkpoint(artifacts)
    monkeypatch.setenv(ARTIFACTS_ENV, str(artifacts))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(OperatorError, match=r"no Kubernetes cluster configured.*set KUBECONFIG"):
        run_tensorrt_llm(_context(tmp_path, src))


def test_checkpoint_off_the_artifact_volume_is_a_clear_stage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _checkpoint(tmp_path / "local")
    monkeypatch.setenv(ARTIFACTS_ENV, str(tmp_path / "artifacts"))
    with pytest.raises(OperatorError, match="is not on it: run the workflow on the cluster"):
        run_tensorrt_llm(_context(tmp_path, src))
