"""Loading a workflow file: YAML with positions -> validated ``Workflow``, or every problem at once.

Parsing happens once, at the edge. The YAML is read with ruamel's round-trip loader so that each
problem -- a YAML syntax error, a pydantic type error, an unknown key, a dangling reference, a
dependency cycle, a malformed dataset row -- is reported as ``file:line:col: field: message`` with a
"did you mean" where a close candidate exists. Semantic checks run even when some stages fail type
validation, so a user fixes everything in one pass.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from forgeline.spec._datasets import validate_dataset
from forgeline.spec._errors import Problem, WorkflowError, did_you_mean
from forgeline.spec._models import (
    PATTERN_HELP,
    SpecContext,
    StageBase,
    Workflow,
    is_ref_like,
    parse_ref,
    stage_adapter,
    stage_classes,
)

Loc = tuple[str | int, ...]


@dataclass
class SourceMap:
    """Positions (1-based line, col) of every key and value in the YAML, by field path."""

    file: str
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def at(self, path: str) -> tuple[int | None, int | None]:
        # Fall back to the nearest enclosing field that has a position.
        probe = path
        while probe:
            if probe in self.positions:
                return self.positions[probe]
            cut = max(probe.rfind("."), probe.rfind("["))
            probe = probe[:cut] if cut > 0 else ""
        # A top-level field (e.g. a missing `model`) points at the document's first key.
        return self.positions.get("", (None, None))

    def problem(self, path: str, message: str, hint: str | None = None) -> Problem:
        line, col = self.at(path)
        return Problem(message=message, file=self.file, line=line, col=col, field=path, hint=hint)


@dataclass
class LoadedWorkflow:
    """A validated workflow with where it came from (for relative paths and located messages)."""

    workflow: Workflow
    path: Path
    text: str
    source: SourceMap

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def dataset_path(self, name: str) -> Path:
        return (self.base_dir / self.workflow.data[name].path).resolve()


def format_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _index_positions(node: Any, prefix: str, smap: SourceMap) -> None:
    if isinstance(node, CommentedMap):
        own = node.lc.data or {}
        for key in node:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key in own:  # keys merged in with `<<: *anchor` have no position of their own here
                kline, kcol = node.lc.key(key)
                vline, vcol = node.lc.value(key)
                smap.positions[path + "#key"] = (kline + 1, kcol + 1)
                smap.positions[path] = (vline + 1, vcol + 1)
            _index_positions(node[key], path, smap)
    elif isinstance(node, CommentedSeq):
        for i, item in enumerate(node):
            path = f"{prefix}[{i}]"
            pos = node.lc.item(i)
            if pos is not None:  # a tagged flow sequence (`!!tag [x]`) records no item positions
                smap.positions[path] = (pos[0] + 1, pos[1] + 1)
            _index_positions(item, path, smap)


def _plain(node: Any) -> Any:
    """ruamel's round-trip types -> plain dict/list/str/int/float/bool/None."""
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


# ----------------------------------------------------------------------------- pydantic errors


def _unwrap(tp: Any) -> list[Any]:
    """Possible concrete types behind Annotated / Optional / Union."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(tp):
            out.extend(_unwrap(arg))
        return out
    return [tp]


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items() if name != "baseline_ref"]


def _model_at(loc: Loc, raw: Any) -> type[BaseModel] | None:
    """The pydantic model class whose fields live at ``loc`` (raw data picks union members)."""
    candidates: list[Any] = [Workflow]
    node = raw
    for part in loc:
        nxt: list[Any] = []
        for tp in candidates:
            for t in _unwrap(tp):
                origin = typing.get_origin(t)
                if isinstance(t, type) and issubclass(t, BaseModel):
                    by_alias = {(f.alias or n): f for n, f in t.model_fields.items()}
                    if isinstance(part, str) and part in by_alias:
                        nxt.append(by_alias[part].annotation)
                elif origin is list and isinstance(part, int):
                    nxt.append(typing.get_args(t)[0])
                elif origin is dict and isinstance(part, str):
                    nxt.append(typing.get_args(t)[1])
        node = node[part] if _has(node, part) else None
        models = [t for tp in nxt for t in _unwrap(tp)]
        stage_models = [t for t in models if isinstance(t, type) and issubclass(t, StageBase)]
        if stage_models:  # the stage union: the member is the one its `kind` names
            kind = node.get("kind") if isinstance(node, dict) else None
            kinds = stage_classes()
            models = [kinds[kind]] if isinstance(kind, str) and kind in kinds else []
        candidates = models
        if not candidates:
            return None
    for t in candidates:
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return part in node
    if isinstance(node, list) and isinstance(part, int):
        return 0 <= part < len(node)
    return False


def _data_loc(loc: Loc, raw: Any) -> Loc:
    """Drop pydantic's discriminator-tag entries (e.g. 'finetune') that are not in the data."""
    out: list[str | int] = []
    node = raw
    for part in loc:
        if _has(node, part):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and part == node.get("kind"):
            continue
        else:
            out.append(part)
            node = None
    return tuple(out)


