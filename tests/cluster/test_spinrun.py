"""The two-iteration run on a real control plane, and the operator SIGKILLed mid-run.

helm install -> the operator's pod (real ReplicaSet, real scheduler, the node agent) ->
kubectl apply -> Jobs -> the real Job controller's pods -> real generation and torchrun
training -> S3 (moto) -> MLflow (real server). Both tests are in the default suite.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from spin_operator.naming import StepKind, job_name
from tests.cluster import kit
from tests.cluster.harness import RealCluster
from tests.cluster.kit import check_mlflow, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

RUN = "e2e"
RUN_TIMEOUT = 600.0
STEPS: tuple[StepKind, ...] = ("generate", "train", "evaluate")
KEEP_JOBS = {"finishedJobs": "Retain"}


def steps(iterations: int) -> list[str]:
    """The check before iteration 0's generation, then each step of each iteration."""
    return [job_name(RUN, 0, "check")] + [
        job_name(RUN, t, stage) for t in range(iterations) for stage in STEPS
    ]


def assert_each_step_once(c: RealCluster, iterations: int) -> None:
    """Each step's Job created once by the operator (audit log), and its pods ran once."""
    expected = steps(iterations)
    created = c.job_creations()
    assert sorted(created) == sorted(expected), f"Job creations: {created}"
    assert {j["metadata"]["name"] for j in c.jobs()} == set(expected)
    pods = collections.Counter(p["metadata"]["labels"]["job-name"] for p in c.pods())
    planned = {name: 1 if name.endswith(("-eval", "-check")) else 2 for name in expected}
    assert dict(pods) == planned, f"pods per Job: {dict(pods)}"
    assert all(p["status"]["phase"] == "Succeeded" for p in c.pods())


