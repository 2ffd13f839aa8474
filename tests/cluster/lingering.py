"""A step that, told to stop (SIGTERM), goes on uploading for a few seconds before it exits, as a
real step finishing a checkpoint upload in its termination grace period: then it writes
``<--output>/late-upload.txt`` (``lingering.py <argv of the step...>``)."""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

from spin_common import storage

LINGER_S = 3.0


def main(argv: list[str]) -> int:
    output = argv[argv.index("--output") + 1]

    def stop(_signum: int, _frame: FrameType | None) -> None:
        time.sleep(LINGER_S)
        storage.write_text(storage.join(output, "late-upload.txt"), "written while terminating\n")
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(0.2)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
