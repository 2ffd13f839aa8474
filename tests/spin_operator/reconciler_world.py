"""A tiny in-memory world for driving the pure reconciler in tests: Jobs, storage, Secrets.

It applies a Decision the way the kopf layer would (create/suspend/delete Jobs, keep the applied
spec and finalizer, write the status) and checks invariants on every step, so tests can move
Jobs through states and assert on what the reconciler did. It answers the reconciler's
`needs_*` requests like the handler: fetch, then call again.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from spin_operator import driver
from spin_operator.api import types as api
from spin_operator.decision import (
    ACTIVE_STATES,
    CreateStep,
    Decision,
    DeleteArtifacts,
    DeleteJob,
    EnsureIterationRun,
    EnsureParentRun,
    Observed,
    ObservedJob,
    RecordSpec,
    SetFinalizer,
    StorageFacts,
    SuspendJob,
)
from spin_operator.driver import Gathered, drive
from spin_operator.naming import parse_job_name, step_field
from spin_operator.observe import COMPLETE_FIELD
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef, spec_digest
from spin_operator.track import Tracking
from spin_operator.validation import InvalidSpec, parse

NAME = "run"
NAMESPACE = "ns"


class MlflowStandIn(Tracking):
    """The operator's `Tracking` (its `settle` decides what counts as confirmed) over an
    in-memory MLflow that can be down: run ids, ended runs, spooled calls per iteration."""

    def __init__(self) -> None:
        super().__init__(cooldown=0.0)
        self.up = True
        self.ended: dict[str, str] = {}  # run id -> status
        self.spooled: dict[int, int] = {}  # iteration -> calls its Jobs spooled, not delivered
        self.delivered = 0
        self.replay_run_ids: frozenset[str] | None = None  # what the last replay was confined to

    async def replay(
        self,
        spec: api.SPINRunSpec,
        spools: dict[int, str],
        run_ids: frozenset[str] | None = None,
        in_storage: object = None,
    ) -> dict[int, int] | None:
        self.replay_run_ids = run_ids
        if not self.up:
            return None
        for t in spools:
            self.delivered += self.spooled.pop(t, 0)
        return {t: 0 for t in spools}

    async def finish(self, spec: api.SPINRunSpec, run_id: str, status: str) -> bool:
        if self.up:
            self.ended[run_id] = status
        return self.up


def spin_object(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "s3://models/base"},
        "dataset": {"uri": "s3://data/sft.jsonl", "evalSamples": 8},
        "iterations": 3,
        "storage": {"uri": "s3://bucket/runs"},
    }
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": NAME, "namespace": NAMESPACE, "uid": "uid-1", "generation": 1},
        "spec": base,
    }


@dataclass
class World:
    obj: dict[str, Any]
    status: api.SPINRunStatus = field(default_factory=api.SPINRunStatus)
    jobs: dict[str, ObservedJob] = field(default_factory=dict)
    storage: dict[int, StorageFacts] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)
    applied: api.SPINRunSpec | None = None
    finalizer: bool = False
    stored_digest: str | None = None
    deleting: bool = False
    artifacts_deleted: bool = False
    clock: itertools.count = field(default_factory=lambda: itertools.count(1))
    created: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)
    unknown_storage: bool = False  # storage reads fail: needs stay unanswered
    mlflow: MlflowStandIn = field(default_factory=MlflowStandIn)
    settled: bool = True  # the last decision's MLflow work was all confirmed
    inputs_checked: bool = False  # local mode: the preflight checked the dataset and θ0

    # ------------------------------------------------------------ inputs

    def spec(self) -> api.SPINRunSpec | InvalidSpec:
        try:
            return resolve_spec(parse(self.obj), Settings(), self.applied)
        except InvalidSpec as exc:
            return exc

    def observed(self, storage: set[int], secrets: bool, jobs: set[str], stored: bool) -> Observed:
        meta = self.obj["metadata"]
        return Observed(
            namespace=NAMESPACE,
            name=NAME,
            uid=meta["uid"],
            generation=meta["generation"],
            now=f"2026-01-01T00:{next(self.clock) % 60:02d}:00Z",
            deleting=self.deleting,
            finalizer=self.finalizer,
            jobs=tuple(self.jobs.values()),
            gone_jobs=frozenset(n for n in jobs if n not in self.jobs),
            missing_secrets=frozenset({"s3-creds", "mlflow-creds", "creds"} - self.secrets)
            if secrets
            else None,
            storage={t: self.storage.get(t, StorageFacts()) for t in storage},
            stored_spec_checked=stored,
            stored_spec_digest=self.stored_digest if stored else None,
            applied_spec=self.applied,
            inputs_checked=self.inputs_checked,
        )

    def edit(self, **spec: Any) -> None:
        """A user edit of the spec (bumps metadata.generation)."""
        new = spin_object(**spec)
        self.obj["spec"] = new["spec"]
        self.obj["metadata"]["generation"] += 1

    # ------------------------------------------------------------ one reconcile

    def reconcile(self, killed: bool = False) -> Decision:
        """One pass of the operator's driver (driver.py) over this world; `killed`: the operator
        dies after writing the status, before MLflow calls."""
        outcome = asyncio.run(drive(self.spec(), self.status, _Pass(self, killed)))
        if outcome.rounds == driver.MAX_ROUNDS and not outcome.decision.complete:
            raise AssertionError("reconciler kept asking for facts")
        return outcome.decision

    def check(self, d: Decision) -> None:
        """Invariants every decision must keep."""
        old, new = self.status, d.status
        creates = d.of_type(CreateStep)
        names = {c.name for c in creates}
        assert len(names) == len(creates), "the same Job created twice in one decision"
        assert not names & set(self.jobs), f"create of an existing Job: {names & set(self.jobs)}"
        for c in creates:
            parsed = parse_job_name(c.name)
            assert parsed is not None and (
                parsed.run,
                parsed.iteration,
                parsed.stage,
                parsed.attempt,
            ) == (NAME, c.iteration, c.stage, c.attempt)
            done = [
                it for it in old.iterations if it.iteration == c.iteration and it.stage == "Done"
            ]
            assert not done, f"finished iteration {c.iteration} redone by {c.name}"
            assert c.iteration >= old.iteration, (
                f"{c.name} is for an earlier iteration than {old.iteration}"
            )
            step = next((it for it in old.iterations if it.iteration == c.iteration), None)
            if step is not None:
                ss = getattr(step, step_field(c.stage))
                assert ss is None or ss.phase != "Succeeded", f"{c.name}: step already succeeded"
        if (
            self.deleting
            or new.phase in ("Succeeded", "Failed")
            or (d.spec is not None and d.spec.suspend)
        ):
            assert not creates, f"created {names} while deleting/terminal/suspended"
        # never two active Jobs for one step
        deleted = {a.name for a in d.of_type(DeleteJob)}
        active: dict[tuple[int, str], int] = {}
        for job in self.jobs.values():
            if job.state in ACTIVE_STATES and job.name not in deleted and not job.deleting:
                active[(job.iteration, job.stage)] = active.get((job.iteration, job.stage), 0) + 1
        for c in creates:
            active[(c.iteration, c.stage)] = active.get((c.iteration, c.stage), 0) + 1
        assert all(n <= 1 for n in active.values()), f"two active Jobs for one step: {active}"
        # status monotone in iterations
        if old.spec_hash is not None and new.spec_hash is not None:
            assert new.iteration >= old.iteration
            assert len(new.iterations) >= len(old.iterations)
            done_old = sum(it.stage == "Done" for it in old.iterations)
            done_new = sum(it.stage == "Done" for it in new.iterations)
            assert done_new >= done_old
        if old.phase in ("Succeeded",):
            assert new.phase == old.phase, "a finished run changed phase"
        api.SPINRunStatus.model_validate(new.to_wire())  # round-trips

    def apply(self, d: Decision, killed: bool = False) -> None:
        asyncio.run(self.apply_async(d, killed))

    async def apply_async(self, d: Decision, killed: bool = False) -> None:
        self.decisions.append(d)
        new = d.status
        if self.mlflow.up and d.of_type(EnsureParentRun) and new.mlflow is None:
            new.mlflow = api.MlflowStatus(run_id="parent", experiment_id="1")
        for e in d.of_type(EnsureIterationRun):
            it = next(i for i in new.iterations if i.iteration == e.iteration)
            if self.mlflow.up and new.mlflow is not None:
                it.mlflow_run_id = it.mlflow_run_id or f"iter-{e.iteration}"
        for a in d.actions:
            if isinstance(a, CreateStep):
                parsed = parse_job_name(a.name)
                assert parsed is not None
                queued = bool(d.spec and d.spec.scheduling.queue_name)
                self.jobs[a.name] = ObservedJob(
                    a.name,
                    a.iteration,
                    a.stage,
                    a.attempt,
                    "Suspended" if queued else "Pending",
                    queued=queued,
                )
                self.created.append(a.name)
            elif isinstance(a, SuspendJob):
                job = self.jobs[a.name]
                self.jobs[a.name] = replace(job, state="Suspended" if a.suspend else "Pending")
            elif isinstance(a, DeleteJob):
                self.jobs.pop(a.name, None)
            elif isinstance(a, RecordSpec):
                self.applied = a.spec
                if a.store:
                    self.stored_digest = spec_digest(a.spec)
            elif isinstance(a, SetFinalizer):
                self.finalizer = a.present
            elif isinstance(a, DeleteArtifacts):
                self.artifacts_deleted = True
                self.storage.clear()
            elif hasattr(a, "reason"):
                self.events.append((a.reason, a.message))  # type: ignore[union-attr]
        if killed:  # the status patch landed; what came after it never ran
            self.status = d.status
            return
        if d.spec is not None:
            run = RunRef(NAMESPACE, NAME, self.obj["metadata"]["uid"])
            self.settled = await self.mlflow.settle(d.spec, run, new, d.actions)
        self.status = d.status

    # ------------------------------------------------------------ moving Jobs

    def active(self) -> list[ObservedJob]:
        return [j for j in self.jobs.values() if j.state in ACTIVE_STATES]

    def set_state(self, name: str, state: str, reason: str = "", message: str = "") -> None:
        self.jobs[name] = replace(self.jobs[name], state=state, reason=reason, message=message)  # type: ignore[arg-type]

    def succeed(
        self, name: str, metrics: dict[str, float] | None = None, write: bool = True
    ) -> None:
        """The Job succeeds; with `write`, its artifact's manifest lands (as the runtime does).
        A control evaluation without `metrics` scores 0.05 below SPIN's default."""
        job = self.jobs[name]
        self.set_state(name, "Succeeded")
        if write:
            facts = self.storage.get(job.iteration, StorageFacts())
            extra: dict[str, Any] = {COMPLETE_FIELD[job.stage]: True}
            if job.stage == "evaluate":
                extra["metrics"] = (
                    metrics if metrics is not None else {"exact_match": 0.1 * (job.iteration + 1)}
                )
            if job.stage == "control-evaluate":
                default = {"exact_match": 0.1 * (job.iteration + 1) - 0.05}
                extra["control_metrics"] = metrics if metrics is not None else default
            self.storage[job.iteration] = replace(facts, **extra)

    def past_the_check(self) -> None:
        """Start the run and let iteration 0's check Job pass (its report lands in storage), so
        the next pass creates the generation Job."""
        self.reconcile()
        (job,) = self.active()
        assert job.stage == "check", job
        self.succeed(job.name)

    def run_to_end(self, limit: int = 100, metrics: list[float] | None = None) -> None:
        """Reconcile and succeed every active Job until the run is finished."""
        for _ in range(limit):
            self.reconcile()
            if self.status.phase in ("Succeeded", "Failed"):
                return
            active = self.active()
            for job in active:
                m = None if metrics is None else {"exact_match": metrics[job.iteration]}
                self.succeed(job.name, m)
        raise AssertionError(f"run did not finish: {self.status.phase} {self.status.message}")


