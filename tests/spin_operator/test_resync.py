"""The periodic resync (spin_operator.resync): a Job deleted while the watch was broken.

kopf re-lists after a watch 410 without DELETED events for what vanished in the gap. The gap is
reproduced by hiding the operator's Job events while the Job is deleted; only the resync can then
tell the controller the Job is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spin_operator.controller import Controller
from spin_operator.kube import Kube
from tests.spin_operator.operator_harness import NS, SPINRUNS, Cluster, OperatorProcess, spinrun
from tests.support.k8s_emulator import running_api

RUN = "gap"
GEN = f"{RUN}-i0-gen"
CHECK = f"{RUN}-i0-check"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with running_api(tmp_path) as api:
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig_path))
        yield Cluster(api, tmp_path)


async def _delete_during_a_watch_gap(cluster: Cluster, controller: Controller) -> None:
    """Delete the generation Job while the operator hears no Job events (a broken watch)."""
    hear = controller.on_job
    lost: list[tuple[str | None, str]] = []  # the events the broken watch swallowed
    controller.on_job = lambda event, obj: lost.append((event, obj["metadata"]["name"]))  # type: ignore[method-assign]

    async def deletion_lost() -> bool:
        return ("DELETED", GEN) in lost

    try:
        await cluster.api.adelete("jobs", GEN, NS)
        await cluster.wait("the Job deleted", lambda: _absent(cluster))
        # deaf until the watch has delivered (and lost) the DELETED event, however loaded the
        # machine: a late one must not be what drops the Job
        await cluster.wait("the watch to deliver the deletion", deletion_lost)
    finally:
        controller.on_job = hear  # type: ignore[method-assign]


async def _absent(cluster: Cluster) -> bool:
    return await cluster.api.aget("jobs", GEN, NS) is None


@pytest.mark.parametrize("resync_seconds", [0.0, 0.5])
async def test_a_job_deleted_in_a_watch_gap_is_dropped_by_the_resync(
    cluster: Cluster, resync_seconds: float
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
            check = f"{RUN}-i0-check"
            cached = controller.jobs.get((NS, RUN), {})
            return check not in cached and await cluster.api.aget("jobs", check, NS) is None

        await cluster.wait("the check Job swept", check_swept)
        await _delete_during_a_watch_gap(cluster, controller)
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

        async def retry_recorded() -> bool:  # the Job is created before the status says so
            status = await cluster.status(RUN)
            return bool(status["iterations"][0]["generate"]["attempts"] == 2)

        await cluster.wait("the status to record the retry", retry_recorded)
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


async def test_a_run_deleted_in_a_watch_gap_is_dropped_by_the_resync(cluster: Cluster) -> None:
    op = await OperatorProcess(cluster.settings(resync_seconds=0.5)).start()
    try:
        await cluster.api.acreate(spinrun(RUN))
        await cluster.wait_job(RUN, GEN)
        controller = op.controller
        assert controller is not None
        hear = controller.on_run
        lost: list[tuple[str | None, str]] = []  # the events the broken watch swallowed
        controller.on_run = lambda event, obj: lost.append((event, obj["metadata"]["name"]))  # type: ignore[method-assign]

        async def deletion_lost() -> bool:
            return ("DELETED", RUN) in lost

        try:
            await cluster.api.adelete(SPINRUNS, RUN, NS)
            await cluster.wait("the run deleted", lambda: _run_absent(cluster))
            # deaf until the watch has delivered (and lost) the DELETED event, however loaded
            # the machine: a late one must not be what drops the run
            await cluster.wait("the watch to deliver the deletion", deletion_lost)
        finally:
            controller.on_run = hear  # type: ignore[method-assign]

        async def dropped() -> bool:
            return (NS, RUN) not in controller.runs

        await cluster.wait("the resync to drop the run", dropped, timeout=10)
        assert controller.metrics.value("spin_operator_resync_dropped_total", kind="spinrun") == 1
        assert (NS, RUN) not in controller.run_touched or GEN not in controller.jobs.get(
            (NS, RUN), {}
        )
    finally:
        await op.stop()


async def _run_absent(cluster: Cluster) -> bool:
    return await cluster.api.aget(SPINRUNS, RUN, NS) is None
