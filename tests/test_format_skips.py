"""Every fmt-skip comment says why the formatter is kept off that statement.

`ruff format` lays out the whole codebase; a statement it may not touch (an argv with each flag
beside its value, a packed word list, a table with one case per line) carries the reason in the
same comment: `# fmt: skip # argv: a flag beside its value`.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("operator", "runtime", "tests", "benchmarks", "scripts")
MARK = "# fmt: " + "skip"  # split: this file's own source is scanned too
WITH_REASON = re.compile(re.escape(MARK) + r" # \S")


def test_every_fmt_skip_gives_its_reason() -> None:
    bare = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if MARK in line and not WITH_REASON.search(line)
    ]
    assert bare == [], f"{MARK} without `# <why>` after it"
