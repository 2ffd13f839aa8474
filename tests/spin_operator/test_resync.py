"""The periodic resync (spin_operator.resync): a Job deleted while the watch was broken.

kopf re-lists after a watch 410 without DELETED events for what vanished in the gap. The gap is
reproduced by hiding the operator's Job events while the Job is deleted; only the resync can then
tell the controller the Job is gone.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from spin_operator import handlers
from spin_operator.controller import Controller
from spin_operator.kube import Kube
from tests.spin_operator.operator_harness import (
    JSON,
    NS,
    SPINRUNS,
    Cluster,
    OperatorProcess,
    emulated_cluster,
    spinrun,
)

RUN = "gap"
GEN = f"{RUN}-i0-gen"
CHECK = f"{RUN}-i0-check"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path, monkeypatch.setenv) as cluster:
        yield cluster


Lost = list[tuple[str | None, str]]  # (event type, name) of what a broken watch swallowed


@contextmanager
def _broken_watch(controller: Controller, entry: str) -> Iterator[Lost]:
    """While open, what kopf's watch delivers to `controller.<entry>` (on_job, on_run) is lost,
    as in a watch gap; yields what was lost. Only the watch is broken: the resync's replays and
    the controller's own calls (a Job it created, one it fetched) still reach the caches, as they
    would under a real broken watch."""
    hear = getattr(controller, entry)
    lost: Lost = []

    def deaf(event: str | None, obj: JSON) -> None:
        # Told apart by the caller (kopf's handler in handlers.py, else the resync or the
        # controller): swallowing the resync's own DELETED of a run too left the run cached, and
        # the next resync dropped it a second time (the metric read 2).
        if sys._getframe(1).f_code.co_filename == handlers.__file__:
            lost.append((event, obj["metadata"]["name"]))
        else:
            hear(event, obj)

    setattr(controller, entry, deaf)
    try:
        yield lost
    finally:
        setattr(controller, entry, hear)


async def _delete_during_a_watch_gap(cluster: Cluster, controller: Controller, held: bool) -> None:
    """Delete the generation Job while the operator hears no Job events (a broken watch); when
    `held`, the gap lasts until a resync has run inside it."""
    with _broken_watch(controller, "on_job") as lost:

        async def deletion_lost() -> bool:
            return ("DELETED", GEN) in lost

        async def resynced() -> bool:
            return controller.metrics.value("spin_operator_resync_dropped_total", kind="job") > 0

        await cluster.api.adelete("jobs", GEN, NS)
        await cluster.wait("the Job deleted", lambda: _absent(cluster))
        # deaf until the watch has delivered (and lost) the DELETED event, however loaded the
        # machine: a late one must not be what drops the Job
        await cluster.wait("the watch to deliver the deletion", deletion_lost)
        if held:
            await cluster.wait("a resync inside the gap", resynced, timeout=10)


async def _absent(cluster: Cluster) -> bool:
    return await cluster.api.aget("jobs", GEN, NS) is None


# held: the gap spans a resync (which drops the Job inside it); else it most likely does not
@pytest.mark.parametrize(("resync_seconds", "held"), [(0.0, False), (0.5, False), (0.5, True)])
async def test_a_job_deleted_in_a_watch_gap_is_dropped_by_the_resync(
    cluster: Cluster, resync_seconds: float, held: bool
) -> None:
    op = await OperatorProcess(cluster.settings(resync_seconds=resync_seconds)).start()
    try:
        await cluster.api.acreate(spinrun(RUN))
        await cluster.wait_job(RUN, GEN)
        controller = op.controller
        assert controller is not None

        async def check_swept() -> bool:
            # The check Job is deleted once its step is recorded: a deletion the gap below
            # swallowed too would be a second Job for the resync to drop (it was, now and then).
            cached = controller.jobs.get((NS, RUN), {})
            return CHECK not in cached and await cluster.api.aget("jobs", CHECK, NS) is None

        await cluster.wait("the check Job swept", check_swept)
        await _delete_during_a_watch_gap(cluster, controller, held)
        if not resync_seconds:  # without a resync the stale entry stays: nothing notices
            assert GEN in controller.jobs[(NS, RUN)], "the gap did not hide the deletion"
            await asyncio.sleep(2.0)
            assert GEN in controller.jobs[(NS, RUN)]
            assert [j["metadata"]["name"] for j in await cluster.jobs(RUN)] == []
            return
        # The resync drops it; the reconciler confirms with a GET and retries the step.
        retry = await cluster.wait_job(RUN, f"{GEN}-r1")
        assert retry["metadata"]["labels"]
        assert controller.metrics.value("spin_operator_resync_dropped_total", kind="job") == 1

        async def retry_recorded() -> JSON | None:
            step = (await cluster.status(RUN))["iterations"][0]["generate"]
            return step if step.get("jobName") == f"{GEN}-r1" else None

        # A pass creates the Job first and writes the status after (apply.py), so the retry Job
        # can be seen while the status still names attempt 1: wait for the status write that
        # records the retry, then check what it counted.
        step = await cluster.wait("the status to record the retry", retry_recorded)
        assert step["attempts"] == 2, step
        assert step["message"] == f"JobDeleted: Job {GEN} was deleted before it finished", step
    finally:
        await op.stop()


class PagedKube:
    """Answers a LIST in pages of `limit` items with continue tokens, as the API server does."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items
        self.calls: list[dict[str, str]] = []

    async def request(self, method: str, path: str, *, params: dict[str, str]) -> dict[str, Any]:
        self.calls.append(dict(params))
        start = int(params.get("continue", "0"))
        end = start + int(params["limit"])
        token = str(end) if end < len(self.items) else ""
        return {"items": self.items[start:end], "metadata": {"continue": token}}