def _expected_literals(ctx: dict[str, Any] | None) -> list[str]:
    import re

    text = str((ctx or {}).get("expected", ""))
    return re.findall(r"'([^']*)'", text)


def _problems_from_validation(exc: ValidationError, raw: Any, smap: SourceMap, prefix: Loc) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = _data_loc(prefix + tuple(err["loc"]), raw)
        path = format_path(loc)
        etype = err["type"]
        inp = err.get("input")
        hint = None
        if etype == "extra_forbidden":
            key = str(loc[-1])
            parent = _model_at(loc[:-1], raw)
            if parent is not None:
                hint = did_you_mean(key, _field_names(parent))
            line, col = smap.positions.get(path + "#key", smap.at(path))
            problems.append(Problem(f"unknown field {key!r}", smap.file, line, col, format_path(loc), hint))
            continue
        if etype == "missing":
            parent_path = format_path(loc[:-1])
            line, col = smap.positions.get(parent_path + "#key", smap.at(parent_path))
            problems.append(Problem(f"missing required field {loc[-1]!r}", smap.file, line, col, path))
            continue
        if etype == "union_tag_invalid":
            kind = str((err.get("ctx") or {}).get("tag", inp))
            path = format_path((*loc, "kind"))
            kinds = stage_classes()
            hint = did_you_mean(kind, kinds) or f"expected one of: {', '.join(kinds)}"
            problems.append(smap.problem(path, f"unknown stage kind {kind!r}", hint))
            continue
        if etype == "union_tag_not_found":
            problems.append(
                smap.problem(path, "missing required field 'kind'", f"one of: {', '.join(stage_classes())}")
            )
            continue
        msg = err["msg"]
        pattern = str((err.get("ctx") or {}).get("pattern", ""))
        if etype == "string_pattern_mismatch" and pattern in PATTERN_HELP:
            shown = repr(inp) if len(repr(inp)) <= 80 else repr(inp)[:77] + "..."
            msg = f"invalid name {shown}: use {PATTERN_HELP[pattern]}"
            hint = "names become file names and process identities; no '/', '..' or spaces"
            problems.append(smap.problem(path, msg, hint))
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif etype == "literal_error" and isinstance(inp, str):
            hint = did_you_mean(inp, _expected_literals(err.get("ctx")))
            msg = f"{msg}, got {inp!r}"
        elif isinstance(inp, str | int | float | bool) and etype != "model_type":
            msg = f"{msg}, got {inp!r}"
        problems.append(smap.problem(path, msg, hint))
    return problems


# ----------------------------------------------------------------------------- semantic checks


