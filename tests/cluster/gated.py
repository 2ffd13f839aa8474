"""Run tests/cluster/standin.py once a gate file exists: a step that lasts exactly as long as a test
wants, so a fault lands while it runs (``gated.py <gate>[:<gate>...] <standin> <argv...>``).

Each pod waits on two files (``os.pathsep``-separated): the test's shared gate, which lets every
step through, and its Job's own gate (``job_gate``), which lets only that Job's pods through.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def job_gate(gate: Path, job: str) -> Path:
    """The file that opens ``gate`` for the pods of Job ``job`` only."""
    return gate.with_name(f"{gate.name}.{job}")


def main(argv: list[str]) -> int:
    gates, standin, *rest = argv
    paths = [Path(p) for p in gates.split(os.pathsep)]
    # the check before iteration 0's generation is not gated: the steps the tests time are
    while rest[1:4] != ["-m", "spin_runtime", "check"] and not any(p.exists() for p in paths):
        time.sleep(0.2)
    os.execv(sys.executable, [sys.executable, standin, *rest])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
