"""What a kind's ``render`` hook gets and returns for ``forgeline render``: the render settings, the
placeholder rules for stage outputs that do not exist yet (:class:`RenderRefs`: a ``pvc://`` URI
under the artifact root, with a note saying so) and the :class:`Doc` (an object plus the YAML
comments above it). The kinds' hooks (``deploy``, ``build`` TensorRT-LLM, ``finetune`` nemo) live in
their folders; :mod:`forgeline_operators.kube.render` only walks the stages and calls them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from forgeline.spec import LoadedWorkflow, parse_ref

__all__ = ["Doc", "RenderRefs", "RenderSettings", "dataset_rows"]


@dataclass(frozen=True)
class RenderSettings:
    namespace: str = "default"
    artifacts_pvc: str = "forgeline-artifacts"
    artifact_dir: str = "home/outputs"  # inside the PVC; the volume is mounted at /artifacts
    on_kubernetes: bool = False


@dataclass
class Doc:
    obj: dict[str, Any]
    notes: list[str] = field(default_factory=list)


class RenderRefs:
    def __init__(self, loaded: LoadedWorkflow, settings: RenderSettings) -> None:
        self.loaded, self.settings = loaded, settings

    def resolve(self, value: str) -> tuple[str, str | None]:
        """(pvc:// URI or model id, note when it is a placeholder)."""
        parsed = parse_ref(value)
        if parsed is None:
            return value, None
        if parsed[0] == "model":
            return self.loaded.workflow.model.base, None
        stage, output = parsed
        uri = self.uri(stage, output or "output")
        return uri, f"placeholder: {value} is not produced yet; rendered as {uri}"

    def rel(self, stage: str, output: str) -> str:
        return f"{self.settings.artifact_dir.strip('/')}/{self.loaded.workflow.name}/{stage}/{output}"

    def uri(self, stage: str, output: str) -> str:
        return f"pvc://{self.settings.artifacts_pvc}/{self.rel(stage, output)}"

    def path(self, stage: str, output: str) -> str:
        return f"/artifacts/{self.rel(stage, output)}"


def dataset_rows(loaded: LoadedWorkflow, dataset: str | None) -> int:
    if not dataset:
        return 0
    path = loaded.dataset_path(dataset)
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0
