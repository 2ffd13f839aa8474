"""One step of an iteration, from its Jobs and storage: adopt, create, retry, suspend, succeed.

A step is done when the status says so or storage holds its complete manifest; a Job found by
its deterministic name is adopted, never created twice; a failed Job is replaced by a new
attempt (`-r<k>`) up to failurePolicy.maxRetries, except for failures that cannot heal.
"""

from __future__ import annotations

from spin_operator.api import types as api
from spin_operator.conditions import dataset_status
from spin_operator.decision import (
    ACTIVE_STATES,
    CreateStep,
    DeleteJob,
    DeleteService,
    EnsureIterationRun,
    ObservedJob,
    RegisterModel,
    StorageFacts,
    SuspendJob,
)
from spin_operator.naming import StepKind, job_name, step_field
from spin_operator.pass_state import Outcome, PassState
from spin_operator.steps import layout_of

# Failures that will not heal (docs/runtime.md: exit 2 = bad input, 126/127 = cannot execute):
# a retry would fail the same way, on a cluster after waiting for GPUs again. "PodFailurePolicy"
# is the Job condition Kubernetes sets when render.py's FailJob rule (those exit codes) matched;
# "BadInput"/"CannotExecute" are local mode's (local/backend.py).
UNHEALABLE_REASONS = ("BadInput", "CannotExecute", "PodFailurePolicy")
BLOCKED_PREFIX = "pods cannot start: "  # step messages set while pods are blocked (cleared after)
SUSPENDED = "suspended"  # the step's message while spec.suspend holds its (Job-suspended) Job
# The step's message while spec.suspend holds a step whose queued Job was deleted (see _active):
# it also marks that attempt as the one to create again on resume, not a failure.
RELEASED = "suspended: Job deleted to leave Kueue's queue; a new one is queued on resume"
ADMISSION = "waiting for Kueue admission"  # a queued Job Kueue has not admitted (yet, or again)


def _seconds_between(start: str, end: str) -> float | None:
    """Seconds from one RFC 3339 time to another; None when either is unreadable."""
    from datetime import datetime

    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


