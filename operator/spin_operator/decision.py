"""What the reconciler decides on and what it decides: `Observed` facts in, a `Decision` out.

The reconciler (reconciler.py) is pure: everything a decision depends on is in `Observed`,
built by the controller (facts.py), local mode or a test. When it needs a fact it was not given
(storage manifests of an iteration, whether referenced Secrets exist, whether a Job that status
remembers is really gone), it says so in `Decision.needs_*` and decides only what is safe
without it; the caller fetches the facts and calls again. The actions are applied by apply.py
(the operator) or local/actions.py (local mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from spin_operator.api import types as api
from spin_operator.naming import StepKind
from spin_operator.steps import RunRef

JobState = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
ACTIVE_STATES = ("Pending", "Running", "Suspended")
STAGE_OF: dict[StepKind, api.Stage] = {
    "check": "Checking",
    "generate": "Generating",
    "train": "Training",
    "evaluate": "Evaluating",
}
KIND_OF: dict[str, StepKind] = {v: k for k, v in STAGE_OF.items()}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ObservedJob:
    """A child Job as last seen (owned by this run's uid)."""

    name: str
    iteration: int
    stage: StepKind
    attempt: int
    state: JobState
    reason: str = ""
    message: str = ""
    start_time: str | None = None
    completion_time: str | None = None
    queued: bool = False  # carries a Kueue queue label: Kueue, not the operator, unsuspends it
    deleting: bool = False
    starting: bool = False  # active, but not every pod it wants is running yet (pods worth a look)
    # Why its pods do not start, from the pods and the Job's events (observe.pod_blockage):
    # Unschedulable, ImagePullBackOff, CreateContainerConfigError, FailedCreate (PodSecurity,
    # quota), ...; "" when none is known. `pending_since`: since when a pod has waited to start.
    blocked_reason: str = ""
    blocked_message: str = ""
    pending_since: str | None = None


@dataclass(frozen=True)
class StorageFacts:
    """Complete artifacts of one iteration (only manifests count)."""

    generated: bool = False
    model: bool = False
    evaluated: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)
    control_model: bool = False  # spec.controlArm: the control checkpoint and its evaluation
    control_evaluated: bool = False
    control_metrics: Mapping[str, float] = field(default_factory=dict)
    dataset_rows: int = 0  # from the generation manifests: rows read, skipped per reason
    dataset_skipped: Mapping[str, int] = field(default_factory=dict)
    checked: bool = False  # iteration 0: the check's report says ok (R/iter-000/check/report.json)
    # its dataset profile ({rows, usable, skipped, skippedByReason: {reason: {count, first}}})
    check_profile: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Observed:
    """Everything outside the status that a decision may depend on."""

    namespace: str
    name: str
    uid: str = ""
    generation: int = 1
    now: str = ""
    deleting: bool = False
    finalizer: bool = False
    jobs: tuple[ObservedJob, ...] = ()
    gone_jobs: frozenset[str] = frozenset()  # names a GET confirmed absent
    missing_secrets: frozenset[str] | None = None  # None: not checked
    storage: Mapping[int, StorageFacts] = field(default_factory=dict)
    stored_spec_checked: bool = False
    stored_spec_digest: str | None = None  # digest of R/spinrun.yaml, None if absent
    applied_spec: api.SPINRunSpec | None = None  # the selfplay.dev/applied-spec annotation
    # Job name -> (reason, message): the API server refused to create it (or its Service) for
    # good (CreateRejected), in a real create or in the dry run of iteration 0 when the run
    # starts, or the step could not be rendered from the spec (InvalidSpec)
    rejected: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    # the dataset and θ0 were checked before the run (local mode): no check step, no Job
    inputs_checked: bool = False

    @property
    def run(self) -> RunRef:
        return RunRef(self.namespace, self.name, self.uid)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class CreateStep:
    """Create the Job (and for training its headless Service) of one step attempt."""

    iteration: int
    stage: StepKind
    attempt: int
    name: str


@dataclass(frozen=True)
class SuspendJob:
    name: str
    suspend: bool


@dataclass(frozen=True)
class DeleteJob:
    name: str


@dataclass(frozen=True)
class DeleteService:
    name: str


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class RecordSpec:
    """Keep the spec the run goes on with (annotation); `store` also writes R/spinrun.yaml."""

    spec: api.SPINRunSpec
    store: bool = False


@dataclass(frozen=True)
class SetFinalizer:
    present: bool


@dataclass(frozen=True)
class DeleteArtifacts:
    prefix: str


@dataclass(frozen=True)
class EnsureParentRun:
    pass


@dataclass(frozen=True)
class EnsureIterationRun:
    iteration: int


@dataclass(frozen=True)
class RegisterModel:
    """Register θt+1 of `iteration` as a model version (moves the best alias too)."""

    iteration: int
    model_uri: str
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class FinishTracking:
    """End the MLflow run of `iteration` (None: the parent run), after delivering what its Jobs
    spooled. Emitted on every pass until `status.mlflow.finished` holds the run id: the executor
    adds it there only when MLflow confirmed both (so an operator killed in between, or an MLflow
    outage, only delays the end)."""

    iteration: int | None
    status: Literal["FINISHED", "FAILED"]


@dataclass(frozen=True)
class ReplaySpool:
    """Deliver what the Jobs of these iterations spooled while MLflow was unreachable; the
    executor writes the count still undelivered to `status.mlflow.spooledCalls`."""

    iterations: tuple[int, ...]


Action = (
    CreateStep
    | SuspendJob
    | DeleteJob
    | DeleteService
    | Event
    | RecordSpec
    | SetFinalizer
    | DeleteArtifacts
    | EnsureParentRun
    | EnsureIterationRun
    | RegisterModel
    | FinishTracking
    | ReplaySpool
)


@dataclass
class Decision:
    """What to do, and the status to write once it is done."""

    status: api.SPINRunStatus
    actions: list[Action] = field(default_factory=list)
    spec: api.SPINRunSpec | None = None  # the spec the run goes on with
    needs_storage: set[int] = field(default_factory=set)
    needs_secrets: bool = False
    needs_jobs: set[str] = field(default_factory=set)
    needs_stored_spec: bool = False

    @property
    def complete(self) -> bool:
        """False while a needed fact is missing (the decision is then safe but partial)."""
        return not (
            self.needs_storage or self.needs_secrets or self.needs_jobs or self.needs_stored_spec
        )

    def of_type(self, kind: type) -> list:  # type: ignore[type-arg]
        return [a for a in self.actions if isinstance(a, kind)]


def referenced_secrets(spec: api.SPINRunSpec) -> dict[str, str]:
    """Secret name -> the spec field that references it (for a field-specific message)."""
    refs: dict[str, str] = {}
    if spec.tracking.credentials_secret is not None and spec.tracking.uri:
        refs[spec.tracking.credentials_secret.name] = "spec.tracking.credentialsSecret.name"
    if spec.storage.credentials_secret is not None:
        refs[spec.storage.credentials_secret.name] = "spec.storage.credentialsSecret.name"
    return refs
