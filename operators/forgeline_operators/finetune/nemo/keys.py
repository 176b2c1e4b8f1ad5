"""The trainers' config keys as of the pinned releases, and the checks of rendered configs against them.

Megatron-Bridge and NeMo-RL do not import here (Python >= 3.12 + CUDA containers), so the key lists are
extracted from their sources by ``_extract_keys.py`` and shipped in ``schemas/``:

* ``megatron-bridge-v0.5.0-keys.json``: Megatron-Bridge v0.5.0 (commit fcbb6031, the release in the NeMo
  Framework 26.06 container) ``ConfigContainer`` sections with Megatron-LM d0b3b775 base classes, and
  its ``*_sft_config`` / ``*_peft_config`` recipe names;
* ``nemo-rl-v0.7.0-dpo-keys.json``: NeMo-RL v0.7.0 (commit 81aa43dd) ``examples/configs/dpo.yaml`` leaf
  paths + ``PreferenceDatasetConfig``.

A key the release does not have fails here, with the closest known names, before a container starts.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "BRIDGE_RELEASE",
    "NEMO_RL_RELEASE",
    "bridge_recipes",
    "check_bridge_overrides",
    "check_dpo_config",
    "flatten",
]

SCHEMAS = Path(__file__).parent / "schemas"
BRIDGE_RELEASE = "v0.5.0"
NEMO_RL_RELEASE = "v0.7.0"


@cache
def _bridge() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS / f"megatron-bridge-{BRIDGE_RELEASE}-keys.json").read_text())
    return data


@cache
def _nemo_rl_keys() -> frozenset[str]:
    data = json.loads((SCHEMAS / f"nemo-rl-{NEMO_RL_RELEASE}-dpo-keys.json").read_text())
    return frozenset(data["keys"])


def bridge_recipes() -> frozenset[str]:
    return frozenset(_bridge()["recipes"])


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_bridge_overrides(overrides: dict[str, Any]) -> list[str]:
    """Problems with ``section.field`` ConfigContainer overrides (empty: all keys exist in the release)."""
    data = _bridge()
    sections: dict[str, list[str]] = data["sections"]
    problems = []
    for key in overrides:
        if key in data["top_level"]:
            continue
        section, _, field = key.rpartition(".")
        if section not in sections:
            known = sorted(sections) + list(data["top_level"])
            problems.append(
                f"{key}: no ConfigContainer section {section or key!r} in Megatron-Bridge {BRIDGE_RELEASE}"
                + _hint(section or key, known)
            )
        elif field not in sections[section]:
            problems.append(
                f"{key}: {section} has no field {field!r} in Megatron-Bridge {BRIDGE_RELEASE}"
                + _hint(field, sections[section])
            )
    return problems


def flatten(tree: Any, prefix: str = "") -> list[str]:
    """Dotted leaf paths of a nested mapping (lists and scalars are leaves; ``defaults`` is not a key)."""
    if not isinstance(tree, dict) or not tree:
        return [prefix]
    out: list[str] = []
    for key, value in tree.items():
        if not prefix and key == "defaults":
            continue
        out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def check_dpo_config(config: dict[str, Any]) -> list[str]:
    """Problems with a NeMo-RL DPO config: every leaf path must exist in the release's DPO config."""
    known = _nemo_rl_keys()
    # A whole subtree may be set (e.g. ``policy.optimizer: null``, as NeMo-RL's own megatron recipes do).
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    return [
        f"{key}: not a NeMo-RL {NEMO_RL_RELEASE} DPO config key" + _hint(key, sorted(known))
        for key in flatten(config)
        if key not in known and key not in prefixes
    ]
