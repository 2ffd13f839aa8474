"""The state one reconcile pass works on, and the helpers every rule of the pass shares.

A pass (reconciler.py) mutates a private copy of the status (`status`; `old` is what the API
server holds and is never written to) while collecting actions into `decision`. Its rules are
split by subject: spec changes (spec_rules.py), one step's Jobs (step_rules.py), and the phase
switch with iterations and conditions (reconciler.py); they all derive from `PassState`.
"""

from __future__ import annotations

from typing import Literal

from spin_operator import conditions as cond
from spin_operator.api import types as api
from spin_operator.decision import (
    ACTIVE_STATES,
    Decision,
    DeleteJob,
    Event,
    Observed,
    referenced_secrets,
)
from spin_operator.naming import StepKind, step_field
from spin_operator.steps import layout_of
from spin_operator.validation import InvalidSpec

Outcome = Literal["done", "waiting", "failed"]  # of a step or a stage, this pass
TERMINAL = ("Succeeded", "Failed")


class PassState:
    """Mutates a private copy of the status while collecting actions."""

    def __init__(
        self, spec: api.SPINRunSpec | InvalidSpec, status: api.SPINRunStatus, observed: Observed
    ):
        self.given = spec  # the spec as written (or why it is invalid)
        self.old = status  # the status as the API server holds it: never written to
        self.status = status.model_copy(deep=True)  # the status this pass writes
        self.observed = observed
        self.decision = Decision(status=self.status)
        self.now = observed.now
        self.started = status.spec_hash is not None
        self.failure: tuple[str, str] | None = None  # (reason, message) when failing this pass
        # the reason when succeeding this pass (Succeeded, EarlyStopped)
        self.success: str | None = None
        self.steps_done: set[int] = set()  # iterations with a step that succeeded in this pass
        # (cause, message) of steps whose pods cannot start
        self.blocked: list[tuple[str, str]] = []
        self.drove = False  # _drive ran: the PodsBlocked condition reflects this pass

    def _act(self, *actions: object) -> None:
        self.decision.actions.extend(actions)  # type: ignore[arg-type]

    def _event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self._act(Event(type_, reason, message))

    def _prefix(self, spec: api.SPINRunSpec) -> str:
        return layout_of(spec, self.observed.run).prefix

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
        self.status.phase = "Failed"
        self.status.message = message
        self.status.completion_time = self.status.completion_time if repeated else self.now
        if not repeated:
            self._event("Warning", reason, message)
        for job in self.observed.jobs:
            if job.state in ACTIVE_STATES and not job.deleting:
                self._act(DeleteJob(job.name))

    def _succeed(self, reason: str, message: str) -> None:
        self.success = reason
        self.status.phase = "Succeeded"
        self.status.stage = "Done"
        self.status.message = message
        self.status.completion_time = self.now
        self._event("Normal", reason, message)

    def _secrets_ok(self, spec: api.SPINRunSpec) -> bool:
        refs = referenced_secrets(spec)
        if not refs:
            return True
        if self.observed.missing_secrets is None:
            self.decision.needs_secrets = True
            return False
        missing = sorted(s for s in refs if s in self.observed.missing_secrets)
        if missing:
            self._fail(
                "SecretNotFound", "; ".join(f'{refs[s]}: Secret "{s}" not found' for s in missing)
            )
            return False
        return True

    def _entry(self, spec: api.SPINRunSpec, t: int) -> api.IterationStatus:
        for it in self.status.iterations:
            if it.iteration == t:
                return it
        layout = layout_of(spec, self.observed.run)
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
            if self.observed.inputs_checked:
                it.check.phase, it.check.message = "Succeeded", "checked by spinctl before the run"
                it.check.completion_time = self.now
        if not spec.evaluation.enabled:
            it.evaluate.phase = "Skipped"
        if spec.control_arm.enabled:
            it.control_train, it.control_evaluate = api.StepStatus(), api.StepStatus()
            it.control = api.ControlArmStatus(
                model_uri=layout.control_model_for_iteration(t, spec.model.uri)
            )
        self.status.iterations.append(it)
        return it

    def _step_status(self, it: api.IterationStatus, kind: StepKind) -> api.StepStatus:
        ss: api.StepStatus | None = getattr(it, step_field(kind))
        if ss is None:  # a control step of an entry written before it existed
            ss = api.StepStatus()
            setattr(it, step_field(kind), ss)
        return ss
