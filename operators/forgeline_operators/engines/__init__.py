"""Serving engines behind one :class:`Engine` protocol, found through the ``forgeline.engines`` entry point.

This package owns the seam between the serve-side stages (``serve``, ``promote``, ``forgeline serve``)
and what is particular to an inference engine: which artifact is the engine's own (``accepts``), how a
model becomes that artifact (``prepare``), how a Triton model repository is written over it
(``write_repository``), which server it needs (``server``) and what it can do (``capabilities``).
Each engine lives in its own folder (``openvino/``, ``tensorrt_llm/``) that imports no other engine;
callers import this facade only. :func:`default_engines` reads the entry point group once; tests build
an :class:`EngineRegistry` of their own.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from forgeline.sdk import ForgelineError
from forgeline_operators.engines._scheduler import SchedulerSpec, bf16_thread_issues

__all__ = [
    "ENTRY_POINT_GROUP",
    "MANIFEST",
    "Engine",
    "EngineCapabilities",
    "EngineError",
    "EngineRegistry",
    "Repository",
    "SchedulerSpec",
    "ServerRequirement",
    "ServingSettings",
    "bf16_thread_issues",
    "default_engines",
]

ENTRY_POINT_GROUP = "forgeline.engines"
MANIFEST = "forgeline-repository.json"  # every engine's repository: what was built (engine, models, ...)
Device = Literal["cpu", "gpu"]


class EngineError(ForgelineError, ValueError):
    """No engine, or not this engine, for what was asked (message names the engines and why)."""


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do, as data (checked up front, never by ``isinstance``)."""

    devices: frozenset[Device]
    lora: bool = False  # serves LoRA adapters by name from ServingSettings.adapters
    speculative_decoding: bool = False  # serves ServingSettings.draft


@dataclass(frozen=True)
class ServerRequirement:
    """The inference server a repository of this engine runs in."""

    name: str  # e.g. "tritonserver"
    backends: tuple[str, ...]  # Triton backends the repository uses, e.g. ("python",)
    runs_here: bool  # True: the local tritonserver of ``deploy`` runs it; False: files for another image
    image: str | None = None  # the container image it needs when not run here


@dataclass(frozen=True)
class ServingSettings:
    """What the serve side asks of any engine's repository; engines map it onto their own settings."""

    name: str  # the served model's name inside the repository
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    threads: int = 1
    adapters: Mapping[str, Path] = field(default_factory=dict)  # adapter name -> PEFT LoRA directory
    draft: Path | None = None  # a prepared draft model (the engine's artifact) for speculative decoding
    num_assistant_tokens: int = 5


@dataclass(frozen=True)
class Repository:
    """A written Triton model repository and what the engine decided in it (logged as stage params)."""

    path: Path
    params: Mapping[str, str | int | float | bool] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    """One serving engine. Implementations are plain objects; no base class."""

    name: str
    server: ServerRequirement
    capabilities: EngineCapabilities

    def accepts(self, path: Path) -> bool:
        """True when ``path`` is this engine's own artifact (the one test; exclusive across engines)."""
        ...

    def prepare(self, model_dir: Path, work_dir: Path, threads: int = 1) -> Path:
        """The artifact to serve for ``model_dir``: itself when accepted, else made under ``work_dir``."""
        ...

    def check(self, settings: ServingSettings) -> None:
        """Refuse settings the engine cannot serve, before any export or build: ValueError."""
        ...

    def write_repository(self, dest: Path, artifact: Path, settings: ServingSettings) -> Repository:
        """Write the Triton model repository serving ``artifact`` under ``dest``; ValueError if unfit."""
        ...


class EngineRegistry:
    """Engines by name; which one serves an artifact on a device."""

    def __init__(self, engines: Iterable[Engine] = ()) -> None:
        self._engines: dict[str, Engine] = {}
        for engine in engines:
            self.add(engine)

    def add(self, engine: Engine) -> None:
        if not isinstance(engine, Engine):
            raise TypeError(f"{engine!r} does not implement the Engine protocol")
        if engine.name in self._engines:
            raise ValueError(f"engine {engine.name!r} registered twice")
        self._engines[engine.name] = engine

    def __iter__(self) -> Iterator[Engine]:
        return iter(sorted(self._engines.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._engines)

    def get(self, name: str) -> Engine:
        try:
            return self._engines[name]
        except KeyError:
            raise EngineError(f"unknown engine {name!r}; known: {', '.join(self.names())}") from None

    def accepting(self, path: Path) -> list[Engine]:
        return [e for e in self if e.accepts(path)]

    def select(self, path: Path, device: Device = "cpu", name: str | None = None) -> Engine:
        """The engine for ``path``: ``name`` when given; else the engine whose artifact it is; else (a
        checkpoint no engine owns) the one engine that runs on ``device``."""
        owners = self.accepting(path)
        if name is not None:
            engine = self.get(name)
            others = [e.name for e in owners if e is not engine]
            if others and engine not in owners:
                raise EngineError(
                    f"{path} is {others[0]}'s artifact, not {name}'s: serve it with engine {others[0]!r} "
                    f"or give {name} a checkpoint it can prepare"
                )
            return engine
        if len(owners) > 1:
            raise EngineError(f"{path} is accepted by several engines: {', '.join(e.name for e in owners)}")
        if owners:
            return owners[0]
        on_device = [e for e in self if device in e.capabilities.devices]
        if len(on_device) != 1:
            found = ", ".join(e.name for e in on_device) or "none"
            raise EngineError(f"no single engine serves {path} on {device} (engines for {device}: {found})")
        return on_device[0]


def _load(entry: Any) -> Engine:
    engine = entry.load()
    if getattr(engine, "name", None) != entry.name:
        raise ValueError(f"entry point {entry.name!r} ({entry.value}) names an engine {engine!r}")
    return engine


@functools.cache
def default_engines() -> EngineRegistry:
    """The engines installed through the ``forgeline.engines`` entry point group (read once)."""
    return EngineRegistry(_load(e) for e in entry_points(group=ENTRY_POINT_GROUP))
