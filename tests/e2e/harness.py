"""Helpers of the end-to-end suite: polling, Job conditions, kubectl, the operator process.

Why a module and not fixtures only: scenario tests share these steps (apply, wait for a phase,
kill and restart the operator) and benchmarks reuse them with their own timing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy; its value is returned.

    Polling (not sleeping for a guessed duration): the test ends as soon as the state is reached,
    and a timeout names what never happened, with the last value seen.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The condition ``kind`` of an object's status when it is True, else None."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None
