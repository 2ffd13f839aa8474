"""The layout rules of the project hold: no shadowing, no operator imports in the runtime,
no torch in the operator or in the light runtime modules the operator shares."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIGHT_RUNTIME_MODULES = ["storage", "manifest", "layout", "cache", "tracking", "records", "rows", "data", "modelcheck", "check"]
HEAVY = ("torch", "transformers", "vllm")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_operator_dir_does_not_shadow_the_stdlib() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter"), "the standard library's operator module is shadowed"


@pytest.mark.parametrize("path", sorted((REPO / "runtime").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_runtime_never_imports_the_operator(path: Path) -> None:
    assert not any(n.split(".")[0] == "spin_operator" for n in _imports(path))


@pytest.mark.parametrize("path", sorted((REPO / "operator").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_operator_has_no_heavy_imports(path: Path) -> None:
    heavy = {n for n in _imports(path) if n.split(".")[0] in HEAVY}
    assert not heavy, f"{path.name} imports {heavy}: keep torch/vllm out of the operator"


def test_operator_and_light_runtime_modules_load_without_torch() -> None:
    present = [m for m in LIGHT_RUNTIME_MODULES if (REPO / "runtime" / "spin_runtime" / f"{m}.py").exists()]
    modules = ["spin_operator.cli", "spin_operator.validation", "spin_operator.api.crd"]
    modules += [f"spin_operator.{p.stem}" for p in (REPO / "operator" / "spin_operator").glob("*.py") if p.stem not in ("__init__", "__main__")]
    modules += [f"spin_runtime.{m}" for m in present]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the operator pulled in: {out.stdout.strip()}"
