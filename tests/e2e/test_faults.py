"""Faults during real runs: the operator SIGKILLed and restarted, a training pod killed, MLflow
down, S3 answering errors. Each run must finish with every step done exactly once (no duplicate
Job in the request log or the Job list, artifact manifests' timestamps unchanged) or, for a
killed pod, through the retry path.

One of them (the operator killed during training) runs in the default suite; the others are slow.
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path
from typing import Any

import pytest

from spin_operator.naming import StepKind, job_name
from tests.e2e import harness
from tests.e2e.harness import Cluster, condition, wait_for
from tests.e2e.s3_proxy import S3FaultProxy
from tests.support.k8s_emulator import K8sApi
from tests.support.servers import MlflowServer

pytestmark = pytest.mark.e2e

RUN = "e2e"
TIMEOUT = 420.0
STEPS: tuple[StepKind, ...] = ("generate", "train", "evaluate")


def prefix(c: Cluster) -> str:
    return f"{harness.STORAGE_URI}/{c.namespace}/{RUN}"


def apply_run(c: Cluster, tmp_path: Path, iterations: int) -> None:
    # finished Jobs kept (retention.finishedJobs: Retain): the checks below count every Job
    c.apply(
        harness.spinrun_file(
            tmp_path, RUN, spec__iterations=iterations, spec__retention={"finishedJobs": "Retain"}
        )
    )


def steps(iterations: int) -> list[str]:
    """The check before iteration 0's generation, then each step of each iteration."""
    return [job_name(RUN, 0, "check")] + [
        job_name(RUN, t, stage) for t in range(iterations) for stage in STEPS
    ]


def wait_pods_running(c: Cluster, job: str, count: int) -> None:
    """Until ``count`` pods of ``job`` run at once (e.g. both training ranks)."""
    wait_for(
        lambda: sum(p.phase == "Running" for p in c.executor.pods(job, c.namespace)) >= count,
        TIMEOUT,
        f"{count} running pods of {job}",
    )


def wait_job_complete(c: Cluster, job: str) -> None:
    wait_for(
        lambda: condition(c.api.get("jobs", job, c.namespace), "Complete"),
        TIMEOUT,
        f"Job {job} to complete",
    )


def assert_each_step_once(c: Cluster, iterations: int) -> None:
    """Every step's Job created exactly once (201s in the request log), no retry Job, and each
    Job's pods ran once (the executor's history): nothing was redone."""
    expected = steps(iterations)
    created = c.job_creations()
    assert sorted(created) == sorted(expected), f"Job creations: {created}"
    assert {j["metadata"]["name"] for j in c.jobs()} == set(expected)
    pods = collections.Counter(p.job for p in c.executor.pods(namespace=c.namespace))
    planned = {name: 1 if name.endswith(("-eval", "-check")) else 2 for name in expected}
    assert dict(pods) == planned, f"pods per Job: {dict(pods)}"


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert before and not changed, f"artifacts rewritten after the restart: {changed}"


def finish(c: Cluster) -> dict[str, Any]:
    run = c.wait_run(RUN, TIMEOUT)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics(RUN)
    return run


# --------------------------------------------------------------------------- operator restarts


def test_operator_killed_during_training_adopts_the_running_job(
    e2e: Cluster, tmp_path: Path
) -> None:
    """SIGKILL while both training ranks run; restart at once: the operator must find the running
    Job (deterministic names) instead of creating another, and carry on."""
    started = time.monotonic()
    apply_run(e2e, tmp_path, iterations=1)
    train = job_name(RUN, 0, "train")
    wait_pods_running(e2e, train, 2)
    generated = harness.artifact_stamps(prefix(e2e))
    e2e.operator.kill()
    e2e.operator.start()
    finish(e2e)
    print(f"\nE2E operator killed during training: {time.monotonic() - started:.1f}s")
    assert_each_step_once(e2e, 1)
    assert_unchanged(generated, harness.artifact_stamps(prefix(e2e)))
    assert e2e.operator.starts == 2


@pytest.mark.slow
def test_operator_killed_during_generation_sees_the_job_finish(
    e2e: Cluster, tmp_path: Path
) -> None:
    """SIGKILL while generation runs; the Job completes while no operator watches; the restarted
    operator must take the finished step as done and go on to training."""
    apply_run(e2e, tmp_path, iterations=1)
    gen = job_name(RUN, 0, "generate")
    wait_pods_running(e2e, gen, 1)
    e2e.operator.kill()
    wait_job_complete(e2e, gen)
    before = harness.artifact_stamps(prefix(e2e))
    assert len([k for k in before if k.endswith(".manifest.json")]) == 2, before
    e2e.operator.start()
    finish(e2e)
    assert_each_step_once(e2e, 1)
    assert_unchanged(before, harness.artifact_stamps(prefix(e2e)))


