"""Regenerates the shipped key lists in ``schemas/`` from the trainers' own sources (a maintainer tool).

The nemo backend cannot import Megatron-Bridge or NeMo-RL here (Python >= 3.12 + CUDA containers), so
the keys our renderers emit are checked against lists extracted from the upstream sources at pinned
commits:

* Megatron-Bridge ``ConfigContainer`` sections: the dataclass fields (``ast``, own class + the bases
  named in :data:`BRIDGE_SECTIONS`) in Megatron-Bridge and in Megatron-LM at the submodule commit that
  Megatron-Bridge pins.
* NeMo-RL DPO: every leaf path of ``examples/configs/dpo.yaml`` plus the ``PreferenceDatasetConfig``
  TypedDict keys under ``data.train`` / ``data.validation`` (its YAML leaves those commented out) and
  the ``TokenizerConfig`` keys under ``policy.tokenizer`` (``chat_template`` is optional there).

Run: ``python -m forgeline_operators.finetune.nemo._extract_keys BRIDGE_GIT MEGATRON_LM_GIT NEMO_RL_GIT``
with bare git directories (e.g. from ``git clone --bare``); it reads the pinned commits with ``git show``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# Megatron-Bridge 0.5.0 is what the NeMo Framework 26.06 container ships
# (Megatron-Bridge v0.6.0 docs/releases/software-versions.md).
BRIDGE_TAG, BRIDGE_COMMIT = "v0.5.0", "fcbb6031103d0ca845c1a54d4fee55ecfcca17b6"
MLM_COMMIT = "d0b3b775498a8ae6870075f1a5fc32bc260aa1b3"  # Megatron-Bridge v0.5.0's 3rdparty/Megatron-LM
NEMO_RL_TAG, NEMO_RL_COMMIT = "v0.7.0", "81aa43dda4765b0429cf31dab44441e4e4383911"

_B = "src/megatron/bridge/"
_T = "megatron/training/config/training_config.py"
# section -> [(repo, path, class)]: the class and every dataclass base whose fields it inherits.
BRIDGE_SECTIONS: dict[str, list[tuple[str, str, str]]] = {
    "train": [("bridge", _B + "training/config.py", "TrainingConfig"), ("mlm", _T, "TrainingConfig")],
    "validation": [("mlm", _T, "ValidationConfig")],
    "scheduler": [("bridge", _B + "training/config.py", "SchedulerConfig"), ("mlm", _T, "SchedulerConfig")],
    "logger": [("bridge", _B + "training/config.py", "LoggerConfig"), ("mlm", _T, "LoggerConfig")],
    "checkpoint": [
        ("bridge", _B + "training/config.py", "CheckpointConfig"),
        ("mlm", _T, "CheckpointConfig"),
    ],
    "tokenizer": [
        ("bridge", _B + "training/tokenizers/config.py", "TokenizerConfig"),
        ("mlm", _T, "TokenizerConfig"),
    ],
    "rng": [("mlm", "megatron/training/config/common_config.py", "RNGConfig")],
    "optimizer": [
        ("bridge", _B + "training/config.py", "OptimizerConfig"),
        ("mlm", "megatron/core/optimizer/optimizer_config.py", "OptimizerConfig"),
    ],
    # run_recipe.py --dataset llm-finetune-preloaded builds a FinetuningDatasetConfig.
    "dataset": [
        ("bridge", _B + "training/config.py", "FinetuningDatasetConfig"),
        ("bridge", _B + "training/config.py", "DataloaderConfig"),
    ],
    "model": [
        ("bridge", _B + "models/gpt_provider.py", "GPTModelProvider"),
        ("mlm", "megatron/core/transformer/transformer_config.py", "TransformerConfig"),
        ("mlm", "megatron/core/model_parallel_config.py", "ModelParallelConfig"),
    ],
    "peft": [
        ("bridge", _B + "peft/lora.py", "LoRA"),
        ("bridge", _B + "peft/base.py", "PEFT"),
        ("bridge", _B + "peft/module_matcher.py", "ModuleMatcher"),
    ],
}
TOP_LEVEL = ["env_vars", "mixed_precision"]  # ConfigContainer's scalar fields our renderer may set


def _show(git_dir: Path, commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def class_fields(source: str, name: str) -> list[str]:
    """Annotated, public attribute names in the body of class ``name`` (dataclass fields)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return [
                st.target.id
                for st in node.body
                if isinstance(st, ast.AnnAssign)
                and isinstance(st.target, ast.Name)
                and not st.target.id.startswith("_")
                and "ClassVar" not in ast.unparse(st.annotation)
            ]
    raise KeyError(f"class {name} not found")


