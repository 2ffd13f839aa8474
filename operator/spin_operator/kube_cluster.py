"""The driver's `Cluster` on Kubernetes: one pass of one SPINRun, over the controller's caches.

Observing reads the controller's Job cache and what it learnt of the run's children (facts.py),
gathering fetches what a decision asks for (facts.py: storage through the per-endpoint pools,
Secrets and Jobs through the API), applying writes to the API server and MLflow (apply.py,
tracking_actions.py). Built per pass by the controller (controller.py), which keeps the caches,
the work queue, retries and re-checks.
"""

from __future__ import annotations

from typing import Any

from spin_operator.api import types as api
from spin_operator.apply import Applier
from spin_operator.decision import Decision, Observed
from spin_operator.driver import Gathered
from spin_operator.facts import Facts, Specs, applied_spec
from spin_operator.refusals import Refusals
from spin_operator.steps import RunRef
from spin_operator.validation import InvalidSpec

Key = tuple[str, str]  # namespace, run name
JSON = dict[str, Any]


class KubeCluster:
    """One pass of the run `body` (the cached SPINRun) against the API server."""

    def __init__(
        self,
        key: Key,
        body: JSON,
        specs: Specs,
        facts: Facts,
        applier: Applier,
        refusals: Refusals,
    ) -> None:
        meta = body["metadata"]
        self.key, self.body = key, body
        self.run = RunRef(meta["namespace"], meta["name"], meta.get("uid", ""))
        self.applied = applied_spec(meta)  # the spec the run goes on with (its annotation)
        self.facts, self.applier, self.refusals = facts, applier, refusals
        # the spec as written with the operator's defaults, or why it is refused
        self.spec: api.SPINRunSpec | InvalidSpec = specs.given(key, body, self.run, self.applied)

    def observe(self, gathered: Gathered) -> Observed:
        given = self.spec if isinstance(self.spec, api.SPINRunSpec) else None
        rejected = self.refusals.of(self.key, self.body, given)
        return self.facts.observed(self.body, self.run, self.applied, gathered, rejected)

    async def gather(self, decision: Decision, gathered: Gathered) -> bool:
        return await self.facts.gather(decision, self.run, gathered)

    async def apply(self, old: api.SPINRunStatus, decision: Decision) -> bool:
        return await self.applier.execute(self.key, self.body, self.run, old, decision)
