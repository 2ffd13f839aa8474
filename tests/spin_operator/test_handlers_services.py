"""The operator with real S3 (moto) and MLflow servers: manifests read from s3://, MLflow runs,
model versions and the best alias, and a run that goes on while MLflow is down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_operator import naming
from spin_operator.api import types as api
from spin_operator.policy import Allowed, Policy
from spin_operator.track import Tracking
from tests.spin_operator.operator_harness import (
    NS,
    Cluster,
    OperatorProcess,
    emulated_cluster,
    spinrun,
)
from tests.support.servers import MlflowServer, free_port


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path, monkeypatch.setenv) as cluster:
        yield cluster


def env_of(job: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {
        e["name"]: e.get("value", "")
        for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }


async def test_s3_storage_and_mlflow_tracking(
    cluster: Cluster, s3_bucket: str, moto_server: str, mlflow_server: MlflowServer
) -> None:
    from mlflow.tracking import MlflowClient

    cluster.storage = s3_bucket + "/runs"  # type: ignore[assignment]
    # the run names its own bucket and endpoint: the admin allows them (spin_operator.policy)
    allowed = Policy(Allowed(storage_prefixes=(s3_bucket,), s3_endpoints=(moto_server,)))
    settings = cluster.settings(storage_uri=None, mlflow_uri=mlflow_server.uri, security=allowed)
    op = await OperatorProcess(settings).start()
    try:
        await cluster.api.acreate(
            spinrun(
                "tracked",
                iterations=2,
                storage={"uri": s3_bucket + "/runs", "endpoint": moto_server},
            )
        )
        gen = await cluster.wait_job("tracked", "tracked-i0-gen")
        env = env_of(gen)
        assert (
            env["AWS_ENDPOINT_URL_S3"] == moto_server
            and env["MLFLOW_TRACKING_URI"] == mlflow_server.uri
        )
        assert env["MLFLOW_RUN_ID"], "the iteration's MLflow run id reaches the Job"
        status = await cluster.run_to_end("tracked", metrics=[0.6, 0.4], timeout=60)
    finally:
        await op.stop()
    assert status["phase"] == "Succeeded" and status["bestIteration"] == 0
    parent = status["mlflow"]["runId"]
    iteration_runs = [it["mlflowRunId"] for it in status["iterations"]]
    assert parent and all(iteration_runs) and len(set(iteration_runs)) == 2
    client = MlflowClient(mlflow_server.uri)

    async def registered() -> bool:
        versions = client.search_model_versions(
            f"name = '{NS}.tracked'"
        )  # confined to the namespace
        return (
            len(versions) == 2
            and client.get_model_version_by_alias(f"{NS}.tracked", "best").tags.get(
                "spin.iteration"
            )
            == "0"
        )

    await cluster.wait("model versions and the best alias", registered, timeout=30)

    async def heldout() -> bool:  # the parent's one series over the models, as spinctl logs it
        history = client.get_metric_history(parent, "heldout/exact_match")
        return sorted((m.step, m.value) for m in history) == [(1, 0.6), (2, 0.4)]

    await cluster.wait("the parent run's heldout/* series", heldout, timeout=30)
    assert client.get_run(iteration_runs[0]).data.tags["mlflow.parentRunId"] == parent
    run_inputs = client.get_run(iteration_runs[1]).inputs
    inputs = {d.dataset.name for d in (run_inputs.dataset_inputs if run_inputs else [])}
    assert inputs == {"sft", "iter-001/generated", "iter-000/generated"}  # mixPreviousIterations: 1


async def test_mlflow_down_never_blocks_the_run(cluster: Cluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    op = await OperatorProcess(cluster.settings(mlflow_uri=dead)).start()
    try:
        await cluster.api.acreate(spinrun("offline", iterations=1))
        gen = await cluster.wait_job("offline", "offline-i0-gen")
        assert env_of(gen)["MLFLOW_TRACKING_URI"] == dead and "MLFLOW_RUN_ID" not in env_of(gen)
        status = await cluster.run_to_end("offline", timeout=60)
    finally:
        await op.stop()
    assert status["phase"] == "Succeeded" and not (status.get("mlflow") or {}).get("runId")
    assert gen["metadata"]["labels"][naming.STAGE_LABEL] == "generate"


class HangingFinish(Tracking):
    """MLflow run ends never return: the operator is killed while they are in flight."""

    def __init__(self) -> None:
        # deadlines for a loaded machine: a slow MLflow answer must not read as an outage here
        super().__init__(timeout=60, cooldown=1)
        self.calls = 0

    async def finish(self, spec: api.SPINRunSpec, run_id: str, status: str) -> bool:
        self.calls += 1
        await asyncio.Event().wait()
        return True


async def test_operator_killed_right_after_succeeded_still_ends_the_mlflow_runs(
    cluster: Cluster, mlflow_server: MlflowServer
) -> None:
    """The run's status says Succeeded, the operator dies before MLflow confirmed the run ends:
    the restarted operator ends them (the reconciler asks until status.mlflow.finished says so)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    hanging = HangingFinish()
    op = await OperatorProcess(
        cluster.settings(mlflow_uri=mlflow_server.uri), tracking=hanging
    ).start()
    try:
        await cluster.api.acreate(spinrun("killed", iterations=1))
        status = await cluster.run_to_end("killed", timeout=60)
        await cluster.wait("the run ends in flight", lambda: _true_when(hanging.calls > 0))
    finally:
        await op.kill()
    assert status["phase"] == "Succeeded"
    parent, iteration_run = status["mlflow"]["runId"], status["iterations"][0]["mlflowRunId"]
    assert client.get_run(parent).info.status == "RUNNING"  # what the bug left forever
    assert not (await cluster.status("killed"))["mlflow"].get("finished")

    op = await OperatorProcess(
        cluster.settings(mlflow_uri=mlflow_server.uri), tracking=Tracking(timeout=60, cooldown=1)
    ).start()
    try:

        async def confirmed() -> bool:
            return sorted(
                (await cluster.status("killed"))["mlflow"].get("finished") or []
            ) == sorted([parent, iteration_run])

        await cluster.wait("status.mlflow.finished to hold both runs", confirmed, timeout=90)
    finally:
        await op.stop()
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(iteration_run).info.status == "FINISHED"
    assert (await cluster.status("killed"))["mlflow"]["spooledCalls"] == 0


