"""The check before iteration 0's generation (issue 21): a light CPU Job parses the dataset and
checks θ0 first; bad input fails the run at once, cause first, and no generation Job is ever
created; a passed check is never run again (restarts, resumes, later iterations)."""

from __future__ import annotations

from dataclasses import replace

from spin_operator.api import types as api
from spin_operator.conditions import get_condition
from spin_operator.decision import CreateStep, StorageFacts
from tests.spin_operator.reconciler_world import NAME, World, spin_object

CAUSE = (
    "dataset s3://data/sft.jsonl: not UTF-8 ×1 (line 23) — 1 of 24 rows skipped (4.2%), "
    "above dataset.maxSkippedFraction 0.01"
)
PROFILE = {
    "rows": 24,
    "usable": 22,
    "skipped": 2,
    "skippedByReason": {
        "not JSON": {"count": 1, "first": ["line 3"]},
        "empty response": {"count": 1, "first": ["line 9"]},
    },
}


def check_job(w: World) -> str:
    (job,) = w.active()
    assert job.stage == "check" and job.iteration == 0
    return job.name


def test_the_check_is_the_first_and_only_job_until_it_passes() -> None:
    w = World(spin_object())
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [f"{NAME}-i0-check"]
    it = w.status.iterations[0]
    assert (w.status.stage, it.stage) == ("Checking", "Checking")
    assert it.check is not None and it.check.phase == "Pending" and it.check.attempts == 1
    assert it.generate.attempts == 0
    w.set_state(check_job(w), "Running")
    for _ in range(3):  # running: nothing else starts
        d = w.reconcile()
        assert not d.of_type(CreateStep)
    assert w.status.iterations[0].check.phase == "Running"  # type: ignore[union-attr]
    assert "Checking" in (w.status.message or "")


def test_a_passed_check_starts_generation_and_its_profile_reaches_the_status() -> None:
    w = World(spin_object())
    w.reconcile()
    name = check_job(w)
    w.set_state(name, "Succeeded")
    w.storage[0] = StorageFacts(checked=True, check_profile=PROFILE)
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [f"{NAME}-i0-gen"]
    it = w.status.iterations[0]
    assert it.check is not None and it.check.phase == "Succeeded" and it.stage == "Generating"
    assert w.status.dataset == api.DatasetStatus(
        rows=24, usable=22, skipped=2, skipped_by_reason={"not JSON": 1, "empty response": 1}
    )
    d = w.reconcile()  # recorded: the finished check Job is swept like any step's
    assert name not in w.jobs


def test_bad_input_fails_the_run_at_once_cause_first_and_no_generation_ever_starts() -> None:
    w = World(spin_object(failurePolicy={"maxRetries": 3}))
    w.reconcile()
    name = check_job(w)
    # exit 2 matched the podFailurePolicy; the controller put the report's problems in message
    w.set_state(name, "Failed", "PodFailurePolicy", CAUSE)
    d = w.reconcile()
    assert w.status.phase == "Failed" and not d.of_type(CreateStep)
    failed = get_condition(w.status.conditions, "Failed")
    assert failed is not None and failed.reason == "PodFailurePolicy"
    assert failed.message.startswith(CAUSE)
    assert "check of iteration 0: bad input, not retried" in failed.message
    assert (w.status.message or "").startswith(CAUSE)
    warnings = [m for r, m in w.events if r == "PodFailurePolicy"]
    assert len(warnings) == 1 and warnings[0].startswith(CAUSE)
    check = w.status.iterations[0].check
    assert check is not None and (check.phase, check.attempts) == ("Failed", 1)
    assert check.message == CAUSE
    for _ in range(3):  # never retried, never followed by a generation
        d = w.reconcile()
        assert not d.of_type(CreateStep)
    assert w.created == [name]
    assert len([m for r, m in w.events if r == "PodFailurePolicy"]) == 1


def test_a_check_that_may_heal_is_retried_up_to_max_retries() -> None:
    w = World(spin_object(failurePolicy={"maxRetries": 1}))
    w.reconcile()
    w.set_state(check_job(w), "Failed", "BackoffLimitExceeded", "storage unreachable")
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [f"{NAME}-i0-check-r1"]
    w.set_state(f"{NAME}-i0-check-r1", "Failed", "BackoffLimitExceeded", "storage unreachable")
    d = w.reconcile()
    assert w.status.phase == "Failed" and not d.of_type(CreateStep)
    assert "check of iteration 0 failed after 2 attempt(s)" in (w.status.message or "")
    assert not any("-gen" in n for n in w.created)


