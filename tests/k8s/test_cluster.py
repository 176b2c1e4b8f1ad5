"""Server facts the operators rely on, checked against the real control plane: CRDs accepted, a bad
spec rejected with 422 naming the field, the status subresource, server-side apply with a field
manager and conflicts, owner-reference garbage collection, and a fixture that leaves no process."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kube_cluster import Cluster, group_alive, require_binaries
from kubernetes import client, dynamic

pytestmark = pytest.mark.k8s
EB = {"group": "forgeline.dev", "version": "v1alpha1", "plural": "enginebuilds"}


def _eb(name: str, ns: str, **spec: Any) -> dict[str, Any]:
    base = {
        "engine": "tensorrt-llm",
        "checkpoint": {"path": "/artifacts/ckpt", "sha256": "ab" * 32},
        "tensorrtLLM": {"tp": 1, "pp": 1},
        "cacheKey": "c0ffee" * 4,
        "output": {"path": "/artifacts/engine"},
        "image": "nvcr.io/nvidia/tensorrt-llm/release:1.2.0",
        "gpus": 1,
    }
    return {
        "apiVersion": "forgeline.dev/v1alpha1",
        "kind": "EngineBuild",
        "metadata": {"name": name, "namespace": ns},
        "spec": {**base, **spec},
    }


def _until(pred: Any, what: str, deadline_s: float = 30) -> Any:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {deadline_s} s: {what}")


def test_crd_accepted_with_status_subresource(
    api_client: client.ApiClient, crds: list[str], namespace: str
) -> None:
    assert "enginebuilds.forgeline.dev" in crds
    co = client.CustomObjectsApi(api_client)
    made = co.create_namespaced_custom_object(**EB, namespace=namespace, body=_eb("a", namespace))
    assert made["metadata"]["generation"] == 1
    # Status goes through its own subresource: it does not bump generation, spec writes ignore it.
    co.patch_namespaced_custom_object_status(
        **EB, namespace=namespace, name="a", body={"status": {"phase": "Running", "observedGeneration": 1}}
    )
    got = co.get_namespaced_custom_object(**EB, namespace=namespace, name="a")
    assert got["status"]["phase"] == "Running" and got["metadata"]["generation"] == 1
    co.patch_namespaced_custom_object(
        **EB, namespace=namespace, name="a", body={"spec": {"gpus": 2}, "status": {"phase": "Succeeded"}}
    )
    got = co.get_namespaced_custom_object(**EB, namespace=namespace, name="a")
    assert got["status"]["phase"] == "Running", "a spec write must not change status"
    assert got["metadata"]["generation"] == 2 and got["spec"]["gpus"] == 2


def test_bad_spec_rejected_with_field_paths(
    api_client: client.ApiClient, crds: list[str], namespace: str
) -> None:
    co = client.CustomObjectsApi(api_client)
    body = _eb("bad", namespace, gpus="two")
    del body["spec"]["cacheKey"]
    with pytest.raises(client.ApiException) as e:
        co.create_namespaced_custom_object(**EB, namespace=namespace, body=body)
    assert e.value.status == 422
    assert "spec.gpus" in e.value.body and "spec.cacheKey" in e.value.body, e.value.body


def test_server_side_apply_field_manager(api_client: client.ApiClient, namespace: str) -> None:
    dyn = dynamic.DynamicClient(api_client)
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    cm = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": namespace},
        "data": {"k": "1"},
    }
    cms.server_side_apply(body=cm, field_manager="forgeline-operator")
    got = cms.get(name="c", namespace=namespace)
    assert {m.manager for m in got.metadata.managedFields} == {"forgeline-operator"}
    # Another manager changing an owned field conflicts (409) unless it forces.
    with pytest.raises(client.ApiException) as e:
        cms.server_side_apply(body={**cm, "data": {"k": "2"}}, field_manager="someone-else")
    assert e.value.status == 409
    cms.server_side_apply(body={**cm, "data": {"k": "2"}}, field_manager="someone-else", force_conflicts=True)
    assert cms.get(name="c", namespace=namespace).data["k"] == "2"


def test_owner_reference_garbage_collection(api_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    parent = core.create_namespaced_config_map(namespace, {"metadata": {"name": "parent"}})
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "parent",
        "uid": parent.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("parent", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_config_map("child", namespace)
        except client.ApiException as e:
            return e.status == 404
        return False

    _until(gone, "the garbage collector deletes the child", deadline_s=60)


def test_cluster_stop_leaves_no_process(kube_bin_dir: Any, tmp_path: Any) -> None:
    """A second control plane started and stopped: every process group it made is gone."""
    c = Cluster(kube_bin_dir, tmp_path).start()
    groups = c.pgids()
    assert len(groups) == 3 and all(group_alive(g) for g in groups)
    c.stop()
    assert not [g for g in groups if group_alive(g)]


def test_client_apply_discovery_and_status(
    api_client: client.ApiClient, crds: list[str], namespace: str
) -> None:
    """kube/client.py on the real server: SSA create of a custom object returns it (the client gives
    None there), re-apply is idempotent, status patches, discovery answers what 1.20 serves."""
    from forgeline_operators.build.k8s import engine_build
    from forgeline_operators.lib.kube_client import FIELD_MANAGER, Kube

    kube = Kube(api_client)
    body = engine_build(
        "c",
        namespace=namespace,
        checkpoint="/a/c",
        checkpoint_sha256="0" * 64,
        settings={"tp": 1, "pp": 1},
        cache_key="k" * 64,
        output="/a/e",
    )
    made = kube.apply(body)
    assert made["metadata"]["uid"] and made["spec"]["cacheKey"] == "k" * 64
    assert {m["manager"] for m in made["metadata"]["managedFields"]} == {FIELD_MANAGER}
    assert kube.apply(body)["metadata"]["generation"] == 1, "re-applying the same object changes nothing"
    kube.patch_status(made, {"phase": "Running"})
    assert (kube.get("forgeline.dev/v1alpha1", "EngineBuild", "c", namespace) or {})["status"][
        "phase"
    ] == "Running"
    assert kube.get("forgeline.dev/v1alpha1", "EngineBuild", "absent", namespace) is None
    assert kube.has_api("forgeline.dev/v1alpha1", "EngineBuild") and kube.has_api("batch/v1", "Job")
    # Kubernetes 1.20 has neither (the operators skip those kinds by discovery there).
    assert not kube.has_api("autoscaling/v2", "HorizontalPodAutoscaler")
    assert not kube.has_api("policy/v1", "PodDisruptionBudget")
    assert kube.delete("forgeline.dev/v1alpha1", "EngineBuild", "c", namespace)
    assert not kube.delete("forgeline.dev/v1alpha1", "EngineBuild", "c", namespace)


def test_missing_binaries_skip_locally_and_fail_in_ci(tmp_path: Any) -> None:
    with pytest.raises(pytest.skip.Exception, match=r"bash scripts/kube_binaries\.sh"):
        require_binaries(tmp_path, ci=False)
    with pytest.raises(pytest.fail.Exception, match=r"needs etcd, kube-apiserver, kube-controller-manager"):
        require_binaries(tmp_path, ci=True)
