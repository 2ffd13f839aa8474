"""The persisted local status: round trip, interrupted attempts set back, stale groups."""

from __future__ import annotations

import os
import subprocess
import sys

from spin_operator.api import types as api
from spin_operator.decision import ObservedJob
from spin_operator.local.state import LocalState, stale_groups


def status_with(train: api.StepStatus) -> api.SPINRunStatus:
    it = api.IterationStatus(iteration=0, stage="Training", train=train)
    it.generate = api.StepStatus(job_name="r-i0-gen", attempts=1, phase="Succeeded")
    return api.SPINRunStatus(phase="Running", iterations=[it], spec_hash="abc")


def test_round_trip_and_unreadable_state() -> None:
    spec = api.SPINRunSpec.model_validate({"model": {"uri": "/m"}, "dataset": {"uri": "/d.jsonl"}})
    state = LocalState(
        status=status_with(api.StepStatus()),
        applied_spec=spec,
        jobs=[ObservedJob("r-i0-gen", 0, "generate", 0, "Succeeded")],
        groups=[12],
    )
    again = LocalState.from_json(state.to_json())
    assert again.uid == state.uid and again.status == state.status
    assert again.applied_spec == spec and again.jobs == state.jobs and again.groups == [12]
    fresh = LocalState.from_json("{not json")
    assert fresh.status.spec_hash is None and fresh.uid != state.uid


def test_an_interrupted_first_attempt_is_set_back_to_not_started() -> None:
    state = LocalState(
        status=status_with(api.StepStatus(job_name="r-i0-train", attempts=1, phase="Running")),
        jobs=[ObservedJob("r-i0-gen", 0, "generate", 0, "Succeeded")],
    )
    assert state.forget_interrupted("r") == ["r-i0-train"]
    train = state.status.iterations[0].train
    assert (train.attempts, train.phase, train.job_name) == (0, "Pending", None)
    assert state.status.iterations[0].generate.attempts == 1  # finished steps untouched


def test_an_interrupted_retry_keeps_the_earlier_failed_attempt() -> None:
    failed = ObservedJob("r-i0-train", 0, "train", 0, "Failed", reason="ProcessFailed")
    state = LocalState(
        status=status_with(api.StepStatus(job_name="r-i0-train-r1", attempts=2, phase="Pending")),
        jobs=[failed],
    )
    assert state.forget_interrupted("r") == ["r-i0-train-r1"]
    train = state.status.iterations[0].train
    assert (train.attempts, train.job_name) == (1, "r-i0-train")


def test_a_finished_attempt_is_not_interrupted() -> None:
    done = ObservedJob("r-i0-train", 0, "train", 0, "Succeeded")
    state = LocalState(
        status=status_with(api.StepStatus(job_name="r-i0-train", attempts=1, phase="Running")),
        jobs=[done],
    )
    assert state.forget_interrupted("r") == []


def test_stale_groups_are_only_live_spin_processes_of_this_host() -> None:
    spin_like = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "spin_runtime"],
        start_new_session=True,
    )
    other = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        state = LocalState(groups=[spin_like.pid, other.pid, 999_999_999, os.getpgrp()])
        assert stale_groups(state) == [spin_like.pid]
        state.host = "another-host"
        assert stale_groups(state) == []
    finally:
        for proc in (spin_like, other):
            proc.kill()
            proc.wait()
