"""Suspend and resume with a Kueue queue (spec.scheduling.queueName) and without one.

Kueue owns a queued Job's spec.suspend (it unsuspends what it admitted), so suspending a run
deletes its queued Jobs and creates the same attempts again on resume; a Job without a queue is
suspended and resumed in place. Neither is ever counted as a failure or a retry, and the status
tells "suspended" from "waiting for Kueue admission". `World` checks its invariants on every pass.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from spin_operator.decision import CreateStep, DeleteJob, Event, SuspendJob
from spin_operator.step_rules import ADMISSION, RELEASED, SUSPENDED
from tests.spin_operator.reconciler_world import World
from tests.spin_operator.test_reconciler import advance_to, condition, started

QUEUE = {"queueName": "team-a"}


def queued_world(**spec: object) -> World:
    return started(scheduling=QUEUE, **spec)


def stopped(w: World) -> tuple[list[str], list[SuspendJob]]:
    """One pass: the active Jobs it deleted (not the sweep of finished ones) and its suspends."""
    active = {j.name for j in w.active()}
    d = w.reconcile()
    return [a.name for a in d.of_type(DeleteJob) if a.name in active], d.of_type(SuspendJob)


def test_suspending_a_queued_run_deletes_its_job_once_and_never_fights_kueue() -> None:
    w = queued_world()
    name = advance_to(w, 0, "train")
    w.set_state(name, "Running")  # Kueue admitted and unsuspended it
    w.edit(scheduling=QUEUE, suspend=True)
    assert stopped(w) == ([name], [])
    train = w.status.iterations[0].train
    assert (train.phase, train.message, train.attempts) == ("Pending", RELEASED, 1)
    assert RELEASED.startswith(SUSPENDED)
    assert (w.status.phase, condition(w, "Suspended").status) == ("Suspended", "True")
    assert w.status.message is not None and w.status.message.endswith("(suspended)")
    for _ in range(5):  # held: no Job is touched, created or counted while suspended
        d = w.reconcile()
        assert not (d.of_type(DeleteJob) or d.of_type(SuspendJob) or d.of_type(CreateStep))
        assert name not in w.jobs
        assert w.status.iterations[0].train.message == RELEASED
    w.edit(scheduling=QUEUE, suspend=False)
    d = w.reconcile()
    assert [(c.name, c.attempt) for c in d.of_type(CreateStep)] == [(name, 0)]
    assert not [e for e in d.of_type(Event) if e.reason == "Retrying"]
    assert w.status.iterations[0].train.attempts == 1 and w.status.phase == "Running"
    assert condition(w, "Suspended").status == "False"
    w.reconcile()  # the new Job is queued, suspended until Kueue admits it
    train = w.status.iterations[0].train
    assert (train.phase, train.message) == ("Pending", ADMISSION)
    assert w.status.message is not None and w.status.message.endswith(f"({ADMISSION})")
    assert condition(w, "Progressing").message == w.status.message
    w.set_state(name, "Running")  # admitted
    w.reconcile()
    assert w.status.iterations[0].train.message is None
    assert w.status.message is not None and "Kueue" not in w.status.message
    w.run_to_end()
    assert w.status.phase == "Succeeded" and w.status.progress == "3/3"
    assert w.created.count(name) == 2 and len(w.created) == len(set(w.created)) + 1


def test_suspend_and_resume_never_use_up_retries() -> None:
    """maxRetries 0: five suspend/resume rounds on one queued step, then it still succeeds."""
    w = queued_world(failurePolicy={"maxRetries": 0})
    name = advance_to(w, 1, "generate")
    for _ in range(5):
        w.set_state(name, "Running")
        w.edit(scheduling=QUEUE, failurePolicy={"maxRetries": 0}, suspend=True)
        w.reconcile()
        assert name not in w.jobs
        w.edit(scheduling=QUEUE, failurePolicy={"maxRetries": 0}, suspend=False)
        w.reconcile()
        assert w.jobs[name].queued and w.jobs[name].state == "Suspended"
    assert w.status.iterations[1].generate.attempts == 1
    w.run_to_end()
    assert w.status.phase == "Succeeded"
    assert not [r for r, _ in w.events if r in ("Retrying", "Failed", "JobDeleted")]


def test_a_lost_status_write_after_the_delete_is_still_a_suspension() -> None:
    """The delete happened but the status that marked it did not land: with the run still
    suspended and queued, the gone Job is the suspension's, not a JobDeleted failure."""
    w = queued_world(failurePolicy={"maxRetries": 0})
    name = advance_to(w, 0, "evaluate")
    before = w.status.model_copy(deep=True)
    w.edit(scheduling=QUEUE, failurePolicy={"maxRetries": 0}, suspend=True)
    w.reconcile()
    w.status = before  # the status patch was lost
    w.reconcile()
    assert w.status.iterations[0].evaluate.message == RELEASED
    w.edit(scheduling=QUEUE, failurePolicy={"maxRetries": 0}, suspend=False)
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [name]
    w.run_to_end()
    assert w.status.phase == "Succeeded"


