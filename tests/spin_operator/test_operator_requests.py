"""API requests the operator makes per SPIN iteration, counted on the emulated API server for one
run whose Jobs go through the states the real Job controller writes (created, pods running,
complete). The scale benchmark measures the same on a real cluster (docs/benchmarks.md,
"Operator"); this keeps regressions to fail in seconds."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.spin_operator.operator_harness import (
    NS,
    Cluster,
    OperatorProcess,
    emulated_cluster,
    spinrun,
)

OPERATOR = ("spin-operator", "kopf")


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path, monkeypatch.setenv) as cluster:
        cluster.api.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "s3-creds", "namespace": NS},
                "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
            }
        )
        yield cluster


async def settled(op: OperatorProcess, name: str, job: str, before: object) -> None:
    """Until the operator's Job cache holds a newer state of `job` than `before` and the pass
    that change started is over (so that what it wrote, if anything, is counted)."""
    controller = op.controller
    assert controller is not None
    key = (NS, name)
    deadline = asyncio.get_running_loop().time() + 15
    while controller.jobs.get(key, {}).get(job) == before or key in controller._running:
        assert asyncio.get_running_loop().time() < deadline, f"{job}: no pass after its change"
        await asyncio.sleep(0.01)


async def drive(cluster: Cluster, op: OperatorProcess, name: str) -> None:
    """Each Job as the real Job controller moves it: its pods start (the operator records the
    step Running), its pods finish and the outcome is decided (the operator's pass on that is
    over before the next write), then it completes with its artifacts written."""
    done: set[str] = set()
    while (await cluster.phase(name)) not in ("Succeeded", "Failed"):
        for job in await cluster.active(name):
            job_name = job["metadata"]["name"]
            if job_name in done:
                continue
            await cluster.start(job)
            step = job["metadata"]["labels"]["selfplay.dev/stage"]

            async def running(job_name: str = job_name, step: str = step) -> bool:
                its = (await cluster.status(name)).get("iterations") or []
                field = step.replace("-", "_")
                return any(
                    (it.get(field) or {}).get("jobName") == job_name
                    and (it.get(field) or {}).get("phase") == "Running"
                    for it in its
                )

            await cluster.wait(f"{job_name} recorded Running", running)
            await asyncio.to_thread(cluster.write_artifacts, job)
            before = op.controller.jobs[(NS, name)].get(job_name)  # type: ignore[union-attr]
            await asyncio.to_thread(cluster.driver.pods_finished, job_name, NS)
            await settled(op, name, job_name, before)
            await cluster.complete(job, write=False)
            done.add(job_name)
        await asyncio.sleep(0.02)


async def test_requests_per_iteration(cluster: Cluster) -> None:
    op = await OperatorProcess(cluster.settings()).start()
    try:
        cluster.api.reset_requests()
        body = spinrun("counted", iterations=2, storage={"credentialsSecret": {"name": "s3-creds"}})
        await cluster.api.acreate(body)
        await asyncio.wait_for(drive(cluster, op, "counted"), 60)
        assert await cluster.phase("counted") == "Succeeded"

        async def swept() -> bool:  # the last Job's delete and the last events are sent
            return not await cluster.jobs("counted")

        await cluster.wait("the last Job deleted", swept)
    finally:
        await op.stop()
    seen = collections.Counter(
        f"{e.verb} {e.rbac_resource}" + (" (dry run)" if e.dry_run else "")
        for e in cluster.api.requests.entries(dry_runs=True)
        if e.user_agent.startswith(OPERATOR) and e.verb not in ("watch", "list")
    )
    # 7 Jobs: the check, then generate, train, evaluate in each of the 2 iterations.
    assert seen["create jobs"] == 7 and seen["create services"] == 2, seen
    assert seen["create jobs (dry run)"] == 4 and seen["create services (dry run)"] == 1, seen
    assert seen["delete jobs"] == 7 and seen["delete services"] == 2, seen
    # The Secret is checked when the run starts, not again before each of its 7 Jobs.
    assert seen["get secrets"] == 1, seen
    # Per Job: its creation (with the previous step's success) and its pods running; one more
    # when the run succeeds. Nothing in between: a Job whose pods finished reads Running, not
    # Pending (it did, and wrote each step back to Pending just before it succeeded: 22 here).
    assert seen["patch spinruns/status"] == 2 * 7 + 1, seen
    assert seen["patch spinruns"] == 1, seen  # the applied-spec annotation
    # Started, JobCreated x 7, IterationCompleted x 2, BestIteration, MetricUninformative,
    # Succeeded: the events users follow with kubectl describe.
    assert seen["create events"] <= 13, seen
    assert sum(seen.values()) <= 2 * 7 + 1 + 1 + 7 + 2 + 5 + 7 + 2 + 1 + 13, seen
