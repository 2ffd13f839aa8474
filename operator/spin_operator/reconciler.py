"""The reconciler: (spec, status, observed) -> Decision (actions + the new status). Pure.

No I/O: everything a decision depends on is in `Observed` (decision.py), built by the
controller (facts.py), local mode or a test. When the reconciler needs a fact it was not given
(storage manifests of an iteration, whether referenced Secrets exist, whether a Job that status
remembers is really gone), it says so in `Decision.needs_*` and decides only what is safe
without it; the caller fetches the facts and calls again. So the caller reads storage and
Secrets only when a decision depends on them.

State machine (KubeRay-style, explicit; `Pass.run` is the switch over phases):
    phase:  Pending -> Running <-> Suspended -> Succeeded | Failed
    stage:  (Checking, iteration 0 only) -> Generating -> Training -> (Evaluating) -> Done,
            then the next iteration.
    With spec.controlArm, the control's steps run beside SPIN's in the same stage
    (train + control-train, evaluate + control-evaluate); a stage ends when both are done.
One step's rules (adopt, create, retry, suspend) are in step_rules.py, the spec-change rule
(docs/operations.md) in spec_rules.py, the state both share in pass_state.py.
"""

from __future__ import annotations

from spin_operator import conditions as cond
from spin_operator.api import types as api
from spin_operator.decision import (
    ACTIVE_STATES,
    KIND_OF,
    STAGE_OF,
    Decision,
    DeleteArtifacts,
    DeleteJob,
    EnsureParentRun,
    FinishTracking,
    Observed,
    RecordSpec,
    ReplaySpool,
    SetFinalizer,
)
from spin_operator.naming import StepKind, step_field
from spin_operator.pass_state import TERMINAL, Outcome
from spin_operator.spec_rules import SpecRules
from spin_operator.step_rules import ADMISSION, StepRules
from spin_operator.steps import beside, spec_digest, steps_of
from spin_operator.validation import InvalidSpec


def reconcile(
    spec: api.SPINRunSpec | InvalidSpec, status: api.SPINRunStatus, observed: Observed
) -> Decision:
    """Decide the next actions and the new status. Pure and deterministic."""
    return Pass(spec, status, observed).run()


