"""``forgeline run FILE --on kubernetes`` against the real API server: without KubeRay the submission
is refused with what to install; with KubeRay's RayJob CRD (v1.7.0's schema, the one the nemo backend
validates against) the quickstart goes in as a ConfigMap (workflow + datasets at their relative
paths) and a RayJob that passes KubeRay's schema, and submitting again updates the same objects.
Not run here: the KubeRay operator that turns the RayJob into pods."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from typer.testing import CliRunner

from forgeline.cli import app
from forgeline_operators.finetune.nemo.validate import RAYJOB_SCHEMA, validate_rayjob
from forgeline_operators.kube.client import Kube, wait_for

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "workflows" / "quickstart.yaml"


def _drop_empty_defaults(node: object) -> object:
    """This 1.20 server reads ``default: ""`` in a CRD schema as null and rejects it (newer servers do
    not; K1's generator leaves such defaults out for the same reason): drop them from KubeRay's schema,
    and the map-list markers whose keys relied on them (server-side apply then merges those lists
    atomically here)."""
    if isinstance(node, dict):
        out = {k: _drop_empty_defaults(v) for k, v in node.items() if not (k == "default" and v == "")}
        if out.get("x-kubernetes-list-type") == "map":  # its keys need the defaults just dropped
            out.pop("x-kubernetes-list-type")
            out.pop("x-kubernetes-list-map-keys", None)
        return out
    if isinstance(node, list):
        return [_drop_empty_defaults(v) for v in node]
    return node


def _rayjob_crd() -> dict[str, object]:
    schema = _drop_empty_defaults(json.loads(RAYJOB_SCHEMA.read_text())["openAPIV3Schema"])
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "rayjobs.ray.io"},
        "spec": {
            "group": "ray.io",
            "scope": "Namespaced",
            "names": {"plural": "rayjobs", "singular": "rayjob", "kind": "RayJob"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


@pytest.fixture
def kuberay_crd(api_client: client.ApiClient) -> Iterator[None]:
    ext = client.ApiextensionsV1Api(api_client)
    ext.create_custom_resource_definition(_rayjob_crd())
    kube = Kube(api_client)
    wait_for(lambda: kube.has_api("ray.io/v1", "RayJob"), 30, "RayJob CRD served")
    yield
    ext.delete_custom_resource_definition("rayjobs.ray.io")


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
    assert f"submitted RayJob {namespace}/forgeline-quickstart" in first.output  # type: ignore[attr-defined]
    job = kube.get("ray.io/v1", "RayJob", "forgeline-quickstart", namespace)
    assert job is not None
    assert validate_rayjob(job) == []  # as stored, against KubeRay's CRD (strict) and pod schemas
    assert job["spec"]["entrypoint"].startswith("forgeline run /workflows/quickstart.yaml --ray-address auto")
    cm = kube.get("v1", "ConfigMap", "forgeline-quickstart", namespace)
    assert cm is not None
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    items = next(v for v in head["volumes"] if v["name"] == "workflow")["configMap"]["items"]
    paths = {i["path"]: cm["data"][i["key"]] for i in items}
    assert paths["quickstart.yaml"] == QUICKSTART.read_text()
    for rel in ("data/chat_sft.jsonl", "data/held_out.jsonl", "data/prefs.jsonl", "data/corpus_sample.jsonl"):
        assert paths[rel] == (ROOT / "workflows" / rel).read_text(), rel

    again = _submit(namespace)  # server-side apply: the same objects, updated in place
    assert again.exit_code == 0, again.output  # type: ignore[attr-defined]
    job2 = kube.get("ray.io/v1", "RayJob", "forgeline-quickstart", namespace)
    assert job2 is not None and job2["metadata"]["uid"] == job["metadata"]["uid"]
