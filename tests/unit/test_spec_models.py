"""The typed spec: dependencies, references, the computed regression baseline, immutability, and the
JSON Schema generated from the same models."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError
from ruamel.yaml import YAML

from forgeline.spec import (
    BASE_MODEL_REF,
    LoadedWorkflow,
    Workflow,
    WorkflowError,
    load_workflow,
    output_ref,
    parse_ref,
    schema_json,
    stage_classes,
)
from forgeline_operators.evaluate.spec import EvaluateGates, EvaluateStage
from forgeline_operators.finetune.spec import FinetuneStage

ROOT = Path(__file__).resolve().parents[2]
SFT_ROW = '{"prompt": "Repeat after me:\\nred fox", "completion": "red fox"}\n'
PREF_ROW = '{"prompt": "Pick one", "chosen": "a", "rejected": "b"}\n'


def load(tmp_path: Path, stages: str) -> LoadedWorkflow:
    (tmp_path / "sft.jsonl").write_text(SFT_ROW)
    (tmp_path / "prefs.jsonl").write_text(PREF_ROW)
    text = (
        "name: demo\n"
        "model: {base: builtin://tiny-llama}\n"
        "data:\n"
        "  sft: {path: sft.jsonl, format: sft}\n"
        "  prefs: {path: prefs.jsonl, format: preference}\n"
        "stages:\n" + textwrap.indent(textwrap.dedent(stages).strip() + "\n", "  ")
    )
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    return load_workflow(path)


def deps(loaded: LoadedWorkflow) -> dict[str, list[str]]:
    wf = loaded.workflow
    return {s.name: wf.dependencies(s.name) for s in wf.stages}


# ------------------------------------------------------------------------------------ dependencies


def test_dependencies_default_to_the_previous_stage(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - {name: a, kind: evaluate, dataset: sft}
        - {name: b, kind: evaluate, dataset: sft}
        - {name: c, kind: evaluate, dataset: sft}
        """,
    )
    assert deps(loaded) == {"a": [], "b": ["a"], "c": ["b"]}


def test_empty_needs_makes_a_root_and_explicit_needs_replace_the_default(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - {name: a, kind: evaluate, dataset: sft}
        - {name: b, kind: evaluate, dataset: sft, needs: []}
        - {name: c, kind: evaluate, dataset: sft, needs: [a]}
        """,
    )
    assert deps(loaded) == {"a": [], "b": [], "c": ["a"]}


def test_references_add_their_stages_as_dependencies(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - {name: tune, kind: finetune, method: lora, dataset: sft}
        - {name: other, kind: evaluate, dataset: sft, needs: []}
        - name: align
          kind: finetune
          method: dpo
          dataset: prefs
          base: ${stages.tune.outputs.merged}
          dpo: {reference: "${stages.tune.outputs.merged}"}
          needs: []
        - name: squeeze
          kind: quantize
          format: int8
          model: ${stages.align.outputs.merged}
          needs: [other]
        """,
    )
    d = deps(loaded)
    assert d["align"] == ["tune"]  # from the refs only (needs: []), and no duplicate for dpo.reference
    assert d["squeeze"] == ["other", "align"]  # needs first, then references