def _semantic_problems(
    raw: dict[str, Any], stages: list[StageBase | None], smap: SourceMap, base_dir: Path
) -> tuple[list[Problem], list[StageBase | None]]:
    problems: list[Problem] = []
    raw_stages: list[Any] = raw["stages"] if isinstance(raw.get("stages"), list) else []
    names: list[str] = [
        s["name"] if isinstance(s, dict) and isinstance(s.get("name"), str) else "" for s in raw_stages
    ]
    kinds: dict[str, str] = {
        n: str(s.get("kind")) for n, s in zip(names, raw_stages, strict=True) if n and isinstance(s, dict)
    }
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name and name in seen:
            problems.append(
                smap.problem(
                    f"stages[{i}].name", f"duplicate stage name {name!r} (first at stages[{seen[name]}])"
                )
            )
        seen.setdefault(name, i)
    known = [n for n in names if n]
    data: dict[str, Any] = raw["data"] if isinstance(raw.get("data"), dict) else {}

    for name, ds in data.items():
        if isinstance(ds, dict) and isinstance(ds.get("path"), str):
            p = (base_dir / ds["path"]).resolve()
            if not p.is_file():
                problems.append(smap.problem(f"data.{name}.path", f"dataset file not found: {p}"))
            elif ds.get("format") in ("sft", "preference", "text"):
                problems.extend(validate_dataset(p, ds["format"], name=name))

    res = raw.get("resources")
    per_stage = res.get("cpus_per_stage", 1) if isinstance(res, dict) else 1
    ctx = SpecContext(
        stages=tuple(known),
        kinds=kinds,
        formats={n: (d.get("format") if isinstance(d, dict) else None) for n, d in data.items()},
        cpus_per_stage=per_stage if isinstance(per_stage, int | float) else 1,
    )
    resolved: list[StageBase | None] = list(stages)
    for i, stage in enumerate(stages):
        at = f"stages[{i}]"
        if stage is None:
            # Type errors elsewhere in this stage: still check its top-level names and references.
            raw_stage = raw_stages[i] if isinstance(raw_stages[i], dict) else {}
            problems.extend(_raw_stage_problems(raw_stage, at, known, kinds, data, smap))
            continue
        for j, need in enumerate(stage.needs or []):
            if need == stage.name:
                problems.append(smap.problem(f"{at}.needs[{j}]", "a stage cannot need itself"))
            elif need not in known:
                problems.append(
                    smap.problem(f"{at}.needs[{j}]", f"unknown stage {need!r}", did_you_mean(need, known))
                )
        for fpath, value in stage.refs().items():
            if fpath == "gates.max_regression_vs":
                continue
            problems.extend(_check_ref(value, f"{at}.{fpath}", stage.name, known, kinds, smap))
        for fpath, ds_name in stage.dataset_refs().items():
            if ds_name not in data:
                problems.append(
                    smap.problem(
                        f"{at}.{fpath}",
                        f"unknown dataset {ds_name!r}",
                        did_you_mean(ds_name, data) or "declare it under data:",
                    )
                )
                continue
        # The kind's own checks and computed fields (the stage model's methods).
        issues = stage.check(ctx)
        more, resolved_stage = stage.resolved(ctx)
        for issue in [*issues, *more]:
            where = f"{at}.{issue.field}" if issue.field else at
            problems.append(smap.problem(where, issue.message, issue.hint))
        resolved[i] = resolved_stage
    return problems, resolved


def _raw_stage_problems(
    raw_stage: dict[str, Any],
    at: str,
    known: list[str],
    kinds: dict[str, str],
    data: dict[str, Any],
    smap: SourceMap,
) -> list[Problem]:
    kind = raw_stage.get("kind")
    cls = stage_classes().get(kind) if isinstance(kind, str) else None  # `kind: [x]` is unhashable
    if cls is None:
        return []
    problems: list[Problem] = []
    name = raw_stage.get("name", "")
    for key in cls.ref_fields:
        value = raw_stage.get(key)
        if isinstance(value, str):
            problems.extend(_check_ref(value, f"{at}.{key}", name, known, kinds, smap))
    for key in cls.dataset_fields:
        value = raw_stage.get(key)
        if isinstance(value, str) and value not in data:
            problems.append(
                smap.problem(
                    f"{at}.{key}",
                    f"unknown dataset {value!r}",
                    did_you_mean(value, data) or "declare it under data:",
                )
            )
    needs = raw_stage.get("needs")
    for j, need in enumerate(needs if isinstance(needs, list) else []):
        if isinstance(need, str) and need not in known:
            problems.append(
                smap.problem(f"{at}.needs[{j}]", f"unknown stage {need!r}", did_you_mean(need, known))
            )
    return problems