class StepRules(PassState):
    def _step(self, spec: api.SPINRunSpec, t: int, kind: StepKind) -> Outcome:
        it = self._entry(spec, t)
        ss = self._step_status(it, kind)
        jobs = {j.attempt: j for j in self.observed.jobs if j.iteration == t and j.stage == kind}
        if jobs and max(jobs) + 1 > ss.attempts:  # a Job status does not know of yet: adopt it
            ss.attempts = max(jobs) + 1
            ss.job_name = jobs[max(jobs)].name
            ss.start_time = ss.start_time or jobs[max(jobs)].start_time or self.now
            ss.phase = "Running" if ss.phase == "Pending" else ss.phase
        for attempt, job in jobs.items():  # never two active Jobs for one step
            if attempt < ss.attempts - 1 and job.state in ACTIVE_STATES and not job.deleting:
                self._act(DeleteJob(job.name))
        if ss.phase == "Succeeded":
            return "done"
        if ss.phase == "Failed":
            return "failed"
        current = jobs.get(ss.attempts - 1) if ss.attempts else None
        if current is None or current.state in ("Succeeded", "Failed"):
            facts = self.observed.storage.get(t)
            if facts is None:
                self.decision.needs_storage.add(t)
                return "waiting"
            if self._complete_in_storage(kind, facts):
                self._step_succeeded(spec, t, kind, facts, current)
                return "done"
        if current is None:
            if ss.attempts == 0:
                return self._create(spec, t, kind, 0)
            if ss.message == RELEASED or (spec.suspend and spec.scheduling.queue_name):
                # Gone because suspend deleted it (_active; the right half of the `or` is for a
                # pass whose status write with the mark was lost): the same attempt again on
                # resume, never counted as a failure or a retry.
                if spec.suspend:
                    ss.phase, ss.message = "Pending", RELEASED
                    return "waiting"
                return self._create(spec, t, kind, ss.attempts - 1, resumed=True)
            name = job_name(self.observed.name, t, kind, ss.attempts - 1)
            if name not in self.observed.gone_jobs:
                self.decision.needs_jobs.add(name)
                return "waiting"
            return self._failed_attempt(
                spec, t, kind, "JobDeleted", f"Job {name} was deleted before it finished"
            )
        if current.state == "Succeeded":
            what = {
                "check": "the check's report",
                "generate": "the generated data",
                "train": "the model checkpoint",
                "evaluate": "the evaluation results",
                "control-train": "the control checkpoint",
                "control-evaluate": "the control's evaluation results",
            }[kind]
            return self._failed_attempt(
                spec,
                t,
                kind,
                "ArtifactIncomplete",
                f"Job {current.name} succeeded but {what} has no complete manifest",
            )
        if current.state == "Failed":
            return self._failed_attempt(
                spec, t, kind, current.reason or "JobFailed", current.message
            )
        return self._active(spec, ss, current)

    def _sweep_recorded(self) -> None:
        """Finished Jobs do not pile up: every Job of a step the status records as succeeded is
        deleted (its pods with it), attempts that failed before included."""
        deleting = {a.name for a in self.decision.of_type(DeleteJob)}
        for job in self.observed.jobs:
            if (
                not job.deleting
                and job.name not in deleting
                and self._recorded(job.iteration, job.stage)
            ):
                self._act(DeleteJob(job.name))

    def _recorded(self, t: int, kind: StepKind) -> bool:
        """True when the status this pass started from (what the API server holds) says the step
        succeeded. Only then are its finished Jobs deleted: a step is never decided from its Job
        again once recorded, so a deleted Job is never re-run, and a status write that did not
        land leaves the Job for the next pass to see."""
        it = next((i for i in self.old.iterations if i.iteration == t), None)
        ss = getattr(it, step_field(kind), None) if it is not None else None
        return ss is not None and ss.phase == "Succeeded"

    def _active(self, spec: api.SPINRunSpec, ss: api.StepStatus, job: ObservedJob) -> Outcome:
        if job.deleting:
            if spec.suspend and job.queued:
                ss.phase, ss.message = "Pending", RELEASED
            return "waiting"
        if spec.suspend and job.queued:
            # Kueue owns a queued Job's spec.suspend: it unsuspends a Job whose Workload is
            # admitted, so patching suspend=true (as below) started a fight that never ended
            # (issue 14.6). Kueue's supported ways are Workload.spec.active=false or deleting the
            # Job; deleting is chosen because it needs no API beyond Jobs (no watch of Workloads,
            # no RBAC on kueue.x-k8s.io, nothing to find by the job-uid label) and ends up where
            # a suspended Job does: pods gone, quota released. What a pod had not stored is lost
            # either way; generation's new Job skips the shards already complete in storage.
            self._act(DeleteJob(job.name))
            ss.phase, ss.message = "Pending", RELEASED
        elif spec.suspend:
            if job.state != "Suspended":
                self._act(SuspendJob(job.name, True))
            ss.phase, ss.message = "Pending", SUSPENDED
        elif job.state == "Suspended":
            if job.queued:
                ss.phase, ss.message = "Pending", ADMISSION
            else:
                self._act(SuspendJob(job.name, False))
                ss.phase, ss.message = "Pending", None
        else:
            ss.phase = "Running" if job.state == "Running" else "Pending"
            transient = ss.message in (SUSPENDED, RELEASED, ADMISSION) or (
                ss.message or ""
            ).startswith(BLOCKED_PREFIX)
            ss.message = None if transient else ss.message
            return self._starting(spec, ss, job)
        return "waiting"

    def _starting(self, spec: api.SPINRunSpec, ss: api.StepStatus, job: ObservedJob) -> Outcome:
        """A running Job whose pods may not start: say why (PodsBlocked condition, a Warning
        event per new cause) and fail the step once a pod waited failurePolicy.pendingTimeoutSeconds."""
        what = f"{job.stage} of iteration {job.iteration}: Job {job.name}"
        if job.blocked_reason:
            ss.message = f"{BLOCKED_PREFIX}{job.blocked_reason}: {job.blocked_message}"
            self.blocked.append(
                (job.blocked_reason, f"{what}: {job.blocked_reason}: {job.blocked_message}")
            )
        timeout = spec.failure_policy.pending_timeout_seconds
        waited = _seconds_between(job.pending_since, self.now) if job.pending_since else None
        if not timeout or waited is None or waited <= timeout:
            return "waiting"
        cause = (
            f"{job.blocked_reason}: {job.blocked_message}"
            if job.blocked_reason
            else "pods still Pending"
        )
        ss.phase, ss.completion_time = "Failed", self.now
        ss.message = f"PendingTimeout: {cause}"
        self._fail(
            "PendingTimeout",
            f"{what}: a pod waited {int(waited)}s to start, over failurePolicy.pendingTimeoutSeconds "
            f"({timeout}s): {cause}",
        )
        return "failed"

    @staticmethod
    def _complete_in_storage(kind: StepKind, facts: StorageFacts) -> bool:
        return {
            # a generation found complete ran the same checks itself (a run resumed from storage)
            "check": facts.checked or facts.generated,
            "generate": facts.generated,
            "train": facts.model,
            "evaluate": facts.evaluated,
            "control-train": facts.control_model,
            "control-evaluate": facts.control_evaluated,
        }[kind]

    def _step_succeeded(
        self,
        spec: api.SPINRunSpec,
        t: int,
        kind: StepKind,
        facts: StorageFacts,
        job: ObservedJob | None,
    ) -> None:
        it = self._entry(spec, t)
        ss = self._step_status(it, kind)
        ss.phase = "Succeeded"
        self.steps_done.add(t)
        ss.completion_time = (
            job.completion_time if job and job.state == "Succeeded" else None
        ) or self.now
        found = job is None or job.state != "Succeeded"
        ss.message = "found complete in storage" if found else None
        layout = layout_of(spec, self.observed.run).iteration(t)
        if kind == "check" and facts.check_profile:
            self.status.dataset = dataset_status(facts.check_profile)
        if kind == "generate" and facts.dataset_rows:
            skipped = dict(facts.dataset_skipped)
            self.status.dataset = api.DatasetStatus(
                rows=facts.dataset_rows,
                usable=facts.dataset_rows - sum(skipped.values()),
                skipped=sum(skipped.values()),
                skipped_by_reason=skipped,
            )
        if kind == "train":
            it.output_model_uri = layout.model
            self._act(
                *(
                    DeleteService(job_name(self.observed.name, t, "train", k))
                    for k in range(ss.attempts)
                )
            )
            if not spec.evaluation.enabled and spec.tracking.uri:
                self._act(RegisterModel(t, layout.model, {}))
        if kind == "control-train":
            it.control = it.control or api.ControlArmStatus()
            it.control.output_model_uri = layout.control_model
            self._act(
                *(
                    DeleteService(job_name(self.observed.name, t, "control-train", k))
                    for k in range(ss.attempts)
                )
            )
        if kind == "control-evaluate":  # never registered: the best alias stays on SPIN's models
            it.control = it.control or api.ControlArmStatus()
            it.control.metrics = {k: float(v) for k, v in facts.control_metrics.items()}
        if kind == "evaluate":
            it.metrics = {k: float(v) for k, v in facts.metrics.items()}
            if spec.tracking.uri:
                self._act(RegisterModel(t, layout.model, dict(it.metrics)))
        if found:  # a Job's own success is on the Job (and the next JobCreated): no event here
            self._event(
                "Normal", "StepSucceeded", f"{kind} of iteration {t}: found complete in storage"
            )

    def _create(
        self,
        spec: api.SPINRunSpec,
        t: int,
        kind: StepKind,
        attempt: int,
        why: str = "",
        resumed: bool = False,
    ) -> Outcome:
        """Create attempt `attempt` of a step: a retry after `why`, or (`resumed`) the attempt a
        suspend deleted, created again under its own name."""
        it = self._entry(spec, t)
        ss = self._step_status(it, kind)
        name = job_name(self.observed.name, t, kind, attempt)
        if spec.suspend:
            ss.phase, ss.message = "Pending", SUSPENDED
            return "waiting"
        if any(j.name == name for j in self.observed.jobs):  # adopted above; never create twice
            return "waiting"
        if not self._secrets_ok(spec):
            return "failed" if self.status.phase == "Failed" else "waiting"
        if (
            name in self.observed.rejected
        ):  # a permanent API error: the same Job would be refused again
            reason, refused = self.observed.rejected[name]
            ss.phase, ss.message, ss.completion_time = "Failed", refused, self.now
            self._fail(reason, refused)
            return "failed"
        if (
            spec.tracking.uri
            and it.mlflow_run_id is None
            and EnsureIterationRun(t) not in self.decision.actions
        ):
            self._act(EnsureIterationRun(t))  # once, when a control step starts beside SPIN's
        self._act(CreateStep(t, kind, attempt, name))
        ss.attempts = attempt + 1
        ss.job_name = name
        ss.phase = "Pending"
        ss.start_time = ss.start_time or self.now
        if resumed:
            ss.message = None
            self._event("Normal", "JobCreated", f"{kind} of iteration {t}: Job {name} (resumed)")
        elif attempt:
            retries = spec.failure_policy.max_retries
            self._event(
                "Warning",
                "Retrying",
                f"{kind} of iteration {t}: {why}; retry {attempt}/{retries} as Job {name}",
            )
        else:
            ss.message = None
            self._event("Normal", "JobCreated", f"{kind} of iteration {t}: Job {name}")
        return "waiting"

    def _failed_attempt(
        self, spec: api.SPINRunSpec, t: int, kind: StepKind, reason: str, message: str
    ) -> Outcome:
        ss = self._step_status(self._entry(spec, t), kind)
        why = f"{reason}: {message}" if message else reason
        ss.message = why
        if reason in UNHEALABLE_REASONS:  # fail at once, the cause first (argv stays in the logs)
            ss.phase = "Failed"
            ss.message = message or reason
            ss.completion_time = self.now
            logs = (
                f"; details: kubectl logs job/{ss.job_name}" if reason == "PodFailurePolicy" else ""
            )
            self._fail(
                reason,
                f"{message or reason} ({kind} of iteration {t}: bad input, not retried{logs})",
            )
            return "failed"
        if ss.attempts - 1 < spec.failure_policy.max_retries:
            return self._create(spec, t, kind, ss.attempts, why)
        ss.phase = "Failed"
        ss.completion_time = self.now
        self._fail(reason, f"{kind} of iteration {t} failed after {ss.attempts} attempt(s): {why}")
        return "failed"
