"""The SPINRun API (`selfplay.dev/v1alpha1`): the single source of truth.

The CRD (`spinctl crd`, `crds/`), the reference (`docs/api.md`) and `spinctl validate` are all
generated from these models. Field names follow Kubernetes conventions (camelCase on the wire);
every default lives here and is written into the CRD so `kubectl get -o yaml` shows it.

This module is the root: the API's identity, the SPINRun's spec and status, and the rules that
span sections. Each section is a module of its own (`inputs`, `generation`, `training`,
`evaluation`, `outputs`, `scheduling`, `pod`, `lifecycle`, `status`; `fields` and `base` hold
what they share). It is also the package's public surface: callers write
`from spin_operator.api import types as api` and name every model and constant as `api.X`; the
names in `__all__` are that surface, re-exported here on purpose, so a caller never needs to
know which section module defines a model.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from spin_operator.api.base import FieldError, FieldErrors, Model, desc, raise_all
from spin_operator.api.evaluation import ControlArmSpec, EvaluationSpec, StoppingSpec
from spin_operator.api.fields import MAX_ITERATIONS, MAX_RETRIES, PATTERN_HELP
from spin_operator.api.generation import GenerationSpec
from spin_operator.api.inputs import DatasetSpec, ModelSpec
from spin_operator.api.lifecycle import FailurePolicySpec, RetentionSpec
from spin_operator.api.outputs import S3CredentialsSecretRef, SecretRef, StorageSpec, TrackingSpec
from spin_operator.api.pod import PodSpec
from spin_operator.api.scheduling import Resources, SchedulingSpec, Toleration
from spin_operator.api.status import (
    Condition,
    ControlArmStatus,
    DatasetStatus,
    IterationStatus,
    MlflowStatus,
    Phase,
    Stage,
    StepStatus,
)
from spin_operator.api.training import PeftSpec, TrainingSpec

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "MAX_ITERATIONS",
    "MAX_NAME_LENGTH",
    "MAX_RETRIES",
    "NAME_PATTERN",
    "PATTERN_HELP",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "Condition",
    "ControlArmSpec",
    "ControlArmStatus",
    "DatasetSpec",
    "DatasetStatus",
    "EvaluationSpec",
    "FailurePolicySpec",
    "FieldError",
    "FieldErrors",
    "GenerationSpec",
    "IterationStatus",
    "MlflowStatus",
    "ModelSpec",
    "PeftSpec",
    "Phase",
    "PodSpec",
    "Resources",
    "RetentionSpec",
    "S3CredentialsSecretRef",
    "SPINRunSpec",
    "SPINRunStatus",
    "SchedulingSpec",
    "SecretRef",
    "Stage",
    "StepStatus",
    "StoppingSpec",
    "StorageSpec",
    "Toleration",
    "TrackingSpec",
    "TrainingSpec",
]

GROUP = "selfplay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SPINRun"
PLURAL = "spinruns"
SINGULAR = "spinrun"
SHORT_NAMES = ["spin"]

# Child names are `<run>-i<t>-<stage>[-r<k>]` plus `-<index>` pod hostnames; all must stay
# within the 63-character DNS label limit, so run names are capped here.
MAX_NAME_LENGTH = 40
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


class SPINRunSpec(Model):
    """Desired state of a SPIN run: the model, the data, and how each iteration runs."""

    model: Annotated[ModelSpec, desc("Base model θ0.")]
    dataset: Annotated[DatasetSpec, desc("SFT dataset.")]
    iterations: Annotated[int, desc("SPIN iterations to run.", ge=1, le=MAX_ITERATIONS)] = 3
    generation: Annotated[GenerationSpec, desc("Generation step.")] = Field(
        default_factory=GenerationSpec
    )
    training: Annotated[TrainingSpec, desc("Training step.")] = Field(default_factory=TrainingSpec)
    evaluation: Annotated[EvaluationSpec, desc("Evaluation step.")] = Field(
        default_factory=EvaluationSpec
    )
    stopping: Annotated[StoppingSpec, desc("Early stopping rule.")] = Field(
        default_factory=StoppingSpec
    )
    control_arm: Annotated[
        ControlArmSpec, desc("Equal-compute SFT control arm (off by default).")
    ] = Field(default_factory=ControlArmSpec)
    storage: Annotated[StorageSpec, desc("Artifact storage.")] = Field(default_factory=StorageSpec)
    tracking: Annotated[TrackingSpec, desc("MLflow tracking.")] = Field(
        default_factory=TrackingSpec
    )
    scheduling: Annotated[SchedulingSpec, desc("Pod scheduling.")] = Field(
        default_factory=SchedulingSpec
    )
    pod: Annotated[
        PodSpec,
        desc(
            "Pod customization of every Job: env, pull secrets, volumes, model cache, affinity, labels."
        ),
    ] = Field(default_factory=PodSpec)
    failure_policy: Annotated[FailurePolicySpec, desc("Retries.")] = Field(
        default_factory=FailurePolicySpec
    )
    suspend: Annotated[bool, desc("Suspend running Jobs and start nothing new; false resumes.")] = (
        False
    )
    retention: Annotated[RetentionSpec, desc("Artifact retention.")] = Field(
        default_factory=RetentionSpec
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> SPINRunSpec:
        errors: list[FieldError] = []
        for name in ("beta_per_iteration", "learning_rate_per_iteration"):
            values = getattr(self.training, name)
            if values and len(values) > self.iterations:
                errors.append(
                    FieldError(
                        f"training.{to_camel(name)}",
                        f"has {len(values)} values for {self.iterations} iterations",
                    )
                )
        if self.stopping.patience is not None and not self.evaluation.enabled:
            errors.append(
                FieldError(
                    "stopping.patience",
                    "needs evaluation.enabled: the rule ranks evaluation results",
                )
            )
        if (
            self.evaluation.enabled
            and self.evaluation.command is None
            and self.dataset.eval_samples == 0
        ):
            errors.append(
                FieldError(
                    "dataset.evalSamples",
                    "is 0 but the built-in evaluation needs held-out prompts "
                    "(set it > 0, evaluation.enabled: false or an evaluation.command)",
                )
            )
        if self.control_arm.enabled and not self.evaluation.enabled:
            errors.append(
                FieldError(
                    "controlArm.enabled",
                    "needs evaluation.enabled: both arms are compared by the evaluation",
                )
            )
        if self.evaluation.metric == "auto" and self.evaluation.mode != "max":
            errors.append(
                FieldError(
                    "evaluation.mode",
                    "must be max with metric auto (both metrics it picks are higher-is-better)",
                )
            )
        raise_all(errors)
        return self


class SPINRunStatus(Model):
    """Observed state, written only by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    phase: Annotated[Phase, desc("Pending, Running, Suspended, Succeeded or Failed.")] = "Pending"
    iteration: Annotated[
        int, desc("Current iteration t (0-based): it trains θt into θt+1.", ge=0)
    ] = 0
    stage: Annotated[Stage | None, desc("Current stage.")] = None
    progress: Annotated[str | None, desc("Iterations completed out of the total, e.g. 1/3.")] = None
    best_iteration: Annotated[
        int | None, desc("Iteration whose output model scored best so far (t: its model is θt+1).")
    ] = None
    best_model: Annotated[
        str | None,
        desc("The best model so far by name, θt+1 for bestIteration t (θ0 is the base)."),
    ] = None
    observed_generation: Annotated[
        int | None, desc("Last spec generation the operator acted on.")
    ] = None
    conditions: Annotated[list[Condition], desc("Standard conditions.")] = Field(
        default_factory=list
    )
    iterations: Annotated[list[IterationStatus], desc("One entry per started iteration.")] = Field(
        default_factory=list
    )
    mlflow: Annotated[MlflowStatus | None, desc("MLflow tracking.")] = None
    dataset: Annotated[
        DatasetStatus | None,
        desc("Dataset rows usable and skipped (from the check before iteration 0's generation)."),
    ] = None
    start_time: Annotated[str | None, desc("When the run started.")] = None
    completion_time: Annotated[str | None, desc("When the run finished.")] = None
    message: Annotated[str | None, desc("Human-readable summary of the current state.")] = None
    spec_hash: Annotated[
        str | None, desc("Digest of the spec fields that cannot change after start.")
    ] = None
