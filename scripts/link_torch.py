"""Hard-link torch (and its CUDA libraries) from one virtualenv into another.

Usage: python scripts/link_torch.py SOURCE_SITE_PACKAGES DEST_SITE_PACKAGES TORCH_VERSION

PyPI's torch 2.13.0 comes with about 4.6 GB of CUDA libraries (nvidia-*, triton). The vLLM
virtualenv needs the very same torch as the main one; installing it twice doubled the disk a
fresh clone needs (a CI run once died of ENOSPC). Hard links share the bytes: each venv still
owns its files (pip can uninstall or upgrade either one without touching the other), and where
the two paths are on different filesystems the files are copied instead.

Prints what it linked; exits 0 without doing anything when the source has no matching torch,
so the caller's `pip install torch==...` then installs it the usual way.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib.metadata import Distribution, distributions
from pathlib import Path

# The heavy part of torch's dependency closure; the small pure-Python ones (sympy, networkx,
# jinja2, ...) are left to pip so that their console scripts point at the right interpreter.
HEAVY_PREFIXES = ("torch", "triton", "nvidia-", "nvidia_", "cuda-", "cuda_")


def _name(dist: Distribution) -> str:
    return str(dist.metadata["Name"]).lower().replace("_", "-")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def link(source: Path, dest: Path, torch_version: str) -> int:
    dists = {_name(d): d for d in distributions(path=[str(source)])}
    torch = dists.get("torch")
    if torch is None or torch.version.split("+")[0] != torch_version:
        print(f"no torch {torch_version} in {source}: nothing linked")
        return 0
    linked = 0
    for name, dist in sorted(dists.items()):
        if not name.startswith(HEAVY_PREFIXES) or name.startswith("torchvision"):
            continue
        for entry in dist.files or []:
            rel = Path(str(entry))
            # Console scripts live in ../../../bin with the source interpreter in their
            # shebang: never link those.
            if rel.parts and rel.parts[0] == "..":
                continue
            src = source / rel
            if src.is_file():
                _link_or_copy(src, dest / rel)
        linked += 1
        print(f"linked {name} {dist.version}")
    return linked


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    source, dest = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    if source == dest:
        sys.exit("source and destination are the same site-packages")
    link(source, dest, sys.argv[3])


if __name__ == "__main__":
    main()