def _check_ref(
    value: str, path: str, self_name: str, known: list[str], kinds: dict[str, str], smap: SourceMap
) -> list[Problem]:
    if not is_ref_like(value):
        return []
    parsed = parse_ref(value)
    if parsed is None:
        return [
            smap.problem(
                path, f"malformed reference {value!r}", "expected ${stages.NAME.outputs.KEY} or ${model}"
            )
        ]
    stage_name, output = parsed
    if stage_name == "model":
        return []
    if stage_name == self_name:
        return [smap.problem(path, "a stage cannot reference its own outputs")]
    if stage_name not in known:
        return [smap.problem(path, f"unknown stage {stage_name!r}", did_you_mean(stage_name, known))]
    cls = stage_classes().get(kinds.get(stage_name, ""))
    if cls is not None and output not in cls.outputs:
        return [
            smap.problem(
                path,
                f"stage {stage_name!r} ({kinds[stage_name]}) has no output "
                f"{output!r}; it has: {', '.join(cls.outputs)}",
                did_you_mean(output or "", cls.outputs),
            )
        ]
    return []


def _cycle_problems(
    workflow_stages: list[StageBase], smap: SourceMap, deps: dict[str, list[str]]
) -> list[Problem]:
    state: dict[str, int] = {}
    stack: list[str] = []
    problems: list[Problem] = []
    index = {s.name: i for i, s in enumerate(workflow_stages)}

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in deps.get(n, []):
            if d not in deps or d == n:
                continue  # unknown stages and self-dependencies are reported where they are written
            if state.get(d) == 1:
                cycle = [*stack[stack.index(d) :], d]
                problems.append(
                    smap.problem(f"stages[{index[d]}].name", f"dependency cycle: {' -> '.join(cycle)}")
                )
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for s in workflow_stages:
        if s.name not in state:
            visit(s.name)
    return problems


# ----------------------------------------------------------------------------- entry points


def load_workflow(path: str | Path, text: str | None = None) -> LoadedWorkflow:
    """Parse and validate a workflow file; raise ``WorkflowError`` listing every problem."""
    path = Path(path)
    display = str(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise WorkflowError([Problem(f"cannot read workflow: {e.strerror or e}", display)]) from None
    smap = SourceMap(display)
    yaml = YAML(typ="rt", pure=True)
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        msg = f"invalid YAML: {e.problem or e.context}"
        raise WorkflowError([Problem(msg, display, line, col)]) from None
    if not isinstance(tree, CommentedMap):
        raise WorkflowError(
            [Problem("a workflow must be a YAML mapping (name, model, stages, ...)", display, 1, 1)]
        )
    smap.positions[""] = (tree.lc.line + 1, tree.lc.col + 1)
    _index_positions(tree, "", smap)
    raw = _plain(tree)
    problems: list[Problem] = []
    workflow: Workflow | None = None
    try:
        workflow = Workflow.model_validate(raw)
    except ValidationError as e:
        problems.extend(_problems_from_validation(e, raw, smap, ()))

    stages: list[StageBase | None] = []
    if workflow is not None:
        stages = list(workflow.stages)
    elif isinstance(raw.get("stages"), list):
        for item in raw["stages"]:
            try:
                stages.append(stage_adapter().validate_python(item))
            except ValidationError:
                stages.append(None)
    sem, resolved = _semantic_problems(raw, stages, smap, path.parent.resolve())
    problems.extend(sem)
    if workflow is not None:  # cycles too, alongside every other problem
        workflow = workflow.model_copy(update={"stages": resolved})
        deps = {s.name: workflow.dependencies(s.name) for s in workflow.stages}
        problems.extend(_cycle_problems(list(workflow.stages), smap, deps))
    if problems or workflow is None:
        raise WorkflowError(_dedupe(problems))
    return LoadedWorkflow(workflow=workflow, path=path.resolve(), text=text, source=smap)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in problems:
        key = (p.line, p.col, p.field, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out
