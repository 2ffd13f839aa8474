"""Every third-party module the code imports is declared in pyproject.toml.

An import that works only because another package happens to pull its distribution in breaks the
day that package drops it. The product (operator/, runtime/) must name its imports in the
dependencies or the extras users install (`operator`, `runtime`, `vllm`, `local`); tests,
benchmarks and scripts may also use the `dev` extra.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("operator", "runtime")
TOOLING = ("tests", "benchmarks", "scripts")
# Repository folders imported as packages (tests.support, benchmarks.operator_scale).
REPO_PACKAGES = {"tests", "benchmarks", "scripts"}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(with_dev: bool) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra, deps in project["optional-dependencies"].items():
        if with_dev or extra != "dev":
            reqs += deps
    return {_normal(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}


def _first_party() -> set[str]:
    """spin_operator, spin_runtime and any other package beside them."""
    return {p.parent.name for root in PRODUCT for p in (ROOT / root).glob("*/__init__.py")}


def _imports(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level module -> files importing it, for every absolute import outside the stdlib."""
    skip = sys.stdlib_module_names | _first_party() | REPO_PACKAGES | {"__future__"}
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.partition(".")[0]
                    if top not in skip:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _undeclared(folders: tuple[str, ...], declared: set[str]) -> list[str]:
    dists = importlib.metadata.packages_distributions()
    problems = []
    for module, files in sorted(_imports(folders).items()):
        # A module not installed here (vllm lives in .venv-vllm) counts by its own name.
        providers = {_normal(d) for d in dists.get(module, [])} or {_normal(module)}
        if not providers & declared:
            problems.append(
                f"{module} (distribution {', '.join(sorted(providers))}) imported by "
                f"{', '.join(sorted(files)[:3])} is not declared in pyproject.toml"
            )
    return problems


@pytest.mark.parametrize(
    ("folders", "with_dev"), [(PRODUCT, False), (TOOLING, True)], ids=["product", "tooling"]
)
def test_every_third_party_import_is_declared(folders: tuple[str, ...], with_dev: bool) -> None:
    assert _undeclared(folders, _declared(with_dev)) == []


def test_a_missing_declaration_is_reported() -> None:
    """The check itself: with aiohttp left out, the operator's import of it is named."""
    declared = _declared(with_dev=False) - {"aiohttp"}
    assert any(p.startswith("aiohttp ") for p in _undeclared(PRODUCT, declared))