@dataclass
class _Pass:
    """The world as the driver's `Cluster` for one pass. It answers the reconciler's `needs_*`
    like the controller: fetch, then call again; with `unknown_storage`, storage reads fail
    (the other needs are still answered, and the pass ends when only storage is asked for)."""

    world: World
    killed: bool
    jobs: set[str] = field(default_factory=set)  # Jobs asked about (the world says which are gone)

    def observe(self, gathered: Gathered) -> Observed:
        return self.world.observed(
            set(gathered.storage),
            gathered.missing_secrets is not None,
            self.jobs,
            gathered.stored_checked,
        )

    async def gather(self, decision: Decision, gathered: Gathered) -> bool:
        others = decision.needs_secrets or decision.needs_jobs or decision.needs_stored_spec
        if self.world.unknown_storage and not others:
            return False
        if not self.world.unknown_storage:
            gathered.storage.update({t: StorageFacts() for t in decision.needs_storage})
        if decision.needs_secrets:
            gathered.missing_secrets = frozenset()  # the world says which are missing
        self.jobs |= decision.needs_jobs
        gathered.stored_checked |= decision.needs_stored_spec
        return True

    async def apply(self, old: api.SPINRunStatus, decision: Decision) -> bool:
        self.world.check(decision)
        await self.world.apply_async(decision, self.killed)
        return self.world.settled
