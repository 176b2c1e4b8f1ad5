"""Registries of operators and built-in model sources: plain objects that tests can swap.

An operator is declared by an :class:`OperatorSpec` — data only (kind, backend, version,
capabilities, and the dotted paths of its ``run(ctx)`` entrypoint and of its plan hooks), so
``plan`` can check capabilities without importing torch. Everything the plan knows about a kind
beyond the generic (the GPUs and workers it asks for, its memory and compute estimate, its own
checks, what it would launch) comes from those hooks: the plan never branches on a kind. Built-in
models (``builtin://NAME``) are declared by a :class:`ModelSource`. Both are discovered through entry
points (``forgeline.operators`` returning a list of specs, ``forgeline.models`` naming a
``ModelSource``, ``forgeline.model_formats`` naming a :class:`ModelFormat` that converts a model file
such as ``.gguf``), so third-party packages plug in the same way the shipped ``forgeline_operators``
do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

__all__ = [
    "Capabilities",
    "ModelFormat",
    "ModelSource",
    "OperatorRegistry",
    "OperatorSpec",
    "ResourceRequest",
    "StageIssue",
    "default_registry",
    "reset_default_registry",
]


@dataclass(frozen=True)
class Capabilities:
    """What an operator can do, checked by ``plan`` before anything runs."""

    cpu: bool = True
    gpu: bool = False
    requires_gpu: bool = False
    tensor_parallel: bool = False
    pipeline_parallel: bool = False
    data_parallel: bool = False
    # The operator starts its own Ray Train workers (one per rank, tp*pp*dp) when the world size is
    # above 1; its stage task then only coordinates and must not hold the CPUs/GPUs they need.
    spawns_workers: bool = False
    # Option values (e.g. quantization formats) that only run with CUDA.
    gpu_only_options: frozenset[str] = field(default_factory=frozenset)
    # Its result depends on the workflow's target (a local endpoint vs a cluster resource), so the
    # target is part of its cache key.
    target_bound: bool = False


@dataclass(frozen=True)
class ResourceRequest:
    """What a stage asks of the cluster, from its operator's ``resources`` hook."""

    gpus: int = 0  # GPUs for the stage when the workflow runs on GPUs (resources.device: gpu)
    workers: int = 0  # Ray Train workers the operator starts itself; 0: the stage's own task works
    remote: bool = False  # its GPU work runs on the cluster (target: kubernetes), not in this Ray


@dataclass(frozen=True)
class StageIssue:
    """A kind's own finding about a stage, from its operator's ``check`` hook: a plan problem (blocks
    the run) or, with ``warning``, a note. ``field`` is relative to the stage (``format``,
    ``parallelism.tp``; None: the stage itself)."""

    message: str
    field: str | None = None
    hint: str | None = None
    warning: bool = False


@dataclass(frozen=True)
class OperatorSpec:
    """One installed operator: ``kind`` (and ``backend`` where a kind has several)."""

    kind: str
    entrypoint: str  # "package.module:function", imported lazily in the worker
    version: str
    backend: str | None = None
    capabilities: Capabilities = field(default_factory=Capabilities)
    description: str = ""
    # For results that live outside the stage store (a running endpoint, a registry entry): a
    # "module:function" called as ``check(record, home, tracking_uri) -> str | None`` on a cache
    # hit; a returned reason makes the driver rerun the stage instead of reusing a stale result.
    cache_check: str | None = None
    # For operators that launch work elsewhere (a container job): a "module:function" called by
    # ``plan`` as ``describe(stage, workflow) -> list[str]`` (what would run, where, in which image);
    # a ValueError it raises is a plan problem. It must import nothing heavy.
    describe: str | None = None
    # Plan hooks, "module:function" each, importing nothing heavy:
    # ``resources(stage, workflow, capabilities) -> ResourceRequest`` (default: no GPUs, no workers);
    # ``estimate(stage, shape, inputs) -> forgeline.plan.StageEstimate | None`` (memory per device,
    # tokens, FLOPs; ``inputs`` is a ``forgeline.plan.EstimateInputs``);
    # ``check(stage, workflow, capabilities) -> list[StageIssue]`` (the kind's own plan problems).
    resources: str | None = None
    estimate: str | None = None
    check: str | None = None
    # ``forgeline render``: ``render(stage, refs) -> list[Doc]`` (forgeline_operators.lib.kube_render),
    # the Kubernetes objects the stage would create; none: it creates nothing on a cluster.
    render: str | None = None
    # A kind of its own: "module:Class", the stage model (a ``forgeline.spec.StageBase`` subclass with
    # a ``kind: Literal[...]`` field) the workflow union, the loader and ``forgeline schema`` include.
    stage_model: str | None = None

    def load(self) -> Callable[..., Any]:
        return _import(self.entrypoint)

    def load_cache_check(self) -> Callable[..., str | None] | None:
        return _import(self.cache_check) if self.cache_check else None

    def load_describe(self) -> Callable[..., list[str]] | None:
        return _import(self.describe) if self.describe else None

    def load_resources(self) -> Callable[..., ResourceRequest] | None:
        return _import(self.resources) if self.resources else None

    def load_estimate(self) -> Callable[..., Any] | None:
        return _import(self.estimate) if self.estimate else None

    def load_check(self) -> Callable[..., list[StageIssue]] | None:
        return _import(self.check) if self.check else None

    def load_render(self) -> Callable[..., list[Any]] | None:
        return _import(self.render) if self.render else None

    def load_stage_model(self) -> type[Any] | None:
        if not self.stage_model:
            return None
        module_name, _, attr = self.stage_model.partition(":")
        cls: type[Any] = getattr(importlib.import_module(module_name), attr)
        return cls


