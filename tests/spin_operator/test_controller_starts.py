"""The controller's start gate: runs that have not started go a few at a time (STARTS_AT_ONCE),
so a wave of new runs never holds up a started run's next Job (issue 13: p99 at 250 runs)."""

from __future__ import annotations

import asyncio
from typing import Any

from spin_operator.api import types as api
from spin_operator.controller import STARTS_AT_ONCE, Controller
from spin_operator.decision import ObservedJob
from spin_operator.kube import CONNECTIONS, Kube
from spin_operator.settings import Settings

NS = "ns"


def body(name: str, started: bool) -> dict[str, Any]:
    return {
        "metadata": {"namespace": NS, "name": name, "uid": f"uid-{name}"},
        "status": {"phase": "Running", "specHash": "abc"} if started else {},
    }


class Passes:
    """Stands in for one pass of each run: unstarted runs hold their pass until `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.inside = 0
        self.most_inside = 0
        self.done: list[str] = []

    async def __call__(self, key: tuple[str, str], body: Any, status: api.SPINRunStatus) -> bool:
        if status.spec_hash is None and not key[1].startswith("jobs-"):
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
            await self.release.wait()
            self.inside -= 1
        self.done.append(key[1])
        return True


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_started_run_is_not_held_behind_a_wave_of_starts() -> None:
    async def scenario() -> None:
        controller = Controller(Settings(), Kube(lambda: None))
        passes = Passes()
        controller._pass = passes  # type: ignore[method-assign]
        try:
            for i in range(3 * STARTS_AT_ONCE):
                controller.on_run("ADDED", body(f"new-{i}", started=False))
            await until(lambda: passes.inside == STARTS_AT_ONCE)
            # A started run's pass, and one whose cached body lost the recorded spec to an older
            # watch event but has Jobs (so it has started), go at once: the starts still wait.
            controller.on_run("MODIFIED", body("running", started=True))
            controller.jobs[(NS, "jobs-run")] = {
                "jobs-run-i0-check": (
                    "uid-jobs-run",
                    ObservedJob("jobs-run-i0-check", 0, "check", 0, "Succeeded"),
                )
            }
            controller.on_run("MODIFIED", body("jobs-run", started=False))
            await until(lambda: {"running", "jobs-run"} <= set(passes.done))
            assert passes.inside == STARTS_AT_ONCE and not any(
                d.startswith("new-") for d in passes.done
            )
            passes.release.set()
            await until(lambda: len(passes.done) == 3 * STARTS_AT_ONCE + 2)
            assert passes.most_inside == STARTS_AT_ONCE  # never more starts at once
        finally:
            await controller.close()

    asyncio.run(scenario())


def test_the_gate_is_few_enough_to_leave_the_client_connections_to_transitions() -> None:
    """Each start pass makes one API call at a time: with STARTS_AT_ONCE below the client's
    connections, the starts alone can never occupy them all."""
    assert 0 < STARTS_AT_ONCE < CONNECTIONS


def test_a_watch_event_of_a_version_the_operator_wrote_over_is_not_cached() -> None:
    """The watch can bring the start's metadata patch after the status patch's answer is cached:
    that older body (no recorded spec) must not replace the newer one, or the next pass redoes
    the start (dry runs again, a 409 on the check Job) and waits at the start gate."""

    async def scenario() -> None:
        controller = Controller(Settings(), Kube(lambda: None))
        passes = Passes()
        passes.release.set()
        controller._pass = passes  # type: ignore[method-assign]
        key = (NS, "run")

        def version(rv: str, started: bool) -> dict[str, Any]:
            b = body("run", started)
            b["metadata"]["resourceVersion"] = rv
            return b

        try:
            controller.on_run("ADDED", version("1", started=False))
            await until(lambda: passes.done == ["run"])
            controller.applier._cache(key, version("2", started=False))  # the metadata patch
            controller.applier._cache(key, version("3", started=True))  # then the status patch
            controller.on_run("MODIFIED", version("2", started=False))  # the first one's event
            assert controller.runs[key]["metadata"]["resourceVersion"] == "3"
            controller.on_run("MODIFIED", version("3", started=True))
            await until(lambda: passes.done == ["run", "run"])  # only the newest one's pass
            controller.on_run("MODIFIED", version("4", started=True))  # someone else's write
            assert controller.runs[key]["metadata"]["resourceVersion"] == "4"
            await until(lambda: passes.done == ["run"] * 3)
        finally:
            await controller.close()

    asyncio.run(scenario())
