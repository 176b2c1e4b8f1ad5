"""The Kubernetes resources: CRDs generated from the pydantic models (current, structural), the camelCase
wire form, the revision hash, and every child manifest of a ModelEndpoint validated offline against its
real schema (Kubernetes 1.31 strict, NVIDIA's NIMService CRD, Gateway API's HTTPRoute CRD)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from forgeline_operators.build import k8s as build_k8s
from forgeline_operators.build.resources import from_cr as build_from_cr
from forgeline_operators.deploy import manifests as m
from forgeline_operators.deploy.resources import (
    EndpointModel,
    ModelEndpointSpec,
    ModelEndpointStatus,
    from_cr,
    revision_of,
    to_cr,
)
from forgeline_operators.deploy.spec import KubernetesDeploySpec, RepositorySourceSpec, RolloutSpec
from forgeline_operators.engines.tensorrt_llm.settings import TrtllmBuildSpec
from forgeline_operators.kube.crds import crd_files, crds
from forgeline_operators.kube.validate import validate_manifests
from forgeline_operators.lib.kube_conditions import Condition, set_condition
from forgeline_operators.lib.kube_crd import camel

ROOT = Path(__file__).resolve().parents[2]
NIM_IMAGE = "nvcr.io/nim/meta/llama-3.1-8b-instruct:2.0.13"


def triton_spec(**kube: Any) -> ModelEndpointSpec:
    return ModelEndpointSpec(
        model=EndpointModel(uri="s3://models/llama/repository", version="llama/3"),
        rollout=RolloutSpec(strategy="canary", steps=[10, 50, 100], max_surge_gpus=2),
        kubernetes=KubernetesDeploySpec(namespace="llm", **kube),
    )


def nim_spec(**model: Any) -> ModelEndpointSpec:
    return ModelEndpointSpec(
        runtime="nim",
        model=EndpointModel(uri="pvc://models/llama-sft", **model),
        kubernetes=KubernetesDeploySpec(
            image=NIM_IMAGE, repository=RepositorySourceSpec(pvc="models", path="llama-sft"), max_replicas=3
        ),
    )


def test_generated_crds_are_current_and_valid_kubernetes_objects() -> None:
    for name, text in crd_files().items():
        path = ROOT / "k8s" / "crds" / name
        assert path.exists() and path.read_text() == text, f"{path} is stale: run `forgeline schema`"
    assert validate_manifests([crd for _, crd in crds().values()]) == []


def _walk(node: dict[str, Any], where: str) -> list[str]:
    bad = []
    for key in ("anyOf", "oneOf", "$ref", "patternProperties"):
        if key in node:
            bad.append(f"{where}: {key}")
    typed = (
        "type" in node
        or node.get("x-kubernetes-int-or-string")
        or node.get("x-kubernetes-preserve-unknown-fields")
    )
    if not typed:
        bad.append(f"{where}: no type")
    if node.get("additionalProperties") is False or ("properties" in node and "additionalProperties" in node):
        bad.append(f"{where}: additionalProperties")
    for k, v in node.get("properties", {}).items():
        bad += _walk(v, f"{where}.{k}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            bad += _walk(node[key], f"{where}[{key}]")
    return bad


def test_crd_schemas_are_structural_camel_case_with_status_and_columns() -> None:
    _, crd = crds()["modelendpoints.forgeline.dev.yaml"]
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _walk(schema, "ModelEndpoint") == []
    spec = schema["properties"]["spec"]["properties"]
    rollout = spec["rollout"]["properties"]
    assert {"stepIntervalSeconds", "maxSurgeGpus", "gates"} <= set(rollout)
    assert set(rollout["gates"]["properties"]) == {"p95TtftMs", "errorRate"}
    assert rollout["gates"]["properties"]["p95TtftMs"] == {
        "minimum": 0,
        "exclusiveMinimum": True,
        "type": "number",
        "nullable": True,
        "description": "Max p95 time to first token.",
    }
    assert spec["runtime"]["enum"] == ["triton", "nim"] and spec["runtime"]["default"] == "triton"
    assert spec["kubernetes"]["properties"]["tolerations"]["items"]["additionalProperties"] == {
        "x-kubernetes-int-or-string": True
    }
    status = schema["properties"]["status"]["properties"]
    assert (
        status["canaryStep"]["nullable"] is True
        and "lastTransitionTime" in (status["conditions"]["items"]["properties"])
    )
    assert version["subresources"] == {"status": {}} and crd["spec"]["names"]["shortNames"] == ["me"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Phase", "Revision", "Traffic", "URL", "Age"]
    _, eb = crds()["enginebuilds.forgeline.dev.yaml"]
    eb_schema = eb["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert _walk(eb_schema, "EngineBuild") == []
    # Build settings keep the workflow's snake_case keys: the Job hands them to the entrypoint unchanged.
    assert "max_batch_size" in eb_schema["properties"]["spec"]["properties"]["tensorrtLLM"]["properties"]


def test_camel_case_names() -> None:
    assert camel("max_surge_gpus") == "maxSurgeGpus"
    assert camel("step_interval_s") == "stepIntervalSeconds"
    assert camel("p95_ttft_ms") == "p95TtftMs" and camel("tensorrtLLM") == "tensorrtLLM"


def test_cr_round_trip_keeps_map_keys_and_omits_nulls() -> None:
    spec = triton_spec(node_selector={"nvidia.com/gpu.product": "H100_SXM"})
    spec = spec.model_copy(update={"model": EndpointModel(uri="s3://m", adapters={"sql_v2": "s3://a"})})
    cr = to_cr("llama", spec)
    assert cr["metadata"]["namespace"] == "llm"
    assert cr["spec"]["kubernetes"]["nodeSelector"] == {"nvidia.com/gpu.product": "H100_SXM"}
    assert cr["spec"]["model"]["adapters"] == {"sql_v2": "s3://a"} and "sha256" not in cr["spec"]["model"]
    assert cr["spec"]["rollout"]["stepIntervalSeconds"] == 60
    status = ModelEndpointStatus(
        phase="Progressing", canary_step=1, traffic_split={"abc": 90, "def": 10}, revisions={"abc": "s3://m"}
    )
    cr["status"] = m_status = {
        "phase": "Progressing",
        "canaryStep": 1,
        "trafficSplit": {"abc": 90, "def": 10},
    }
    cr["status"]["revisions"] = {"abc": "s3://m"}
    back_spec, back_status = from_cr(cr)
    assert back_spec == spec and back_status == status and m_status["canaryStep"] == 1
    assert validate_manifests([cr]) == []
    with pytest.raises(ValidationError, match="gpuz"):
        from_cr({"spec": {**cr["spec"], "kubernetes": {"gpuz": 1}}})
    with pytest.raises(ValueError, match="at most 52 characters"):
        to_cr("x" * 60, spec)


def test_revision_ignores_replica_counts_only() -> None:
    base = triton_spec(replicas=1)
    assert revision_of(base) == revision_of(triton_spec(replicas=5, max_replicas=9))
    assert revision_of(base) != revision_of(triton_spec(image="example.com/triton:1"))
    assert len(revision_of(base)) == 10 and int(revision_of(base), 16) >= 0


@pytest.mark.parametrize("steps", [[50, 10, 100], [10, 50], [10, 10, 100], [0, 100], [10, 150]], ids=str)
def test_canary_steps_must_increase_to_100(steps: list[int]) -> None:
    with pytest.raises(ValidationError, match="steps"):
        RolloutSpec(strategy="canary", steps=steps)


def test_repository_source_needs_exactly_one_of_pvc_or_uri() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        RepositorySourceSpec(pvc="a", uri="s3://b")
    with pytest.raises(ValidationError, match="exactly one"):
        RepositorySourceSpec()


def test_triton_revision_children_from_the_object_store() -> None:
    spec = triton_spec(replicas=2, max_replicas=6, gpus=2)
    rev = revision_of(spec)
    docs = m.revision_children("llama", spec, rev, 2, owner=("llama", "uid-1"))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    assert all(d["metadata"]["name"] == f"llama-{rev}" for d in docs)
    assert all(d["metadata"]["ownerReferences"][0]["uid"] == "uid-1" for d in docs)
    assert all(d["metadata"]["ownerReferences"][0]["controller"] is True for d in docs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert triton["image"] == m.TRITON_IMAGE
    assert [(p["containerPort"], p["protocol"]) for p in triton["ports"]] == [
        (8000, "TCP"),
        (8001, "TCP"),
        (8002, "TCP"),
    ]
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["initContainers"][0]["command"][:3] == ["aws", "s3", "sync"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert all(p["protocol"] == "TCP" for p in kinds["Service"]["spec"]["ports"])
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "nv_inference_queue_duration_us"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 6)
    assert "replicas" not in kinds["Deployment"]["spec"]  # the HPA owns the count, SSA must not fight it
    fixed = m.revision_children("llama", spec, rev, 2, autoscale=False)  # e.g. a canary in its budget
    assert fixed[0]["spec"]["replicas"] == 2 and "HorizontalPodAutoscaler" not in {d["kind"] for d in fixed}
    assert validate_manifests(docs) == []


def test_triton_from_a_pvc_and_errors_name_the_fix() -> None:
    spec = triton_spec(repository=RepositorySourceSpec(pvc="models", path="llama/repo"))
    docs = m.revision_children("llama", spec, "abc", 1)
    pod = docs[0]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "models", "mountPath": "/models", "subPath": "llama/repo", "readOnly": True} in (
        pod["containers"][0]["volumeMounts"]
    )
    assert {d["kind"] for d in docs} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }  # no autoscaling asked
    assert validate_manifests(docs) == []
    local = triton_spec(repository=RepositorySourceSpec(uri="file:///data/repo"))
    with pytest.raises(m.ManifestError, match="PVC"):
        m.revision_children("llama", local, "abc", 1)


def test_nim_service_with_model_path_and_adapters_validates_against_nvidia_schema() -> None:
    spec = nim_spec(adapters={"sql": "pvc://models/loras/sql", "chat": "pvc://models/loras/chat"})
    (nim,) = m.revision_children("llama", spec, "r1", 2, owner=("llama", "u"))
    assert nim["apiVersion"] == "apps.nvidia.com/v1alpha1" and nim["kind"] == "NIMService"
    env = {e["name"]: e["value"] for e in nim["spec"]["env"]}
    assert env == {"NIM_MODEL_PATH": "/model-store/llama-sft", "NIM_PEFT_SOURCE": "/model-store/loras"}
    assert nim["spec"]["readinessProbe"]["probe"]["httpGet"]["path"] == "/v1/health/ready"
    assert nim["spec"]["livenessProbe"]["probe"]["httpGet"]["path"] == "/v1/health/live"
    assert nim["spec"]["expose"]["service"]["port"] == 8000
    assert nim["spec"]["labels"][m.REVISION_LABEL] == "r1"
    assert nim["spec"]["scale"]["hpa"] == {"minReplicas": 2, "maxReplicas": 3}
    assert validate_manifests([nim, m.stable_service("llama", spec, "r1")]) == []
    broken = {**nim, "spec": {**nim["spec"], "imagePullPolicy": "Always"}}
    assert any("imagePullPolicy" in p for p in validate_manifests([broken]))


def test_nim_errors_name_the_fix() -> None:
    with pytest.raises(m.ManifestError, match=r"kubernetes\.image"):
        m.revision_children("a", nim_spec().model_copy(update={"kubernetes": KubernetesDeploySpec()}), "r", 1)
    on_s3 = nim_spec().model_copy(
        update={
            "kubernetes": KubernetesDeploySpec(image=NIM_IMAGE, repository=RepositorySourceSpec(uri="s3://b"))
        }
    )
    with pytest.raises(m.ManifestError, match="PVC"):
        m.revision_children("a", on_s3, "r", 1)
    with pytest.raises(m.ManifestError, match="one sub-directory per adapter"):
        m.revision_children("a", nim_spec(adapters={"sql": "pvc://models/loras/other"}), "r", 1)


def test_stable_service_and_weighted_route() -> None:
    spec = triton_spec(service_type="LoadBalancer", gateway="infra/public")
    svc = m.stable_service("llama", spec, "aaa", owner=("llama", "u"))
    assert svc["metadata"]["name"] == "llama" and svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["selector"] == {m.ENDPOINT_LABEL: "llama", m.REVISION_LABEL: "aaa"}
    route = m.http_route("llama", spec, {"aaa": 90, "bbb": 10})
    backends = route["spec"]["rules"][0]["backendRefs"]
    assert [(b["name"], b["weight"]) for b in backends] == [("llama-aaa", 90), ("llama-bbb", 10)]
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public", "namespace": "infra"}
    ]
    assert validate_manifests([svc, route]) == []
    with pytest.raises(m.ManifestError, match="sum to 100"):
        m.http_route("llama", spec, {"aaa": 90})
    bad_route = yaml.safe_load(yaml.safe_dump(route))
    bad_route["spec"]["rules"][0]["backendRefs"][0]["weight"] = "ninety"
    assert any("weight" in p for p in validate_manifests([bad_route]))


def test_engine_build_from_the_existing_builder_matches_its_crd() -> None:
    eb = build_k8s.engine_build(
        "llama-trt",
        namespace="llm",
        checkpoint="/artifacts/ckpt",
        checkpoint_sha256="ab" * 32,
        settings=TrtllmBuildSpec(tp=2).model_dump(),
        cache_key="cd" * 32,
        output="/artifacts/engine",
    )
    assert validate_manifests([eb]) == []
    spec, status = build_from_cr({**eb, "status": {"phase": "Succeeded", "cache": "hit", "path": "/e"}})
    assert spec.tensorrt_llm.tp == 2 and spec.gpus == 2 and status.cache == "hit"
    eb["spec"]["tensorrtLLM"]["maxBatchSize"] = 8  # camelCase is wrong inside the verbatim settings
    assert any("maxBatchSize" in p for p in validate_manifests([eb]))


def test_validate_manifests_fails_on_unknown_kinds_and_fields() -> None:
    problems = validate_manifests(
        [
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"portz": []}},
        ]
    )
    assert problems[0].startswith("Widget/w: no Kubernetes 1.31 schema")
    assert "portz" in problems[1]


def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    first = [Condition(type="Ready", status="False", reason="Rolling", last_transition_time="t0")]
    same = set_condition(
        first, Condition(type="Ready", status="False", reason="Still", last_transition_time="t1")
    )
    assert same[0].last_transition_time == "t0" and same[0].reason == "Still"
    flipped = set_condition(same, Condition(type="Ready", status="True", last_transition_time="t2"))
    assert flipped[0].last_transition_time == "t2"
    both = set_condition(flipped, Condition(type="Degraded", status="False"))
    assert [c.type for c in both] == ["Ready", "Degraded"]