def flatten(tree: Any, prefix: str = "") -> list[str]:
    """Dotted leaf paths of a YAML mapping (lists and scalars are leaves)."""
    if not isinstance(tree, dict) or not tree:
        return [prefix]
    out: list[str] = []
    for key, value in tree.items():
        out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def recipes(bridge_git: Path) -> list[str]:
    """Every ``*_sft_config`` / ``*_peft_config`` recipe function defined under ``recipes/``."""
    out = subprocess.run(
        ["git", "--git-dir", str(bridge_git), "grep", "-h", "-o", "-E", r"^def [a-z0-9_]+_(sft|peft)_config",
         BRIDGE_COMMIT, "--", _B + "recipes/"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted({line.removeprefix("def ") for line in out.split()} - {"def"})


def bridge_keys(bridge_git: Path, mlm_git: Path) -> dict[str, Any]:
    repos = {"bridge": (bridge_git, BRIDGE_COMMIT), "mlm": (mlm_git, MLM_COMMIT)}
    sections: dict[str, list[str]] = {}
    for section, chain in BRIDGE_SECTIONS.items():
        names: set[str] = set()
        for repo, path, cls in chain:
            git_dir, commit = repos[repo]
            names.update(class_fields(_show(git_dir, commit, path), cls))
        sections[section] = sorted(names)
    return {
        "source": {
            "megatron_bridge": {"tag": BRIDGE_TAG, "commit": BRIDGE_COMMIT},
            "megatron_lm": {"commit": MLM_COMMIT, "note": "Megatron-Bridge v0.5.0 3rdparty/Megatron-LM"},
            "classes": {s: [f"{r}:{p}:{c}" for r, p, c in chain] for s, chain in BRIDGE_SECTIONS.items()},
        },
        "top_level": TOP_LEVEL,
        "sections": sections,
        "recipes": recipes(bridge_git),
    }


def nemo_rl_keys(rl_git: Path) -> dict[str, Any]:
    import yaml  # PyYAML: a kubernetes-validate dependency

    dpo = yaml.safe_load(_show(rl_git, NEMO_RL_COMMIT, "examples/configs/dpo.yaml"))
    keys = set(flatten(dpo))
    data_init = _show(rl_git, NEMO_RL_COMMIT, "nemo_rl/data/__init__.py")
    for split in ("train", "validation", "default"):
        keys.discard(f"data.{split}")
        keys.update(f"data.{split}.{k}" for k in class_fields(data_init, "PreferenceDatasetConfig"))
    # policy.tokenizer.chat_template (how prompts are rendered) is optional, so dpo.yaml leaves it out.
    policy_init = _show(rl_git, NEMO_RL_COMMIT, "nemo_rl/models/policy/__init__.py")
    keys.update(f"policy.tokenizer.{k}" for k in class_fields(policy_init, "TokenizerConfig"))
    return {
        "source": {
            "nemo_rl": {"tag": NEMO_RL_TAG, "commit": NEMO_RL_COMMIT},
            "files": [
                "examples/configs/dpo.yaml",
                "nemo_rl/data/__init__.py:PreferenceDatasetConfig",
                "nemo_rl/models/policy/__init__.py:TokenizerConfig",
            ],
        },
        "keys": sorted(keys),
    }


def main(argv: list[str]) -> None:
    bridge, mlm, rl = (Path(a) for a in argv)
    out = Path(__file__).parent / "schemas"
    (out / f"megatron-bridge-{BRIDGE_TAG}-keys.json").write_text(
        json.dumps(bridge_keys(bridge, mlm), indent=1) + "\n"
    )
    (out / f"nemo-rl-{NEMO_RL_TAG}-dpo-keys.json").write_text(json.dumps(nemo_rl_keys(rl), indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