@pytest.mark.slow
def test_operator_killed_between_iterations(e2e: Cluster, tmp_path: Path) -> None:
    """SIGKILL during iteration 0's evaluation; it completes with no operator: iteration 0 is
    done and nothing of iteration 1 exists. The restarted operator starts iteration 1 from θ1."""
    apply_run(e2e, tmp_path, iterations=2)
    evaluation = job_name(RUN, 0, "evaluate")
    wait_pods_running(e2e, evaluation, 1)
    e2e.operator.kill()
    wait_job_complete(e2e, evaluation)
    assert {j["metadata"]["name"] for j in e2e.jobs()} == set(steps(1))
    before = harness.artifact_stamps(prefix(e2e))
    assert "iter-000/eval/_MANIFEST.json" in before, before
    e2e.operator.start()
    run = finish(e2e)
    assert run["status"]["progress"] == "2/2"
    assert_each_step_once(e2e, 2)
    assert_unchanged(before, harness.artifact_stamps(prefix(e2e)))


# --------------------------------------------------------------------------- pods and services


@pytest.mark.slow
def test_training_pod_killed_is_retried_with_a_new_job(e2e: Cluster, tmp_path: Path) -> None:
    """Rank 0 SIGKILLed (exit 137): the Job fails (backoffLimit 0), the operator creates the
    retry Job ``-r1``, which trains to completion; generation is not redone."""
    apply_run(e2e, tmp_path, iterations=1)
    train = job_name(RUN, 0, "train")
    wait_pods_running(e2e, train, 2)
    generated = harness.artifact_stamps(prefix(e2e))
    killed = e2e.executor.kill_pod(train, 0, namespace=e2e.namespace)
    failed = condition(
        wait_for(
            lambda: (
                (j := e2e.api.get("jobs", train, e2e.namespace)) and condition(j, "Failed") and j
            ),
            TIMEOUT,
            "the training Job to fail",
        ),
        "Failed",
    )
    assert failed and failed["reason"] == "BackoffLimitExceeded"
    run = finish(e2e)
    retry = job_name(RUN, 0, "train", attempt=1)
    created = e2e.job_creations()
    assert created.count(train) == 1 and created.count(retry) == 1, created
    assert created.count(job_name(RUN, 0, "generate")) == 1, created
    assert run["status"]["iterations"][0]["train"]["attempts"] == 2
    assert (
        next(p for p in e2e.executor.pods(train, e2e.namespace) if p.name == killed.name).exit_code
        == 137
    )
    assert all(p.phase == "Succeeded" for p in e2e.executor.pods(retry, e2e.namespace))
    assert_unchanged(
        generated, {k: v for k, v in harness.artifact_stamps(prefix(e2e)).items() if k in generated}
    )


@pytest.mark.slow
def test_mlflow_down_during_an_iteration(
    e2e: Cluster, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """MLflow stops while generation runs and comes back only after training: tracking must never
    fail a Job or the run."""
    apply_run(e2e, tmp_path, iterations=1)
    wait_pods_running(e2e, job_name(RUN, 0, "generate"), 1)
    mlflow_server.stop()
    try:
        wait_job_complete(e2e, job_name(RUN, 0, "train"))
    finally:
        mlflow_server.start()
    run = finish(e2e)
    assert_each_step_once(e2e, 1)
    assert run["status"]["iterations"][0]["evaluate"]["phase"] == "Succeeded"
    hit = [
        p.name
        for p in e2e.executor.pods(namespace=e2e.namespace)
        if re.search(r"MLflow .*failed", p.log())
    ]
    assert hit, "no pod noticed the outage: it did not overlap the run"
    # what the generation pods logged during the outage was spooled and is replayed, not lost
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    iteration_run = run["status"]["iterations"][0]["mlflowRunId"]
    wait_for(
        lambda: "generate/prompts" in client.get_run(iteration_run).data.metrics,
        120,
        "the generation metrics logged during the outage to reach MLflow",
    )


@pytest.mark.slow
def test_s3_errors_for_a_while_are_retried(
    k8s_api: K8sApi, tmp_path: Path, e2e_inputs: str, mlflow_server: MlflowServer
) -> None:
    """Operator and pods reach S3 through a proxy that fails two requests in three for 20 s at
    the start (downloads, the operator's reads) and again when training starts; everything is
    retried, the run succeeds, and every artifact verifies against its manifest."""
    from spin_runtime import manifest, storage

    mlflow_server.start()
    proxy = S3FaultProxy(e2e_inputs).start()
    try:
        with harness.cluster(k8s_api, tmp_path, proxy.url, mlflow_server.uri) as c:
            proxy.fail_window(20)
            apply_run(c, tmp_path, iterations=1)
            wait_pods_running(c, job_name(RUN, 0, "train"), 2)
            proxy.fail_window(20)
            finish(c)
            assert_each_step_once(c, 1)
            it = f"{prefix(c)}/iter-000"
            manifest.verify_artifact(f"{it}/model")
            manifest.verify_artifact(f"{it}/eval")
            shards = manifest.shard_manifests(f"{it}/generated")
            assert len(shards) == 2
            records = sum(
                len(storage.read_text(f"{it}/generated/{name}").splitlines())
                for name in ("shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl")
            )
            assert records == 64  # 48 training + 16 held-out prompts, none lost
    finally:
        proxy.stop()
    assert proxy.injected >= 20, f"only {proxy.injected} S3 errors were injected"
    print(
        f"\nE2E S3 faults: {proxy.injected} errors injected, {proxy.forwarded} requests forwarded"
    )