def test_promote_requires_become_dependencies(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - {name: eval-a, kind: evaluate, dataset: sft}
        - {name: eval-b, kind: evaluate, dataset: sft, needs: []}
        - {name: register, kind: register, model: "${model}", registered_name: m, needs: []}
        - {name: promote, kind: promote, registered_name: m, requires: [eval-a, eval-b, register]}
        """,
    )
    assert deps(loaded)["promote"] == ["register", "eval-a", "eval-b"]


# ------------------------------------------------------------------------------------ references


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("${model}", ("model", None)),
        ("${ model }", ("model", None)),
        ("${stages.tune.outputs.merged}", ("tune", "merged")),
        ("  ${stages.eval-base_2.outputs.report}  ", ("eval-base_2", "report")),
        ("builtin://tiny-llama", None),
        ("hf://org/name@main", None),
        ("./checkpoints/x", None),
        ("${stages.tune}", None),
        ("${stages.tune.outputs}", None),
        ("${models}", None),
        ("${stages.tune.outputs.merged}.bak", None),
    ],
)
def test_parse_ref(value: str, parsed: tuple[str, str | None] | None) -> None:
    assert parse_ref(value) == parsed


def test_output_ref_round_trips_through_parse_ref() -> None:
    assert output_ref("tune", "adapter") == "${stages.tune.outputs.adapter}"
    assert parse_ref(output_ref("tune", "adapter")) == ("tune", "adapter")
    assert parse_ref(BASE_MODEL_REF) == ("model", None)


def test_every_stage_kind_declares_consistent_outputs() -> None:
    for kind, cls in stage_classes().items():
        assert cls.model_fields["kind"].annotation.__args__ == (kind,)  # type: ignore[union-attr]
        assert cls.outputs, kind
        assert cls.primary_output in cls.outputs, kind
        assert cls.value_outputs <= set(cls.outputs), kind
        fields = {f.alias or n for n, f in cls.model_fields.items()}
        assert set(cls.ref_fields) <= fields and set(cls.dataset_fields) <= fields, kind


# --------------------------------------------------------------------------- regression baseline


def test_baseline_ref_for_base_is_the_workflow_model(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - {name: tune, kind: finetune, method: lora, dataset: sft}
        - name: eval
          kind: evaluate
          model: ${stages.tune.outputs.merged}
          dataset: sft
          gates: {max_regression_vs: base, max_regression: 0.02}
        """,
    )
    stage = loaded.workflow.stage("eval")
    assert isinstance(stage, EvaluateStage)
    assert stage.gates.baseline_ref == BASE_MODEL_REF
    assert stage.refs()["gates.max_regression_vs"] == "${model}"


def test_baseline_ref_for_a_finetune_stage_is_its_merged_output_and_a_dependency(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - {name: tune, kind: finetune, method: lora, dataset: sft}
        - {name: tune2, kind: finetune, method: lora, dataset: sft, base: "${stages.tune.outputs.merged}"}
        - name: eval
          kind: evaluate
          model: ${stages.tune2.outputs.merged}
          dataset: sft
          gates: {max_regression_vs: tune}
          needs: []
        """,
    )
    stage = loaded.workflow.stage("eval")
    assert isinstance(stage, EvaluateStage)
    assert stage.gates.baseline_ref == "${stages.tune.outputs.merged}"
    assert loaded.workflow.dependencies("eval") == ["tune2", "tune"]


def test_baseline_ref_for_a_quantize_stage_is_its_checkpoint(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - {name: squeeze, kind: quantize, format: int8}
        - {name: eval, kind: evaluate, dataset: sft, gates: {max_regression_vs: squeeze}}
        """,
    )
    stage = loaded.workflow.stage("eval")
    assert isinstance(stage, EvaluateStage)
    assert stage.gates.baseline_ref == "${stages.squeeze.outputs.checkpoint}"


def test_baseline_ref_is_not_user_settable_nor_exported() -> None:
    with pytest.raises(ValidationError, match="computed from max_regression_vs"):
        EvaluateGates(baseline_ref="${model}")
    gates = EvaluateGates(max_regression_vs="base").model_copy(update={"baseline_ref": "${model}"})
    assert "baseline_ref" not in gates.model_dump()
    assert "baseline_ref" not in schema_json()


def test_without_a_gate_there_is_no_baseline(tmp_path: Path) -> None:
    loaded = load(tmp_path, "- {name: eval, kind: evaluate, dataset: sft}")
    stage = loaded.workflow.stage("eval")
    assert isinstance(stage, EvaluateStage)
    assert stage.gates.baseline_ref is None
    assert "gates.max_regression_vs" not in stage.refs()


# ------------------------------------------------------------------------------------ immutability


def test_models_are_frozen(tmp_path: Path) -> None:
    loaded = load(tmp_path, "- {name: tune, kind: finetune, method: lora, dataset: sft, lora: {r: 4}}")
    wf = loaded.workflow
    stage = wf.stages[0]
    assert isinstance(stage, FinetuneStage)
    with pytest.raises(ValidationError):
        wf.name = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        stage.method = "sft"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        stage.training.lr = 1.0  # type: ignore[misc]
    assert stage.lora is not None
    with pytest.raises(ValidationError):
        stage.lora.r = 64  # type: ignore[misc]


