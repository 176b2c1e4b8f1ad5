"""The status vocabulary every Forgeline custom resource shares: the Kubernetes API conventions'
``Condition`` (``type``, ``status`` "True"|"False"|"Unknown", ``reason``, ``message``,
``lastTransitionTime``, ``observedGeneration``) and the helper that sets one without moving its
transition time when nothing changed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Condition", "CrModel", "set_condition"]


class CrModel(BaseModel):
    """Base config of custom-resource models: closed, immutable, settable by field name or alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class Condition(CrModel):
    type: str = Field(description="Condition type, e.g. Ready, Progressing, Degraded.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(default="", description="CamelCase reason of the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(
        default=None, description="RFC 3339 time the status last changed."
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


def set_condition(conditions: list[Condition], new: Condition) -> list[Condition]:
    """``conditions`` with ``new`` in place of the same type; the transition time is kept if the status
    did not change (so ``lastTransitionTime`` means what the conventions say)."""
    out = []
    replaced = False
    for c in conditions:
        if c.type == new.type:
            keep_time = c.status == new.status and c.last_transition_time
            out.append(
                new.model_copy(update={"last_transition_time": c.last_transition_time}) if keep_time else new
            )
            replaced = True
        else:
            out.append(c)
    return out if replaced else [*out, new]
