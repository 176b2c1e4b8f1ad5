"""Property-based run of schemathesis against the API's own OpenAPI document: for a bounded number of
generated requests per operation (valid and invalid), no 5xx, only documented status codes, and every
body and content type conforms to the schema. The submission launcher is a stand-in (nothing runs);
a run and a model version are seeded so reads reach MLflow for real."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from forgeline.api import ApiSettings, create_app, create_token
from forgeline.tracking import (
    TAG_ROLE,
    TAG_STAGE,
    TAG_WORKFLOW,
    Tracker,
    TrackingSettings,
    prepare,
    register_version,
    resolve_settings,
)

ROOT = Path(__file__).resolve().parents[2]
TOKEN: dict[str, str] = {}


@pytest.fixture
def api_schema(home: Path) -> Any:
    uri = resolve_settings(None, "", home).uri
    tracker = Tracker(uri)
    exp = prepare(TrackingSettings(uri, "seeded", home / "artifacts" / "mlflow"))
    parent = tracker.start_run(exp, "seeded", {TAG_ROLE: "workflow", TAG_WORKFLOW: "seeded"})
    tracker.start_run(exp, "s", {TAG_ROLE: "stage", TAG_STAGE: "s"}, parent_run_id=parent)
    src = home / "artifacts" / "weights"
    src.mkdir(parents=True)
    register_version(tracker, "seeded-model", src.as_uri(), None, {"forgeline.sha256": "0" * 64}, "candidate")
    tokens = home / "api" / "tokens.json"
    TOKEN["all"] = create_token(tokens, "fuzzer", ["read", "submit", "promote"])
    app_settings = ApiSettings(
        home=home, tracking_uri=uri, data_root=ROOT / "workflows", tokens_file=tokens, submit_wait_s=1.0
    )
    app = create_app(app_settings, launcher=lambda s, sub: None)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# The pytest plugin's lazy fixture loader (`schemathesis.pytest.from_fixture`) fails under pytest 9
# ('Function' object has no attribute '_nodeid'), so each operation's strategy is driven directly.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_conformance(api_schema: Any, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 14
    headers = {"Authorization": f"Bearer {TOKEN['all']}"}
    exercised: Counter[str] = Counter()
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            exercised[case.operation.label] += 1
            case.call_and_validate(headers=headers, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:
            # Negative mode has nothing to break in an operation without parameters or body.
            assert mode == GenerationMode.NEGATIVE, operation.label
    # Every operation with something to get wrong was driven (health and plain lists have nothing).
    assert len(exercised) >= (len(operations) if mode == GenerationMode.POSITIVE else 11), exercised
    assert sum(exercised.values()) >= 100, exercised
