"""The layout rules of the project hold: no shadowing, no operator imports in the runtime,
no torch in the operator or in the light runtime modules the operator shares (checked by
import-linter's contracts in .importlinter, and by importing them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIGHT_RUNTIME_MODULES = [
    "storage",
    "manifest",
    "layout",
    "cache",
    "tracking",
    "records",
    "rows",
    "data",
    "modelcheck",
    "check",
]
HEAVY = ("torch", "transformers", "vllm")


def test_operator_dir_does_not_shadow_the_stdlib() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    import operator

    assert hasattr(operator, "itemgetter"), "the standard library's operator module is shadowed"


def test_the_import_contracts_hold() -> None:
    """.importlinter's contracts (also run by `make lint`): the runtime never imports the
    operator; neither the operator nor the light runtime modules reach torch/transformers/vllm,
    directly or through another module, function-level imports included."""
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run(
        [str(lint), "--config", str(REPO / ".importlinter"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_operator_and_light_runtime_modules_load_without_torch() -> None:
    present = [
        m for m in LIGHT_RUNTIME_MODULES if (REPO / "runtime" / "spin_runtime" / f"{m}.py").exists()
    ]
    modules = ["spin_operator.cli", "spin_operator.validation", "spin_operator.api.crd"]
    modules += [
        f"spin_operator.{p.stem}"
        for p in (REPO / "operator" / "spin_operator").glob("*.py")
        if p.stem not in ("__init__", "__main__")
    ]
    modules += [f"spin_runtime.{m}" for m in present]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing the operator pulled in: {out.stdout.strip()}"
