"""The pure reconciler, driven through every stage, Job state, suspend, deletion and spec change.

`World` (reconciler_world.py) applies each Decision like the kopf layer and asserts the
invariants on every call: never two active Jobs for one step, never a create of an existing
name, never a finished iteration or step redone, status monotone in iterations.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from spin_operator.api import types as api
from spin_operator.conditions import get_condition
from spin_operator.decision import (
    CreateStep,
    DeleteArtifacts,
    DeleteJob,
    DeleteService,
    EnsureIterationRun,
    EnsureParentRun,
    Event,
    FinishTracking,
    Observed,
    RecordSpec,
    RegisterModel,
    SetFinalizer,
    StorageFacts,
    SuspendJob,
)
from spin_operator.reconciler import reconcile
from spin_operator.validation import InvalidSpec, Problem
from tests.spin_operator.reconciler_world import NAME, World, spin_object

STAGES = ("generate", "train", "evaluate")
JOB_STATES = ("Pending", "Running", "Suspended", "Succeeded", "Failed", "Missing")


def started(**spec) -> World:
    w = World(spin_object(**spec))
    w.reconcile()
    return w


def advance_to(w: World, iteration: int, stage: str) -> str:
    """Succeed Jobs until the Job of (iteration, stage) is the current one; return its name."""
    for _ in range(60):
        for job in w.active():
            if (job.iteration, job.stage) == (iteration, stage):
                return job.name
            w.succeed(job.name)
        w.reconcile()
    raise AssertionError(f"never reached {stage} of iteration {iteration}")


def condition(w: World, type_: str) -> api.Condition:
    found = get_condition(w.status.conditions, type_)
    assert found is not None, f"no {type_} condition"
    return found


# --------------------------------------------------------------------------- happy paths


def test_three_iterations_to_succeeded() -> None:
    w = World(spin_object())
    w.run_to_end()
    s = w.status
    assert (s.phase, s.stage, s.progress, s.iteration) == ("Succeeded", "Done", "3/3", 2)
    assert w.created == [f"{NAME}-i0-check"] + [
        f"{NAME}-i{t}-{k}" for t in range(3) for k in ("gen", "train", "eval")
    ]
    assert [it.metrics["exact_match"] for it in s.iterations] == pytest.approx([0.1, 0.2, 0.3])
    assert s.best_iteration == 2
    assert condition(w, "Ready").status == "True"
    complete = condition(w, "Complete")
    assert (complete.status, complete.reason) == ("True", "Succeeded")
    assert condition(w, "Progressing").status == "False"
    assert s.iterations[1].model_uri == "s3://bucket/runs/ns/run/iter-000/model"
    assert s.iterations[2].output_model_uri == "s3://bucket/runs/ns/run/iter-002/model"
    assert s.start_time and s.completion_time and s.spec_hash
    reasons = [r for r, _ in w.events]
    assert (
        reasons.count("JobCreated") == 10 and reasons[0] == "Started" and reasons[-1] == "Succeeded"
    )


def test_without_evaluation_two_jobs_per_iteration_and_no_best() -> None:
    w = World(spin_object(evaluation={"enabled": False}, iterations=2))
    w.run_to_end()
    assert w.created == ["run-i0-check", "run-i0-gen", "run-i0-train", "run-i1-gen", "run-i1-train"]
    assert w.status.best_iteration is None
    assert all(it.evaluate.phase == "Skipped" for it in w.status.iterations)


def test_first_decision_asks_for_facts_before_acting() -> None:
    w = World(spin_object(storage={"uri": "s3://bkt1/x", "credentialsSecret": {"name": "creds"}}))
    obs = w.observed(set(), False, set(), False)
    d = reconcile(w.spec(), w.status, obs)
    assert d.needs_stored_spec and not d.of_type(CreateStep) and d.status.phase == "Pending"
    obs = w.observed(set(), False, set(), True)
    d = reconcile(w.spec(), w.status, obs)
    assert d.needs_secrets and not d.of_type(CreateStep)
    w.secrets.add("creds")
    d = reconcile(w.spec(), w.status, w.observed(set(), True, set(), True))
    assert d.needs_storage == {0} and not d.of_type(CreateStep)
    assert d.status.phase == "Running"  # started: facts of iteration 0 decide what runs first
    d = reconcile(w.spec(), w.status, w.observed({0}, True, set(), True))
    assert [c.name for c in d.of_type(CreateStep)] == ["run-i0-check"]


def test_storage_unreachable_never_creates_but_keeps_status() -> None:
    w = World(spin_object())
    w.unknown_storage = True
    d = w.reconcile()
    assert not d.of_type(CreateStep) and d.needs_storage == {0}
    assert w.status.phase == "Running" and w.status.spec_hash


def test_tracking_actions() -> None:
    w = World(spin_object(tracking={"uri": "http://mlflow:5000"}, iterations=1))
    d = w.reconcile()
    assert d.of_type(EnsureParentRun) and d.of_type(EnsureIterationRun) == [EnsureIterationRun(0)]
    w.run_to_end()
    actions = [a for d in w.decisions for a in d.actions]
    registered = [a for a in actions if isinstance(a, RegisterModel)]
    assert [(r.iteration, r.model_uri) for r in registered] == [
        (0, "s3://bucket/runs/ns/run/iter-000/model")
    ]
    assert registered[0].metrics["exact_match"] == pytest.approx(0.1)
    assert FinishTracking(0, "FINISHED") in actions and FinishTracking(None, "FINISHED") in actions


def test_no_tracking_actions_without_a_tracking_uri() -> None:
    w = World(spin_object(iterations=1))
    w.run_to_end()
    actions = [a for d in w.decisions for a in d.actions]
    assert not [
        a for a in actions if isinstance(a, EnsureParentRun | EnsureIterationRun | RegisterModel)
    ]


def test_training_service_deleted_when_training_succeeds() -> None:
    w = started()
    name = advance_to(w, 0, "train")
    w.succeed(name)
    d = w.reconcile()
    assert d.of_type(DeleteService) == [DeleteService("run-i0-train")]


# --------------------------------------------------------------------------- failures


def test_failed_job_is_retried_with_a_new_job_then_succeeds() -> None:
    w = started()
    name = advance_to(w, 0, "train")
    w.set_state(
        name, "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    )
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == ["run-i0-train-r1"]
    step = w.status.iterations[0].train
    assert (step.attempts, step.job_name) == (2, "run-i0-train-r1")
    assert "BackoffLimitExceeded" in (step.message or "")
    assert "Retrying" in [r for r, _ in w.events]
    w.run_to_end()
    assert w.status.phase == "Succeeded"


def test_retries_exhausted_fail_the_run_with_the_jobs_reason() -> None:
    w = started(failurePolicy={"maxRetries": 1})
    name = advance_to(w, 1, "generate")
    w.set_state(name, "Failed", "DeadlineExceeded", "Job was active longer than specified deadline")
    w.reconcile()
    w.set_state(
        "run-i1-gen-r1",
        "Failed",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    )
    d = w.reconcile()
    assert not d.of_type(CreateStep)
    assert w.status.phase == "Failed"
    failed = condition(w, "Failed")
    assert failed.status == "True" and failed.reason == "DeadlineExceeded"
    assert "generate of iteration 1 failed after 2 attempt(s)" in failed.message
    assert condition(w, "Ready").status == "False"
    assert (condition(w, "Complete").status, condition(w, "Complete").reason) == (
        "False",
        "NotComplete",
    )
    assert w.status.iterations[1].generate.phase == "Failed"
    assert w.reconcile().actions == []  # terminal: nothing more
    assert w.status.phase == "Failed"


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        # a cluster: render.py's FailJob rule matched exit code 2 (bad input) or 126/127
        (
            "PodFailurePolicy",
            "Container generate for pod ns/run-i0-gen-0-x failed with exit code 2 matching FailJob rule at index 0",
        ),
        ("BadInput", "dataset line 23: not UTF-8"),  # local mode: the runtime's own error line
        ("CannotExecute", "no-such-evaluator: No such file or directory"),
    ],
)
def test_bad_input_is_never_retried_and_the_cause_leads(reason: str, message: str) -> None:
    w = started(failurePolicy={"maxRetries": 3})
    name = advance_to(w, 0, "generate")
    w.set_state(name, "Failed", reason, message)
    d = w.reconcile()
    assert not d.of_type(CreateStep) and "Retrying" not in [r for r, _ in w.events]
    assert w.status.phase == "Failed"
    failed = condition(w, "Failed")
    assert failed.reason == reason and failed.message.startswith(
        f"{message} (generate of iteration 0: bad input, not retried"
    )
    assert ("kubectl logs job/run-i0-gen" in failed.message) == (reason == "PodFailurePolicy")
    assert w.status.message == failed.message
    assert [m for r, m in w.events if r == reason] == [failed.message]  # one event
    step = w.status.iterations[0].generate
    assert (step.phase, step.attempts, step.message) == ("Failed", 1, message)
    w.reconcile()
    assert [m for r, m in w.events if r == reason] == [failed.message]  # not repeated


def test_dataset_rows_from_the_generation_manifests_reach_the_status() -> None:
    w = started()
    name = advance_to(w, 0, "generate")
    w.succeed(name)
    w.storage[0] = replace(
        w.storage[0], dataset_rows=24, dataset_skipped={"not JSON": 2, "empty messages": 1}
    )
    w.reconcile()
    ds = w.status.dataset
    assert ds is not None and (ds.rows, ds.usable, ds.skipped) == (24, 21, 3)
    assert ds.skipped_by_reason == {"not JSON": 2, "empty messages": 1}
    assert w.status.to_wire()["dataset"]["skippedByReason"] == {"not JSON": 2, "empty messages": 1}


def test_job_succeeding_without_a_manifest_counts_as_a_failed_attempt() -> None:
    w = started(failurePolicy={"maxRetries": 0})
    name = advance_to(w, 0, "train")
    w.succeed(name, write=False)
    w.reconcile()
    assert w.status.phase == "Failed"
    assert condition(w, "Failed").reason == "ArtifactIncomplete"


def test_job_deleted_behind_our_back_is_retried() -> None:
    w = started()
    name = advance_to(w, 0, "generate")
    del w.jobs[name]
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == ["run-i0-gen-r1"]
    assert "JobDeleted" in (w.status.iterations[0].generate.message or "")


def test_missing_job_is_confirmed_before_it_counts_as_gone() -> None:
    w = started()
    name = advance_to(w, 0, "generate")
    job = w.jobs.pop(name)
    d = reconcile(w.spec(), w.status, w.observed({0}, True, set(), True))
    assert d.needs_jobs == {name} and not d.of_type(CreateStep)
    w.jobs[name] = job  # the GET found it (the cache was late): adopt, no retry
    d = w.reconcile()
    assert not d.of_type(CreateStep) and w.status.iterations[0].generate.attempts == 1


def test_failed_job_whose_artifact_is_complete_counts_as_done() -> None:
    w = started()
    name = advance_to(w, 0, "generate")
    w.succeed(name)
    w.set_state(name, "Failed", "Error", "exit 1 after writing")
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == ["run-i0-train"]


# --------------------------------------------------------------------------- invalid spec, secrets


def test_invalid_spec_fails_with_the_field_and_recovers_when_fixed() -> None:
    w = World(spin_object(training={"maxPromptLength": 2048}))
    d = w.reconcile()
    assert w.status.phase == "Failed" and not d.of_type(CreateStep)
    failed = condition(w, "Failed")
    assert failed.reason == "InvalidSpec" and "spec.training.maxPromptLength" in failed.message
    assert w.reconcile().actions == []  # no repeated event
    w.edit()
    w.reconcile()
    assert w.status.phase == "Running" and condition(w, "Failed").status == "False"


def test_missing_operator_storage_default_names_the_field() -> None:
    obj = spin_object()
    del obj["spec"]["storage"]
    w = World(obj)
    w.reconcile()
    assert condition(w, "Failed").message.startswith("spec.storage.uri:")


def test_missing_secret_fails_naming_the_field_then_starts_once_created() -> None:
    w = World(
        spin_object(
            storage={"credentialsSecret": {"name": "s3-creds"}},
            tracking={"uri": "http://m:5000", "credentialsSecret": {"name": "mlflow-creds"}},
        )
    )
    w.secrets = {"mlflow-creds"}
    w.reconcile()
    failed = condition(w, "Failed")
    assert (w.status.phase, failed.reason) == ("Failed", "SecretNotFound")
    assert failed.message == 'spec.storage.credentialsSecret.name: Secret "s3-creds" not found'
    w.secrets.add("s3-creds")
    d = w.reconcile()
    assert w.status.phase == "Running" and d.of_type(CreateStep)


def test_secret_deleted_mid_run_fails_before_the_next_job() -> None:
    w = started(storage={"credentialsSecret": {"name": "s3-creds"}})
    w.secrets = {"s3-creds"}
    w.reconcile()
    name = advance_to(w, 0, "train")
    w.secrets.clear()
    w.succeed(name)
    d = w.reconcile()
    assert not d.of_type(CreateStep) and w.status.phase == "Failed"
    assert "spec.storage.credentialsSecret.name" in condition(w, "Failed").message


def test_storage_holding_another_specs_artifacts_is_refused() -> None:
    w = World(spin_object())
    w.stored_digest = "0123456789abcdef"
    w.reconcile()
    assert condition(w, "Failed").reason == "StorageConflict"
    assert "spec.storage.uri" in condition(w, "Failed").message


# --------------------------------------------------------------------------- suspend


def test_suspend_suspends_running_jobs_and_starts_nothing_then_resumes() -> None:
    w = started()
    name = advance_to(w, 0, "train")
    w.set_state(name, "Running")
    w.edit(suspend=True)
    d = w.reconcile()
    assert d.of_type(SuspendJob) == [SuspendJob(name, True)]
    assert (w.status.phase, condition(w, "Suspended").status) == ("Suspended", "True")
    w.succeed(name)  # finished just before the suspension landed
    d = w.reconcile()
    assert not d.of_type(CreateStep) and w.status.phase == "Suspended"
    w.edit(suspend=False)
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == ["run-i0-eval"]
    assert w.status.phase == "Running" and condition(w, "Suspended").status == "False"


def test_resume_unsuspends_a_suspended_job() -> None:
    w = started()
    name = advance_to(w, 0, "generate")
    w.edit(suspend=True)
    w.reconcile()
    assert w.jobs[name].state == "Suspended"
    w.edit(suspend=False)
    d = w.reconcile()
    assert d.of_type(SuspendJob) == [SuspendJob(name, False)]


def test_run_created_suspended_starts_nothing() -> None:
    w = World(spin_object(suspend=True))
    d = w.reconcile()
    assert w.status.phase == "Suspended" and not d.of_type(CreateStep)


def test_kueue_jobs_are_created_suspended_and_left_to_kueue() -> None:
    w = started(scheduling={"queueName": "team-a"})
    name = advance_to(w, 0, "generate")
    assert w.jobs[name].state == "Suspended" and w.jobs[name].queued
    d = w.reconcile()
    assert not d.of_type(SuspendJob)  # Kueue admits and unsuspends it
    assert w.status.iterations[0].generate.message == "waiting for Kueue admission"
    w.set_state(name, "Running")
    w.reconcile()
    assert w.status.iterations[0].generate.phase == "Running"


# --------------------------------------------------------------------------- spec changes


def test_immutable_change_is_refused_and_the_run_goes_on_with_its_spec() -> None:
    w = started()
    advance_to(w, 0, "train")
    w.edit(model={"uri": "s3://models/other"}, training={"beta": 0.5})
    d = w.reconcile()
    refused = condition(w, "SpecChangeRefused")
    assert (
        refused.status == "True"
        and "spec.model.uri" in refused.message
        and "spec.training.beta" in refused.message
    )
    assert refused.observed_generation == 2
    assert (
        d.spec is not None
        and d.spec.model.uri == "s3://models/base"
        and d.spec.training.beta == 0.1
    )
    assert "SpecChangeRefused" in [r for r, _ in w.events]
    w.run_to_end()
    assert w.status.iterations[1].model_uri == "s3://bucket/runs/ns/run/iter-000/model"


def test_refusal_clears_when_the_change_is_reverted() -> None:
    w = started()
    w.edit(dataset={"uri": "s3://data/other.jsonl"})
    w.reconcile()
    assert condition(w, "SpecChangeRefused").status == "True"
    w.edit()
    w.reconcile()
    assert condition(w, "SpecChangeRefused").status == "False"


def test_mutable_changes_apply_while_immutable_ones_are_refused() -> None:
    w = started()
    w.edit(model={"uri": "s3://models/other"}, iterations=5, failurePolicy={"maxRetries": 0})
    d = w.reconcile()
    assert d.spec is not None and d.spec.iterations == 5 and d.spec.failure_policy.max_retries == 0
    assert d.spec.model.uri == "s3://models/base"
    rec = d.of_type(RecordSpec)
    assert rec and rec[-1].spec.iterations == 5 and rec[-1].spec.model.uri == "s3://models/base"
    w.run_to_end()
    assert w.status.progress == "5/5"


def test_lowering_iterations_below_the_started_ones_is_clamped() -> None:
    w = started(iterations=5)
    advance_to(w, 2, "generate")
    w.edit(iterations=1)
    d = w.reconcile()
    assert d.spec is not None and d.spec.iterations == 3
    assert "spec.iterations" in condition(w, "SpecChangeRefused").message
    w.run_to_end()
    assert w.status.progress == "3/3" and w.status.phase == "Succeeded"


def test_invalid_edit_of_a_running_run_is_refused_not_fatal() -> None:
    w = started()
    advance_to(w, 0, "train")
    w.edit(training={"maxPromptLength": 4096})
    w.reconcile()
    assert w.status.phase == "Running"
    assert "invalid" in condition(w, "SpecChangeRefused").message


def test_suspend_through_a_refused_change_still_applies() -> None:
    w = started()
    name = advance_to(w, 0, "generate")
    w.set_state(name, "Running")
    w.edit(model={"uri": "s3://models/other"}, suspend=True)
    d = w.reconcile()
    assert d.of_type(SuspendJob) == [SuspendJob(name, True)]


def test_lost_annotation_with_unchanged_spec_is_restored() -> None:
    w = started()
    w.applied = None
    d = w.reconcile()
    assert d.of_type(RecordSpec) and w.status.phase == "Running"


def test_lost_annotation_with_changed_spec_fails_rather_than_guessing() -> None:
    w = started()
    w.applied = None
    w.edit(model={"uri": "s3://models/other"})
    w.reconcile()
    assert condition(w, "Failed").reason == "AppliedSpecLost"


# --------------------------------------------------------------------------- restarts


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("job_state", ("Pending", "Running", "Succeeded", "Failed"))
def test_restart_with_status_lost_adopts_jobs_and_skips_done_steps(
    stage: str, job_state: str
) -> None:
    """The operator restarts and the status patch of the last transition never landed."""
    w = started()
    name = advance_to(w, 1, stage)
    if job_state == "Succeeded":
        w.succeed(name)
    elif job_state != "Pending":
        w.set_state(name, job_state, "BackoffLimitExceeded" if job_state == "Failed" else "")
    w.status = api.SPINRunStatus()  # nothing remembered at all
    w.created.clear()
    w.run_to_end()
    assert w.status.phase == "Succeeded"
    redone = [n for n in w.created if n.startswith(("run-i0-", f"run-i1-{name.split('-')[2]}"))]
    expected = [f"{name}-r1"] if job_state == "Failed" else []
    assert redone == expected, f"steps redone after the restart: {redone}"
    assert w.status.iterations[1].__getattribute__(stage).job_name is not None


def test_restart_with_stale_status_adopts_the_newer_attempt() -> None:
    w = started()
    name = advance_to(w, 0, "train")
    stale = w.status.model_copy(deep=True)
    w.set_state(name, "Failed", "BackoffLimitExceeded")
    w.reconcile()  # created -r1
    w.status = stale  # the status patch was lost
    d = w.reconcile()
    assert not d.of_type(CreateStep)
    assert w.status.iterations[0].train.attempts == 2


# --------------------------------------------------------------------------- deletion


def test_deletion_with_retain_does_nothing() -> None:
    w = started()
    advance_to(w, 0, "train")
    w.deleting = True
    d = w.reconcile()
    assert d.actions == []


def test_deletion_with_delete_stops_jobs_then_deletes_artifacts_then_lets_go() -> None:
    w = started(retention={"onDelete": "Delete"})
    assert w.finalizer
    name = advance_to(w, 0, "train")
    w.deleting = True
    d = w.reconcile()
    # the running Job, and the generation Job whose step the status recorded in the same pass
    assert sorted(a.name for a in d.of_type(DeleteJob)) == ["run-i0-gen", name] and not d.of_type(
        DeleteArtifacts
    )
    d = w.reconcile()
    assert d.of_type(DeleteArtifacts) == [DeleteArtifacts("s3://bucket/runs/ns/run")]
    assert d.of_type(SetFinalizer) == [SetFinalizer(False)]


def test_jobs_of_a_recorded_step_are_deleted_and_never_rerun() -> None:
    """Finished Jobs do not pile up (issue 14, item 10): once the status holds a step's success,
    its Jobs (failed attempts included) are deleted, and the step is never run again for lack
    of a Job, whatever happens to storage afterwards."""
    w = started(failurePolicy={"maxRetries": 1})
    gen = advance_to(w, 0, "generate")
    w.set_state(gen, "Failed", "BackoffLimitExceeded", "pod failed")
    w.reconcile()
    retry = next(j.name for j in w.active())
    w.succeed(retry)
    d = w.reconcile()  # records the step; the Jobs are still needed by nothing but not yet deleted
    assert w.status.iterations[0].generate.phase == "Succeeded" and not d.of_type(DeleteJob)
    d = w.reconcile()  # the status now says so: both attempts go
    assert sorted(a.name for a in d.of_type(DeleteJob)) == sorted([gen, retry])
    assert gen not in w.jobs and retry not in w.jobs
    w.storage.pop(0)  # even if storage forgot the data, a recorded step is not redone
    for _ in range(3):
        d = w.reconcile()
        assert not [c for c in d.of_type(CreateStep) if c.stage == "generate"]
        assert not d.needs_jobs
    w.run_to_end()
    assert sorted(w.created) == sorted(
        ["run-i0-check", gen, retry, "run-i0-train", "run-i0-eval"]
        + [f"run-i{t}-{k}" for t in (1, 2) for k in ("gen", "train", "eval")]
    )
    w.reconcile()  # the pass after the final status write (its watch event) sweeps the last one
    assert not w.jobs, "finished Jobs left behind"


def test_retention_retain_keeps_finished_jobs() -> None:
    w = World(spin_object(iterations=2, retention={"finishedJobs": "Retain"}))
    w.run_to_end()
    w.reconcile()
    assert sorted(w.jobs) == sorted(w.created) and not any(
        d.of_type(DeleteJob) for d in w.decisions
    )


def test_a_status_write_that_did_not_land_keeps_the_job() -> None:
    w = started()
    gen = advance_to(w, 0, "generate")
    w.succeed(gen)
    before = w.status
    w.reconcile()
    w.status = before  # the /status patch was lost (409, operator killed)
    d = w.reconcile()
    assert not d.of_type(DeleteJob) and gen in w.jobs  # not recorded yet: the Job stays
    d = w.reconcile()
    assert [a.name for a in d.of_type(DeleteJob)] == [gen]


def test_artifacts_are_deleted_only_once_every_job_and_its_pods_are_gone() -> None:
    """Foreground deletion keeps a Job, marked deleting, until its pods are gone: a pod still
    uploading must never write into a prefix that was already deleted (issue 14, item 9)."""
    w = started(retention={"onDelete": "Delete"}, controlArm={"enabled": True})
    gen = advance_to(w, 0, "generate")
    w.succeed(gen)
    w.reconcile()
    trains = sorted(j.name for j in w.active())
    w.jobs[gen] = replace(w.jobs[gen], state="Succeeded")  # a finished Job not yet cleaned up
    w.deleting = True
    obs = w.observed({0}, True, set(), True)
    d = reconcile(w.spec(), w.status, obs)
    assert sorted(a.name for a in d.of_type(DeleteJob)) == sorted([gen, *trains])
    assert not d.of_type(DeleteArtifacts) and not d.of_type(SetFinalizer)
    for name in list(w.jobs):  # Foreground: marked deleting, pods still terminating
        w.jobs[name] = replace(w.jobs[name], deleting=True)
    for _ in range(3):
        d = reconcile(w.spec(), w.status, w.observed({0}, True, set(), True))
        assert not d.of_type(DeleteArtifacts) and not d.of_type(DeleteJob)
        assert "waiting for" in (d.status.message or "")
    del w.jobs[trains[0]]
    d = reconcile(w.spec(), w.status, w.observed({0}, True, set(), True))
    assert not d.of_type(DeleteArtifacts)
    w.jobs.clear()  # the garbage collector removed the pods, then the Jobs
    d = reconcile(w.spec(), w.status, w.observed({0}, True, set(), True))
    assert d.of_type(DeleteArtifacts) == [DeleteArtifacts("s3://bucket/runs/ns/run")]
    assert d.of_type(SetFinalizer) == [SetFinalizer(False)]


@pytest.mark.parametrize("tamper", ["annotation", "annotation and spec"])
def test_a_tampered_applied_spec_never_redirects_the_deletion(tamper: str) -> None:
    """Threat 4 (docs/security.md): the author rewrites the applied-spec annotation (and the spec)
    to point at another team's prefix before deleting the run; only the started prefix, checked
    against status.specHash, is ever deleted."""
    w = started(retention={"onDelete": "Delete"})
    advance_to(w, 0, "train")
    assert w.applied is not None
    other = w.applied.model_copy(
        update={"storage": w.applied.storage.model_copy(update={"uri": "s3://corp-models/prod"})}
    )
    w.applied = other
    if tamper == "annotation and spec":
        w.obj["spec"]["storage"] = {"uri": "s3://corp-models/prod"}
    w.deleting = True
    assert not w.reconcile().of_type(DeleteArtifacts)  # the Jobs stop first
    d = w.reconcile()
    deleted = d.of_type(DeleteArtifacts)
    assert all(a.prefix == "s3://bucket/runs/ns/run" for a in deleted), deleted
    assert d.of_type(SetFinalizer) == [SetFinalizer(False)]
    if tamper == "annotation":  # the spec itself still proves the started prefix
        assert deleted == [DeleteArtifacts("s3://bucket/runs/ns/run")]
    else:  # nothing proves it: nothing is deleted, and the event says so
        assert deleted == [] and any(e.reason == "ArtifactsKept" for e in d.of_type(Event))


def test_retention_change_adds_and_removes_the_finalizer() -> None:
    w = started()
    assert not w.finalizer
    w.edit(retention={"onDelete": "Delete"})
    w.reconcile()
    assert w.finalizer
    w.edit(retention={"onDelete": "Retain"})
    w.reconcile()
    assert not w.finalizer


# --------------------------------------------------------------------------- stopping rule


def test_early_stopping_reports_the_best_iteration() -> None:
    w = World(spin_object(iterations=6, stopping={"patience": 2, "minDelta": 0.01}))
    w.run_to_end(metrics=[0.30, 0.40, 0.405, 0.39, 0.9, 0.9])
    assert w.status.phase == "Succeeded"
    assert w.status.progress == "4/6"
    assert w.status.best_iteration == 2  # 0.405 is the best score even though below minDelta
    assert "stopped after 4 iteration(s)" in (w.status.message or "")
    assert w.events[-1][0] == "EarlyStopped"
    # `kubectl wait --for=condition=Complete` ends; the reason says how, and later passes keep it.
    w.reconcile()
    complete = condition(w, "Complete")
    assert (complete.status, complete.reason) == ("True", "EarlyStopped")


def test_min_mode_ranks_lower_as_better() -> None:
    w = World(spin_object(iterations=3, evaluation={"metric": "loss", "mode": "min"}))
    for _ in range(60):
        w.reconcile()
        if w.status.phase == "Succeeded":
            break
        for job in w.active():
            w.succeed(job.name, {"loss": [3.0, 1.0, 2.0][job.iteration]})
    assert w.status.best_iteration == 1


# --------------------------------------------------------------------------- exhaustive product


def _variant(w: World, variant: str) -> None:
    if variant == "suspend":
        w.edit(suspend=True)
    elif variant == "delete":
        w.deleting = True
    elif variant == "immutable-change":
        w.edit(model={"uri": "s3://models/other"})
    elif variant == "mutable-change":
        w.edit(iterations=4, failurePolicy={"maxRetries": 0})
    elif variant == "status-lost":
        w.status = api.SPINRunStatus()
    elif variant == "storage-complete":
        job = next(iter(w.active()), None)
        if job is not None:
            w.succeed(job.name)
            w.jobs[job.name] = replace(w.jobs[job.name], state="Running")


@pytest.mark.parametrize(
    "variant",
    [
        "none",
        "suspend",
        "delete",
        "immutable-change",
        "mutable-change",
        "status-lost",
        "storage-complete",
    ],
)
@pytest.mark.parametrize("job_state", JOB_STATES)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("iteration", [0, 2])
def test_state_space(iteration: int, stage: str, job_state: str, variant: str) -> None:
    """Every stage x child state x (suspend, delete, spec change, restart): the invariants hold
    (checked by World on every call) and the run still reaches the end."""
    w = started(iterations=3, retention={"onDelete": "Delete"})
    name = advance_to(w, iteration, stage)
    if job_state == "Missing":
        del w.jobs[name]
    elif job_state == "Succeeded":
        w.succeed(name)
    else:
        w.set_state(name, job_state, "BackoffLimitExceeded" if job_state == "Failed" else "")
    _variant(w, variant)
    before = w.status.model_copy(deep=True)
    d = w.reconcile()
    if variant == "delete":
        assert not d.of_type(CreateStep)
        w.reconcile()
        assert w.artifacts_deleted and not w.finalizer
        return
    last_step_done = (iteration, stage, job_state) == (2, "evaluate", "Succeeded")
    if variant == "suspend":
        assert w.status.phase == ("Succeeded" if last_step_done else "Suspended")
        assert all(j.state in ("Suspended", "Succeeded", "Failed") for j in w.jobs.values())
        w.edit(suspend=False)
    if variant == "immutable-change":
        assert condition(w, "SpecChangeRefused").status == "True"
    if variant != "status-lost":
        assert w.status.iteration >= before.iteration
    w.reconcile()  # a second pass with nothing new changes nothing
    again = w.reconcile()
    assert not again.of_type(CreateStep) or w.status.phase == "Running"
    w.run_to_end()
    if job_state in ("Failed", "Missing") and variant == "mutable-change":  # maxRetries now 0
        assert w.status.phase == "Failed"
        assert condition(w, "Failed").reason == (
            "BackoffLimitExceeded" if job_state == "Failed" else "JobDeleted"
        )
        return
    assert w.status.phase == "Succeeded"
    total = 4 if variant == "mutable-change" else 3
    assert w.status.progress == f"{total}/{total}"


# --------------------------------------------------------------------------- random walk


def test_random_walk_over_event_sequences() -> None:
    """Hypothesis-style: random interleavings of Job outcomes, user edits, lost status patches
    and restarts; invariants hold throughout and every walk ends Succeeded or Failed."""
    rng = random.Random(20260101)
    outcomes = {"Succeeded": 0, "Failed": 0}
    for _ in range(150):
        w = World(
            spin_object(
                iterations=rng.randint(1, 4),
                failurePolicy={"maxRetries": rng.randint(0, 2)},
                evaluation={"enabled": rng.random() < 0.7},
            )
        )
        suspended = False
        for _step in range(400):
            w.reconcile()
            if w.status.phase in ("Succeeded", "Failed"):
                break
            roll = rng.random()
            active = w.active()
            if roll < 0.45 and active:
                job = rng.choice(active)
                if job.state != "Suspended":
                    w.succeed(job.name, write=rng.random() < 0.95)
            elif roll < 0.55 and active:
                job = rng.choice(active)
                w.set_state(job.name, "Failed", "BackoffLimitExceeded")
            elif roll < 0.62 and active:
                job = rng.choice(active)
                if job.state == "Pending":
                    w.set_state(job.name, "Running")
            elif roll < 0.68:
                suspended = not suspended
                w.edit(
                    suspend=suspended,
                    iterations=w.obj["spec"]["iterations"],
                    failurePolicy=w.obj["spec"]["failurePolicy"],
                    evaluation=w.obj["spec"]["evaluation"],
                )
            elif roll < 0.72:
                w.edit(
                    model={"uri": f"s3://models/m{rng.randint(0, 3)}"},
                    suspend=suspended,
                    iterations=w.obj["spec"]["iterations"],
                    failurePolicy=w.obj["spec"]["failurePolicy"],
                    evaluation=w.obj["spec"]["evaluation"],
                )
            elif roll < 0.78:
                w.status = (
                    w.decisions[rng.randrange(len(w.decisions))].status
                    if rng.random() < 0.5
                    else w.status
                )
            elif roll < 0.80 and active:
                del w.jobs[rng.choice(active).name]
            if suspended and rng.random() < 0.3:
                suspended = False
                w.edit(
                    suspend=False,
                    iterations=w.obj["spec"]["iterations"],
                    failurePolicy=w.obj["spec"]["failurePolicy"],
                    evaluation=w.obj["spec"]["evaluation"],
                )
        else:
            raise AssertionError(f"walk did not finish: {w.status.phase} {w.status.message}")
        outcomes[w.status.phase] += 1
    assert outcomes["Succeeded"] > 10 and outcomes["Failed"] > 10, outcomes


def test_observed_is_hashable_input_only() -> None:
    """reconcile never mutates its inputs (purity)."""
    w = started()
    advance_to(w, 0, "train")
    status = w.status.model_copy(deep=True)
    obs = w.observed({0}, True, set(), True)
    reconcile(w.spec(), w.status, obs)
    assert w.status == status
    assert isinstance(obs, Observed)


def test_storage_facts_default_incomplete() -> None:
    assert StorageFacts() == StorageFacts(False, False, False, {})


def test_invalid_spec_object_is_accepted_as_input() -> None:
    problems = InvalidSpec([Problem("spec.iterations", "must be >= 1")])
    d = reconcile(problems, api.SPINRunStatus(), Observed(namespace="ns", name="x", now="t"))
    assert d.status.phase == "Failed" and "spec.iterations" in d.status.message  # type: ignore[operator]


# --------------------------------------------------------------------------- ranking metric


def _run_with_results(w: World, results: list[dict[str, float]], limit: int = 100) -> None:
    """Run to the end; iteration t's evaluation writes results[t] (as results.json would)."""
    for _ in range(limit):
        w.reconcile()
        if w.status.phase in ("Succeeded", "Failed"):
            return
        for job in w.active():
            w.succeed(job.name, results[job.iteration] if job.stage == "evaluate" else None)
    raise AssertionError(w.status.message)


