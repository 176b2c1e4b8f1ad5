"""JSON Schema export of the workflow models (for editors: ``workflows/schema.json``)."""

from __future__ import annotations

import json

from forgeline.spec._models import Workflow


def schema_json() -> str:
    schema = Workflow.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Forgeline workflow"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
