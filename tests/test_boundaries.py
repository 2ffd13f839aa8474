"""The layout rules of the project hold: no shadowing, the operator and the runtime independent,
no torch in the operator or in the shared package (spin_common).

The import rules themselves are import-linter's contracts in .importlinter (`make lint`, and run
here too). What import-linter cannot see stays as a test: the `operator/` folder shadowing the
standard library, and imports made at run time by name (`importlib.import_module`, as the runtime's
CLI loads its commands), which only importing the modules catches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "vllm")


def test_operator_dir_does_not_shadow_the_stdlib() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter"), "the standard library's operator module is shadowed"


def test_the_import_contracts_hold() -> None:
    """.importlinter's contracts (also run by `make lint`): the operator and the runtime never
    import each other, spin_common neither of them; neither the operator nor spin_common reach
    torch/transformers/vllm, directly or through another module, function-level imports
    included."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--config", str(REPO / ".importlinter"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _modules(package_dir: Path) -> list[str]:
    """Every module of a package, subpackages included (`local/`, `api/`)."""
    root = package_dir.parent
    return sorted(
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in package_dir.rglob("*.py")
        if p.stem != "__main__"
    )


def test_operator_and_shared_modules_load_without_torch() -> None:
    """Importing every module of the operator and of spin_common loads no torch, transformers or
    vllm: this also covers imports by name that import-linter cannot follow."""
    modules = _modules(REPO / "operator" / "spin_operator")
    modules += _modules(REPO / "runtime" / "spin_common")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the operator pulled in: {out.stdout.strip()}"
