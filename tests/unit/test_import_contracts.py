"""The import contracts in ``pyproject.toml`` bite: ``lint-imports`` passes on a copy of both packages'
sources and fails, naming the contract, once one forbidden import is planted in the copy.

Hermetic: the sources (``.py`` files only) and ``pyproject.toml`` are copied to a temporary directory,
``lint-imports`` reads that copy's contracts (``--config``) and finds the copied packages first on
``PYTHONPATH`` (a planted import that only the copy has is what proves it); no cache is written.
A test for each family of contract: stage independence, engine independence, the operator layers
(stage folders above engines above lib), platform -> operators.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"platform": "forgeline", "operators": "forgeline_operators"}
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _sources_only(directory: str, names: list[str]) -> list[str]:
    here = Path(directory)
    return [n for n in names if n == "__pycache__" or ((here / n).is_file() and not n.endswith(".py"))]


@pytest.fixture(scope="module")
def copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("contracts")
    for folder, package in SOURCES.items():
        shutil.copytree(ROOT / folder / package, root / folder / package, ignore=_sources_only)
    shutil.copyfile(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(root / folder) for folder in SOURCES),
        "COLUMNS": "1000",  # one report line per contract and per import, whatever the terminal
    }
    # The config file as the positional argument: import-linter 2.x deprecates `--config`.
    cmd = [str(LINT_IMPORTS), str(root / "pyproject.toml"), "--no-cache", "--no-logo"]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)


def _contract(root: Path, match: Callable[[dict[str, Any]], bool]) -> str:
    contracts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (name,) = [c["name"] for c in contracts if match(c)]
    return str(name)


def test_the_contracts_cover_both_packages_and_hold(copy: Path) -> None:
    config = tomllib.loads((copy / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert sorted(config["root_packages"]) == sorted(SOURCES.values())
    result = _lint(copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(config['contracts'])} kept, 0 broken." in result.stdout


# (module planted in the copy, its import, the contract it breaks)
PLANTS = [
    pytest.param(
        "operators/forgeline_operators/evaluate/_planted.py",
        "from forgeline_operators.serve import operator",
        lambda c: c["type"] == "independence" and "forgeline_operators.serve" in c["modules"],
        id="a-stage-folder-imports-another",
    ),
    pytest.param(
        "operators/forgeline_operators/engines/openvino/_planted.py",
        "from forgeline_operators.engines.tensorrt_llm import trtllm",
        lambda c: c["type"] == "independence" and "forgeline_operators.engines.openvino" in c["modules"],
        id="an-engine-imports-another",
    ),
    pytest.param(
        "operators/forgeline_operators/engines/_planted.py",
        "from forgeline_operators.promote import gates",
        lambda c: c["type"] == "layers" and c["layers"][0] == "forgeline_operators.kube",
        id="the-engines-import-a-stage-folder",
    ),
    pytest.param(
        "operators/forgeline_operators/lib/_planted.py",
        "from forgeline_operators.finetune import operator",
        lambda c: c["type"] == "layers" and c["layers"][0] == "forgeline_operators.kube",
        id="lib-imports-a-stage-folder",
    ),
    pytest.param(
        "platform/forgeline/plan/_planted.py",
        "from forgeline_operators.lib import intervals",  # imports nothing else: breaks only this one
        lambda c: c["type"] == "forbidden" and c["forbidden_modules"] == ["forgeline_operators"],
        id="the-platform-imports-an-operator",
    ),
]


@pytest.mark.parametrize(("path", "line", "contract"), PLANTS)
def test_a_planted_violation_fails_naming_its_contract(
    copy: Path, path: str, line: str, contract: Callable[[dict[str, Any]], bool]
) -> None:
    planted = copy / path
    planted.write_text(f'"""A planted violation."""\n\n{line}  # noqa: F401\n')
    try:
        result = _lint(copy)
    finally:
        planted.unlink()
    name = _contract(copy, contract)
    module = ".".join(Path(path).with_suffix("").parts[1:])
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{name} BROKEN" in result.stdout, result.stdout
    assert module in result.stdout, result.stdout
    assert "1 broken." in result.stdout, result.stdout
