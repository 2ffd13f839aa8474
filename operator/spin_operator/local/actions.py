"""The driver's `Cluster` in local mode: processes in place of Jobs (`spinctl run`).

The same pass as the operator's (driver.py: reconcile, fetch only what `Decision.needs_*`
names, reconcile again, apply), with local stand-ins: the local Jobs' states from the backend,
storage read in this process, the applied spec in the local state file, MLflow through
`LocalTracking`. Secrets do not exist locally: credentials come from this process's
environment, so no referenced Secret is ever "missing" here.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from spin_operator import observe
from spin_operator.api import types as api
from spin_operator.decision import (
    CreateStep,
    Decision,
    DeleteJob,
    Event,
    Observed,
    RecordSpec,
    RegisterModel,
    StorageFacts,
)
from spin_operator.driver import Gathered
from spin_operator.endpoints import StoragePools, at_endpoint
from spin_operator.local.backend import LocalBackend
from spin_operator.local.display import Display
from spin_operator.local.state import LocalState
from spin_operator.local.tracking import LocalTracking
from spin_operator.settings import Settings
from spin_operator.steps import RunRef, layout_of, plan_step
from spin_operator.tracking_actions import TrackingActions

log = logging.getLogger(__name__)
# the display already says these (IterationCompleted: as the results table of the iteration)
QUIET_EVENTS = {"JobCreated", "StepSucceeded", "IterationCompleted"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LocalCluster:
    """One local run's steps as process groups; lives as long as the `spinctl run` loop."""

    def __init__(
        self,
        spec: api.SPINRunSpec,
        run: RunRef,
        settings: Settings,
        backend: LocalBackend,
        state: LocalState,
        tracking: LocalTracking,
        display: Display,
    ) -> None:
        self.spec, self.run, self.settings = spec, run, settings
        self.layout = layout_of(spec, run)
        self.backend, self.state, self.tracking, self.display = backend, state, tracking, display
        # the MLflow ids steps need, as the operator ensures them (its storage pools stay unused:
        # what local mode reads from storage it reads in this process)
        self.ids = TrackingActions(tracking.tracking, StoragePools())
        self.facts: dict[int, StorageFacts] = {}  # complete iterations only (they never change)
        self.reported: set[str] = set()
        self.shown: set[int] = set()
        # the results table (`spinctl run`'s summary): (model, held-out metrics)
        self.results: list[tuple[str, dict[str, float]]] = []

    # ------------------------------------------------------------------ observe + gather

    def observe(self, gathered: Gathered) -> Observed:
        return Observed(
            namespace=self.run.namespace,
            name=self.run.name,
            uid=self.run.uid,
            now=_now(),
            jobs=self.backend.observed(),
            gone_jobs=frozenset(gathered.gone),
            missing_secrets=frozenset(),
            storage=dict(gathered.storage),
            stored_spec_checked=gathered.stored_checked,
            stored_spec_digest=gathered.stored_digest,
            applied_spec=self.state.applied_spec,
            # local mode checks before the run (spinctl run's preflight, in-process; spinctl
            # demo builds its own task and model): no check step as a process
            inputs_checked=True,
        )

    async def gather(self, decision: Decision, gathered: Gathered) -> bool:
        spec = decision.spec
        if spec is None:
            return False
        try:
            if decision.needs_stored_spec:
                gathered.stored_digest = observe.read_stored_digest(spec, self.run)
                gathered.stored_checked = True
            # a Job neither running here nor remembered finished is gone (e.g. lost state)
            gathered.gone |= decision.needs_jobs
            for t in sorted(decision.needs_storage):
                facts = self.facts.get(t) or observe.read_facts(spec, self.run, t)
                if observe.facts_final(spec, facts):
                    self.facts[t] = facts
                gathered.storage[t] = facts
        except OSError as exc:
            log.warning("cannot read storage: %s", exc)
            return False
        return True

    # ------------------------------------------------------------------ act

    async def apply(self, old: api.SPINRunStatus, d: Decision) -> bool:
        """Carry out `d`; False while MLflow has not confirmed the run ends and spool replays
        it asks for (the status then leaves them out, so a rerun asks again)."""
        spec = d.spec
        for a in d.actions:
            if isinstance(a, RecordSpec):
                if a.store:
                    observe.write_stored_spec(a.spec, self.run)
                self.state.applied_spec = a.spec
        if spec is not None and self.tracking.enabled:
            await self._ensure_tracking(d)
        if spec is not None:
            self._show_new_results(d)
        for a in d.actions:
            if isinstance(a, DeleteJob):
                self.backend.terminate(a.name, reason="Deleted")
            elif isinstance(a, CreateStep) and spec is not None:
                it = next((i for i in d.status.iterations if i.iteration == a.iteration), None)
                plan = plan_step(
                    spec,
                    self.settings,
                    self.run,
                    a.iteration,
                    a.stage,
                    a.attempt,
                    it.mlflow_run_id if it else None,
                )
                if a.stage == "train":
                    self._log_datasets(d, a.iteration)
                job = self.backend.start(plan)
                self.display.step_started(job)
                self.reported.discard(job.name)
            elif isinstance(a, Event):
                self._event(d, a)
        if spec is None or not self.tracking.enabled:
            return True
        await self._register(d)
        # run ends and spool replays: in the status only once MLflow confirmed them, so a
        # rerun of an interrupted or MLflow-less invocation asks again (see FinishTracking)
        return await self.tracking.settle(d.status, d.actions)

    def report_finished(self) -> None:
        """Print each local Job's end once (success, or the failure and its log tail)."""
        for job in self.backend.jobs.values():
            if job.completion_time is None or job.name in self.reported:
                continue
            self.reported.add(job.name)
            # the cause is said once: by the retry event, or by the run's final "Failed:" line
            self.display.step_done(job.name, job.state == "Succeeded")

    def _event(self, d: Decision, event: Event) -> None:
        if event.reason in QUIET_EVENTS:
            if event.reason == "StepSucceeded" and "found complete in storage" in event.message:
                self.display.say(f"  {event.message}")
            return
        if event.reason in ("Succeeded", "Started"):
            return  # the header and the final line say it
        if d.status.phase == "Failed" and event.message == d.status.message:
            return  # the run's final "Failed:" line says it (once, not three times)
        prefix = "warning: " if event.type == "Warning" else ""
        self.display.say(f"  {prefix}{event.message}")

    # ------------------------------------------------------------------ results

    def _show_new_results(self, d: Decision) -> None:
        """Results of every iteration whose last step is done and not yet shown (on a resume,
        those of earlier iterations too)."""
        last = "evaluate" if self.spec.evaluation.enabled else "train"
        for it in d.status.iterations:
            control = it.control_evaluate  # controlArm: both arms' results together
            if control is not None and control.phase != "Succeeded":
                continue
            if it.iteration not in self.shown and getattr(it, last).phase == "Succeeded":
                self.shown.add(it.iteration)
                self._show_results(d, it.iteration)

    def _show_results(self, d: Decision, t: int) -> None:
        """Evaluation of θt+1 with the trainer's held-out SPIN metrics, and the control arm's
        (also logged on the parent MLflow run per iteration, step 0 = θ0)."""
        from spin_common import manifest, storage
        from spin_common.tracking import HELDOUT_METRICS

        it = self.layout.iteration(t)
        try:
            with at_endpoint(self.spec):
                evaluated = self.spec.evaluation.enabled and storage.exists(it.eval_results)
                results = results_of(storage.read_text(it.eval_results)) if evaluated else {}
                model = manifest.read_manifest(it.model)
        except OSError as exc:
            log.warning("results of iteration %d not readable: %s", t, exc)
            return
        meta = (model.meta or {}) if model else {}
        spin = {**dict(meta.get("metrics") or {}), "eval_pairs": meta.get("eval_pairs", "?")}
        self.display.iteration_results(t, results, spin)
        metrics = {k: float(v) for k, v in (results.get("metrics") or {}).items() if _number(v)}
        baseline = {k: float(v) for k, v in (results.get("baseline") or {}).items() if _number(v)}
        keep = HELDOUT_METRICS  # score: what evaluation.metric auto ranks by
        if t == 0 and baseline:
            self.results.append(("θ0 (SFT)", {k: baseline[k] for k in keep if k in baseline}))
        row = {k: metrics[k] for k in keep if k in metrics}
        row |= {k: float(spin[k]) for k in ("eval_margin", "eval_accuracy") if _number(spin.get(k))}
        self.results.append((f"θ{t + 1}", row))
        control = self._control_row(d, t, keep)
        if control is not None:
            self.results.append((f"control θ{t + 1}", control))
        # heldout/* is logged as the operator logs it (RegisterModel -> Tracking.log_heldout);
        # the control arm's heldout/control/* beside it is local mode's own (docs/mlflow.md)
        parent = d.status.mlflow.run_id if d.status.mlflow else None
        if parent and control is not None and self.tracking.enabled:
            if t == 0 and baseline:  # both arms start from θ0: one chart, one origin
                self.tracking.log_metrics(
                    parent, {f"heldout/control/{k}": baseline[k] for k in keep if k in baseline}, 0
                )
            self.tracking.log_metrics(
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
            self.display.say(
                f"  SPIN vs equal-compute SFT control ({c.metric}): θ{t + 1} {c.spin_score:.3f}, "
                f"control {c.control_score:.3f} -> {who} ({c.spin_advantage:+.3f})"
            )
        return {k: c.metrics[k] for k in keep if k in c.metrics}

    # ------------------------------------------------------------------ MLflow

    async def _ensure_tracking(self, d: Decision) -> None:
        """Ids the new steps need (MLFLOW_RUN_ID), written into the status: the operator's own
        `TrackingActions.ensure_ids`; a parent run created now gets the SFT dataset as input."""
        new = d.status
        had_parent = new.mlflow is not None and new.mlflow.run_id is not None
        await self.ids.ensure_ids(self.spec, self.run, d)
        if had_parent or new.mlflow is None or not new.mlflow.run_id:
            return
        from spin_common.errors import UsageError
        from spin_operator.local.tracking import file_digest
        from spin_operator.track import dataset_profile

        try:
            digest = file_digest(self.spec.dataset.uri)
            profile = dataset_profile(new.dataset) if new.dataset else None  # rows, skipped
            self.tracking.log_dataset(
                new.mlflow.run_id, "sft", self.spec.dataset.uri, digest, "sft", profile
            )
        except (OSError, UsageError) as exc:  # UsageError: DatasetError (no such data)
            log.warning("dataset digest not computed: %s", exc)

    def _log_datasets(self, d: Decision, t: int) -> None:
        """The generated data iteration t trains on, as inputs of its MLflow run."""
        from spin_common import manifest

        it = next((i for i in d.status.iterations if i.iteration == t), None)
        if it is None or not it.mlflow_run_id or not self.tracking.enabled:
            return
        for uri in self.layout.training_data_for_iteration(
            t, self.spec.training.mix_previous_iterations
        ):
            try:
                with at_endpoint(self.spec):
                    digest = manifest.digest(uri)
            except OSError as exc:
                log.warning("no digest for %s: %s", uri, exc)
                continue
            name = uri.rstrip("/").split("/")[-2] + "/generated"
            self.tracking.log_dataset(it.mlflow_run_id, name, uri, digest, "training")

    async def _register(self, d: Decision) -> None:
        """Model versions, and the parent run's heldout/* series, as the operator's
        `TrackingActions` (there in the background; here in line, as local mode waits anyway)."""
        status = d.status
        parent = status.mlflow.run_id if status.mlflow else None
        by_iter = {i.iteration: i.mlflow_run_id for i in status.iterations}
        for a in d.of_type(RegisterModel):
            rid = by_iter.get(a.iteration) or (
                parent and await self.tracking.ensure_iteration(parent, a.iteration)
            )
            if rid:
                await self.tracking.register(rid, a.iteration, a.model_uri, dict(a.metrics))
            if parent:  # one chart per metric over θ0…θN on the parent (docs/mlflow.md)
                await self.tracking.log_heldout(parent, a.iteration, dict(a.metrics))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def results_of(text: str) -> dict[str, Any]:
    """results.json as a dict ({} when unreadable)."""
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
