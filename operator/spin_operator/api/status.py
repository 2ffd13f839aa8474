"""The parts of a SPINRun's status (written only by the operator): conditions, one entry per
iteration with its steps, the control arm's comparison, the dataset check and MLflow.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from spin_operator.api.base import Model, desc

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
Stage = Literal["Checking", "Generating", "Training", "Evaluating", "Done"]


class Condition(Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: Annotated[
        str, desc("Ready, Complete, Progressing, Suspended, Failed, SpecChangeRefused, ...")
    ]
    status: Annotated[Literal["True", "False", "Unknown"], desc("True, False or Unknown.")]
    reason: Annotated[str, desc("CamelCase machine-readable reason.")] = ""
    message: Annotated[str, desc("Human-readable details.")] = ""
    last_transition_time: Annotated[
        str | None, desc("RFC 3339 time of the last status change.")
    ] = None
    observed_generation: Annotated[int | None, desc("Spec generation the condition reflects.")] = (
        None
    )


class StepStatus(Model):
    """One step (check, generate, train or evaluate) of an iteration."""

    job_name: Annotated[str | None, desc("Name of the current (latest) Job of this step.")] = None
    attempts: Annotated[int, desc("Jobs created for this step so far.", ge=0)] = 0
    phase: Annotated[
        Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"], desc("Step phase.")
    ] = "Pending"
    start_time: Annotated[str | None, desc("When the first Job of the step was created.")] = None
    completion_time: Annotated[str | None, desc("When the step finished.")] = None
    message: Annotated[str | None, desc("Last failure reason, if any.")] = None


class ControlArmStatus(Model):
    """The SFT control of one iteration and how SPIN's model compares to it."""

    model_uri: Annotated[str | None, desc("The control model this iteration starts from.")] = None
    output_model_uri: Annotated[str | None, desc("The control checkpoint it produced.")] = None
    metrics: Annotated[dict[str, float], desc("The control's evaluation results.")] = Field(
        default_factory=dict
    )
    metric: Annotated[
        str | None, desc("The metric both arms are compared by (evaluation.metric).")
    ] = None
    spin_score: Annotated[float | None, desc("SPIN's model (θt+1) on that metric.")] = None
    control_score: Annotated[float | None, desc("The control model on that metric.")] = None
    spin_advantage: Annotated[
        float | None,
        desc(
            "How much SPIN beat the control: spinScore - controlScore (negated for mode min); negative when the control is ahead."
        ),
    ] = None


class IterationStatus(Model):
    """One SPIN iteration t: θt -> θt+1."""

    iteration: Annotated[int, desc("Iteration index t (0-based).", ge=0)]
    stage: Annotated[Stage, desc("Current stage of this iteration.")] = "Generating"
    check: Annotated[
        StepStatus | None,
        desc(
            "Iteration 0 only: the check of the dataset and θ0 (a CPU Job) that runs before any "
            "generation."
        ),
    ] = None
    generate: Annotated[StepStatus, desc("Generation step.")] = Field(default_factory=StepStatus)
    train: Annotated[StepStatus, desc("Training step.")] = Field(default_factory=StepStatus)
    evaluate: Annotated[StepStatus, desc("Evaluation step.")] = Field(default_factory=StepStatus)
    control_train: Annotated[
        StepStatus | None, desc("SFT control training step (controlArm.enabled).")
    ] = None
    control_evaluate: Annotated[
        StepStatus | None, desc("SFT control evaluation step (controlArm.enabled).")
    ] = None
    control: Annotated[
        ControlArmStatus | None,
        desc("The SFT control arm and SPIN's score against it (controlArm.enabled)."),
    ] = None
    start_time: Annotated[str | None, desc("When the iteration started.")] = None
    completion_time: Annotated[str | None, desc("When the iteration finished.")] = None
    model_uri: Annotated[str | None, desc("θt, the model this iteration starts from.")] = None
    output_model_uri: Annotated[str | None, desc("θt+1, the checkpoint it produced.")] = None
    data_uri: Annotated[str | None, desc("Generated data of this iteration.")] = None
    metrics: Annotated[
        dict[str, float],
        desc(
            "Summary metrics (evaluation results): evaluation.metric and score, exact_match, "
            "real_logp_per_token, num_examples, truncation_rate, each also as baseline/<key> for "
            "θ0; every other metric is in MLflow only.",
        ),
    ] = Field(default_factory=dict)
    mlflow_run_id: Annotated[str | None, desc("Nested MLflow run of this iteration.")] = None


class DatasetStatus(Model):
    """What the dataset check found: rows read, rows usable, rows skipped and why."""

    rows: Annotated[int, desc("Rows read (blank lines are not rows).", ge=0)] = 0
    usable: Annotated[int, desc("Rows that parse into a prompt and its answer.", ge=0)] = 0
    skipped: Annotated[int, desc("Rows skipped as unusable.", ge=0)] = 0
    skipped_by_reason: Annotated[
        dict[str, int], desc("Skipped rows per reason (e.g. `not JSON`, `empty response`).")
    ] = Field(default_factory=dict)


class MlflowStatus(Model):
    """Where the run is tracked."""

    run_id: Annotated[str | None, desc("Parent MLflow run id.")] = None
    experiment_id: Annotated[str | None, desc("MLflow experiment id.")] = None
    url: Annotated[str | None, desc("Link to the parent run in the MLflow UI.")] = None
    finished: Annotated[
        list[str],
        desc(
            "Ids of the MLflow runs (parent and iterations) that MLflow confirmed ended, each after "
            "every call its Jobs spooled during an outage was delivered. The operator keeps ending "
            "the others of a finished iteration or run until MLflow confirms."
        ),
    ] = Field(default_factory=list)
    spooled_calls: Annotated[
        int | None,
        desc(
            "Tracking calls that Jobs spooled while MLflow was unreachable and that are not "
            "delivered yet (0: none pending; unset: no spool checked yet).",
            ge=0,
        ),
    ] = None
