"""The reconcile driver (driver.py) against an in-memory `Cluster`, with the real reconciler:
the rounds of one pass, what it fetches, when it stops, and what it applies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from spin_operator import driver
from spin_operator.api import types as api
from spin_operator.decision import CreateStep, Decision, Observed, RecordSpec, StorageFacts
from spin_operator.driver import MAX_ROUNDS, Cluster, Gathered, Outcome, drive, needs
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
        return True


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
