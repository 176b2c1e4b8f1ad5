"""The deploy stage's ``target: kubernetes`` spec building (deploy/kube_target.py): where pods read the
model from, the refusal of a local directory (with the fix), and the rollout deadline."""

from __future__ import annotations

import pytest

from forgeline.runtime.context import OperatorError
from forgeline_operators.deploy.kube_target import BASE_DEADLINE_S, deadline_s, endpoint_spec, model_uri
from forgeline_operators.deploy.spec import DeployStage


def stage(**fields: object) -> DeployStage:
    return DeployStage.model_validate(
        {"name": "deploy", "kind": "deploy", "repository": "${stages.serve.outputs.repository}", **fields}
    )


def test_model_uri_sources() -> None:
    kube = {"repository": {"uri": "s3://b/repo"}}
    assert model_uri(stage(kubernetes=kube), "/local/repo") == "s3://b/repo"
    kube = {"repository": {"pvc": "models", "path": "/llama/repo/"}}
    assert model_uri(stage(kubernetes=kube), "/local/repo") == "pvc://models/llama/repo"
    assert model_uri(stage(), "gs://bucket/repo") == "gs://bucket/repo"
    with pytest.raises(
        OperatorError, match=r"not a URI the cluster's pods can read.*repository: \{uri: s3://"
    ):
        model_uri(stage(), "${stages.serve.outputs.repository}")


def test_endpoint_spec_carries_the_stage() -> None:
    s = stage(
        runtime="triton",
        rollout={
            "strategy": "canary",
            "steps": [20, 100],
            "step_interval_s": 30,
            "gates": {"error_rate": 0.01},
        },
        kubernetes={"namespace": "prod", "replicas": 3, "gpus": 2},
    )
    spec = endpoint_spec(s, "s3://b/repo", version="chat/4")
    assert spec.model.uri == "s3://b/repo" and spec.model.version == "chat/4"
    assert spec.kubernetes.replicas == 3 and spec.kubernetes.namespace == "prod"
    assert spec.rollout.steps == [20, 100] and spec.rollout.gates.error_rate == 0.01
    assert deadline_s(spec) == BASE_DEADLINE_S + 60
    assert deadline_s(endpoint_spec(stage(), "s3://b/repo")) == BASE_DEADLINE_S
