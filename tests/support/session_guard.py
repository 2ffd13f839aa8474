"""Session hooks that keep `make test` independent of what an earlier run left behind.

A test run must leave nothing in the repository tree (everything goes under pytest's tmp_path)
and no process of its own running: either would make the next run, or a run after `make clean`,
see a different world. At the end of the session both are checked, and the session fails naming
what was left. (Python's bytecode caches and pytest's own cache are not the tests' doing.)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
NOT_THE_TESTS = ("__pycache__/", ".pyc", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/")
_before: set[str] | None = None


def untracked_entries() -> set[str] | None:
    """Untracked and ignored paths of the repository tree (None outside a git checkout)."""
    if not (REPO / ".git").exists():
        return None
    try:
        done = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "status",
                "--porcelain",
                "--ignored",
                "--untracked-files=normal",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    entries = {line[3:] for line in done.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {
        e for e in entries if not any(e.endswith(s) or f"/{s}" in f"/{e}" for s in NOT_THE_TESTS)
    }


def live_children() -> list[str]:
    """Processes this pytest process started that still run (zombies excluded)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (
                (entry / "cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
                .strip()
            )
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`SPIN_CACHE_DIR` (model downloads, the runtime's fallback tracking spool) in this
    session's tmp dir, never ~/.cache/spin: nothing cached by an earlier run (or another user of
    the machine) is seen. Tests that need their own set it with monkeypatch."""
    folder = tmp_path_factory.mktemp("spin-cache")
    previous = os.environ.get("SPIN_CACHE_DIR")
    os.environ["SPIN_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SPIN_CACHE_DIR", None)
    else:
        os.environ["SPIN_CACHE_DIR"] = previous


def pytest_sessionstart(session: pytest.Session) -> None:
    global _before
    _before = untracked_entries()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):
        return  # an xdist worker: the controller checks
    problems: list[str] = []
    after = untracked_entries()
    if _before is not None and after is not None and (new := sorted(after - _before)):
        problems.append("tests wrote into the repository tree (use tmp_path): " + ", ".join(new))
    if Path("/proc").is_dir() and (children := live_children()):
        problems.append(
            "processes started by the tests still run after the session:\n  "
            + "\n  ".join(children)
        )
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "session guard: the suite left something behind", red=True)
            for problem in problems:
                reporter.write_line(problem, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
