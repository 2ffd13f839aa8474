"""Bad input on the real control plane (issue 21): the check Job before iteration 0's generation
runs the real `python -m spin_runtime check` (the stand-in hands it to the runtime) on a dataset
with too many unusable rows, exits 2, and the real Job controller fails the Job through its
podFailurePolicy. The operator fails the run at once — one check Job, no retry although
failurePolicy.maxRetries is 2, no generation Job at all — with the cause first in the Failed
condition, the status and one Warning event.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_operator.naming import job_name
from tests.cluster import kit
from tests.cluster.harness import RealCluster

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "bad"
BAD_DATASET = f"s3://{kit.BUCKET}/data/bad-rows-cluster.jsonl"


def test_bad_dataset_fails_the_check_job_once_and_no_generation_job_exists(
    cluster_quick: RealCluster, tmp_path: Path
) -> None:
    from spin_common import storage

    c = cluster_quick
    good = storage.read_bytes(kit.DATASET_URI)
    storage.write_bytes(BAD_DATASET, good + b'{"prompt": "caf\xe9", "response": "x"}\n' * 20)
    # finished Jobs kept (retention.finishedJobs: Retain) to read the check Job back
    c.apply(
        kit.spinrun_file(
            tmp_path,
            RUN,
            spec__dataset__uri=BAD_DATASET,
            spec__iterations=1,
            spec__failurePolicy={"maxRetries": 2},
            spec__retention={"finishedJobs": "Retain"},
        )
    )
    run = c.wait_run(RUN, 300)
    status = run["status"]
    assert status["phase"] == "Failed", c.diagnostics(RUN)
    check = job_name(RUN, 0, "check")
    assert c.job_creations() == [check]  # one Job: no -r1, no generation
    assert [j["metadata"]["name"] for j in c.jobs()] == [check]
    job = c.jobs()[0]
    failed_job = next(x for x in job["status"]["conditions"] if x["type"] == "Failed")
    assert failed_job["reason"] == "PodFailurePolicy", job["status"]  # the real Job controller's
    pods = [p for p in c.pods() if p["metadata"]["labels"].get("job-name") == check]
    assert len(pods) == 1 and pods[0]["status"]["phase"] == "Failed"
    container = pods[0]["spec"]["containers"][0]
    assert "gpu" not in json.dumps(container["resources"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"

    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    # the cause first: the problems of the check's report, not the exit-code line
    assert failed["message"].startswith(
        f"dataset {BAD_DATASET}: not UTF-8 ×20 (line 241, line 242,"
    ), failed
    assert "above dataset.maxSkippedFraction 0.01" in failed["message"]
    assert failed["message"].endswith(
        f"(check of iteration 0: bad input, not retried; details: kubectl logs job/{check})"
    )
    assert status["message"] == failed["message"]
    it = status["iterations"][0]
    assert (it["check"]["phase"], it["check"]["attempts"]) == ("Failed", 1)
    assert it["generate"]["attempts"] == 0
    out = c.kubectl(
        "get",
        "events",
        "-n",
        c.namespace,
        "--field-selector",
        f"involvedObject.name={RUN},involvedObject.kind=SPINRun",
        "-o",
        "json",
    )
    warnings = [
        e["message"]
        for e in json.loads(out.stdout).get("items") or []
        if e.get("type") == "Warning" and e.get("reason") == "PodFailurePolicy"
    ]
    assert len(warnings) == 1 and warnings[0].startswith(f"dataset {BAD_DATASET}: not UTF-8")