# Chat data as the built-in evaluation reports it: exact match 0 for every model, the real
# answers' log-likelihood rising, `score` = that log-likelihood (data.score_metric's choice).
CHAT = [
    {
        "exact_match": 0.0,
        "real_logp_per_token": lp,
        "score": lp,
        "baseline/exact_match": 0.0,
        "baseline/score": -2.5,
    }
    for lp in (-2.2, -1.9, -1.7)
]


def test_default_metric_follows_the_data_not_exact_match() -> None:
    """The finding: with exact_match ranking, best stuck at iteration 0 on chat data."""
    obj = spin_object(iterations=3, stopping={"patience": 1})
    assert api.SPINRunSpec.model_validate(obj["spec"]).evaluation.metric == "auto"
    w = World(obj)
    _run_with_results(w, CHAT)
    assert (w.status.phase, w.status.progress, w.status.best_iteration) == ("Succeeded", "3/3", 2)
    assert ("BestIteration", "θ3 (iteration 2) is the best model so far by score") in w.events
    assert w.status.best_model == "θ3"
    assert "best model θ3 (iteration 2)" in (w.status.message or "")
    assert get_condition(w.status.conditions, "MetricUninformative") is None


def test_an_uninformative_metric_is_a_warning_condition() -> None:
    w = World(
        spin_object(iterations=3, evaluation={"metric": "exact_match"}, stopping={"patience": 1})
    )
    _run_with_results(w, CHAT)
    # It stops after θ2 did not beat θ1 on a metric that is 0 everywhere: now said out loud.
    assert w.status.best_iteration == 0 and w.status.progress == "2/3"
    blind = condition(w, "MetricUninformative")
    assert blind.status == "True" and blind.reason == "SameValueEverywhere"
    assert "exact_match is 0 for every evaluated model (θ0, θ1, θ2)" in blind.message
    assert [r for r, _ in w.events].count("MetricUninformative") == 1


def test_auto_without_a_score_ranks_by_exact_match() -> None:
    """A custom evaluation (or an older runtime) writes no `score`: auto keeps exact_match."""
    w = World(spin_object(iterations=2))
    _run_with_results(w, [{"exact_match": 0.4}, {"exact_match": 0.3}])
    assert w.status.best_iteration == 0
    assert get_condition(w.status.conditions, "MetricUninformative") is None
