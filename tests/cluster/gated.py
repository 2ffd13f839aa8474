"""Run tests/e2e/standin.py once a gate file exists: a step that lasts exactly as long as a test
wants, so a fault lands while it runs (``gated.py <gate> <standin> <argv...>``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    gate, standin, *rest = argv
    # the check before iteration 0's generation is not gated: the steps the tests time are
    while rest[1:4] != ["-m", "spin_runtime", "check"] and not Path(gate).exists():
        time.sleep(0.2)
    os.execv(sys.executable, [sys.executable, standin, *rest])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
