"""The module maps agree with the tree: docs/design.md's map of the three packages and the list in
spin_operator/local/__init__.py name every module there is, and no module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("operator/spin_operator", "runtime/spin_runtime", "runtime/spin_common")
# An entry of the map: two spaces, then `name.py`, `dir/name.py` or `dir/`, several joined by ", ".
ENTRY = re.compile(r"^  ((?:[\w/]+\.py|\w+/)(?:, (?:[\w/]+\.py|\w+/))*)")


def design_map() -> dict[str, set[str]]:
    """Package folder -> the entries its block of the map lists (`api/types.py`, `local/`)."""
    maps: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in (ROOT / "docs" / "design.md").read_text().splitlines():
        if line.rstrip("/") in PACKAGES:
            current = maps.setdefault(line.rstrip("/"), set())
        elif current is not None and line.startswith("```"):
            current = None
        elif current is not None and (m := ENTRY.match(line)):
            current.update(m.group(1).split(", "))
    return maps


def missing_and_stale(package: Path, listed: set[str]) -> tuple[list[str], list[str]]:
    missing = []
    for path in sorted(package.iterdir()):
        if path.suffix == ".py" and path.name != "__init__.py" and path.name not in listed:
            missing.append(path.name)
        elif (path / "__init__.py").exists() and f"{path.name}/" not in listed:
            missing += [
                f"{path.name}/{m.name}"
                for m in sorted(path.glob("*.py"))
                if m.name != "__init__.py" and f"{path.name}/{m.name}" not in listed
            ]
    stale = sorted(entry for entry in listed if not (package / entry).exists())
    return missing, stale


def test_design_md_maps_every_module_of_each_package() -> None:
    maps = design_map()
    assert sorted(maps) == sorted(PACKAGES)
    for folder, listed in maps.items():
        missing, stale = missing_and_stale(ROOT / folder, listed)
        assert (missing, stale) == ([], []), f"docs/design.md's map of {folder}: (missing, gone)"


def test_local_mode_docstring_lists_every_local_module() -> None:
    local = ROOT / "operator" / "spin_operator" / "local"
    listed = set(re.findall(r"^\* `(\w+)`", (local / "__init__.py").read_text(), re.M))
    modules = {p.stem for p in local.glob("*.py") if p.name != "__init__.py"}
    assert (sorted(modules - listed), sorted(listed - modules)) == ([], [])


def test_a_module_left_out_of_the_map_is_named() -> None:
    """The check itself: with `resync.py` dropped from the listed entries, it is reported."""
    listed = design_map()["operator/spin_operator"] - {"resync.py"}
    assert missing_and_stale(ROOT / "operator/spin_operator", listed) == (["resync.py"], [])
