"""The Job driver writes Job status as the Job controller does, on command and automatically."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from tests.support.job_driver import (
    MANAGED_BY_SPIN,
    DriverError,
    Failure,
    JobDriver,
    index_ranges,
    job_state,
)
from tests.support.k8s_emulator import K8sApi
from tests.support.k8s_semantics import ApiError

LABELS = dict([MANAGED_BY_SPIN.split("=")])


def job(
    name: str, *, indexed: int = 0, suspend: bool = False, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "suspend": suspend,
        "backoffLimit": 2,
        "template": {
            "spec": {"containers": [{"name": "main", "image": "busybox"}], "restartPolicy": "Never"}
        },
    }
    if indexed:
        spec.update(completionMode="Indexed", completions=indexed, parallelism=indexed)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": labels or LABELS},
        "spec": spec,
    }


def types(obj: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["type"], c["status"], c["reason"]) for c in obj["status"]["conditions"]]


def test_index_ranges() -> None:
    assert index_ranges([]) == ""
    assert index_ranges([3, 0, 1, 2, 5, 7, 8]) == "0-3,5,7-8"


def test_succeed_writes_the_controller_status_through_status(
    k8s_api: K8sApi, job_driver: JobDriver
) -> None:
    k8s_api.create(job("gen", indexed=4))
    running = job_driver.start("gen")
    assert (running["status"]["active"], job_state(running)) == (4, "Running")
    done = job_driver.succeed("gen")
    status = done["status"]
    assert types(done) == [
        ("SuccessCriteriaMet", "True", "CompletionsReached"),
        ("Complete", "True", "CompletionsReached"),
    ]
    assert (status["succeeded"], status["active"], status["completedIndexes"]) == (4, 0, "0-3")
    assert status["startTime"] == running["status"]["startTime"] and status["completionTime"]
    assert k8s_api.requests.by_verb_resource(user_agent="job-driver")["patch jobs/status"] == 2
    assert (
        k8s_api.requests.count(
            user_agent="job-driver", verb="patch", resource="jobs", subresource=None
        )
        == 0
    )


def test_fail_sets_failure_conditions_without_completion_time(
    k8s_api: K8sApi, job_driver: JobDriver
) -> None:
    k8s_api.create(job("train", indexed=2))
    failed = job_driver.fail("train", reason="DeadlineExceeded")
    assert types(failed) == [
        ("FailureTarget", "True", "DeadlineExceeded"),
        ("Failed", "True", "DeadlineExceeded"),
    ]
    assert (
        failed["status"]["conditions"][1]["message"]
        == "Job was active longer than specified deadline"
    )
    assert "completionTime" not in failed["status"] and job_state(failed) == "Failed"
    k8s_api.create(job("gen"))
    assert job_driver.fail("gen")["status"]["failed"] == 3  # backoffLimit 2 -> 3 failed pods


def test_suspension_is_honoured(k8s_api: K8sApi, job_driver: JobDriver) -> None:
    k8s_api.create(job("gen", indexed=2, suspend=True))
    suspended = job_driver.sync_suspension("gen")
    assert types(suspended) == [("Suspended", "True", "JobSuspended")]
    assert suspended["status"]["active"] == 0 and "startTime" not in suspended["status"]
    with pytest.raises(DriverError, match="suspended"):
        job_driver.succeed("gen")
    k8s_api.patch("jobs", "gen", {"spec": {"suspend": False}})
    resumed = job_driver.sync_suspension("gen")
    assert types(resumed) == [("Suspended", "False", "JobResumed")]
    assert resumed["status"]["active"] == 2 and resumed["status"]["startTime"]


def test_status_writes_retry_on_conflicts(k8s_api: K8sApi, job_driver: JobDriver) -> None:
    k8s_api.create(job("gen"))
    conflicts = [2]

    def conflict_twice(request: Any) -> ApiError | None:
        if request.subresource == "status" and conflicts[0] > 0:
            conflicts[0] -= 1
            return ApiError(409, "Conflict", "the object has been modified")
        return None

    k8s_api.emulator.faults.append(conflict_twice)
    assert job_state(job_driver.succeed("gen")) == "Succeeded"
    assert k8s_api.requests.count(user_agent="job-driver", subresource="status", code=409) == 2


def test_auto_completes_new_jobs_runs_the_hook_and_skips_suspended_ones(
    k8s_api: K8sApi, job_driver: JobDriver
) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def hook(obj: dict[str, Any]) -> Failure | None:
        with lock:
            seen.append(obj["metadata"]["name"])
        return Failure("BackoffLimitExceeded") if obj["metadata"]["name"] == "bad" else None

    k8s_api.create(job("early"))
    with job_driver.auto(delay=0.05, on_complete=hook) as auto:
        for name in ("a", "bad"):
            k8s_api.create(job(name, indexed=2))
        k8s_api.create(job("held", suspend=True))
        k8s_api.create(job("foreign", labels={"app": "other"}))
        k8s_api.wait_for(lambda: len(auto.completed) + len(auto.failed) == 3, timeout=10)
        k8s_api.wait_for(lambda: (k8s_api.get("jobs", "held") or {}).get("status"), timeout=10)
        assert job_state(k8s_api.get("jobs", "held") or {}) == "Suspended"
        time.sleep(0.2)
        assert "default/held" not in auto.completed
        k8s_api.patch("jobs", "held", {"spec": {"suspend": False}})
        k8s_api.wait_for(lambda: "default/held" in auto.completed, timeout=10)
    assert not auto.errors
    assert sorted(seen) == ["a", "bad", "early", "held"]
    assert auto.failed == ["default/bad"]
    states = {j["metadata"]["name"]: job_state(j) for j in k8s_api.list("jobs")}
    assert states == {
        "a": "Succeeded",
        "bad": "Failed",
        "early": "Succeeded",
        "held": "Succeeded",
        "foreign": "Pending",
    }
    held_final = k8s_api.get("jobs", "held")
    assert held_final is not None and [c["type"] for c in held_final["status"]["conditions"]] == [
        "Suspended",
        "SuccessCriteriaMet",
        "Complete",
    ]
