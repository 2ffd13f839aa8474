"""The reconcile driver (driver.py) against an in-memory `Cluster`, with the real reconciler:
the rounds of one pass, what it fetches, when it stops, and what it applies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from spin_operator import driver
from spin_operator.api import types as api
from spin_operator.apply import Again
from spin_operator.controller import Controller
from spin_operator.decision import CreateStep, Decision, Observed, RecordSpec, StorageFacts
from spin_operator.driver import MAX_ROUNDS, Cluster, Gathered, Outcome, drive, needs
from spin_operator.kube import Kube
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import spec_digest
from spin_operator.validation import InvalidSpec, parse
from tests.spin_operator.reconciler_world import NAME, NAMESPACE, spin_object

COMPLETE = StorageFacts(
    checked=True, generated=True, model=True, evaluated=True, metrics={"exact_match": 0.5}
)


def spec_of(**fields: Any) -> api.SPINRunSpec:
    return resolve_spec(parse(spin_object(**fields)), Settings(), None)


@dataclass
class MemoryCluster:
    """Children, storage and Secrets in memory; it records every call the driver makes."""

    storage: dict[int, StorageFacts] = field(default_factory=dict)
    stored_digest: str | None = None
    fail_gather: bool = False  # storage (or the API) down: every fetch fails
    forgetful: bool = False  # answers every fetch, but nothing it fetched reaches `observe`
    calls: list[str] = field(default_factory=list)
    asked: list[dict[str, object]] = field(default_factory=list)  # needs of each gather call
    fetched: list[str] = field(default_factory=list)  # what gather actually read
    seen: list[Observed] = field(default_factory=list)
    applied: list[tuple[api.SPINRunStatus, Decision]] = field(default_factory=list)
    gate: asyncio.Event | None = None  # apply waits for it (a pass in progress)
    refuse_once: bool = False  # apply raises Again once: a child refused for good

    def observe(self, gathered: Gathered) -> Observed:
        self.calls.append("observe")
        g = Gathered() if self.forgetful else gathered
        observed = Observed(
            namespace=NAMESPACE,
            name=NAME,
            uid="uid-1",
            now="2026-01-01T00:00:00Z",
            gone_jobs=frozenset(g.gone),
            missing_secrets=g.missing_secrets,
            storage=dict(g.storage),
            stored_spec_checked=g.stored_checked,
            stored_spec_digest=g.stored_digest,
        )
        self.seen.append(observed)
        return observed

    async def gather(self, decision: Decision, gathered: Gathered) -> bool:
        self.calls.append("gather")
        self.asked.append(needs(decision))
        if self.fail_gather:
            return False
        if decision.needs_stored_spec:
            self.fetched.append("storedSpec")
            gathered.stored_checked, gathered.stored_digest = True, self.stored_digest
        if decision.needs_secrets:
            self.fetched.append("secrets")
            gathered.missing_secrets = frozenset()
        for name in sorted(decision.needs_jobs):
            self.fetched.append(f"job {name}")
            gathered.gone.add(name)
        for t in sorted(decision.needs_storage):
            self.fetched.append(f"storage {t}")
            gathered.storage[t] = self.storage.get(t, StorageFacts())
        return True

    async def apply(self, old: api.SPINRunStatus, decision: Decision) -> bool:
        self.calls.append("apply")
        self.applied.append((old, decision))
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse_once:
            self.refuse_once = False
            raise Again("refused for good: decide again with the refusal")
        return True

    @property
    def passes(self) -> int:
        return self.calls.count("apply")


def run(spec: api.SPINRunSpec | InvalidSpec, status: api.SPINRunStatus, c: Cluster) -> Outcome:
    """One pass (`c: Cluster`: mypy checks the in-memory cluster against the protocol)."""
    return asyncio.run(drive(spec, status, c, "test"))


def test_a_fresh_run_fetches_what_each_round_asks_and_stops_when_complete() -> None:
    c = MemoryCluster()
    status = api.SPINRunStatus()
    outcome = run(spec_of(), status, c)
    d = outcome.decision
    assert d.complete and outcome.settled and d.status.phase == "Running"
    # reconcile, fetch, reconcile, ... and the last (complete) decision is never fetched for
    assert c.calls == ["observe", "gather"] * (outcome.rounds - 1) + ["observe", "apply"]
    assert outcome.rounds >= 2 and all(c.asked)
    # each fetch is exactly what that round's decision asked for, and the next round sees it
    asked_flat = []
    for needed in c.asked:
        asked_flat += ["storedSpec"] if needed.get("storedSpec") else []
        asked_flat += ["secrets"] if needed.get("secrets") else []
        asked_flat += [f"job {n}" for n in sorted(needed.get("jobs") or ())]  # type: ignore[call-overload]
        asked_flat += [f"storage {t}" for t in sorted(needed.get("storage") or ())]  # type: ignore[call-overload]
    assert c.fetched == asked_flat
    assert c.asked[0] == {"storedSpec": True}  # nothing else is safe to ask before it
    assert not c.seen[0].stored_spec_checked and c.seen[1].stored_spec_checked
    # applied once: the old status and the final decision, its actions in the reconciler's order
    assert c.applied == [(status, d)]
    kinds = [type(a) for a in d.actions]
    assert kinds.index(RecordSpec) < kinds.index(CreateStep)
    assert status.phase != d.status.phase  # the driver never changes the status it was given


def test_a_refused_spec_is_decided_in_one_round_without_fetching() -> None:
    obj = spin_object(iterations=0)
    try:
        parse(obj)
    except InvalidSpec as exc:
        refused = exc
    else:
        pytest.fail("iterations: 0 should be refused")
    c = MemoryCluster()
    outcome = run(refused, api.SPINRunStatus(), c)
    assert c.calls == ["observe", "apply"] and outcome.rounds == 1
    assert outcome.decision.status.phase == "Failed"


def test_a_failed_fetch_stops_the_pass_applies_the_partial_decision_and_is_not_settled() -> None:
    c = MemoryCluster(fail_gather=True)
    outcome = run(spec_of(), api.SPINRunStatus(), c)
    assert c.calls == ["observe", "gather", "apply"] and outcome.rounds == 1
    assert not outcome.decision.complete and not outcome.settled
    assert outcome.applied  # what was safe to decide was applied; the caller retries the rest
    assert not outcome.decision.of_type(CreateStep)  # nothing is started on a partial decision


def test_the_rounds_are_bounded_when_the_facts_never_arrive() -> None:
    c = MemoryCluster(forgetful=True)
    outcome = run(spec_of(), api.SPINRunStatus(), c)
    assert outcome.rounds == MAX_ROUNDS and c.calls.count("gather") == MAX_ROUNDS
    assert c.calls[-1] == "apply" and c.calls.count("apply") == 1
    assert not outcome.settled


def test_a_run_of_the_most_iterations_resumes_from_storage_within_one_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every iteration complete in storage (a rerun after the status was lost): one pass learns
    them one round each, so MAX_ROUNDS must exceed the largest `iterations`."""
    spec = spec_of(iterations=api.MAX_ITERATIONS, evaluation={"enabled": True})
    c = MemoryCluster(
        storage={t: COMPLETE for t in range(api.MAX_ITERATIONS)}, stored_digest=spec_digest(spec)
    )
    outcome = run(spec, api.SPINRunStatus(), c)
    assert outcome.settled and outcome.decision.status.phase == "Succeeded"
    learnt = [f for f in c.fetched if f.startswith("storage ")]
    assert len(learnt) == api.MAX_ITERATIONS == len(set(learnt))  # each iteration read once
    # with fewer rounds than that, the same pass stops short (and says so)
    monkeypatch.setattr(driver, "MAX_ROUNDS", outcome.rounds - 1)
    short = run(
        spec, api.SPINRunStatus(), MemoryCluster(storage=c.storage, stored_digest=c.stored_digest)
    )
    assert not short.settled and short.decision.status.phase != "Succeeded"


