"""One reconcile pass: the state machine behind `reconciler.reconcile` (pure, no I/O)."""

from __future__ import annotations

from typing import Literal

from pydantic import ValidationError

from spin_operator import status as cond
from spin_operator.api import types as api
from spin_operator.naming import StepKind, job_name, step_field
from spin_operator.reconciler import (
    ACTIVE_STATES,
    KIND_OF,
    STAGE_OF,
    CreateStep,
    Decision,
    DeleteArtifacts,
    DeleteJob,
    DeleteService,
    EnsureIterationRun,
    EnsureParentRun,
    Event,
    FinishTracking,
    Observed,
    ObservedJob,
    RecordSpec,
    RegisterModel,
    ReplaySpool,
    SetFinalizer,
    StorageFacts,
    SuspendJob,
    referenced_secrets,
)
from spin_operator.steps import (
    beside,
    changed_fields,
    layout_of,
    merge_mutable,
    spec_digest,
    steps_of,
)
from spin_operator.validation import InvalidSpec

Outcome = Literal["done", "waiting", "failed"]
TERMINAL = ("Succeeded", "Failed")
# Failures that will not heal (docs/runtime.md: exit 2 = bad input, 126/127 = cannot execute):
# a retry would fail the same way, on a cluster after waiting for GPUs again. "PodFailurePolicy"
# is the Job condition Kubernetes sets when render.py's FailJob rule (those exit codes) matched;
# "BadInput"/"CannotExecute" are local mode's (local/backend.py).
UNHEALABLE_REASONS = ("BadInput", "CannotExecute", "PodFailurePolicy")
BLOCKED_PREFIX = "pods cannot start: "  # step messages set while pods are blocked (cleared after)


def _seconds_between(start: str, end: str) -> float | None:
    """Seconds from one RFC 3339 time to another; None when either is unreadable."""
    from datetime import datetime

    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None