def _import(dotted: str) -> Callable[..., Any]:
    module_name, _, attr = dotted.partition(":")
    module = importlib.import_module(module_name)
    fn: Callable[..., Any] = getattr(module, attr)
    return fn


@dataclass(frozen=True)
class ModelSource:
    """A built-in model, ``builtin://<name>``: created offline, deterministically."""

    name: str
    fingerprint: Callable[[], str]  # sha256 hex of what materialize writes; cheap, no torch import
    materialize: Callable[[Path], None]  # writes an HF checkpoint directory (weights + tokenizer)
    parameters: int  # parameter count, for plan's memory estimates
    description: str = ""


@dataclass(frozen=True)
class ModelFormat:
    """A model file format other than an HF directory (``.gguf``): a model URI naming such a file is
    converted once into a verified HF checkpoint in the store."""

    name: str
    suffixes: tuple[str, ...]  # lowercase, with the dot: (".gguf",)
    version: str  # of the converter: part of the converted model's fingerprint
    convert: Callable[[Path, Path], None]  # (file, empty destination directory) -> HF checkpoint


class OperatorRegistry:
    """Operators by (kind, backend), model sources by name, model file formats by suffix."""

    def __init__(
        self,
        operators: Iterable[OperatorSpec] = (),
        models: Iterable[ModelSource] = (),
        formats: Iterable[ModelFormat] = (),
    ) -> None:
        self._ops: dict[tuple[str, str | None], OperatorSpec] = {}
        self._models: dict[str, ModelSource] = {}
        self._formats: dict[str, ModelFormat] = {}
        for op in operators:
            self.add_operator(op)
        for m in models:
            self.add_model(m)
        for f in formats:
            self.add_format(f)

    def add_format(self, fmt: ModelFormat) -> None:
        for suffix in fmt.suffixes:
            self._formats[suffix.lower()] = fmt

    def format_for(self, path: str | Path) -> ModelFormat | None:
        """The format converting a file named like ``path`` (by suffix), if one is registered."""
        return self._formats.get(Path(path).suffix.lower())

    def add_operator(self, op: OperatorSpec) -> None:
        self._ops[(op.kind, op.backend)] = op

    def add_model(self, source: ModelSource) -> None:
        self._models[source.name] = source

    def stage_models(self) -> dict[str, type[Any]]:
        """Stage models that operators declare (``stage_model``), by kind."""
        out: dict[str, type[Any]] = {}
        for op in self._ops.values():
            cls = op.load_stage_model()
            if cls is not None:
                if out.get(op.kind, cls) is not cls:
                    raise TypeError(f"two operators of kind {op.kind!r} declare different stage models")
                out[op.kind] = cls
        return out

    def operator(self, kind: str, backend: str | None = None) -> OperatorSpec | None:
        # An operator registered without a backend serves every backend of its kind.
        return self._ops.get((kind, backend)) or self._ops.get((kind, None))

    def operators(self) -> list[OperatorSpec]:
        return list(self._ops.values())

    def model(self, name: str) -> ModelSource | None:
        return self._models.get(name)

    def models(self) -> list[ModelSource]:
        return list(self._models.values())

    def format_suffixes(self) -> list[str]:
        return sorted(self._formats)


_default: OperatorRegistry | None = None


def reset_default_registry() -> None:
    """Forget the cached registry: the next :func:`default_registry` reads the entry points again
    (after a package was installed into this process)."""
    global _default
    _default = None


def default_registry() -> OperatorRegistry:
    """The registry built from installed entry points (cached for the process)."""
    global _default
    if _default is None:
        reg = OperatorRegistry()
        for ep in entry_points(group="forgeline.operators"):
            for op in ep.load()():
                reg.add_operator(op)
        for ep in entry_points(group="forgeline.models"):
            reg.add_model(ep.load())
        for ep in entry_points(group="forgeline.model_formats"):
            reg.add_format(ep.load())
        _default = reg
    return _default