# ---------------------------------------------------------------- the controller's scheduling


def controller_over(cluster: MemoryCluster, retry_base: float) -> Controller:
    """The operator's controller with `cluster` in place of the API server (its Kube client is
    never called: the in-memory cluster answers every pass)."""
    controller = Controller(
        Settings(), Kube(lambda: None), retry_base=retry_base, retry_max=retry_base * 2
    )

    async def open_pass(key: tuple[str, str], body: dict[str, Any]) -> Any:
        return spec_of(), cluster

    controller.open_pass = open_pass  # type: ignore[method-assign]
    return controller


async def until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_the_controller_retries_a_pass_that_could_not_fetch_until_it_settles() -> None:
    async def scenario() -> None:
        c = MemoryCluster(fail_gather=True)
        controller = controller_over(c, retry_base=0.02)
        key = (NAMESPACE, NAME)
        try:
            controller.on_run("ADDED", spin_object())
            await until(lambda: c.passes >= 3)  # nothing else happens: the retries bring them
            assert key in controller._retries
            c.fail_gather = False
            await until(lambda: key not in controller._retries and not controller._running)
            settled = c.passes
            await asyncio.sleep(0.3)  # several retry delays: no pass without a reason now
            assert c.passes == settled and c.applied[-1][1].complete
        finally:
            await controller.close()

    asyncio.run(scenario())


def test_events_during_a_pass_coalesce_into_one_more_pass() -> None:
    async def scenario() -> None:
        c = MemoryCluster(gate=asyncio.Event())
        controller = controller_over(c, retry_base=60)
        try:
            controller.on_run("ADDED", spin_object())
            await until(lambda: c.passes == 1)  # the first pass waits in apply
            for _ in range(5):
                controller.on_run("MODIFIED", spin_object())
            assert c.gate is not None
            c.gate.set()
            await until(lambda: not controller._running)
            assert c.passes == 2
        finally:
            await controller.close()

    asyncio.run(scenario())


def test_a_refused_child_is_decided_on_again_at_once_and_a_deleted_run_is_not_retried() -> None:
    async def scenario() -> None:
        c = MemoryCluster(refuse_once=True)
        controller = controller_over(c, retry_base=60)  # a retry would come far too late
        key = (NAMESPACE, NAME)
        try:
            controller.on_run("ADDED", spin_object())
            await until(lambda: c.passes == 2 and not controller._running, timeout=5)
            assert key not in controller._retries
            c.fail_gather = True
            controller.on_run("MODIFIED", spin_object())
            await until(lambda: key in controller._retries)
            controller.on_run("DELETED", spin_object())
            assert key not in controller._retries and key not in controller.runs
        finally:
            await controller.close()

    asyncio.run(scenario())
