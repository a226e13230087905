"""pyproject.toml declares exactly what the package imports: every third-party module that dtr_scale/ imports
belongs to a declared distribution (core or an extra), and every core dependency is imported somewhere."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
# Imported only to make an installed copy importable (dtr_scale/compat.py), never required; see pyproject.toml.
NOT_DECLARED_ON_PURPOSE = {"torchvision"}


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in (REPO / "dtr_scale").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"dtr_scale", "__future__"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda requirement: _normalise(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])  # noqa: E731
    core = {name(r) for r in project["dependencies"]}
    extras = {name(r) for group in project["optional-dependencies"].values() for r in group}
    return core, extras


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    owners = packages_distributions()
    return {module: {_normalise(d) for d in owners.get(module, [module])} for module in modules}


def test_every_imported_module_is_declared():
    core, extras = _declared()
    undeclared = {
        module: dists
        for module, dists in _distributions(_imported_top_level_modules()).items()
        if not dists & (core | extras) and module not in NOT_DECLARED_ON_PURPOSE
    }
    assert undeclared == {}, "imported by dtr_scale/ but not declared in pyproject.toml"


def test_every_core_dependency_is_imported():
    core, _ = _declared()
    imported = set().union(*_distributions(_imported_top_level_modules()).values())
    assert core - imported == set(), "declared in pyproject.toml but never imported by dtr_scale/"


def test_the_check_sees_a_missing_declaration():
    # Independent of the package: a module owned by scikit-learn maps to that distribution name.
    assert _distributions({"sklearn"})["sklearn"] == {"scikit-learn"}
    assert "scikit-learn" in _declared()[0] and "scipy" not in _declared()[0]