async def _true_when(value: bool) -> bool:
    return value


@pytest.mark.slow  # restarting MLflow: ~30 s here, over a minute on a loaded machine
async def test_spooled_calls_are_replayed_when_mlflow_answers_again_not_at_the_run_end(
    cluster: Cluster, mlflow_server: MlflowServer
) -> None:
    """A Job spooled its metrics during an outage; the operator counts them in
    status.mlflow.spooledCalls while MLflow is down and delivers them as soon as it answers
    again, while the iteration still runs (not only when a run ends)."""
    from mlflow.tracking import MlflowClient

    from spin_common.layout import RunLayout
    from spin_common.runlog import RunLogger, TrackingPolicy

    tracking = Tracking(timeout=60, cooldown=1)  # deadlines for a loaded machine
    op = await OperatorProcess(
        cluster.settings(mlflow_uri=mlflow_server.uri), tracking=tracking
    ).start()
    try:
        await cluster.api.acreate(spinrun("spooled", iterations=1))
        gen = await cluster.wait_job("spooled", "spooled-i0-gen")
        run_id = env_of(gen)["MLFLOW_RUN_ID"]
        spool = RunLayout.for_run(str(cluster.storage), NS, "spooled").iteration(0).tracking_spool
        # what the generation Job's logger does when MLflow is unreachable at its end
        dead = f"http://127.0.0.1:{free_port()}"
        logger = RunLogger(
            run_id, dead, spool_dir=spool, policy=TrackingPolicy(attempts=1, base_delay=0.01)
        )
        logger.log_metrics({"generate/prompts": 64.0, "generate/tokens": 900.0}, step=0)
        assert logger.flush() is not None, "nothing spooled"
        mlflow_server.stop(crash=True)
        try:
            await cluster.complete(gen)

            async def counted() -> bool:
                return ((await cluster.status("spooled")).get("mlflow") or {}).get(
                    "spooledCalls", 0
                ) > 0

            await cluster.wait(
                "status.mlflow.spooledCalls to count the backlog", counted, timeout=60
            )
        finally:
            await asyncio.to_thread(mlflow_server.start)
        train = await cluster.wait_job("spooled", "spooled-i0-train")
        client = MlflowClient(mlflow_server.uri)

        async def delivered() -> bool:
            status = await cluster.status("spooled")
            return (
                status["mlflow"].get("spooledCalls") == 0
                and "generate/prompts" in client.get_run(run_id).data.metrics
            )

        await cluster.wait("the spooled metrics to reach MLflow", delivered, timeout=90)
        assert train["metadata"]["name"] in {
            j["metadata"]["name"] for j in await cluster.active("spooled")
        }
        assert (
            await cluster.phase("spooled")
        ) == "Running"  # delivered mid-iteration, training runs
        assert client.get_run(run_id).data.metrics["generate/tokens"] == 900.0
        status = await cluster.run_to_end("spooled", timeout=60)
    finally:
        await op.stop()
    assert status["phase"] == "Succeeded"
