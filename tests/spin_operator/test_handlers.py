"""The real kopf operator against the emulated API server: whole SPINRun lifecycles.

Jobs are moved through their states by the Job controller stand-in; completing one first writes
the artifacts and manifests the runtime would write (local storage prefix), so the operator's
storage facts are real.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from spin_operator import naming
from spin_operator.policy import Allowed, Policy
from tests.spin_operator.operator_harness import (
    NS,
    SPINRUNS,
    Cluster,
    OperatorProcess,
    emulated_cluster,
    spinrun,
)


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path, monkeypatch.setenv) as cluster:
        yield cluster
        errors = list(cluster.api.emulator.internal_errors)
    assert not errors, "the emulated API server failed internally:\n" + "\n".join(errors)


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[OperatorProcess]:
    op = await OperatorProcess(cluster.settings()).start()
    yield op
    await op.stop()


async def test_three_iterations_to_succeeded(cluster: Cluster, operator: OperatorProcess) -> None:
    await cluster.api.acreate(spinrun("paper", iterations=3))
    status = await cluster.run_to_end("paper", metrics=[0.2, 0.5, 0.4])
    assert (status["phase"], status["progress"], status["stage"], status["bestIteration"]) == (
        "Succeeded",
        "3/3",
        "Done",
        1,
    )
    assert [it["metrics"]["exact_match"] for it in status["iterations"]] == [0.2, 0.5, 0.4]
    ready = await cluster.condition("paper", "Ready")
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    assert cluster.creates() == [201] * 10  # the check, then 9 steps: never a second create
    # a step's Jobs are deleted once the status records it (none left behind, none re-run)
    await cluster.wait("finished Jobs deleted", lambda: _no_jobs(cluster, "paper"))
    assert cluster.creates() == [201] * 10
    assert await cluster.api.alist("services", namespace=NS) == []  # rendezvous Services cleaned up
    reasons = collections.Counter(
        r
        for r, _ in await cluster.wait(
            "events", lambda: _events_with(cluster, "paper", "Succeeded")
        )
    )
    assert (
        reasons["JobCreated"] == 10
        and reasons["IterationCompleted"] == 3
        and reasons["Started"] == 1
    )
    # one status patch per transition, no polling: a bounded number of writes per Job
    writes = cluster.api.requests.by_verb_resource(user_agent="spin-operator")
    assert writes["patch spinruns/status"] <= 2 * 10 + 2, writes
    assert writes["create jobs"] == 10 and writes["get secrets"] == 0
    assert (cluster.storage / NS / "paper" / "spinrun.yaml").exists()


async def _events_with(cluster: Cluster, name: str, reason: str) -> list[tuple[str, str]]:
    events = await cluster.events(name)
    return events if any(r == reason for r, _ in events) else []


async def test_training_job_gets_a_headless_service(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(spinrun("multi"))
    gen = await cluster.wait_job("multi", "multi-i0-gen")
    assert gen["spec"]["completions"] == 2 and gen["spec"]["completionMode"] == "Indexed"
    await cluster.complete(gen)
    train = await cluster.wait_job("multi", "multi-i0-train")
    service = await cluster.api.aget("services", "multi-i0-train", NS)
    assert service is not None and service["spec"]["clusterIP"] == "None"
    assert train["spec"]["template"]["spec"]["subdomain"] == "multi-i0-train"
    owner = train["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("SPINRun", "multi", True)


async def test_failed_job_is_retried_then_succeeds(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(spinrun("flaky"))
    first = await cluster.wait_job("flaky", "flaky-i0-gen")
    await cluster.fail(first)
    retry = await cluster.wait_job("flaky", "flaky-i0-gen-r1")
    assert retry["metadata"]["labels"][naming.ATTEMPT_LABEL] == "1"
    status = await cluster.run_to_end("flaky")
    assert status["phase"] == "Succeeded"
    gen = status["iterations"][0]["generate"]
    assert (gen["attempts"], gen["jobName"]) == (2, "flaky-i0-gen-r1")
    assert any(r == "Retrying" for r, _ in await cluster.events("flaky"))


async def test_retries_exhausted_fail_the_run_with_the_reason(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(spinrun("doomed", failurePolicy={"maxRetries": 1}))
    await cluster.fail(await cluster.wait_job("doomed", "doomed-i0-gen"), "DeadlineExceeded")
    await cluster.fail(await cluster.wait_job("doomed", "doomed-i0-gen-r1"), "DeadlineExceeded")
    await cluster.wait_phase("doomed", "Failed")
    failed = await cluster.condition("doomed", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded"
    assert "generate of iteration 0 failed after 2 attempt(s)" in failed["message"]
    await asyncio.sleep(0.3)
    assert len(await cluster.jobs("doomed")) == 2  # nothing more started


async def test_suspend_and_resume(cluster: Cluster, operator: OperatorProcess) -> None:
    await cluster.api.acreate(spinrun("pause"))
    job = await cluster.wait_job("pause", "pause-i0-gen")
    await cluster.start(job)
    await cluster.api.apatch(SPINRUNS, "pause", {"spec": {"suspend": True}}, NS)

    async def suspended() -> bool:
        found = await cluster.api.aget("jobs", "pause-i0-gen", NS)
        return bool(found and found["spec"].get("suspend") is True)

    await cluster.wait("Job suspended", suspended)
    await cluster.wait_phase("pause", "Suspended")
    assert (await cluster.condition("pause", "Suspended"))["status"] == "True"
    await cluster.api.apatch(SPINRUNS, "pause", {"spec": {"suspend": False}}, NS)

    async def resumed() -> bool:
        found = await cluster.api.aget("jobs", "pause-i0-gen", NS)
        return bool(found and found["spec"].get("suspend") is False)

    await cluster.wait("Job resumed", resumed)
    await cluster.wait_phase("pause", "Running")
    assert (await cluster.run_to_end("pause"))["phase"] == "Succeeded"
    assert cluster.creates() == [201] * 4  # the check, then generate, train, evaluate


async def test_deletion_keeps_artifacts_by_default(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(spinrun("keep"))
    await cluster.complete(await cluster.wait_job("keep", "keep-i0-gen"))
    await cluster.wait_job("keep", "keep-i0-train")
    assert "finalizers" not in (await cluster.run("keep"))["metadata"]
    await cluster.api.adelete(SPINRUNS, "keep", NS)
    await cluster.wait("SPINRun gone", lambda: _gone(cluster, "keep"))
    await cluster.wait("Jobs collected", lambda: _no_jobs(cluster, "keep"))
    assert (cluster.storage / NS / "keep" / "iter-000" / "generated").is_dir()


async def test_deletion_with_retention_delete_removes_artifacts(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(spinrun("wipe", retention={"onDelete": "Delete"}))
    await cluster.complete(await cluster.wait_job("wipe", "wipe-i0-gen"))
    await cluster.wait_job("wipe", "wipe-i0-train")
    assert naming.FINALIZER in (await cluster.run("wipe"))["metadata"]["finalizers"]
    prefix = cluster.storage / NS / "wipe"
    assert prefix.is_dir()
    await cluster.api.adelete(SPINRUNS, "wipe", NS)
    await cluster.wait("SPINRun gone", lambda: _gone(cluster, "wipe"))
    assert not prefix.exists()
    await cluster.wait("Jobs gone", lambda: _no_jobs(cluster, "wipe"))


async def _gone(cluster: Cluster, name: str) -> bool:
    return await cluster.api.aget(SPINRUNS, name, NS) is None


async def _no_jobs(cluster: Cluster, name: str) -> bool:
    return not await cluster.jobs(name)


@pytest.mark.parametrize("stage", ["check", "gen", "train", "eval"])
@pytest.mark.parametrize("while_down", ["running", "completed"])
async def test_operator_killed_and_restarted_at_each_stage(
    cluster: Cluster, stage: str, while_down: str
) -> None:
    """Kill the operator while a Job of `stage` runs (and maybe finishes meanwhile), restart it:
    no Job is created twice and no finished step is redone."""
    op = await OperatorProcess(cluster.settings()).start()
    await cluster.api.acreate(spinrun("phoenix", iterations=2))
    for name in ("phoenix-i0-check", "phoenix-i0-gen", "phoenix-i0-train", "phoenix-i0-eval"):
        job = await cluster.wait_job("phoenix", name)
        if name.endswith(stage):
            break
        await cluster.complete(job)
    await op.kill()
    if while_down == "completed":
        await cluster.complete(job)
    op = await OperatorProcess(cluster.settings()).start()
    try:
        status = await cluster.run_to_end("phoenix")
    finally:
        await op.stop()
    assert status["phase"] == "Succeeded" and status["progress"] == "2/2"
    assert [it["generate"]["jobName"] for it in status["iterations"]] == [
        "phoenix-i0-gen",
        "phoenix-i1-gen",
    ]
    assert status["iterations"][0]["check"]["jobName"] == "phoenix-i0-check"
    assert "check" not in status["iterations"][1]
    assert cluster.creates() == [201] * 7  # the check once, then 3 steps per iteration


async def test_restart_with_status_lost_resumes_from_storage(cluster: Cluster) -> None:
    """Even with the whole status wiped, finished steps are found in storage, not redone."""
    op = await OperatorProcess(cluster.settings()).start()
    await cluster.api.acreate(spinrun("amnesia", iterations=2))
    for name in ("amnesia-i0-gen", "amnesia-i0-train", "amnesia-i0-eval"):
        await cluster.complete(await cluster.wait_job("amnesia", name))
    await cluster.wait_job("amnesia", "amnesia-i1-gen")
    await op.kill()
    await cluster.api.apatch(SPINRUNS, "amnesia", {"status": None}, NS, subresource="status")
    op = await OperatorProcess(cluster.settings()).start()
    try:
        status = await cluster.run_to_end("amnesia")
    finally:
        await op.stop()
    assert status["phase"] == "Succeeded"
    assert cluster.creates() == [201] * 7  # the check (found in storage after), 3 + 3 steps
    assert status["iterations"][0]["generate"]["phase"] == "Succeeded"
    assert status["iterations"][0]["check"]["phase"] == "Succeeded"


async def test_missing_storage_default_fails_naming_the_field(cluster: Cluster) -> None:
    # no default, but the admin allows the prefix the fixed spec names (spin_operator.policy)
    allowed = Policy(Allowed(storage_prefixes=(str(cluster.storage),)))
    op = await OperatorProcess(cluster.settings(storage_uri=None, security=allowed)).start()
    try:
        await cluster.api.acreate(spinrun("nowhere"))
        await cluster.wait_phase("nowhere", "Failed")
        failed = await cluster.condition("nowhere", "Failed")
        assert failed["reason"] == "InvalidSpec" and failed["message"].startswith(
            "spec.storage.uri:"
        )
        assert await cluster.jobs("nowhere") == []
        # fixing the spec re-evaluates a run that never started
        await cluster.api.apatch(
            SPINRUNS, "nowhere", {"spec": {"storage": {"uri": str(cluster.storage)}}}, NS
        )
        await cluster.wait_job("nowhere", "nowhere-i0-gen")
        await cluster.wait_phase("nowhere", "Running")
    finally:
        await op.stop()


async def test_missing_secret_fails_naming_the_field(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(
        spinrun("locked", storage={"credentialsSecret": {"name": "s3-creds"}})
    )
    await cluster.wait_phase("locked", "Failed")
    failed = await cluster.condition("locked", "Failed")
    assert (failed["reason"], failed["message"]) == (
        "SecretNotFound",
        'spec.storage.credentialsSecret.name: Secret "s3-creds" not found',
    )
    assert await cluster.jobs("locked") == []
    await cluster.api.acreate(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-creds", "namespace": NS},
            "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
        }
    )
    await cluster.api.apatch(
        SPINRUNS, "locked", {"metadata": {"annotations": {"selfplay.dev/recheck": "1"}}}, NS
    )
    job = await cluster.wait_job("locked", "locked-i0-gen")
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "AWS_ACCESS_KEY_ID",
    }


async def test_refused_spec_change_goes_on_with_the_started_spec(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(spinrun("steady", iterations=2))
    await cluster.complete(await cluster.wait_job("steady", "steady-i0-gen"))
    await cluster.wait_job("steady", "steady-i0-train")
    await cluster.api.apatch(
        SPINRUNS, "steady", {"spec": {"model": {"uri": "s3://models/other"}, "iterations": 3}}, NS
    )

    async def refused() -> bool:
        conds = (await cluster.status("steady")).get("conditions") or []
        return any(c["type"] == "SpecChangeRefused" and c["status"] == "True" for c in conds)

    await cluster.wait("SpecChangeRefused", refused)
    cond = await cluster.condition("steady", "SpecChangeRefused")
    assert "spec.model.uri" in cond["message"] and cond["observedGeneration"] == 2
    train = await cluster.api.aget("jobs", "steady-i0-train", NS)  # (finished Jobs are deleted)
    assert (
        train is not None
        and "s3://models/tiny" in train["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    status = await cluster.run_to_end("steady")
    assert status["progress"] == "3/3"  # iterations is mutable: raised to 3


async def test_metrics_count_jobs_and_transitions(
    cluster: Cluster, operator: OperatorProcess
) -> None:
    await cluster.api.acreate(spinrun("counted"))
    await cluster.run_to_end("counted")
    assert operator.controller is not None
    m = operator.controller.metrics
    assert m.value("spin_operator_jobs_created_total", stage="train") == 1
    assert (
        m.value("spin_operator_phase_transitions_total", from_phase="Running", to_phase="Succeeded")
        == 1
    )
    assert m.value("spin_operator_runs", phase="Succeeded") == 1
    assert m.value("spin_operator_reconcile_duration_seconds_count") > 0