def test_defaults_fill_in_and_unknown_keys_are_refused() -> None:
    wf = Workflow.model_validate(
        {
            "name": "demo",
            "model": {"base": "builtin://tiny-llama"},
            "stages": [{"name": "tune", "kind": "finetune", "method": "lora", "dataset": "d"}],
        }
    )
    stage = wf.stages[0]
    assert isinstance(stage, FinetuneStage)
    assert (stage.base, stage.backend, stage.parallelism.world_size) == (BASE_MODEL_REF, "hf", 1)
    assert stage.uses_adapter
    with pytest.raises(ValidationError, match="extra"):
        Workflow.model_validate({"name": "demo", "model": {"base": "x"}, "stages": [], "stagse": []})


def test_a_valid_workflow_loads_without_problems(tmp_path: Path) -> None:
    loaded = load(tmp_path, "- {name: eval, kind: evaluate, dataset: sft}")
    assert loaded.path == (tmp_path / "wf.yaml").resolve()
    assert loaded.dataset_path("sft") == (tmp_path / "sft.jsonl").resolve()
    line = loaded.text.splitlines()[6]
    assert loaded.source.at("stages[0].dataset") == (7, line.index("sft}") + 1)
    assert loaded.source.at("stages[0].no.such.field") == loaded.source.at("stages[0]") == (7, 5)


def test_yaml_anchors_and_merge_keys_load(tmp_path: Path) -> None:
    loaded = load(
        tmp_path,
        """
        - &eval
          name: eval-a
          kind: evaluate
          dataset: sft
          max_samples: 16
        - <<: *eval
          name: eval-b
          needs: []
        """,
    )
    a, b = loaded.workflow.stages
    assert isinstance(a, EvaluateStage) and isinstance(b, EvaluateStage)
    assert (b.name, b.dataset, b.max_samples, b.needs) == ("eval-b", "sft", 16, [])


def test_a_broken_workflow_raises_workflow_error(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="unknown dataset 'sfd'"):
        load(tmp_path, "- {name: eval, kind: evaluate, dataset: sfd}")


# ------------------------------------------------------------------------------------ JSON Schema


def schema() -> dict:
    return json.loads(schema_json())


def test_schema_is_valid_json_schema() -> None:
    s = schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)


def test_schema_discriminates_stages_on_kind_for_all_ten_kinds() -> None:
    items = schema()["properties"]["stages"]["items"]
    assert items["discriminator"]["propertyName"] == "kind"
    mapping = items["discriminator"]["mapping"]
    assert set(mapping) == set(stage_classes()) and len(mapping) == 10
    assert {ref["$ref"] for ref in items["oneOf"]} == set(mapping.values())


def test_every_schema_property_is_described() -> None:
    s = schema()
    undescribed = [
        f"{name}.{prop}"
        for name, d in [("Workflow", s), *s["$defs"].items()]
        for prop, v in d.get("properties", {}).items()
        if not v.get("description")
    ]
    assert undescribed == []


def test_schema_accepts_shipped_workflows_and_rejects_unknown_keys() -> None:
    validator = jsonschema.Draft202012Validator(schema())
    for path in sorted((ROOT / "workflows").rglob("*.yaml")):
        if "lm_eval" in path.parent.parts:  # lm-evaluation-harness task files, not workflows
            continue
        doc = YAML(typ="safe", pure=True).load(path.read_text())
        assert not list(validator.iter_errors(doc)), path
    bad = {"name": "x", "model": {"base": "m"}, "stages": [{"name": "a", "kind": "evaluate", "dataset": "d"}]}
    bad["stages"][0]["modle"] = "y"
    assert list(validator.iter_errors(bad))


def test_checked_in_schema_is_current() -> None:
    path = ROOT / "workflows" / "schema.json"
    if not path.exists():
        pytest.skip("workflows/schema.json not generated yet (run `forgeline schema`)")
    assert path.read_text() == schema_json(), "workflows/schema.json is stale: run `forgeline schema`"
