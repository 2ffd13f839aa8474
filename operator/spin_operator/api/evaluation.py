"""How iterations are judged: the evaluation step (`spec.evaluation`), the early-stopping rule
(`spec.stopping`) and the SFT control arm they are compared with (`spec.controlArm`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from spin_operator.api.base import Model, desc
from spin_operator.api.scheduling import Resources


class EvaluationSpec(Model):
    """Optional step 3 of each iteration: score θt+1 on the held-out prompts."""

    enabled: Annotated[bool, desc("Run an evaluation Job after each training step.")] = True
    command: Annotated[
        list[Annotated[str, Field(min_length=1)]] | None,
        desc(
            "Custom evaluation argv (no shell). It gets SPIN_MODEL_URI, SPIN_EVAL_OUTPUT and "
            "SPIN_ITERATION and must write results.json there; default: the built-in "
            "`python -m spin_runtime evaluate` (exact match, real-answer log-likelihood).",
            min_length=1,
        ),
    ] = None
    image: Annotated[str | None, desc("Image for a custom command.", min_length=1)] = None
    baseline: Annotated[bool, desc("At iteration 0, also evaluate θ0 for comparison.")] = True
    max_new_tokens: Annotated[int, desc("Token limit of greedy answers.", ge=1, le=65536)] = 256
    gpus: Annotated[int, desc("GPUs of the evaluation pod.", ge=0, le=64)] = 1
    resources: Annotated[
        Resources, desc("CPU/memory/ephemeral-storage requests and limits of the evaluation pod.")
    ] = Field(default_factory=Resources)
    metric: Annotated[
        str,
        desc(
            "Metric in results.json that ranks iterations (best alias, stopping). `auto`: the "
            "built-in evaluation's `score`, chosen by the data: exact_match for short answers, "
            "real_logp_per_token (real answers' log-likelihood per token) for free text such as "
            "chat, where exact match is ~0 for every model; exact_match for a custom command "
            "that writes no `score`.",
            min_length=1,
            pattern=r"^[A-Za-z0-9_./-]+$",
        ),
    ] = "auto"
    mode: Annotated[Literal["max", "min"], desc("Whether a higher or lower metric is better.")] = (
        "max"
    )


class ControlArmSpec(Model):
    """An equal-compute SFT control: does SPIN beat plain SFT continued for the same steps?"""

    enabled: Annotated[
        bool,
        desc(
            "Per iteration, beside SPIN's training Job, train a plain SFT model (cross-entropy "
            "on the real answers) for the same optimizer steps on the same prompts, continuing "
            "from the previous control checkpoint (θ0 at iteration 0), and evaluate it by the "
            "same evaluation. Status, the ControlArm condition and MLflow (`control/` metrics) "
            "compare both arms; the best alias stays on SPIN's models.",
        ),
    ] = False
    learning_rate: Annotated[
        float | None,
        desc(
            "Peak learning rate of the SFT control; default: SPIN's learning rate of the "
            "iteration (same optimizer, schedule, batch and epochs either way).",
            gt=0,
        ),
    ] = None


class StoppingSpec(Model):
    """Early stopping: SPIN can regress in later iterations (e.g. with too high a learning rate)."""

    patience: Annotated[
        int | None,
        desc("Stop when the evaluation metric has not improved for this many iterations.", ge=1),
    ] = None
    min_delta: Annotated[float, desc("Smallest change that counts as an improvement.", ge=0)] = 0.0
