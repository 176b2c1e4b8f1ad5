"""Which stages a run touches: ``--only`` and ``--from``, resolved against the workflow's DAG.

``--only S`` runs S and everything S needs (upstream stages still come from the cache when their key
matches), nothing downstream of it — the ``make target`` idiom. ``--from S`` reruns S and everything
downstream of it even when their cache keys match (a flaky evaluation, an operator bug fixed without a
version bump); its fresh results replace the cached ones. Both take several stages and combine: the
forced set is cut to the selected set. Unknown names are errors with a "did you mean".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from forgeline.errors import ForgelineError
from forgeline.spec import Workflow, did_you_mean

__all__ = ["Selection", "SelectionError"]

TAG_ONLY = "forgeline.select.only"
TAG_FROM = "forgeline.select.from"


class SelectionError(ForgelineError, ValueError):
    """A ``--only`` / ``--from`` name that is not a stage of the workflow."""


@dataclass(frozen=True)
class Selection:
    """Stage names given on the command line; empty means every stage / no forced rerun."""

    only: tuple[str, ...] = ()
    rerun_from: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return not self.only and not self.rerun_from

    def check(self, wf: Workflow) -> None:
        names = [s.name for s in wf.stages]
        errors = []
        for flag, given in (("--only", self.only), ("--from", self.rerun_from)):
            for name in given:
                if name not in names:
                    hint = did_you_mean(name, names)
                    errors.append(
                        f"{flag} {name}: no stage of that name in workflow {wf.name!r}"
                        + (f" ({hint})" if hint else f"; stages: {', '.join(names)}")
                    )
        if errors:
            raise SelectionError("\n".join(errors))

    def selected(self, wf: Workflow) -> set[str]:
        """The stages that run: ``--only`` targets and their ancestors (all stages without ``--only``)."""
        if not self.only:
            return {s.name for s in wf.stages}
        return _closure(self.only, wf.dependencies)

    def forced(self, wf: Workflow) -> set[str]:
        """Selected stages whose cache is ignored: ``--from`` targets and their descendants."""
        if not self.rerun_from:
            return set()
        dependents: dict[str, list[str]] = {s.name: [] for s in wf.stages}
        for s in wf.stages:
            for dep in wf.dependencies(s.name):
                dependents[dep].append(s.name)
        return _closure(self.rerun_from, lambda n: dependents[n]) & self.selected(wf)

    def to_tags(self) -> dict[str, str]:
        """Recorded on the workflow run so ``resume`` continues the same selection."""
        return {
            "forgeline.select.only": ",".join(self.only),
            "forgeline.select.from": ",".join(self.rerun_from),
        }

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Selection:
        def split(key: str) -> tuple[str, ...]:
            return tuple(n for n in tags.get(key, "").split(",") if n)

        return cls(split(TAG_ONLY), split(TAG_FROM))


def _closure(start: Iterable[str], step: Callable[[str], Iterable[str]]) -> set[str]:
    seen: set[str] = set()
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(step(name))
    return seen