def test_a_check_job_whose_report_is_missing_is_not_taken_as_passed() -> None:
    w = World(spin_object(failurePolicy={"maxRetries": 0}))
    w.reconcile()
    w.succeed(check_job(w), write=False)
    w.reconcile()
    assert w.status.phase == "Failed"
    assert "check's report has no complete manifest" in (w.status.message or "")


def test_an_operator_restart_adopts_the_check_job_and_never_creates_it_twice() -> None:
    w = World(spin_object())
    before = w.status.model_copy(deep=True)
    w.reconcile(killed=True)  # created the Job, then died: status written, nothing after
    name = check_job(w)
    w.status = before  # and even the status write was lost
    w.stored_digest = None
    for _ in range(3):
        d = w.reconcile()
        assert not d.of_type(CreateStep)
    check = w.status.iterations[0].check
    assert check is not None and check.attempts == 1 and check.job_name == name
    assert w.created == [name]
    w.succeed(name)
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [f"{NAME}-i0-gen"]


def test_a_recorded_check_is_never_rerun_even_when_storage_forgets_its_report() -> None:
    w = World(spin_object())
    w.past_the_check()
    w.reconcile()
    w.reconcile()  # the check Job is swept
    assert f"{NAME}-i0-check" not in w.jobs
    w.storage[0] = StorageFacts()  # the report is gone too
    for _ in range(3):
        d = w.reconcile()
        assert not [c for c in d.of_type(CreateStep) if c.stage == "check"]
    w.run_to_end()
    assert w.status.phase == "Succeeded"
    assert [n for n in w.created if "check" in n] == [f"{NAME}-i0-check"]  # one, for iteration 0


def test_no_check_in_later_iterations() -> None:
    w = World(spin_object(iterations=3))
    w.run_to_end()
    assert [c for n in w.created if (c := n.split("-")[-1]) == "check"] == ["check"]
    assert [it.check is not None for it in w.status.iterations] == [True, False, False]
    assert [it.stage for it in w.status.iterations] == ["Done"] * 3


def test_a_run_resumed_from_storage_after_iteration_0s_generation_is_not_checked_again() -> None:
    w = World(spin_object(iterations=2))
    w.storage[0] = StorageFacts(generated=True, dataset_rows=10)  # an earlier run's artifacts
    w.run_to_end()
    assert f"{NAME}-i0-check" not in w.created and w.created[0] == f"{NAME}-i0-train"
    check = w.status.iterations[0].check
    assert check is not None and (check.phase, check.message) == (
        "Succeeded",
        "found complete in storage",
    )


def test_a_run_already_past_the_check_stage_never_gets_one() -> None:
    """A run started by an operator without the check (its status has no check step, its
    storage no report) goes on without one."""
    w = World(spin_object())
    w.past_the_check()
    w.reconcile()
    w.status.iterations[0].check = None
    w.storage[0] = replace(w.storage[0], checked=False)
    w.run_to_end()
    assert w.status.phase == "Succeeded"
    assert [n for n in w.created if "check" in n] == [f"{NAME}-i0-check"]
    assert w.status.iterations[0].check is None


def test_suspended_before_the_check_creates_nothing() -> None:
    w = World(spin_object(suspend=True))
    d = w.reconcile()
    assert not d.of_type(CreateStep)
    assert w.status.iterations[0].check.message == "suspended"  # type: ignore[union-attr]
    w.edit(suspend=False)
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [f"{NAME}-i0-check"]


def test_local_mode_checked_by_the_preflight_creates_no_check_job() -> None:
    w = World(spin_object(iterations=1), inputs_checked=True)
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [f"{NAME}-i0-gen"]
    check = w.status.iterations[0].check
    assert check is not None and (check.phase, check.message, check.attempts) == (
        "Succeeded",
        "checked by spinctl before the run",
        0,
    )
    w.run_to_end()
    assert not any("check" in n for n in w.created)


def test_the_check_of_a_job_failed_by_bad_input_without_a_cause_still_fails_once() -> None:
    w = World(spin_object())
    w.reconcile()
    name = check_job(w)
    msg = "Container check for pod ns/run-i0-check-0-abc failed with exit code 2"
    w.set_state(name, "Failed", "PodFailurePolicy", msg)
    w.reconcile()
    assert w.status.phase == "Failed" and (w.status.message or "").startswith(msg)
    assert w.created == [name]
