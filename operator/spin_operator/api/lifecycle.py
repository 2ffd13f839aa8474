"""How a run's Jobs live and go: retries of failed steps (`spec.failurePolicy`) and what is kept
when steps finish and when the SPINRun is deleted (`spec.retention`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from spin_operator.api.base import Model, desc
from spin_operator.api.fields import MAX_RETRIES


class FailurePolicySpec(Model):
    """How failed steps are retried."""

    max_retries: Annotated[
        int, desc("New Jobs created for a failed step before the run fails.", ge=0, le=MAX_RETRIES)
    ] = 2
    backoff_limit: Annotated[
        int,
        desc(
            "Pod restarts within one Job before it fails: per shard for generation (backoffLimitPerIndex); "
            "not used by multi-node training, whose ranks restart together as the next Job.",
            ge=0,
            le=100,
        ),
    ] = 0
    active_deadline_seconds: Annotated[int | None, desc("Wall-clock limit of each Job.", ge=1)] = (
        None
    )
    pending_timeout_seconds: Annotated[
        int,
        desc(
            "Fail the step when a pod of its Job has waited this long to start (unschedulable, "
            "image pull back-off, a missing Secret key, pods refused by PodSecurity or a quota); "
            "0 waits forever. A Job suspended for Kueue does not count as waiting.",
            ge=0,
        ),
    ] = 3600


class RetentionSpec(Model):
    """What happens to artifacts when the SPINRun is deleted."""

    on_delete: Annotated[
        Literal["Retain", "Delete"],
        desc("Retain keeps checkpoints and data in storage; Delete removes the run prefix."),
    ] = "Retain"
    finished_jobs: Annotated[
        Literal["Delete", "Retain"],
        desc(
            "Delete removes a step's Jobs and their pods once the status records the step as "
            "succeeded (so they do not pile up); Retain keeps them until the SPINRun is deleted "
            "(for debugging). Jobs of a step that failed the run are always kept.",
        ),
    ] = "Delete"