class Pass:
    """Mutates a private copy of the status while collecting actions."""

    def __init__(
        self, spec: api.SPINRunSpec | InvalidSpec, status: api.SPINRunStatus, observed: Observed
    ):
        self.given = spec
        self.old = status
        self.st = status.model_copy(deep=True)
        self.o = observed
        self.d = Decision(status=self.st)
        self.now = observed.now
        self.started = status.spec_hash is not None
        self.failure: tuple[str, str] | None = None  # (reason, message) when failing this pass
        self.success: str | None = (
            None  # the reason when succeeding this pass (Succeeded, EarlyStopped)
        )
        self.steps_done: set[int] = set()  # iterations with a step that succeeded in this pass
        self.blocked: list[
            tuple[str, str]
        ] = []  # (cause, message) of steps whose pods cannot start
        self.drove = False  # _drive ran: the PodsBlocked condition reflects this pass

    # ------------------------------------------------------------------ entry point

    def run(self) -> Decision:
        if self.o.deleting:
            self._deleting()
            return self.d
        spec = self._effective_spec()
        if spec is not None:
            self.d.spec = spec
            self._finalizer(spec)
            if self.started and self.st.phase in TERMINAL:
                self._cleanup_terminal()
            elif self.started or self._start(spec):
                self._drive(spec)
            if spec.retention.finished_jobs == "Delete":
                self._sweep_recorded()
            if self.started and spec.tracking.uri:
                self._tracking()
        self._sync_conditions()
        self.st.observed_generation = self.o.generation
        return self.d

    # ------------------------------------------------------------------ helpers

    def _act(self, *actions: object) -> None:
        self.d.actions.extend(actions)  # type: ignore[arg-type]

    def _event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self._act(Event(type_, reason, message))

    def _prefix(self, spec: api.SPINRunSpec) -> str:
        return layout_of(spec, self.o.run).prefix

    def _fail(self, reason: str, message: str) -> None:
        """Phase Failed; one event per distinct failure (re-evaluated pre-start failures repeat)."""
        previous = cond.get_condition(self.old.conditions, cond.FAILED)
        repeated = (
            self.old.phase == "Failed"
            and previous is not None
            and previous.reason == reason
            and self.old.message == message
        )
        self.failure = (reason, message)
        self.st.phase = "Failed"
        self.st.message = message
        self.st.completion_time = self.st.completion_time if repeated else self.now
        if not repeated:
            self._event("Warning", reason, message)
        for job in self.o.jobs:
            if job.state in ACTIVE_STATES and not job.deleting:
                self._act(DeleteJob(job.name))

    def _succeed(self, reason: str, message: str) -> None:
        self.success = reason
        self.st.phase = "Succeeded"
        self.st.stage = "Done"
        self.st.message = message
        self.st.completion_time = self.now
        self._event("Normal", reason, message)

    # ------------------------------------------------------------------ spec

    def _refuse(self, message: str | None) -> None:
        current = cond.get_condition(self.st.conditions, cond.SPEC_CHANGE_REFUSED)
        if message is None:
            if current is not None and current.status == "True":
                cond.set_condition(
                    self.st.conditions,
                    cond.SPEC_CHANGE_REFUSED,
                    False,
                    "SpecAccepted",
                    "",
                    self.now,
                    self.o.generation,
                )
            return
        was = current is not None and current.status == "True" and current.message == message
        cond.set_condition(
            self.st.conditions,
            cond.SPEC_CHANGE_REFUSED,
            True,
            "ImmutableFieldChanged",
            message,
            self.now,
            self.o.generation,
        )
        if not was:
            self._event("Warning", "SpecChangeRefused", message)

    def _effective_spec(self) -> api.SPINRunSpec | None:
        """The spec the run goes on with; fails the run or refuses changes as the rule says."""
        given, applied = self.given, self.o.applied_spec
        if not self.started:
            if isinstance(given, InvalidSpec):
                self._fail("InvalidSpec", str(given))
                return None
            return given
        if applied is not None and spec_digest(applied) != self.st.spec_hash:
            applied = None  # the annotation is not what the run started with: do not trust it
        refusals: list[str] = []
        if isinstance(given, InvalidSpec):
            if applied is None:
                self._fail("InvalidSpec", f"{given} (and the spec the run started with is unknown)")
                return None
            spec = applied
            refusals.append(
                f"the new spec is invalid ({given}); the run goes on with its last accepted spec"
            )
        elif applied is None:
            if spec_digest(given) != self.st.spec_hash:
                self._fail(
                    "AppliedSpecLost",
                    f"immutable fields changed and annotation of the started spec is missing or altered (specHash {self.st.spec_hash})",
                )
                return None
            spec = given
        else:
            changed = changed_fields(applied, given)
            spec = given
            if changed:
                try:
                    spec = merge_mutable(applied, given)
                    refusals.append(
                        f"{', '.join(changed)}: cannot change after the run started; the run goes on with the values it started with"
                    )
                except ValidationError as exc:
                    spec = applied
                    refusals.append(
                        f"{', '.join(changed)}: cannot change after the run started, and the other changes do not fit the started spec ({exc.error_count()} error(s)); the run goes on with its last accepted spec"
                    )
        started_count = len(self.st.iterations)
        if spec.iterations < started_count:
            refusals.append(
                f"spec.iterations: {spec.iterations} is below the {started_count} iteration(s) already started; using {started_count}"
            )
            spec = spec.model_copy(update={"iterations": started_count})
        self._refuse("; ".join(refusals) or None)
        if self.o.applied_spec is None or spec.to_wire() != self.o.applied_spec.to_wire():
            self._act(RecordSpec(spec))
        return spec

    def _finalizer(self, spec: api.SPINRunSpec) -> None:
        wanted = spec.retention.on_delete == "Delete"
        if wanted != self.o.finalizer:
            self._act(SetFinalizer(wanted))

    # ------------------------------------------------------------------ lifecycle

    def _start(self, spec: api.SPINRunSpec) -> bool:
        """Accept the spec and start iteration 0, once storage and Secrets check out."""
        o = self.o
        if self.st.phase != "Failed":
            self.st.phase = "Pending"
        if not o.stored_spec_checked:
            self.d.needs_stored_spec = True
            return False
        digest = spec_digest(spec)
        if o.stored_spec_digest is not None and o.stored_spec_digest != digest:
            self._fail(
                "StorageConflict",
                f"spec.storage.uri: {self._prefix(spec)} holds the artifacts of a different spec "
                f"(digest {o.stored_spec_digest}, this spec {digest}); delete them or use another storage.uri or name",
            )
            return False
        if not self._secrets_ok(spec):
            return False
        if o.rejected:  # the dry run of iteration 0: nothing was created or stored
            refusals = [o.rejected[n] for n in sorted(o.rejected)]
            self._fail(refusals[0][0], "; ".join(message for _, message in refusals))
            return False
        self.started = True
        self.st.spec_hash = digest
        self.st.phase = "Running"
        self.st.message = None
        self.st.completion_time = None
        self.st.start_time = self.st.start_time or self.now
        self.st.iteration = 0
        self.st.progress = f"0/{spec.iterations}"
        self._entry(spec, 0)
        self._act(RecordSpec(spec, store=o.stored_spec_digest is None))
        if spec.tracking.uri:
            self._act(EnsureParentRun())
        resumed = " (resuming from storage)" if o.stored_spec_digest is not None else ""
        self._event(
            "Normal",
            "Started",
            f"{spec.iterations} iteration(s), artifacts under {self._prefix(spec)}{resumed}",
        )
        return True

    def _secrets_ok(self, spec: api.SPINRunSpec) -> bool:
        refs = referenced_secrets(spec)
        if not refs:
            return True
        if self.o.missing_secrets is None:
            self.d.needs_secrets = True
            return False
        missing = sorted(s for s in refs if s in self.o.missing_secrets)
        if missing:
            self._fail(
                "SecretNotFound", "; ".join(f'{refs[s]}: Secret "{s}" not found' for s in missing)
            )
            return False
        return True

    def _tracking(self) -> None:
        """MLflow run ends and spool replays, decided from the status alone: asked for again on
        every pass until `status.mlflow` records MLflow's confirmation (see FinishTracking)."""
        ml, st = self.st.mlflow, self.st
        if ml is None:
            return  # no parent run: MLflow was never reached, nothing of this run is there
        confirmed = set(ml.finished)
        terminal = st.phase in TERMINAL
        ends: list[FinishTracking] = []
        open_runs: list[int] = []
        for it in st.iterations:
            if not it.mlflow_run_id or it.mlflow_run_id in confirmed:
                continue
            if it.stage == "Done":
                ends.append(FinishTracking(it.iteration, "FINISHED"))
            elif terminal:  # the iteration a failed run stopped in
                ends.append(FinishTracking(it.iteration, "FAILED"))
            else:
                open_runs.append(it.iteration)
        # a finished step may have left a spool; an unknown or known backlog is retried on every
        # pass (each pass after MLflow answers again delivers it)
        if open_runs and (self.steps_done & set(open_runs) or ml.spooled_calls != 0):
            self._act(ReplaySpool(tuple(open_runs)))
        self._act(*ends)
        if terminal and ml.run_id and ml.run_id not in confirmed:
            self._act(FinishTracking(None, "FINISHED" if st.phase == "Succeeded" else "FAILED"))

    def _cleanup_terminal(self) -> None:
        for job in self.o.jobs:
            if job.state in ACTIVE_STATES and not job.deleting:
                self._act(DeleteJob(job.name))

    def _deleting(self) -> None:
        """With retention Delete: stop writers, then delete the run prefix, then let go.

        Every Job goes (the controller deletes with propagationPolicy Foreground, so a Job stays
        visible, marked deleting, until the garbage collector removed all its pods): artifacts
        are deleted only once no Job is left, so no pod still uploading writes into a deleted
        prefix (and a finished Job's pods are gone with it)."""
        if not self.o.finalizer:
            return
        remaining = list(self.o.jobs)
        if remaining:
            self._act(*(DeleteJob(j.name) for j in remaining if not j.deleting))
            self.st.message = f"deleting: waiting for {len(remaining)} Job(s) and their pods to be gone before deleting artifacts"
            return
        if self.started:
            # Only the prefix the run started with, proven by status.specHash (written by the
            # operator alone): the applied-spec annotation and the spec are the author's to edit,
            # and a tampered one must not redirect a recursive delete (docs/security.md, threat 4).
            given = self.given if not isinstance(self.given, InvalidSpec) else None
            spec = next(
                (
                    s
                    for s in (self.o.applied_spec, given)
                    if s is not None and spec_digest(s) == self.st.spec_hash
                ),
                None,
            )
            self.d.spec = spec
            if spec is None:
                self._event(
                    "Warning",
                    "ArtifactsKept",
                    f"no spec matching specHash {self.st.spec_hash} (the applied-spec annotation was altered or lost): artifacts are kept, delete them by hand",
                )
            elif spec.storage.uri:
                self._act(DeleteArtifacts(self._prefix(spec)))
        self._act(SetFinalizer(False))

    # ------------------------------------------------------------------ iterations

    def _entry(self, spec: api.SPINRunSpec, t: int) -> api.IterationStatus:
        for it in self.st.iterations:
            if it.iteration == t:
                return it
        layout = layout_of(spec, self.o.run)
        it = api.IterationStatus(
            iteration=t,
            stage="Checking" if t == 0 else "Generating",
            start_time=self.now,
            model_uri=layout.model_for_iteration(t, spec.model.uri),
            data_uri=layout.iteration(t).generated,
        )
        if t == 0:  # the dataset and θ0 are checked once, before any generation (docs/datasets.md)
            it.check = api.StepStatus()
            # local mode checks in-process before the run (spinctl run's preflight)
            if self.o.inputs_checked:
                it.check.phase, it.check.message = "Succeeded", "checked by spinctl before the run"
                it.check.completion_time = self.now
        if not spec.evaluation.enabled:
            it.evaluate.phase = "Skipped"
        if spec.control_arm.enabled:
            it.control_train, it.control_evaluate = api.StepStatus(), api.StepStatus()
            it.control = api.ControlArmStatus(
                model_uri=layout.control_model_for_iteration(t, spec.model.uri)
            )
        self.st.iterations.append(it)
        return it

    def _drive(self, spec: api.SPINRunSpec) -> None:
        st = self.st
        self.drove = True
        if spec.suspend and st.phase != "Suspended":
            st.phase = "Suspended"
            self._event(
                "Normal",
                "Suspended",
                "spec.suspend is true: running Jobs suspended, nothing new starts",
            )
        elif not spec.suspend and st.phase in ("Suspended", "Pending"):
            if st.phase == "Suspended":
                self._event("Normal", "Resumed", "spec.suspend is false: Jobs resume")
            st.phase = "Running"
        steps = steps_of(spec)
        while st.phase not in TERMINAL:
            t = st.iteration
            it = self._entry(spec, t)
            if it.stage == "Done":
                if not self._next_iteration(spec, t):
                    break
                continue
            kind = KIND_OF[it.stage]
            outcome = self._stage(spec, t, kind)
            if outcome != "done":
                break
            # the check (iteration 0) leads every step
            later = steps[steps.index(kind) + 1 :] if kind in steps else steps
            if later:
                it.stage = STAGE_OF[later[0]]
                continue
            self._complete_iteration(spec, t)
        current = self._entry(spec, st.iteration)
        st.stage = "Done" if st.phase == "Succeeded" else current.stage
        done = sum(1 for it in st.iterations if it.stage == "Done")
        st.progress = f"{done}/{spec.iterations}"
        if st.phase in ("Running", "Suspended"):
            suffix = " (suspended)" if st.phase == "Suspended" else ""
            # Iterations count from 0 everywhere (ITERATION column, Job names, MLflow runs).
            t = st.iteration
            st.message = f"iteration {t} of {spec.iterations} (θ{t} → θ{t + 1}): {st.stage}{suffix}"

    def _stage(self, spec: api.SPINRunSpec, t: int, kind: StepKind) -> Outcome:
        """SPIN's step `kind` and, with controlArm, its control beside it (both start at once:
        a waiting step does not hold back its partner); done when every one of them is."""
        outcomes: list[Outcome] = []
        for k in beside(spec, kind):
            outcomes.append(self._step(spec, t, k))
            if self.st.phase in TERMINAL:  # failed: nothing more may start this pass
                return "failed"
        return "done" if all(o == "done" for o in outcomes) else "waiting"

    def _complete_iteration(self, spec: api.SPINRunSpec, t: int) -> None:
        it = self._entry(spec, t)
        it.stage = "Done"
        it.completion_time = self.now
        summary = ", ".join(f"{k}={v:g}" for k, v in sorted(it.metrics.items()))
        self._event(
            "Normal", "IterationCompleted", f"iteration {t} done{': ' + summary if summary else ''}"
        )
        if spec.evaluation.enabled:
            metric = cond.ranking_metric(self.st.iterations, spec)
            best = cond.best_iteration(self.st.iterations, metric, spec.evaluation.mode)
            if best != self.st.best_iteration and best is not None:
                self._event(
                    "Normal",
                    "BestIteration",
                    f"θ{best + 1} (iteration {best}) is the best model so far by {metric}",
                )
            self.st.best_iteration = best
            self.st.best_model = None if best is None else f"θ{best + 1}"
            blind = cond.uninformative(self.st.iterations, metric)
            previous = cond.get_condition(self.st.conditions, cond.METRIC_UNINFORMATIVE)
            if blind and (previous is None or previous.status != "True"):
                self._event("Warning", cond.METRIC_UNINFORMATIVE, blind)
            if blind or previous is not None:
                cond.set_condition(
                    self.st.conditions, cond.METRIC_UNINFORMATIVE, bool(blind),
                    "SameValueEverywhere" if blind else "MetricRanks", blind or "", self.now, self.o.generation,
                )  # fmt: skip
            if spec.control_arm.enabled:
                self._compare_control(spec, it, metric)

    def _compare_control(self, spec: api.SPINRunSpec, it: api.IterationStatus, metric: str) -> None:
        """Status, the ControlArm condition and (control ahead) a Warning: did SPIN pay off?"""
        ahead, reason, message = cond.control_verdict(it, metric, spec.evaluation.mode)
        cond.set_condition(
            self.st.conditions,
            cond.CONTROL_ARM,
            ahead,
            reason,
            message,
            self.now,
            self.o.generation,
        )
        if reason == "ControlAhead":
            self._event("Warning", "ControlAhead", message)

    def _next_iteration(self, spec: api.SPINRunSpec, t: int) -> bool:
        """After iteration t: finish the run, stop early, or start t+1 (True)."""
        done = t + 1
        b = self.st.best_iteration
        best = f"; best model θ{b + 1} (iteration {b})" if b is not None else ""
        if done >= spec.iterations:
            self._succeed("Succeeded", f"{done} iteration(s) done{best}")
            return False
        stop, why = cond.should_stop(self.st.iterations, spec)
        if stop:
            self._succeed("EarlyStopped", f"stopped after {done} iteration(s): {why}{best}")
            return False
        self.st.iteration = t + 1
        self._entry(spec, t + 1)
        return True

    # ------------------------------------------------------------------ steps

    def _step_status(self, it: api.IterationStatus, kind: StepKind) -> api.StepStatus:
        ss: api.StepStatus | None = getattr(it, step_field(kind))
        if ss is None:  # a control step of an entry written before it existed
            ss = api.StepStatus()
            setattr(it, step_field(kind), ss)
        return ss

    def _step(self, spec: api.SPINRunSpec, t: int, kind: StepKind) -> Outcome:
        it = self._entry(spec, t)
        ss = self._step_status(it, kind)
        jobs = {j.attempt: j for j in self.o.jobs if j.iteration == t and j.stage == kind}
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
            facts = self.o.storage.get(t)
            if facts is None:
                self.d.needs_storage.add(t)
                return "waiting"
            if self._complete_in_storage(kind, facts):
                self._step_succeeded(spec, t, kind, facts, current)
                return "done"
        if current is None:
            if ss.attempts == 0:
                return self._create(spec, t, kind, 0)
            name = job_name(self.o.name, t, kind, ss.attempts - 1)
            if name not in self.o.gone_jobs:
                self.d.needs_jobs.add(name)
                return "waiting"
            return self._failed_attempt(
                spec, t, kind, "JobDeleted", f"Job {name} was deleted before it finished"
            )
        if current.state == "Succeeded":
            what = {
                "check": "the check's report", "generate": "the generated data", "train": "the model checkpoint", "evaluate": "the evaluation results",
                "control-train": "the control checkpoint", "control-evaluate": "the control's evaluation results",
            }[kind]  # fmt: skip
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
        deleting = {a.name for a in self.d.of_type(DeleteJob)}
        for job in self.o.jobs:
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
            return "waiting"
        if spec.suspend:
            if job.state != "Suspended":
                self._act(SuspendJob(job.name, True))
            ss.phase = "Pending"
            ss.message = "suspended"
        elif job.state == "Suspended":
            if job.queued:
                ss.phase, ss.message = "Pending", "waiting for Kueue admission"
            else:
                self._act(SuspendJob(job.name, False))
                ss.phase, ss.message = "Pending", None
        else:
            ss.phase = "Running" if job.state == "Running" else "Pending"
            transient = ss.message in ("suspended", "waiting for Kueue admission") or (
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
            "check": facts.checked or facts.generated, "generate": facts.generated, "train": facts.model, "evaluate": facts.evaluated,
            "control-train": facts.control_model, "control-evaluate": facts.control_evaluated,
        }[kind]  # fmt: skip

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
        layout = layout_of(spec, self.o.run).iteration(t)
        if kind == "check" and facts.check_profile:
            self.st.dataset = cond.dataset_status(facts.check_profile)
        if kind == "generate" and facts.dataset_rows:
            skipped = dict(facts.dataset_skipped)
            self.st.dataset = api.DatasetStatus(
                rows=facts.dataset_rows, usable=facts.dataset_rows - sum(skipped.values()),
                skipped=sum(skipped.values()), skipped_by_reason=skipped,
            )  # fmt: skip
        if kind == "train":
            it.output_model_uri = layout.model
            self._act(
                *(DeleteService(job_name(self.o.name, t, "train", k)) for k in range(ss.attempts))
            )
            if not spec.evaluation.enabled and spec.tracking.uri:
                self._act(RegisterModel(t, layout.model, {}))
        if kind == "control-train":
            it.control = it.control or api.ControlArmStatus()
            it.control.output_model_uri = layout.control_model
            self._act(
                *(
                    DeleteService(job_name(self.o.name, t, "control-train", k))
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
        self, spec: api.SPINRunSpec, t: int, kind: StepKind, attempt: int, why: str = ""
    ) -> Outcome:
        it = self._entry(spec, t)
        ss = self._step_status(it, kind)
        name = job_name(self.o.name, t, kind, attempt)
        if spec.suspend:
            ss.phase, ss.message = "Pending", "suspended"
            return "waiting"
        if any(j.name == name for j in self.o.jobs):  # adopted above; never create twice
            return "waiting"
        if not self._secrets_ok(spec):
            return "failed" if self.st.phase == "Failed" else "waiting"
        if name in self.o.rejected:  # a permanent API error: the same Job would be refused again
            reason, refused = self.o.rejected[name]
            ss.phase, ss.message, ss.completion_time = "Failed", refused, self.now
            self._fail(reason, refused)
            return "failed"
        if (
            spec.tracking.uri
            and it.mlflow_run_id is None
            and EnsureIterationRun(t) not in self.d.actions
        ):
            self._act(EnsureIterationRun(t))  # once, when a control step starts beside SPIN's
        self._act(CreateStep(t, kind, attempt, name))
        ss.attempts = attempt + 1
        ss.job_name = name
        ss.phase = "Pending"
        ss.start_time = ss.start_time or self.now
        if attempt:
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

    # ------------------------------------------------------------------ conditions

    def _sync_conditions(self) -> None:
        st, now, gen = self.st, self.now, self.o.generation
        phase = st.phase
        failed = cond.get_condition(st.conditions, cond.FAILED)
        reason, message = self.failure or (
            (failed.reason, failed.message) if phase == "Failed" and failed else ("", "")
        )
        stage = st.stage or "Pending"
        cs = st.conditions
        cond.set_condition(cs, cond.READY, phase == "Succeeded", phase, st.message or "", now, gen)
        # Complete, as Jobs and TrainJobs have it: `kubectl wait --for=condition=Complete`.
        # Its reason says how the run ended (Succeeded, EarlyStopped), kept on later reconciles.
        complete = cond.get_condition(self.old.conditions, cond.COMPLETE)
        done_reason = self.success or (
            complete.reason if complete and complete.status == "True" else "Succeeded"
        )
        succeeded = phase == "Succeeded"
        cond.set_condition(
            cs,
            cond.COMPLETE,
            succeeded,
            done_reason if succeeded else "NotComplete",
            (st.message or "") if succeeded else "",
            now,
            gen,
        )
        running = phase == "Running"
        cond.set_condition(
            cs,
            cond.PROGRESSING,
            running,
            stage if running else phase,
            (st.message or "") if running else "",
            now,
            gen,
        )
        cond.set_condition(
            cs,
            cond.SUSPENDED,
            phase == "Suspended",
            "SuspendedBySpec" if phase == "Suspended" else "NotSuspended",
            "",
            now,
            gen,
        )
        cond.set_condition(
            cs,
            cond.FAILED,
            phase == "Failed",
            reason if phase == "Failed" else "NotFailed",
            message if phase == "Failed" else "",
            now,
            gen,
        )
        self._pods_blocked_condition()

    def _pods_blocked_condition(self) -> None:
        """PodsBlocked: True with the first cause while pods cannot start (all causes in the
        message); one Warning event per cause not already reported; False once they start."""
        cs, previous = (
            self.st.conditions,
            cond.get_condition(self.old.conditions, cond.PODS_BLOCKED),
        )
        was = previous.message if previous is not None and previous.status == "True" else ""
        if not self.drove or self.st.phase in TERMINAL:
            if was and self.st.phase in TERMINAL:
                cond.set_condition(
                    cs, cond.PODS_BLOCKED, False, self.st.phase, "", self.now, self.o.generation
                )
            return
        if self.blocked:
            for cause, message in self.blocked:
                if message not in was:
                    self._event("Warning", cause, message)
            text = "; ".join(m for _, m in self.blocked)
            cond.set_condition(
                cs, cond.PODS_BLOCKED, True, self.blocked[0][0], text, self.now, self.o.generation
            )
        elif previous is not None:
            cond.set_condition(
                cs, cond.PODS_BLOCKED, False, "PodsStarted", "", self.now, self.o.generation
            )
