"""Bad input on a cluster: the real runtime in the first generation Job finds a dataset with too
many unusable rows and exits 2; the Job fails through its podFailurePolicy and the operator fails
the run at once — no retry Job, although failurePolicy.maxRetries is 2 — with one Warning event
and the step's message in the status.
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
    gen = job_name(RUN, 0, "generate")
    assert e2e.job_creations() == [gen]  # one Job: no -r1 although maxRetries is 2
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    # the cause first: what the runtime left in the step's output folder, not the exit-code line
    assert failed["message"].startswith(
        f"dataset {BAD_DATASET}: not UTF-8 ×20 (line 241, line 242,"
    )
    assert "above dataset.maxSkippedFraction 0.01" in failed["message"]
    assert failed["message"].endswith(
        f"(generate of iteration 0: bad input, not retried; details: kubectl logs job/{gen})"
    )
    assert status["message"] == failed["message"]
    step = status["iterations"][0]["generate"]
    assert (step["phase"], step["attempts"]) == ("Failed", 1)
    assert step["message"].startswith(f"dataset {BAD_DATASET}: not UTF-8")
    job = next(j for j in e2e.jobs() if j["metadata"]["name"] == gen)
    assert condition(job, "Failed")
    logs = "".join(p.log() for p in e2e.executor.pods(gen, e2e.namespace))
    assert f"error: dataset {BAD_DATASET}: not UTF-8 ×20" in logs  # the cause, in the pod log
    assert "above dataset.maxSkippedFraction 0.01" in logs
