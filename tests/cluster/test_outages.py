"""MLflow down and S3 answering errors during real runs on the real control plane.

Real steps (generation, torchrun training, evaluation), since what is under test is how the
runtime's and the operator's clients ride out an outage: tracking must never fail a Job or the
run, and S3 errors are retried (botocore's retries, then spin_common.storage's) until every
artifact verifies against its manifest. Each step's Job is created once (the audit log).
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_operator.naming import StepKind, job_name
from tests.cluster import harness, kit
from tests.cluster.harness import RealCluster
from tests.cluster.kit import condition, wait_for
from tests.cluster.s3_proxy import S3FaultProxy
from tests.support.servers import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "outage"
TIMEOUT = 600.0
STEPS: tuple[StepKind, ...] = ("generate", "train", "evaluate")


def apply_run(c: RealCluster, tmp_path: Path) -> None:
    # finished Jobs and pods kept (retention.finishedJobs: Retain): the checks read them back
    c.apply(
        kit.spinrun_file(
            tmp_path, RUN, spec__iterations=1, spec__retention={"finishedJobs": "Retain"}
        )
    )


def wait_pods_running(c: RealCluster, job: str, count: int) -> None:
    """Until ``count`` pods of ``job`` run at once; fails at once (with the whole picture) if the
    run ends first."""

    def running() -> bool:
        phase = (c.run(RUN).get("status") or {}).get("phase")
        assert phase not in kit.TERMINAL, f"{RUN} ended {phase} first:\n{c.diagnostics(RUN)}"
        pods = [p for p in c.pods() if p["metadata"]["labels"].get("job-name") == job]
        return sum((p.get("status") or {}).get("phase") == "Running" for p in pods) >= count

    try:
        wait_for(running, TIMEOUT, f"{count} running pods of {job}", 0.25)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{c.diagnostics(RUN)}") from None


def finish_each_step_once(c: RealCluster) -> dict:
    run = c.wait_run(RUN, TIMEOUT)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics(RUN)
    expected = [job_name(RUN, 0, stage) for stage in ("check", *STEPS)]
    created = c.job_creations()
    assert sorted(created) == sorted(expected), f"Job creations: {created}"
    pods = collections.Counter(p["metadata"]["labels"]["job-name"] for p in c.pods())
    planned = {name: 1 if name.endswith(("-eval", "-check")) else 2 for name in expected}
    assert dict(pods) == planned, f"pods per Job: {dict(pods)}"
    return run


def test_mlflow_down_during_an_iteration(
    cluster: RealCluster, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """MLflow stops while generation runs and comes back only after training: tracking must never
    fail a Job or the run, and what was logged meanwhile is replayed, not lost."""
    from mlflow.tracking import MlflowClient

    c = cluster
    started = time.monotonic()
    apply_run(c, tmp_path)
    wait_pods_running(c, job_name(RUN, 0, "generate"), 1)
    mlflow_server.stop()
    try:
        train = job_name(RUN, 0, "train")
        wait_for(
            lambda: condition(c.get("job", train), "Complete"),
            TIMEOUT,
            f"Job {train} to complete",
            0.5,
        )
    finally:
        mlflow_server.start()
    run = finish_each_step_once(c)
    print(f"\nCLUSTER MLflow down during an iteration: {time.monotonic() - started:.1f}s")
    assert run["status"]["iterations"][0]["evaluate"]["phase"] == "Succeeded"
    logs = {
        p["metadata"]["name"]: kit.tail(
            c.agent.find(c.namespace, p["metadata"]["name"]).log_path, 10**7
        )
        for p in c.pods()
    }
    hit = [name for name, log in logs.items() if re.search(r"MLflow .*failed", log)]
    assert hit, "no pod noticed the outage: it did not overlap the run"
    # what the generation pods logged during the outage was spooled and is replayed
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    iteration_run = run["status"]["iterations"][0]["mlflowRunId"]
    wait_for(
        lambda: "generate/prompts" in client.get_run(iteration_run).data.metrics,
        120,
        "the generation metrics logged during the outage to reach MLflow",
    )


@pytest.fixture
def s3_flapping(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[tuple[RealCluster, S3FaultProxy]]:
    """The operator and every pod reach S3 (moto) through a proxy that can answer 503s."""
    mlflow_server.start()
    proxy = S3FaultProxy(cluster_inputs).start()
    try:
        with harness.release(real_cluster, tmp_path, proxy.url, mlflow_server.uri) as c:
            yield c, proxy
    finally:
        proxy.stop()


def test_s3_errors_for_a_while_are_retried(
    s3_flapping: tuple[RealCluster, S3FaultProxy], tmp_path: Path
) -> None:
    """Two requests in three fail, 30 requests from the start (the operator's reads, the input
    check, the generation pods' downloads) and 30 more from when training starts; everything is
    retried, the run succeeds, and every artifact verifies against its manifest."""
    from spin_common import manifest, storage

    c, proxy = s3_flapping
    started = time.monotonic()
    proxy.fail_next(30)
    apply_run(c, tmp_path)
    wait_pods_running(c, job_name(RUN, 0, "train"), 2)
    assert proxy.injected == 20, f"{proxy.injected} errors before training: S3 barely used?"
    proxy.fail_next(30)
    finish_each_step_once(c)
    print(
        f"\nCLUSTER S3 faults: {time.monotonic() - started:.1f}s, {proxy.injected} errors "
        f"injected, {proxy.forwarded} requests forwarded"
    )
    assert proxy.injected == 40, f"{proxy.injected} errors: training and evaluation barely used S3?"
    it = f"{kit.STORAGE_URI}/{c.namespace}/{RUN}/iter-000"
    manifest.verify_artifact(f"{it}/model")
    manifest.verify_artifact(f"{it}/eval")
    assert len(manifest.shard_manifests(f"{it}/generated")) == 2
    records = sum(
        len(storage.read_text(f"{it}/generated/{name}").splitlines())
        for name in ("shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl")
    )
    assert records == 64  # 48 training + 16 held-out prompts, none lost
