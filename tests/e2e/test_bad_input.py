"""Bad input on a cluster: the check Job before iteration 0's generation (the real runtime's
`check`, one CPU pod) finds a dataset with too many unusable rows and exits 2; the Job fails
through its podFailurePolicy and the operator fails the run at once — no retry Job, although
failurePolicy.maxRetries is 2, and no generation Job at all — with one Warning event and the
cause first in the condition, the status and the step's message.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spin_operator.naming import job_name
from tests.e2e import harness
from tests.e2e.harness import Cluster, condition

pytestmark = pytest.mark.e2e

RUN = "bad"
BAD_DATASET = f"s3://{harness.BUCKET}/data/bad-rows.jsonl"


def test_bad_dataset_fails_the_first_job_once_and_is_not_retried(
    e2e: Cluster, tmp_path: Path
) -> None:
    from spin_runtime import storage

    good = storage.read_bytes(harness.DATASET_URI)
    storage.write_bytes(BAD_DATASET, good + b'{"prompt": "caf\xe9", "response": "x"}\n' * 20)
    e2e.apply(
        harness.spinrun_file(tmp_path, RUN, spec__dataset__uri=BAD_DATASET, spec__iterations=1)
    )
    run = e2e.wait_run(RUN, 300)
    status = run["status"]
    assert status["phase"] == "Failed", e2e.diagnostics(RUN)
    check = job_name(RUN, 0, "check")
    assert e2e.job_creations() == [check]  # one Job: no -r1 (maxRetries is 2), no generation
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    # the cause first: the problems of the check's report, not the exit-code line
    assert failed["message"].startswith(
        f"dataset {BAD_DATASET}: not UTF-8 ×20 (line 241, line 242,"
    )
    assert "above dataset.maxSkippedFraction 0.01" in failed["message"]
    assert failed["message"].endswith(
        f"(check of iteration 0: bad input, not retried; details: kubectl logs job/{check})"
    )
    assert status["message"] == failed["message"]
    it = status["iterations"][0]
    assert (it["check"]["phase"], it["check"]["attempts"]) == ("Failed", 1)
    assert it["check"]["message"].startswith(f"dataset {BAD_DATASET}: not UTF-8")
    assert it["generate"]["attempts"] == 0
    job = next(j for j in e2e.jobs() if j["metadata"]["name"] == check)
    assert condition(job, "Failed")
    pod = job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in str(pod["containers"][0]["resources"])
    logs = "".join(p.log() for p in e2e.executor.pods(check, e2e.namespace))
    assert f"error: dataset {BAD_DATASET}: not UTF-8 ×20" in logs  # the cause, in the pod log
    assert "above dataset.maxSkippedFraction 0.01" in logs
