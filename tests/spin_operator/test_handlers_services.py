"""The operator with real S3 (moto) and MLflow servers: manifests read from s3://, MLflow runs,
model versions and the best alias, and a run that goes on while MLflow is down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_operator import naming
from tests.spin_operator.operator_harness import NS, Cluster, OperatorProcess, spinrun
from tests.support.k8s_emulator import running_api
from tests.support.servers import MlflowServer, free_port


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with running_api(tmp_path) as api:
        api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig_path))
        yield Cluster(api, tmp_path)


def env_of(job: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {e["name"]: e.get("value", "") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


async def test_s3_storage_and_mlflow_tracking(cluster: Cluster, s3_bucket: str, moto_server: str, mlflow_server: MlflowServer) -> None:
    from mlflow.tracking import MlflowClient

    cluster.storage = s3_bucket + "/runs"  # type: ignore[assignment]
    settings = cluster.settings(storage_uri=None, mlflow_uri=mlflow_server.uri)
    op = await OperatorProcess(settings).start()
    try:
        await cluster.api.acreate(spinrun("tracked", iterations=2, storage={"uri": s3_bucket + "/runs", "endpoint": moto_server}))
        gen = await cluster.wait_job("tracked", "tracked-i0-gen")
        env = env_of(gen)
        assert env["AWS_ENDPOINT_URL_S3"] == moto_server and env["MLFLOW_TRACKING_URI"] == mlflow_server.uri
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
        versions = client.search_model_versions("name = 'tracked'")
        return len(versions) == 2 and client.get_model_version_by_alias("tracked", "best").tags.get("spin.iteration") == "0"

    await cluster.wait("model versions and the best alias", registered, timeout=30)
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
