"""``forgeline render`` on the shipped Kubernetes examples, and the ``k8s/`` tree (kustomize overlays,
RBAC, KubeRay templates): every output document validated offline against its real schema."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline_operators.kube import kuberay
from forgeline_operators.kube.validate import validate_manifests

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = ROOT / ".venv" / "bin" / "kubectl"
EXAMPLES = sorted((ROOT / "workflows" / "examples").glob("*-k8s.yaml"))


def _docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return [d["kind"] for d in docs]


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} == {"llama3-8b-lora-k8s.yaml", "nim-k8s.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_render_example_output_validates_strict(path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["render", str(path), "--on", "kubernetes", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (written,) = tmp_path.glob("*.yaml")
    text = written.read_text()
    docs = _docs(text)
    assert validate_manifests(docs) == []
    assert _kinds(docs)[-2:] == ["ConfigMap", "RayJob"]  # --on kubernetes: the whole workflow
    # Mounted from workflows/ (the examples read ../data/*.jsonl): relative paths still hold.
    assert docs[-1]["spec"]["entrypoint"].startswith(f"forgeline run /workflows/examples/{path.name}")
    assert "data__chat_sft.jsonl" in docs[-2]["data"]
    if path.name == "nim-k8s.yaml":
        assert _kinds(docs)[:5] == ["RayJob", "ModelEndpoint", "NIMService", "Service", "HTTPRoute"]
        env = {e["name"]: e["value"] for e in docs[2]["spec"]["env"]}
        # The NeMo stage's merged model, on the artifact PVC the NIM operator mounts at /model-store.
        assert env == {"NIM_MODEL_PATH": "/model-store/home/outputs/nim-k8s/sft/merged"}
        assert docs[2]["spec"]["storage"]["pvc"] == {"name": "forgeline-artifacts", "create": False}
    else:
        assert _kinds(docs)[:3] == ["RayJob", "EngineBuild", "Job"]
        assert {
            "ModelEndpoint",
            "Deployment",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "HTTPRoute",
        } <= set(_kinds(docs))
        endpoint = next(d for d in docs if d["kind"] == "ModelEndpoint")
        assert endpoint["spec"]["rollout"]["steps"] == [10, 50, 100]
        assert endpoint["spec"]["rollout"]["stepIntervalSeconds"] == 300
        # The serve stage's output does not exist yet: a placeholder under the artifact root, said so.
        uri = "pvc://forgeline-artifacts/home/outputs/llama3-8b-lora-k8s/serve/repository"
        assert endpoint["spec"]["model"]["uri"] == uri
        assert (
            f"# placeholder: ${{stages.serve.outputs.repository}} is not produced yet; rendered as {uri}"
            in text
        )


def test_render_prints_to_stdout_and_reports_errors_with_the_fix(tmp_path: Path) -> None:
    runner = CliRunner()
    nim = (ROOT / "workflows" / "examples" / "nim-k8s.yaml").read_text()
    nim = nim.replace("../data/", f"{ROOT / 'workflows' / 'data'}/")  # the copies live in tmp_path
    printed = runner.invoke(app, ["render", str(ROOT / "workflows" / "examples" / "nim-k8s.yaml")])
    assert (
        printed.exit_code == 0
        and "kind: NIMService" in printed.stdout
        and "kind: ConfigMap" not in printed.stdout
    )
    broken = tmp_path / "nim-k8s.yaml"
    broken.write_text(nim.replace("      image: nvcr.io/nim/meta/llama-3.1-8b-instruct:2.0.13\n", ""))
    result = runner.invoke(app, ["render", str(broken)])
    assert result.exit_code == 1 and "kubernetes.image" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["render", str(ROOT / "workflows" / "quickstart-tiny.yaml")])  # all local
    assert result.exit_code == 1 and "nothing to render" in result.output


@pytest.mark.parametrize("overlay", ["dev", "gpu-cluster"])
def test_kustomize_overlays_build_and_validate(overlay: str) -> None:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    docs = _docs(out)
    assert validate_manifests(docs) == []
    kinds = _kinds(docs)
    assert kinds.count("CustomResourceDefinition") == 2
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Namespace"} <= set(kinds)
    operator = next(d for d in docs if d["kind"] == "Deployment")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "forgeline_operators.kube.operator"]
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == "forgeline-operator"


def test_cluster_role_covers_every_kind_the_controllers_write() -> None:
    role = yaml.safe_load((ROOT / "k8s" / "rbac" / "cluster-role.yaml").read_text())
    granted = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    for group, resource in [
        ("apps", "deployments"),
        ("", "services"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("policy", "poddisruptionbudgets"),
        ("apps.nvidia.com", "nimservices"),
        ("gateway.networking.k8s.io", "httproutes"),
    ]:
        assert {"get", "list", "create", "patch", "delete"} <= granted[(group, resource)], resource
    assert {"create", "patch"} <= granted[("batch", "jobs")]
    assert {"get", "patch"} <= granted[("forgeline.dev", "modelendpoints/status")]
    assert {"watch", "patch"} <= granted[("forgeline.dev", "enginebuilds")]
    assert granted[("", "events")] == {"create"}
    assert ("coordination.k8s.io", "leases") not in granted  # standalone kopf: no peering


def test_kuberay_templates_are_the_builders_output_and_validate() -> None:
    cluster = _docs((ROOT / "k8s" / "kuberay" / "raycluster.yaml").read_text())
    assert cluster == [kuberay.ray_cluster("forgeline", "forgeline-system")]
    job = _docs((ROOT / "k8s" / "kuberay" / "rayjob-workflow.yaml").read_text())
    assert job[1] == kuberay.workflow_rayjob(
        "forgeline-workflow-x", "forgeline-system", "x.yaml", configmap="forgeline-workflow-x"
    )
    assert validate_manifests(cluster + job) == []
    broken = yaml.safe_load(yaml.safe_dump(job[1]))
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolice"
    ] = "x"
    assert any("imagePullPolice" in p for p in validate_manifests([broken]))


def test_schema_check_fails_on_a_stale_crd(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "schema",
        "-o",
        str(tmp_path / "s.json"),
        "--reference",
        str(tmp_path / "r.md"),
        "--crds",
        str(tmp_path),
    ]
    assert runner.invoke(app, args).exit_code == 0
    crd = tmp_path / "modelendpoints.forgeline.dev.yaml"
    assert crd.read_text() == (ROOT / "k8s" / "crds" / crd.name).read_text()
    assert runner.invoke(app, [*args, "--check"]).exit_code == 0
    crd.write_text(crd.read_text().replace("shortNames:\n    - me", "shortNames:\n    - mep"))
    result = runner.invoke(app, [*args, "--check"])
    assert result.exit_code == 1 and str(crd) in result.output


@pytest.mark.parametrize("name", ["llama3-70b-lora-tp4pp2.yaml", "llama3-8b-fp8-trtllm.yaml"])
def test_render_other_gpu_examples(name: str) -> None:
    result = CliRunner().invoke(app, ["render", str(ROOT / "workflows" / "examples" / name)])
    assert result.exit_code == 0, result.output
    docs = _docs(result.stdout)
    assert validate_manifests(docs) == []
    expected = ["RayJob"] if name.startswith("llama3-70b") else ["EngineBuild", "Job", "EngineBuild", "Job"]
    assert _kinds(docs) == expected
