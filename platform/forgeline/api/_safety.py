"""What a submitted workflow may touch, checked before anything reads or runs it.

* **YAML structure**: the event stream is walked once; the size the document would have with every
  alias expanded is bounded (the loader's plain-data copy would otherwise grow exponentially), recursive
  aliases and nesting deeper than 64 levels are refused, and so is any explicit tag beyond the core
  schema's (``!!python/...``, ``!foo``):
  a workflow is plain maps, lists and scalars, and nothing else reaches the loader.
* **Datasets** must resolve inside the server's data root, checked on the raw tree *before* the loader
  validates dataset rows (it reads the files and would echo lines of any readable file otherwise).
* **Model URIs**: local paths and ``file://`` only inside the artifact root (``<home>/artifacts``), as
  absolute paths; remote schemes are left to the planner.
* **Tracking**: a submission runs against the server's MLflow store only (the API reads runs there).

Each refusal is a :class:`~forgeline.spec.Problem` with the line and column of the offending value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    ScalarEvent,
)

from forgeline.artifacts import MODELS_PREFIX
from forgeline.spec import LoadedWorkflow, Problem, parse_ref

_MAX_DEPTH = 64
_CORE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}


def _tag_problem(event: Any, file: str) -> Problem | None:
    tag = getattr(event, "tag", None)
    if tag is None or tag == "!" or tag in _CORE_TAGS:
        return None
    mark = event.start_mark
    shown = "!!" + tag[len("tag:yaml.org,2002:") :] if tag.startswith("tag:yaml.org,2002:") else tag
    return Problem(
        f"YAML tag {shown} is not allowed",
        file,
        mark.line + 1 if mark else None,
        mark.column + 1 if mark else None,
        hint="a workflow is plain maps, lists and scalars: remove the tag",
    )


def structure_problem(text: str, limit: int, file: str) -> Problem | None:
    """A problem when the YAML has a non-core tag, a recursive alias, or more than ``limit`` nodes with
    aliases expanded; None otherwise (syntax errors are left to the loader, which locates them)."""
    sizes: dict[str, int] = {}
    stack: list[tuple[int, str | None]] = []  # (expanded size so far, anchor) of open collections
    total = 0

    def add(n: int) -> None:
        nonlocal total
        total += n
        if stack:
            size, anchor = stack[-1]
            stack[-1] = (size + n, anchor)

    try:
        for event in YAML(typ="safe", pure=True).parse(text):
            tagged = _tag_problem(event, file)
            if tagged is not None:
                return tagged
            if isinstance(event, ScalarEvent):
                if event.anchor:
                    sizes[event.anchor] = 1
                add(1)
            elif isinstance(event, CollectionStartEvent):
                total += 1
                stack.append((1, event.anchor))
                if len(stack) > _MAX_DEPTH:  # the loader's composer recurses per level
                    mark = event.start_mark
                    return Problem(
                        f"the document nests deeper than {_MAX_DEPTH} levels",
                        file,
                        mark.line + 1 if mark else None,
                        mark.column + 1 if mark else None,
                        hint="a workflow needs a handful of levels",
                    )
            elif isinstance(event, CollectionEndEvent):
                size, anchor = stack.pop()
                if anchor:
                    sizes[anchor] = size
                if stack:
                    top, top_anchor = stack[-1]
                    stack[-1] = (top + size, top_anchor)
            elif isinstance(event, AliasEvent):
                mark = event.start_mark
                if event.anchor not in sizes:  # still open: the node contains itself
                    return Problem(
                        f"recursive YAML alias *{event.anchor}",
                        file,
                        mark.line + 1 if mark else None,
                        mark.column + 1 if mark else None,
                        hint="write the value out; a workflow is a tree",
                    )
                add(sizes[event.anchor])
            if total > limit:
                return Problem(
                    f"the document expands to more than {limit} YAML nodes (aliases included)",
                    file,
                    1,
                    1,
                    hint="a workflow needs far fewer; remove the nested aliases",
                )
    except Exception:
        return None  # a syntax error: the loader reports it with its position
    return None


def _position(node: Any, key: str) -> tuple[int | None, int | None]:
    try:
        line, col = node.lc.value(key)
        return line + 1, col + 1
    except Exception:
        return None, None


def dataset_problems(text: str, data_root: Path, file: str) -> list[Problem]:
    """Datasets whose path resolves outside ``data_root`` (checked before the loader reads any)."""
    try:
        tree = YAML(typ="rt", pure=True).load(text)
    except Exception:
        return []  # the loader reports syntax errors with positions
    data = tree.get("data") if isinstance(tree, CommentedMap) else None
    if not isinstance(data, CommentedMap):
        return []
    root = data_root.resolve()
    problems = []
    for name, spec in data.items():
        if not isinstance(spec, CommentedMap) or not isinstance(spec.get("path"), str):
            continue
        resolved = (root / Path(spec["path"]).expanduser()).resolve()
        if not resolved.is_relative_to(root):
            line, col = _position(spec, "path")
            problems.append(
                Problem(
                    f"dataset path {spec['path']!r} is outside the server's data root",
                    file,
                    line,
                    col,
                    f"data.{name}.path",
                    hint=f"use a path relative to (or inside) {root}",
                )
            )
    return problems


def absolute_datasets(text: str, data_root: Path) -> str:
    """The YAML with every relative dataset path made absolute under ``data_root`` (comments kept), so the
    stored submission runs from any directory."""
    yaml = YAML(typ="rt", pure=True)
    yaml.width = 4096  # never re-wrap long lines
    tree = yaml.load(text)
    data = tree.get("data") if isinstance(tree, CommentedMap) else None
    if isinstance(data, CommentedMap):
        for spec in data.values():
            if isinstance(spec, CommentedMap) and isinstance(spec.get("path"), str):
                spec["path"] = str((data_root.resolve() / spec["path"]).resolve())
    import io

    buf = io.StringIO()
    yaml.dump(tree, buf)
    return buf.getvalue()


def _path_like(value: str) -> bool:
    if value.startswith("file://"):
        return True
    if value.startswith(MODELS_PREFIX):  # MLflow's models:/NAME/VERSION: a registry URI, not a path
        return False
    return "://" not in value and (value.startswith(("/", ".", "~")) or "/" in value)


def model_uri_problems(loaded: LoadedWorkflow, artifact_root: Path, file: str) -> list[Problem]:
    """Local model paths / ``file://`` URIs that are relative or outside the artifact root."""
    from urllib.parse import unquote, urlparse

    root = artifact_root.resolve()
    wf = loaded.workflow
    found: list[tuple[str, str]] = [("model.base", wf.model.base)]
    for i, stage in enumerate(wf.stages):
        for fpath, ref in stage.refs().items():
            if isinstance(ref, str) and parse_ref(ref) is None:
                found.append((f"stages[{i}].{fpath}", ref))
    problems = []
    for field, value in found:
        if not _path_like(value):
            continue
        raw = unquote(urlparse(value).path) if value.startswith("file://") else value
        path = Path(raw).expanduser()
        if not path.is_absolute():
            message = f"relative model path {value!r}: a submitted workflow has no directory of its own"
        elif not path.resolve().is_relative_to(root):
            message = f"model path {value!r} is outside the artifact root"
        else:
            continue
        line, col = loaded.source.at(field)
        problems.append(
            Problem(
                message,
                file,
                line,
                col,
                field,
                hint=f"use a path under {root}, builtin://, mlflow://, models:/, hf:// or s3://",
            )
        )
    return problems


def tracking_problems(loaded: LoadedWorkflow, tracking_uri: str, file: str) -> list[Problem]:
    uri = loaded.workflow.tracking.uri
    if uri and uri != tracking_uri:
        line, col = loaded.source.at("tracking.uri")
        return [
            Problem(
                f"tracking.uri {uri!r} differs from the server's store; the API could not follow the run",
                file,
                line,
                col,
                "tracking.uri",
                hint="remove tracking.uri from a workflow submitted over the API",
            )
        ]
    return []
