"""``forgeline run FILE --on kubernetes`` against the real API server: without KubeRay the submission
is refused with what to install; with KubeRay's RayJob CRD (v1.7.0's schema, the one the nemo backend
validates against) the quickstart goes in as a ConfigMap (workflow + datasets at their relative
paths) and a RayJob that passes KubeRay's schema, and submitting again updates the same objects.
Not run here: the KubeRay operator that turns the RayJob into pods."""

from __future__ import annotations

from pathlib import Path

from kubernetes import client
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline_operators.finetune.nemo.validate import validate_rayjob
from forgeline_operators.lib.kube_client import Kube

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "workflows" / "quickstart-tiny.yaml"


def _submit(namespace: str) -> object:
    return CliRunner().invoke(app, ["run", str(QUICKSTART), "--on", "kubernetes", "--namespace", namespace])


def test_submission_without_kuberay_says_what_to_install(namespace: str) -> None:
    result = _submit(namespace)
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert "no KubeRay" in result.output and "kuberay-operator" in result.output  # type: ignore[attr-defined]


def test_quickstart_submitted_as_rayjob(
    api_client: client.ApiClient, namespace: str, kuberay_crd: None
) -> None:
    kube = Kube(api_client)
    first = _submit(namespace)
    assert first.exit_code == 0, first.output  # type: ignore[attr-defined]
    assert f"submitted RayJob {namespace}/forgeline-quickstart-tiny" in first.output  # type: ignore[attr-defined]
    job = kube.get("ray.io/v1", "RayJob", "forgeline-quickstart-tiny", namespace)
    assert job is not None
    assert validate_rayjob(job) == []  # as stored, against KubeRay's CRD (strict) and pod schemas
    assert job["spec"]["entrypoint"].startswith(
        "forgeline run /workflows/quickstart-tiny.yaml --ray-address auto"
    )
    cm = kube.get("v1", "ConfigMap", "forgeline-quickstart-tiny", namespace)
    assert cm is not None
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    items = next(v for v in head["volumes"] if v["name"] == "workflow")["configMap"]["items"]
    paths = {i["path"]: cm["data"][i["key"]] for i in items}
    assert paths["quickstart-tiny.yaml"] == QUICKSTART.read_text()
    for rel in ("data/chat_sft.jsonl", "data/held_out.jsonl", "data/prefs.jsonl", "data/corpus_sample.jsonl"):
        assert paths[rel] == (ROOT / "workflows" / rel).read_text(), rel

    again = _submit(namespace)  # server-side apply: the same objects, updated in place
    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    job2 = kube.get("ray.io/v1", "RayJob", "forgeline-quickstart-tiny", namespace)
    assert job2 is not None and job2["metadata"]["uid"] == job["metadata"]["uid"]
