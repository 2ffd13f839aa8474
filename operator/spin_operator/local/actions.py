"""One reconcile pass of a local run: gather the facts the reconciler asks for, then act.

The same protocol as the operator's controller (`spin_operator.controller`): call `reconcile`,
fetch only what `Decision.needs_*` names, call again, then apply the actions — with processes
in place of Jobs. Secrets do not exist locally: credentials come from this process's
environment, so no referenced Secret is ever "missing" here.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from spin_operator import observe
from spin_operator.decision import (
    CreateStep,
    Decision,
    DeleteJob,
    EnsureIterationRun,
    EnsureParentRun,
    Event,
    Observed,
    RecordSpec,
    RegisterModel,
    StorageFacts,
)
from spin_operator.endpoints import at_endpoint
from spin_operator.reconciler import reconcile
from spin_operator.steps import plan_step

if TYPE_CHECKING:
    from spin_operator.local.runner import LocalRun

log = logging.getLogger(__name__)
MAX_ROUNDS = 120
# the display already says these (IterationCompleted: as the results table of the iteration)
QUIET_EVENTS = {"JobCreated", "StepSucceeded", "IterationCompleted"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Actor:
    def __init__(self, run: LocalRun) -> None:
        self.r = run
        self.facts: dict[int, StorageFacts] = {}  # complete iterations only (they never change)
        self.reported: set[str] = set()
        self.shown: set[int] = set()
        self.settled = True  # MLflow confirmed every run end and spool replay asked for so far

    # ------------------------------------------------------------------ observe + decide

    def decide(self) -> Decision:
        r = self.r
        storage: dict[int, StorageFacts] = {}
        stored: tuple[bool, str | None] = (False, None)
        gone: set[str] = set()
        decision = None
        for _ in range(MAX_ROUNDS):
            observed = Observed(
                namespace=r.run_ref.namespace,
                name=r.run_ref.name,
                uid=r.run_ref.uid,
                now=_now(),
                jobs=r.backend.observed(),
                gone_jobs=frozenset(gone),
                missing_secrets=frozenset(),
                storage=dict(storage),
                stored_spec_checked=stored[0],
                stored_spec_digest=stored[1],
                applied_spec=r.state.applied_spec,
                # local mode checks before the run (spinctl run's preflight, in-process; spinctl
                # demo builds its own task and model): no check step as a process
                inputs_checked=True,
            )
            decision = reconcile(r.spec, r.status, observed)
            if decision.complete or decision.spec is None:
                break
            spec = decision.spec
            try:
                if decision.needs_stored_spec:
                    stored = (True, observe.read_stored_digest(spec, r.run_ref))
                # a Job neither running here nor remembered finished is gone (e.g. lost state)
                gone |= decision.needs_jobs
                for t in sorted(decision.needs_storage):
                    facts = self.facts.get(t) or observe.read_facts(spec, r.run_ref, t)
                    if observe.facts_final(spec, facts):
                        self.facts[t] = facts
                    storage[t] = facts
            except OSError as exc:
                log.warning("cannot read storage: %s", exc)
                break
        assert decision is not None
        return decision

    # ------------------------------------------------------------------ act

    def execute(self, d: Decision) -> None:
        r = self.r
        spec = d.spec
        for a in d.actions:
            if isinstance(a, RecordSpec):
                if a.store:
                    observe.write_stored_spec(a.spec, r.run_ref)
                r.state.applied_spec = a.spec
        if spec is not None and r.tracking.enabled:
            self._ensure_tracking(d)
        if spec is not None:
            self._show_new_results(d)
        for a in d.actions:
            if isinstance(a, DeleteJob):
                r.backend.terminate(a.name, reason="Deleted")
            elif isinstance(a, CreateStep) and spec is not None:
                it = next((i for i in d.status.iterations if i.iteration == a.iteration), None)
                plan = plan_step(
                    spec,
                    r.settings,
                    r.run_ref,
                    a.iteration,
                    a.stage,
                    a.attempt,
                    it.mlflow_run_id if it else None,
                )
                if a.stage == "train":
                    self._log_datasets(d, a.iteration)
                job = r.backend.start(plan)
                r.display.step_started(job)
                self.reported.discard(job.name)
            elif isinstance(a, Event):
                self._event(d, a)
        if spec is not None and r.tracking.enabled:
            self._register(d)
            # run ends and spool replays: in the status only once MLflow confirmed them, so a
            # rerun of an interrupted or MLflow-less invocation asks again (see FinishTracking)
            self.settled = r.tracking.settle(d.status, d.actions)

    def report_finished(self) -> None:
        """Print each local Job's end once (success, or the failure and its log tail)."""
        for job in self.r.backend.jobs.values():
            if job.completion_time is None or job.name in self.reported:
                continue
            self.reported.add(job.name)
            # the cause is said once: by the retry event, or by the run's final "Failed:" line
            self.r.display.step_done(job.name, job.state == "Succeeded")

    def _event(self, d: Decision, event: Event) -> None:
        if event.reason in QUIET_EVENTS:
            if event.reason == "StepSucceeded" and "found complete in storage" in event.message:
                self.r.display.say(f"  {event.message}")
            return
        if event.reason in ("Succeeded", "Started"):
            return  # the header and the final line say it
        if d.status.phase == "Failed" and event.message == d.status.message:
            return  # the run's final "Failed:" line says it (once, not three times)
        prefix = "warning: " if event.type == "Warning" else ""
        self.r.display.say(f"  {prefix}{event.message}")

    # ------------------------------------------------------------------ results

    def _show_new_results(self, d: Decision) -> None:
        """Results of every iteration whose last step is done and not yet shown (on a resume,
        those of earlier iterations too)."""
        last = "evaluate" if self.r.spec.evaluation.enabled else "train"
        for it in d.status.iterations:
            control = it.control_evaluate  # controlArm: both arms' results together
            if control is not None and control.phase != "Succeeded":
                continue
            if it.iteration not in self.shown and getattr(it, last).phase == "Succeeded":
                self.shown.add(it.iteration)
                self._show_results(d, it.iteration)

    def _show_results(self, d: Decision, t: int) -> None:
        """Evaluation of θt+1 with the trainer's held-out SPIN metrics; also logged on the
        parent MLflow run per iteration (step 0 = θ0), so one chart shows the whole run."""
        from spin_common import manifest, storage
        from spin_common.tracking import HELDOUT_METRICS
        from spin_operator.local.runner import results_of

        r = self.r
        it = r.layout.iteration(t)
        try:
            with at_endpoint(r.spec):
                evaluated = r.spec.evaluation.enabled and storage.exists(it.eval_results)
                results = results_of(storage.read_text(it.eval_results)) if evaluated else {}
                model = manifest.read_manifest(it.model)
        except OSError as exc:
            log.warning("results of iteration %d not readable: %s", t, exc)
            return
        meta = (model.meta or {}) if model else {}
        spin = {**dict(meta.get("metrics") or {}), "eval_pairs": meta.get("eval_pairs", "?")}
        r.display.iteration_results(t, results, spin)
        metrics = {k: float(v) for k, v in (results.get("metrics") or {}).items() if _number(v)}
        baseline = {k: float(v) for k, v in (results.get("baseline") or {}).items() if _number(v)}
        keep = HELDOUT_METRICS  # score: what evaluation.metric auto ranks by
        if t == 0 and baseline:
            r.results.append(("θ0 (SFT)", {k: baseline[k] for k in keep if k in baseline}))
        row = {k: metrics[k] for k in keep if k in metrics}
        row |= {k: float(spin[k]) for k in ("eval_margin", "eval_accuracy") if _number(spin.get(k))}
        r.results.append((f"θ{t + 1}", row))
        control = self._control_row(d, t, keep)
        if control is not None:
            r.results.append((f"control θ{t + 1}", control))
        parent = d.status.mlflow.run_id if d.status.mlflow else None
        if parent and r.tracking.enabled:
            if t == 0 and baseline:
                r.tracking.log_metrics(
                    parent, {f"heldout/{k}": baseline[k] for k in keep if k in baseline}, 0
                )
                if control is not None:  # both arms start from θ0: one chart, one origin
                    r.tracking.log_metrics(
                        parent,
                        {f"heldout/control/{k}": baseline[k] for k in keep if k in baseline},
                        0,
                    )
            r.tracking.log_metrics(parent, {f"heldout/{k}": v for k, v in row.items()}, t + 1)
            if control is not None:
                r.tracking.log_metrics(
                    parent, {f"heldout/control/{k}": v for k, v in control.items()}, t + 1
                )

    def _control_row(self, d: Decision, t: int, keep: tuple[str, ...]) -> dict[str, float] | None:
        """The SFT control's held-out results of iteration t (controlArm), and the verdict."""
        it = next((i for i in d.status.iterations if i.iteration == t), None)
        if it is None or it.control is None or not it.control.metrics:
            return None
        c = it.control
        if c.spin_advantage is not None:
            who = (
                "SPIN ahead"
                if c.spin_advantage > 0
                else "SFT control ahead"
                if c.spin_advantage < 0
                else "level"
            )
            self.r.display.say(
                f"  SPIN vs equal-compute SFT control ({c.metric}): θ{t + 1} {c.spin_score:.3f}, "
                f"control {c.control_score:.3f} -> {who} ({c.spin_advantage:+.3f})"
            )
        return {k: c.metrics[k] for k in keep if k in c.metrics}

    # ------------------------------------------------------------------ MLflow

    def _ensure_tracking(self, d: Decision) -> None:
        """Ids the new steps need (MLFLOW_RUN_ID), written into the status, as the operator."""
        wanted = [a.iteration for a in d.of_type(EnsureIterationRun)]
        if not (d.of_type(EnsureParentRun) or wanted):
            return
        r, new = self.r, d.status
        if new.mlflow is None or new.mlflow.run_id is None:
            new.mlflow = r.tracking.ensure_parent() or new.mlflow
            if new.mlflow and new.mlflow.run_id:
                from spin_common.errors import UsageError
                from spin_operator.local.tracking import file_digest
                from spin_operator.track import dataset_profile

                try:
                    digest = file_digest(r.spec.dataset.uri)
                    profile = (
                        dataset_profile(new.dataset) if new.dataset else None
                    )  # rows, skipped per reason
                    r.tracking.log_dataset(
                        new.mlflow.run_id, "sft", r.spec.dataset.uri, digest, "sft", profile
                    )
                except (OSError, UsageError) as exc:  # UsageError: DatasetError (no such data)
                    log.warning("dataset digest not computed: %s", exc)
        parent = new.mlflow.run_id if new.mlflow else None
        for t in wanted:
            it = next((i for i in new.iterations if i.iteration == t), None)
            if parent and it is not None and it.mlflow_run_id is None:
                it.mlflow_run_id = r.tracking.ensure_iteration(parent, t)

    def _log_datasets(self, d: Decision, t: int) -> None:
        """The generated data iteration t trains on, as inputs of its MLflow run."""
        from spin_common import manifest

        r = self.r
        it = next((i for i in d.status.iterations if i.iteration == t), None)
        if it is None or not it.mlflow_run_id or not r.tracking.enabled:
            return
        for uri in r.layout.training_data_for_iteration(t, r.spec.training.mix_previous_iterations):
            try:
                with at_endpoint(r.spec):
                    digest = manifest.digest(uri)
            except OSError as exc:
                log.warning("no digest for %s: %s", uri, exc)
                continue
            name = uri.rstrip("/").split("/")[-2] + "/generated"
            r.tracking.log_dataset(it.mlflow_run_id, name, uri, digest, "training")

    def _register(self, d: Decision) -> None:
        r, status = self.r, d.status
        parent = status.mlflow.run_id if status.mlflow else None
        by_iter = {i.iteration: i.mlflow_run_id for i in status.iterations}
        for a in d.of_type(RegisterModel):
            rid = by_iter.get(a.iteration) or (
                parent and r.tracking.ensure_iteration(parent, a.iteration)
            )
            if rid:
                r.tracking.register(rid, a.iteration, a.model_uri, dict(a.metrics))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
