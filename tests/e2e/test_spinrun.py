"""kubectl apply -> the operator's Jobs -> real generation and training -> S3 -> MLflow.

The short version of the suite (not marked slow, so it runs in ``make test``): one two-iteration
run of examples/04-e2e.yaml with every step really executed, checked from the user's side
(kubectl), the cluster's side (Jobs, the request log), the storage side (manifests) and MLflow's.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import Cluster, wait_for

pytestmark = pytest.mark.e2e

RUN = "e2e"
RUN_TIMEOUT = 420.0


def test_kubectl_apply_runs_two_real_iterations(e2e: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    applied = e2e.apply()
    assert f"spinrun.selfplay.dev/{RUN} created" in applied.stdout

    run = e2e.wait_run(RUN, RUN_TIMEOUT)
    elapsed = time.monotonic() - started
    status = run["status"]
    assert status["phase"] == "Succeeded", e2e.diagnostics(RUN)
    print(
        f"\nE2E two-iteration run: {elapsed:.1f}s (operator start {e2e.timings['operator_start_s']:.1f}s)"
    )

    # --- the status a user sees
    assert status["progress"] == "2/2"
    assert [it["iteration"] for it in status["iterations"]] == [0, 1]
    for it in status["iterations"]:
        for step in ("generate", "train", "evaluate"):
            assert it[step]["phase"] == "Succeeded", (it["iteration"], step, it[step])
            assert it[step]["attempts"] == 1
        assert "exact_match" in it["metrics"]
    assert status["bestIteration"] in (0, 1)
    # --- `kubectl wait` on the Job-style condition returns at once for a finished run
    waited = e2e.kubectl(
        "wait", "--for=condition=Complete", f"spinrun/{RUN}", "-n", e2e.namespace, "--timeout=30s"
    )
    assert "condition met" in waited.stdout, waited.stdout + waited.stderr

    # --- kubectl get shows the printer columns
    table = e2e.kubectl("get", "spinruns", "-n", e2e.namespace).stdout.splitlines()
    header = table[0].split()
    assert header[:2] == ["NAME", "PHASE"] and {"ITERATION", "STAGE", "DONE", "BEST", "AGE"} <= set(
        header
    ), table
    row = dict(zip(header, table[1].split(), strict=False))
    assert row["NAME"] == RUN and row["PHASE"] == "Succeeded"
    # One numbering: the last iteration is 1 (0-based), 2 of 2 done, the best model θ(t+1).
    assert row["ITERATION"] == "1" and row["DONE"] == "2/2"
    assert row["BEST"] == f"θ{status['bestIteration'] + 1}" == status["bestModel"]

    # --- the cluster: one Job per step, each created exactly once; pods per Job as planned
    created = e2e.job_creations()
    assert len(created) == 7 and len(set(created)) == 7, created
    stages = collections.Counter(re.sub(r"^e2e-i\d+-", "", name) for name in created)
    assert stages.pop("check") == 1 and set(stages.values()) == {2}, stages  # the check: once
    pods = e2e.executor.pods(namespace=e2e.namespace)
    per_job = collections.Counter(p.job for p in pods)
    assert all(p.phase == "Succeeded" for p in pods), [(p.name, p.phase) for p in pods]
    for job, count in per_job.items():
        assert count == (1 if "eval" in job or "check" in job else 2), per_job
    train = next(p for p in pods if "train" in p.job and p.index == 1)
    master = train.env["PET_MASTER_ADDR"]  # torchrun's own variable, not an argv flag
    assert master == "127.0.0.1", train.env  # <job>-0.<svc> resolved to the local master
    assert train.env["PET_NODE_RANK"] == "1" and "--node-rank" not in train.argv

    # --- storage: every artifact complete (manifests last)
    prefix = f"{harness.STORAGE_URI}/{e2e.namespace}/{RUN}"
    stamps = harness.artifact_stamps(prefix)
    for t in (0, 1):
        it = f"iter-{t:03d}"
        assert f"{it}/generated/shard-00000-of-00002.manifest.json" in stamps
        assert f"{it}/generated/shard-00001-of-00002.manifest.json" in stamps
        assert f"{it}/model/_MANIFEST.json" in stamps
        assert f"{it}/eval/_MANIFEST.json" in stamps

    # --- MLflow: parent run, iteration runs, datasets, model versions
    screenshot_mlflow(e2e, run, tmp_path)
    check_mlflow(e2e, run)


def check_mlflow(e2e: Cluster, run: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=e2e.mlflow_uri)
    status = run["status"]
    parent_id = status["mlflow"]["runId"]
    iteration_ids = {it["mlflowRunId"] for it in status["iterations"]}
    # run ends follow the Succeeded status (MLflow never holds the phase up): wait for the status
    # to record MLflow's confirmation, with a deadline, instead of reading MLflow at once
    wait_for(
        lambda: (
            set((e2e.run(RUN).get("status", {}).get("mlflow") or {}).get("finished") or [])
            >= iteration_ids | {parent_id}
        ),
        60,
        "status.mlflow.finished to hold the parent and iteration runs",
    )
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert e2e.run(RUN)["status"]["mlflow"]["spooledCalls"] == 0
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == e2e.namespace
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    child_ids = {c.info.run_id for c in children}
    assert iteration_ids <= child_ids and len(iteration_ids) == 2, (iteration_ids, child_ids)
    iteration_runs = [c for c in children if c.info.run_id in iteration_ids]
    for child in iteration_runs:
        assert child.data.metrics, f"iteration run {child.info.run_id} has no metrics"
    # registration runs in the background after the evaluation's status: polled, not asserted
    wait_for(
        lambda: (
            {v.run_id for v in client.search_model_versions(f"name = '{e2e.namespace}.{RUN}'")}
            >= iteration_ids
        ),
        60,
        "a model version for each iteration run",
    )
    for child in iteration_runs:
        assert child.info.status == "FINISHED"
    logged = {
        c.info.run_id: [d.dataset.name for d in (c.inputs.dataset_inputs if c.inputs else [])]
        for c in iteration_runs
    }
    assert all(logged.values()), f"iteration runs without MLflow dataset inputs: {logged}"


def screenshot_mlflow(e2e: Cluster, run: dict[str, Any], tmp_path: Path) -> None:
    """A headless Chromium screenshot of the last iteration's MLflow run page, where Chromium
    exists. It lands in the test's tmp dir; with ``SPIN_E2E_SCREENSHOT_DIR`` set it is also copied
    there (``docs/img`` when refreshing the documentation), so tests never write into the repo."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        return
    from mlflow.tracking import MlflowClient

    run_id = run["status"]["iterations"][-1]["mlflowRunId"]
    experiment = MlflowClient(tracking_uri=e2e.mlflow_uri).get_run(run_id).info.experiment_id
    url = f"{e2e.mlflow_uri}/#/experiments/{experiment}/runs/{run_id}"
    out = tmp_path / "e2e-mlflow-run.png"
    subprocess.run(
        [
            str(chromium),
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
    if target := os.environ.get("SPIN_E2E_SCREENSHOT_DIR"):
        shutil.copy(out, Path(target) / out.name)
