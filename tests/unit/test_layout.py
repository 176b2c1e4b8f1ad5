"""Repository layout: the ``platform/`` source folder must never shadow the stdlib ``platform`` module,
and every module says what it is for."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "platform" / "forgeline", ROOT / "operators" / "forgeline_operators"]
MODULES = sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py"))


def test_import_platform_is_the_stdlib_module() -> None:
    import platform

    assert callable(platform.system) and platform.system()
    assert platform.__file__ is not None
    assert not Path(platform.__file__).resolve().is_relative_to(ROOT / "platform")
    assert Path(platform.__file__).resolve().parent == Path(importlib.__file__).resolve().parents[1]


def test_platform_folder_is_not_a_package() -> None:
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert str(ROOT / "platform") not in [str(Path(p).resolve()) for p in sys.path if p]


def test_forgeline_is_imported_from_this_checkout() -> None:
    import forgeline
    import forgeline_operators

    # forgeline is a namespace package (no __init__.py): check where its portions come from.
    portions = [Path(p).resolve() for p in forgeline.__path__ if Path(p).is_dir()]
    assert portions == [ROOT / "platform" / "forgeline"]
    assert Path(str(forgeline_operators.__file__)).resolve().is_relative_to(ROOT / "operators")


def test_there_are_modules_to_check() -> None:
    assert len(MODULES) > 20


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_module_has_a_docstring(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    assert doc and doc.strip(), f"{path.relative_to(ROOT)} has no module docstring"