class Pass(SpecRules, StepRules):
    """One reconcile pass: the phase switch, the run's lifecycle, iterations and conditions."""

    def run(self) -> Decision:
        if self.observed.deleting:  # whatever the phase: stop the writers, then let go
            self._deleting()
            return self.decision
        spec = self._effective_spec()
        if spec is not None:
            self.decision.spec = spec
            self._finalizer(spec)
            match (self.started, self.status.phase):
                case (True, "Succeeded" | "Failed"):  # terminal: only stop what still runs
                    self._cleanup_terminal()
                case (True, _):  # Running or Suspended: drive the iterations on
                    self._drive(spec)
                case _:  # not started (Pending, or Failed before start: checked again)
                    if self._start(spec):
                        self._drive(spec)
            if spec.retention.finished_jobs == "Delete":
                self._sweep_recorded()
            if self.started and spec.tracking.uri:
                self._tracking()
        self._sync_conditions()
        self.status.observed_generation = self.observed.generation
        return self.decision

    # ------------------------------------------------------------------ lifecycle

    def _finalizer(self, spec: api.SPINRunSpec) -> None:
        wanted = spec.retention.on_delete == "Delete"
        if wanted != self.observed.finalizer:
            self._act(SetFinalizer(wanted))

    def _start(self, spec: api.SPINRunSpec) -> bool:
        """Accept the spec and start iteration 0, once storage and Secrets check out."""
        o = self.observed
        if self.status.phase != "Failed":
            self.status.phase = "Pending"
        if not o.stored_spec_checked:
            self.decision.needs_stored_spec = True
            return False
        digest = spec_digest(spec)
        if o.stored_spec_digest is not None and o.stored_spec_digest != digest:
            self._fail(
                "StorageConflict",
                f"spec.storage.uri: {self._prefix(spec)} holds the artifacts of a different spec "
                f"(digest {o.stored_spec_digest}, this spec {digest}); "
                "delete them or use another storage.uri or name",
            )
            return False
        if not self._secrets_ok(spec):
            return False
        if o.rejected:  # the dry run of iteration 0: nothing was created or stored
            refusals = [o.rejected[n] for n in sorted(o.rejected)]
            self._fail(refusals[0][0], "; ".join(message for _, message in refusals))
            return False
        self.started = True
        # specHash is written here only: it makes the run started for every later pass and is
        # the proof of which prefix a deletion may remove (_deleting); the author cannot edit it.
        self.status.spec_hash = digest
        self.status.phase = "Running"
        self.status.message = None
        self.status.completion_time = None
        self.status.start_time = self.status.start_time or self.now
        self.status.iteration = 0
        self.status.progress = f"0/{spec.iterations}"
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

    def _tracking(self) -> None:
        """MLflow run ends and spool replays, decided from the status alone: asked for again on
        every pass until `status.mlflow` records MLflow's confirmation (see FinishTracking)."""
        ml, st = self.status.mlflow, self.status
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
        for job in self.observed.jobs:
            if job.state in ACTIVE_STATES and not job.deleting:
                self._act(DeleteJob(job.name))

    def _deleting(self) -> None:
        """With retention Delete: stop writers, then delete the run prefix, then let go.

        Every Job goes (the controller deletes with propagationPolicy Foreground, so a Job stays
        visible, marked deleting, until the garbage collector removed all its pods): artifacts
        are deleted only once no Job is left, so no pod still uploading writes into a deleted
        prefix (and a finished Job's pods are gone with it)."""
        if not self.observed.finalizer:
            return
        remaining = list(self.observed.jobs)
        if remaining:
            self._act(*(DeleteJob(j.name) for j in remaining if not j.deleting))
            self.status.message = (
                f"deleting: waiting for {len(remaining)} Job(s) and their pods to be gone "
                "before deleting artifacts"
            )
            return
        if self.started:
            # Only the prefix the run started with, proven by status.specHash (written by the
            # operator alone): the applied-spec annotation and the spec are the author's to edit,
            # and a tampered one must not redirect a recursive delete (docs/security.md, threat 4).
            given = self.given if not isinstance(self.given, InvalidSpec) else None
            spec = next(
                (
                    s
                    for s in (self.observed.applied_spec, given)
                    if s is not None and spec_digest(s) == self.status.spec_hash
                ),
                None,
            )
            self.decision.spec = spec
            if spec is None:
                self._event(
                    "Warning",
                    "ArtifactsKept",
                    f"no spec matching specHash {self.status.spec_hash} (the applied-spec "
                    "annotation was altered or lost): artifacts are kept, delete them by hand",
                )
            elif spec.storage.uri:
                self._act(DeleteArtifacts(self._prefix(spec)))
        self._act(SetFinalizer(False))

    # ------------------------------------------------------------------ iterations

    def _drive(self, spec: api.SPINRunSpec) -> None:
        """Suspend or resume, then advance iteration by iteration, stage by stage, as far as the
        steps' outcomes allow this pass (a step that waits or fails ends the loop)."""
        st = self.status
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
        while st.phase not in TERMINAL:  # a failed step or the last iteration ends the run
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
        # The run's summary fields mirror the current iteration, whatever ended the loop.
        current = self._entry(spec, st.iteration)
        st.stage = "Done" if st.phase == "Succeeded" else current.stage
        done = sum(1 for it in st.iterations if it.stage == "Done")
        st.progress = f"{done}/{spec.iterations}"
        if st.phase in ("Running", "Suspended"):
            kinds = beside(spec, KIND_OF[current.stage]) if current.stage in KIND_OF else ()
            queued = any(
                getattr(getattr(current, step_field(k)), "message", None) == ADMISSION
                for k in kinds
            )
            suffix = (
                " (suspended)" if st.phase == "Suspended" else f" ({ADMISSION})" if queued else ""
            )
            # Iterations count from 0 everywhere (ITERATION column, Job names, MLflow runs).
            t = st.iteration
            st.message = f"iteration {t} of {spec.iterations} (θ{t} → θ{t + 1}): {st.stage}{suffix}"

    def _stage(self, spec: api.SPINRunSpec, t: int, kind: StepKind) -> Outcome:
        """SPIN's step `kind` and, with controlArm, its control beside it (both start at once:
        a waiting step does not hold back its partner); done when every one of them is."""
        outcomes: list[Outcome] = []
        for k in beside(spec, kind):
            outcomes.append(self._step(spec, t, k))
            if self.status.phase in TERMINAL:  # failed: nothing more may start this pass
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
            metric = cond.ranking_metric(self.status.iterations, spec)
            best = cond.best_iteration(self.status.iterations, metric, spec.evaluation.mode)
            if best != self.status.best_iteration and best is not None:
                self._event(
                    "Normal",
                    "BestIteration",
                    f"θ{best + 1} (iteration {best}) is the best model so far by {metric}",
                )
            self.status.best_iteration = best
            self.status.best_model = None if best is None else f"θ{best + 1}"
            blind = cond.uninformative(self.status.iterations, metric)
            previous = cond.get_condition(self.status.conditions, cond.METRIC_UNINFORMATIVE)
            if blind and (previous is None or previous.status != "True"):
                self._event("Warning", cond.METRIC_UNINFORMATIVE, blind)
            if blind or previous is not None:
                cond.set_condition(
                    self.status.conditions,
                    cond.METRIC_UNINFORMATIVE,
                    bool(blind),
                    "SameValueEverywhere" if blind else "MetricRanks",
                    blind or "",
                    self.now,
                    self.observed.generation,
                )
            if spec.control_arm.enabled:
                self._compare_control(spec, it, metric)

    def _compare_control(self, spec: api.SPINRunSpec, it: api.IterationStatus, metric: str) -> None:
        """Status, the ControlArm condition and (control ahead) a Warning: did SPIN pay off?"""
        ahead, reason, message = cond.control_verdict(it, metric, spec.evaluation.mode)
        cond.set_condition(
            self.status.conditions,
            cond.CONTROL_ARM,
            ahead,
            reason,
            message,
            self.now,
            self.observed.generation,
        )
        if reason == "ControlAhead":
            self._event("Warning", "ControlAhead", message)

    def _next_iteration(self, spec: api.SPINRunSpec, t: int) -> bool:
        """After iteration t: finish the run, stop early, or start t+1 (True)."""
        done = t + 1
        b = self.status.best_iteration
        best = f"; best model θ{b + 1} (iteration {b})" if b is not None else ""
        if done >= spec.iterations:
            self._succeed("Succeeded", f"{done} iteration(s) done{best}")
            return False
        stop, why = cond.should_stop(self.status.iterations, spec)
        if stop:
            self._succeed("EarlyStopped", f"stopped after {done} iteration(s): {why}{best}")
            return False
        self.status.iteration = t + 1
        self._entry(spec, t + 1)
        return True

    # ------------------------------------------------------------------ conditions

    def _sync_conditions(self) -> None:
        st, now, gen = self.status, self.now, self.observed.generation
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
            self.status.conditions,
            cond.get_condition(self.old.conditions, cond.PODS_BLOCKED),
        )
        was = previous.message if previous is not None and previous.status == "True" else ""
        if not self.drove or self.status.phase in TERMINAL:
            if was and self.status.phase in TERMINAL:
                cond.set_condition(
                    cs,
                    cond.PODS_BLOCKED,
                    False,
                    self.status.phase,
                    "",
                    self.now,
                    self.observed.generation,
                )
            return
        if self.blocked:
            for cause, message in self.blocked:
                if message not in was:
                    self._event("Warning", cause, message)
            text = "; ".join(m for _, m in self.blocked)
            cond.set_condition(
                cs,
                cond.PODS_BLOCKED,
                True,
                self.blocked[0][0],
                text,
                self.now,
                self.observed.generation,
            )
        elif previous is not None:
            cond.set_condition(
                cs, cond.PODS_BLOCKED, False, "PodsStarted", "", self.now, self.observed.generation
            )
