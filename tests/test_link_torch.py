"""scripts/link_torch.py: the vLLM venv shares the main venv's torch through hard links."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("link_torch", REPO / "scripts" / "link_torch.py")
assert _spec and _spec.loader
link_torch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(link_torch)


def _dist(site: Path, name: str, version: str, files: dict[str, str]) -> None:
    """A minimal installed distribution: its files, METADATA and a RECORD listing them."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    for rel, text in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        record.append(f"{rel},,")
    (info / "RECORD").write_text("\n".join(record) + "\n")


def test_links_torch_and_its_cuda_libraries_not_the_rest(tmp_path: Path) -> None:
    src, dst = (tmp_path / v / "lib" / "python3.11" / "site-packages" for v in ("a", "b"))
    _dist(src, "torch", "2.13.0+cu130", {"torch/__init__.py": "", "../../../bin/torchrun": "#!x"})
    _dist(src, "nvidia-cublas", "13.1", {"nvidia/cu13/lib/libcublas.so": "elf"})
    _dist(src, "sympy", "1.14", {"sympy/__init__.py": ""})
    dst.mkdir(parents=True)

    assert link_torch.link(src, dst, "2.13.0") == 2

    for rel in ("torch/__init__.py", "nvidia/cu13/lib/libcublas.so"):
        assert os.path.samefile(src / rel, dst / rel), rel
    assert (dst / "torch-2.13.0+cu130.dist-info" / "RECORD").exists()
    # pip installs the small ones itself, with console scripts for this interpreter.
    assert not (dst / "sympy").exists()
    assert (tmp_path / "a" / "bin" / "torchrun").exists()
    assert not (tmp_path / "b" / "bin").exists()


def test_another_torch_version_links_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "a", tmp_path / "b"
    _dist(src, "torch", "2.12.1", {"torch/__init__.py": ""})
    dst.mkdir()
    assert link_torch.link(src, dst, "2.13.0") == 0
    assert list(dst.iterdir()) == []
