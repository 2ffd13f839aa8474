"""One reconcile pass, whatever runs the steps: the operator's controller (Jobs on a cluster) and
local mode (`spinctl run`, processes) both call `drive` with their own `Cluster`.

The protocol: build `Observed` from what the cluster holds, ask the pure reconciler, fetch only
what the decision's `needs_*` name (storage manifests, the stored spec's digest, Secrets, Jobs
the cache may have lost), ask again with those facts, and so on until the decision is complete,
a fetch fails (storage or the API down: the partial decision is safe to apply) or `MAX_ROUNDS`
is reached; then the last decision is applied, once. This module makes no I/O of its own and
imports no client: it sees the cluster only through the `Cluster` protocol (an import-linter
contract keeps it so), which is what lets tests drive it against an in-memory cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from spin_operator.api import types as api
from spin_operator.decision import Decision, Observed, StorageFacts
from spin_operator.reconciler import reconcile
from spin_operator.validation import InvalidSpec

log = logging.getLogger(__name__)
# Each round answers at least one need, and a decision asks for the storage facts of at most
# every iteration at once: a complete pass takes a few rounds; the bound is for a reconciler
# bug (a need asked for again and again), never reached by a correct one.
MAX_ROUNDS = api.MAX_ITERATIONS + 10


@dataclass
class Gathered:
    """Facts fetched during one pass because the reconciler asked for them."""

    storage: dict[int, StorageFacts] = field(default_factory=dict)
    # The iteration's Jobs (name, state) its storage facts were read for (facts.py drops facts
    # whose Jobs changed since: they may predate a Job's end that `observe` would show).
    storage_jobs: dict[int, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    missing_secrets: frozenset[str] | None = None
    gone: set[str] = field(default_factory=set)
    stored_checked: bool = False
    stored_digest: str | None = None


class Cluster(Protocol):
    """Where a run's steps run, as one pass of the driver sees it (for one run).

    `observe`: the run's children and everything else outside the status (Jobs or processes,
    the applied spec, refusals), with the facts gathered so far this pass. `gather`: fetch what
    `decision.needs_*` asks for into `gathered` (manifests, stored digest, Secrets, Jobs gone);
    False when something could not be fetched. `apply`: carry out the decision (create, delete
    or suspend a step's objects, record the spec, write the status, post events, the MLflow
    work); False while MLflow has not confirmed every run end and replay it asked for. Errors
    `apply` raises (the API refusing a write, a stale snapshot) are the caller's to handle.
    """

    def observe(self, gathered: Gathered) -> Observed: ...

    async def gather(self, decision: Decision, gathered: Gathered) -> bool: ...

    async def apply(self, old: api.SPINRunStatus, decision: Decision) -> bool: ...


@dataclass(frozen=True)
class Outcome:
    """What one pass decided and how far it got."""

    decision: Decision
    rounds: int  # reconcile calls made
    applied: bool  # `Cluster.apply` said everything it asked MLflow for is confirmed

    @property
    def settled(self) -> bool:
        """Every needed fact was available and every action applied: nothing to retry."""
        return self.decision.complete and self.applied


async def drive(
    spec: api.SPINRunSpec | InvalidSpec,
    status: api.SPINRunStatus,
    cluster: Cluster,
    label: str = "",
) -> Outcome:
    """One pass: reconcile -> gather -> reconcile ... (at most MAX_ROUNDS), then apply once."""
    gathered = Gathered()
    decision: Decision | None = None
    rounds = 0
    while rounds < MAX_ROUNDS:
        rounds += 1
        decision = reconcile(spec, status, cluster.observe(gathered))
        # no spec (a refused one): nothing to fetch with, the decision only says why
        if decision.complete or decision.spec is None:
            break
        if not await cluster.gather(decision, gathered):
            break
    assert decision is not None  # MAX_ROUNDS > 0
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "%s: phase %s -> %s after %d round(s), actions %s, still needed %s",
            label,
            status.phase,
            decision.status.phase,
            rounds,
            [
                type(a).__name__ + (f"({getattr(a, 'name', '')})" if hasattr(a, "name") else "")
                for a in decision.actions
            ],
            needs(decision),
        )
    applied = await cluster.apply(status, decision)
    return Outcome(decision, rounds, applied)


def needs(d: Decision) -> dict[str, object]:
    """What `d` still asks for, by kind (empty: complete)."""
    asked = (
        ("storage", d.needs_storage),
        ("secrets", d.needs_secrets),
        ("jobs", d.needs_jobs),
        ("storedSpec", d.needs_stored_spec),
    )
    return {k: v for k, v in asked if v}