def test_helm_install_then_kubectl_apply_runs_two_real_iterations(
    cluster: RealCluster, tmp_path: Path
) -> None:
    c = cluster
    operator = c.operator_pod()
    assert operator is not None and operator["status"]["phase"] == "Running"
    assert operator["spec"]["nodeName"] in {n.name for n in c.agent.nodes.values()}
    started = time.monotonic()
    # examples/04-e2e.yaml, keeping finished Jobs and pods (retention.finishedJobs) to inspect them
    applied = c.apply(kit.spinrun_file(tmp_path, RUN, spec__retention=KEEP_JOBS))
    assert f"spinrun.selfplay.dev/{RUN} created" in applied.stdout
    run = c.wait_run(RUN, RUN_TIMEOUT)
    elapsed = time.monotonic() - started
    status = run["status"]
    assert status["phase"] == "Succeeded", c.diagnostics(RUN)
    print(f"\nCLUSTER two-iteration run: {elapsed:.1f}s; timings {c.timings}")

    assert status["progress"] == "2/2"
    assert [it["iteration"] for it in status["iterations"]] == [0, 1]
    for it in status["iterations"]:
        for step in STEPS:
            assert it[step]["phase"] == "Succeeded", (it["iteration"], step, it[step])
            assert it[step]["attempts"] == 1
        assert "exact_match" in it["metrics"]
    assert status["bestIteration"] in (0, 1)
    # `kubectl wait` on the Job-style condition returns at once for a finished run
    waited = c.kubectl(
        "wait", "--for=condition=Complete", f"spinrun/{RUN}", "-n", c.namespace, "--timeout=30s"
    )
    assert "condition met" in waited.stdout, waited.stdout + waited.stderr
    # kubectl get shows the printer columns; one numbering: the last iteration is 1 (0-based),
    # 2 of 2 done, the best model θ(t+1)
    table = c.kubectl("get", "spinruns", "-n", c.namespace).stdout.splitlines()
    header = table[0].split()
    assert header[:2] == ["NAME", "PHASE"], table
    assert {"ITERATION", "STAGE", "DONE", "BEST", "AGE"} <= set(header), table
    row = dict(zip(header, table[1].split(), strict=False))
    assert (row["NAME"], row["PHASE"], row["ITERATION"], row["DONE"]) == (
        RUN,
        "Succeeded",
        "1",
        "2/2",
    )
    assert row["BEST"] == f"θ{status['bestIteration'] + 1}" == status["bestModel"]
    assert_each_step_once(c, 2)
    # The Job controller (not a stand-in) made the pods; the scheduler bound each to a Node.
    for pod in c.pods():
        owner = pod["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "Job" and owner["controller"], owner
        assert pod["spec"]["nodeName"], pod["metadata"]["name"]
        assert pod["spec"]["restartPolicy"] == "Never"
    # Every Job is owned by the SPINRun (garbage collection on deletion).
    for job in c.jobs():
        owners = job["metadata"]["ownerReferences"]
        assert [(o["kind"], o["name"]) for o in owners] == [("SPINRun", RUN)], owners
    # rank 1 found rank 0 through <job>-0.<headless service>, resolved to 127.0.0.1
    train = job_name(RUN, 0, "train")
    rank1 = next(
        p
        for p in c.pods()
        if p["metadata"]["labels"]["job-name"] == train
        and p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "1"
    )
    env = c.agent.find(c.namespace, rank1["metadata"]["name"]).env
    # torchrun's own variables: the rank from the completion-index annotation (downward API)
    assert (env["PET_MASTER_ADDR"], env["PET_NODE_RANK"]) == ("127.0.0.1", "1"), env

    stamps = kit.artifact_stamps(f"{kit.STORAGE_URI}/{c.namespace}/{RUN}")
    for t in (0, 1):
        it = f"iter-{t:03d}"
        assert f"{it}/generated/shard-00000-of-00002.manifest.json" in stamps
        assert f"{it}/generated/shard-00001-of-00002.manifest.json" in stamps
        assert f"{it}/model/_MANIFEST.json" in stamps
        assert f"{it}/eval/_MANIFEST.json" in stamps
    check_mlflow(c, RUN, run)
    if target := os.environ.get("SPIN_E2E_SCREENSHOT_DIR"):
        screenshot_mlflow(c, run, tmp_path, Path(target))


def test_operator_sigkilled_during_training_adopts_the_running_job(
    cluster: RealCluster, tmp_path: Path
) -> None:
    """SIGKILL the operator's container while both training ranks run: the node agent restarts
    it (restartPolicy Always); it must adopt the running Job, not create another."""
    c = cluster
    started = time.monotonic()
    c.apply(kit.spinrun_file(tmp_path, RUN, spec__iterations=1, spec__retention=KEEP_JOBS))
    train = job_name(RUN, 0, "train")

    def ranks_running() -> bool:
        pods = [p for p in c.pods() if p["metadata"]["labels"].get("job-name") == train]
        return sum((p.get("status") or {}).get("phase") == "Running" for p in pods) >= 2

    wait_for(ranks_running, RUN_TIMEOUT, f"both ranks of {train} running", interval=0.25)
    prefix = f"{kit.STORAGE_URI}/{c.namespace}/{RUN}"
    generated = kit.artifact_stamps(prefix)
    restarts = c.kill_operator()

    def restarted() -> bool:
        pod = c.operator_pod() or {}
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        return (
            statuses[0].get("restartCount", 0) >= restarts and pod["status"]["phase"] == "Running"
        )

    wait_for(restarted, 120, "the operator container to be restarted", interval=0.25)
    run = c.wait_run(RUN, RUN_TIMEOUT)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics(RUN)
    print(f"\nCLUSTER operator SIGKILL during training: {time.monotonic() - started:.1f}s")
    assert_each_step_once(c, 1)
    after = kit.artifact_stamps(prefix)
    changed = {k: (v, after.get(k)) for k, v in generated.items() if after.get(k) != v}
    assert generated and not changed, f"artifacts rewritten after the restart: {changed}"


def screenshot_mlflow(c: RealCluster, run: dict[str, Any], tmp_path: Path, target: Path) -> None:
    """Refreshes docs/img/e2e-mlflow-run.png (``SPIN_E2E_SCREENSHOT_DIR=docs/img``): headless
    Chromium's screenshot of the last iteration's MLflow run page, taken in the test's tmp dir
    and copied to ``target``, so tests never write into the repository unasked."""
    from mlflow.tracking import MlflowClient

    chromium = shutil.which("chromium")
    assert chromium, "SPIN_E2E_SCREENSHOT_DIR is set but there is no chromium on PATH"
    run_id = run["status"]["iterations"][-1]["mlflowRunId"]
    experiment = MlflowClient(tracking_uri=c.mlflow_uri).get_run(run_id).info.experiment_id
    url = f"{c.mlflow_uri}/#/experiments/{experiment}/runs/{run_id}"
    out = tmp_path / "e2e-mlflow-run.png"
    subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,1300",
            "--virtual-time-budget=15000",
            f"--screenshot={out}",
            url,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert out.exists() and out.stat().st_size > 10_000, "chromium produced no screenshot"
    shutil.copy(out, target / out.name)
