"""The register stage's model: the directory registered by reference, its name, alias and tags. The
operator's ``stage_model``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from forgeline.sdk import ALIAS_PATTERN, REGISTERED_NAME_PATTERN, Ref, StageBase


class RegisterStage(StageBase):
    ref_fields: ClassVar[tuple[str, ...]] = ("model",)
    outputs: ClassVar[tuple[str, ...]] = ("version", "model_uri")
    primary_output: ClassVar[str | None] = "version"
    value_outputs: ClassVar[frozenset[str]] = frozenset({"version", "model_uri"})

    kind: Literal["register"] = Field(description="Register a model version in the MLflow registry.")
    model: Ref = Field(description="Directory to register (by reference: URI + sha256, never uploaded).")
    registered_name: str = Field(description="Registered model name.", pattern=REGISTERED_NAME_PATTERN)
    alias: str | None = Field(
        default="candidate", description="Alias to point at the new version.", pattern=ALIAS_PATTERN
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the model version.")

    def refs(self) -> dict[str, str]:
        return {"model": self.model}