def test_a_queued_job_being_deleted_is_left_to_finish_going() -> None:
    w = queued_world()
    name = advance_to(w, 0, "generate")
    w.set_state(name, "Running")
    job = w.jobs[name]
    w.edit(scheduling=QUEUE, suspend=True)
    w.reconcile()
    w.jobs[name] = replace(job, deleting=True)  # a foreground delete: pods still going
    w.edit(scheduling=QUEUE, suspend=False)
    d = w.reconcile()  # resumed before the Job was gone: nothing created beside it
    assert not d.of_type(CreateStep) and not d.of_type(DeleteJob)
    del w.jobs[name]
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [name]


def test_a_deleted_job_without_suspend_is_still_a_failed_attempt() -> None:
    w = queued_world(failurePolicy={"maxRetries": 1})
    name = advance_to(w, 0, "train")
    del w.jobs[name]  # someone deleted it; the run is not suspended
    w.reconcile()
    train = w.status.iterations[0].train
    assert train.attempts == 2 and train.message is not None and "JobDeleted" in train.message


def test_without_a_queue_suspend_patches_the_job_and_resume_unpatches_it() -> None:
    w = started()
    name = advance_to(w, 0, "generate")
    w.set_state(name, "Running")
    w.edit(suspend=True)
    assert stopped(w) == ([], [SuspendJob(name, True)])
    assert w.status.iterations[0].generate.message == SUSPENDED
    assert w.status.phase == "Suspended"
    d = w.reconcile()
    assert not d.of_type(SuspendJob)  # suspended once, left so
    w.edit(suspend=False)
    d = w.reconcile()
    assert d.of_type(SuspendJob) == [SuspendJob(name, False)] and not d.of_type(CreateStep)
    w.set_state(name, "Running")
    w.reconcile()
    assert w.status.iterations[0].generate.message is None
    w.run_to_end()
    assert w.status.phase == "Succeeded" and w.created.count(name) == 1


@pytest.mark.parametrize("job_state", ["Pending", "Running", "Suspended"])
@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
@pytest.mark.parametrize("iteration", [0, 2])
def test_queued_suspend_resume_at_every_step(iteration: int, stage: str, job_state: str) -> None:
    """Admitted or not (Suspended = still in Kueue's queue), every queued step is deleted on
    suspend, created again under the same name on resume, and the run ends with one attempt
    per step."""
    w = queued_world()
    name = advance_to(w, iteration, stage)
    w.set_state(name, job_state)
    w.edit(scheduling=QUEUE, suspend=True)
    assert stopped(w) == ([name], [])
    assert w.status.phase == "Suspended"
    w.edit(scheduling=QUEUE, suspend=False)
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [name]
    w.run_to_end()
    assert w.status.phase == "Succeeded"
    assert all(
        getattr(it, k).attempts == 1 for it in w.status.iterations for k in ("generate", "train")
    )