async def test_lists_are_paged_with_the_label_selector() -> None:
    kube = PagedKube([{"metadata": {"name": f"j{i}"}} for i in range(7)])
    names = [i["metadata"]["name"] async for i in Kube.pages(kube, "/x", selector="a=b", chunk=3)]  # type: ignore[arg-type]
    assert names == [f"j{i}" for i in range(7)]
    assert [c.get("continue") for c in kube.calls] == [None, "3", "6"]
    assert all(c["limit"] == "3" and c["labelSelector"] == "a=b" for c in kube.calls)


@pytest.mark.parametrize("held", [False, True])  # held: the gap spans the resync that drops it
async def test_a_run_deleted_in_a_watch_gap_is_dropped_by_the_resync(
    cluster: Cluster, held: bool
) -> None:
    op = await OperatorProcess(cluster.settings(resync_seconds=0.5)).start()
    try:
        await cluster.api.acreate(spinrun(RUN))
        await cluster.wait_job(RUN, GEN)
        controller = op.controller
        assert controller is not None

        async def dropped() -> bool:
            return (NS, RUN) not in controller.runs

        with _broken_watch(controller, "on_run") as lost:

            async def deletion_lost() -> bool:
                return ("DELETED", RUN) in lost

            before = time.monotonic()  # a list without the run, and so the drop, come later
            await cluster.api.adelete(SPINRUNS, RUN, NS)
            await cluster.wait("the run deleted", lambda: _run_absent(cluster))
            # deaf until the watch has delivered (and lost) the DELETED event, however loaded
            # the machine: a late one must not be what drops the run
            await cluster.wait("the watch to deliver the deletion", deletion_lost)
            if held:
                await cluster.wait("a resync inside the gap to drop the run", dropped, timeout=10)

        await cluster.wait("the resync to drop the run", dropped, timeout=10)
        assert controller.metrics.value("spin_operator_resync_dropped_total", kind="spinrun") == 1
        # The drop forgot the run's Jobs; one cached again since came from a newer event, GET or
        # re-list (a pass in flight, the next resync: the Job is still there, nothing GCs it
        # here), never left over from before the drop.
        if GEN in controller.jobs.get((NS, RUN), {}):
            assert controller.touched[(NS, RUN, GEN)] > before
    finally:
        await op.stop()


async def _run_absent(cluster: Cluster) -> bool:
    return await cluster.api.aget(SPINRUNS, RUN, NS) is None
