"""Step 2 of each iteration, training (`spec.training`): the torchrun topology, SPIN's
hyperparameters (per iteration where the paper varies them) and the optional LoRA adapter.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from spin_operator.api.base import FieldError, Model, desc, raise_all
from spin_operator.api.fields import MAX_ITERATIONS, QUANTITY
from spin_operator.api.scheduling import Resources


class PeftSpec(Model):
    """A LoRA adapter on θt (peft) instead of full fine-tuning; θt+1 is published merged, the adapter in iter-t/model/adapter."""

    # θt stays the reference and the fresh adapter is zero, so SPIN's first loss is still ln 2;
    # generation, evaluation and the next iteration load the merged checkpoint unchanged.

    method: Annotated[Literal["lora"], desc("Adapter type.")] = "lora"
    rank: Annotated[int, desc("LoRA rank r.", ge=1, le=4096)] = 16
    alpha: Annotated[
        int, desc("LoRA alpha; the update is scaled by alpha / rank.", ge=1, le=65536)
    ] = 32
    dropout: Annotated[float, desc("Dropout on the adapter's input.", ge=0, lt=1)] = 0.0
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]],
        desc(
            "Module names to adapt (e.g. q_proj, v_proj), or [all-linear]: every linear layer "
            "but the output head.",
            min_length=1,
            max_length=64,
        ),
    ] = ["all-linear"]  # pydantic copies it per object; a default_factory would not reach the CRD

    @model_validator(mode="after")
    def _check_targets(self) -> PeftSpec:
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise FieldError("targetModules", "all-linear cannot be combined with module names")
        return self


class TrainingSpec(Model):
    """Step 2 of each iteration: θt+1 learns to prefer the real answers over θt's own."""

    image: Annotated[
        str | None, desc("Runtime image; defaults to the operator's runtime image.", min_length=1)
    ] = None
    nodes: Annotated[int, desc("Pods (nodes) of the torchrun job.", ge=1, le=512)] = 1
    gpus_per_node: Annotated[int, desc("GPUs per node.", ge=0, le=64)] = 1
    processes_per_node: Annotated[
        int | None,
        desc("torchrun processes per node; defaults to gpusPerNode (1 when no GPU).", ge=1, le=64),
    ] = None
    beta: Annotated[float, desc("SPIN β: the loss temperature.", gt=0, le=100)] = 0.1
    beta_per_iteration: Annotated[
        list[Annotated[float, Field(gt=0, le=100)]] | None,
        desc(
            "β of iteration t at index t; iterations past the list use its last value "
            "(the official scripts raise β to 5.0 in the last iteration).",
            min_length=1,
            max_length=MAX_ITERATIONS,
        ),
    ] = None
    learning_rate: Annotated[float, desc("Peak learning rate.", gt=0, le=1)] = 5e-7
    learning_rate_per_iteration: Annotated[
        list[Annotated[float, Field(gt=0, le=1)]] | None,
        desc(
            "Learning rate of iteration t at index t; later iterations use the last value "
            "(paper: 5e-7, 5e-7, 1e-7, ...).",
            min_length=1,
            max_length=MAX_ITERATIONS,
        ),
    ] = None
    epochs: Annotated[int, desc("Epochs over the iteration's pairs.", ge=1, le=100)] = 2
    global_batch_size: Annotated[
        int, desc("Pairs per optimizer step across all processes.", ge=1)
    ] = 64
    micro_batch_size: Annotated[int, desc("Pairs per process per forward pass.", ge=1)] = 1
    max_length: Annotated[int, desc("Max tokens of prompt + response.", ge=2, le=1048576)] = 1024
    max_prompt_length: Annotated[int, desc("Max prompt tokens (must be < maxLength).", ge=1)] = 512
    optimizer: Annotated[Literal["rmsprop", "adamw"], desc("Optimizer (paper: RMSprop).")] = (
        "rmsprop"
    )
    weight_decay: Annotated[float, desc("Weight decay.", ge=0, le=1)] = 0.0
    lr_scheduler: Annotated[
        Literal["linear", "cosine", "constant"], desc("Schedule after warmup.")
    ] = "linear"
    warmup_ratio: Annotated[float, desc("Fraction of steps spent warming up.", ge=0, lt=1)] = 0.1
    max_grad_norm: Annotated[float, desc("Gradient clipping norm; 0 disables.", ge=0)] = 1.0
    precision: Annotated[
        Literal["auto", "bf16", "fp32"], desc("auto: bf16 on GPU, fp32 on CPU.")
    ] = "auto"
    gradient_checkpointing: Annotated[bool, desc("Trade compute for activation memory.")] = False
    peft: Annotated[
        PeftSpec | None,
        desc("Train a LoRA adapter instead of all weights (unset: full fine-tuning)."),
    ] = None
    prompt_sharing: Annotated[
        Literal["auto", "on", "off"],
        desc(
            "Score each pair as one row (the prompt computed once) instead of two. auto: only "
            "when checked exact for the model at start (full-attention layers, no window "
            "shorter than a row, shared and separate layouts within 1e-4 nats on the run's own "
            "pairs); on: the same check, but the training Job fails when it does not pass."
        ),
    ] = "auto"
    truncated_answers: Annotated[
        Literal["keep", "drop"],
        desc(
            "Generated answers cut by maxNewTokens: keep trains on them as sampled (no EOS "
            "appended), drop leaves their pairs out."
        ),
    ] = "keep"
    drop_identical_pairs: Annotated[
        bool,
        desc(
            "Leave out pairs whose generated answer is token for token the real one: they add "
            "no gradient but dilute each step's mean and count as wrong in the accuracy. "
            "Counted in the metrics either way."
        ),
    ] = True
    strategy: Annotated[
        Literal["auto", "ddp", "fsdp"],
        desc("auto: DDP when the model fits on one GPU, else FSDP2."),
    ] = "auto"
    mix_previous_iterations: Annotated[
        int,
        desc(
            "Previous iterations whose generated answers are mixed into the training pairs "
            "(1 as in the paper).",
            ge=0,
            le=MAX_ITERATIONS,
        ),
    ] = 1
    seed: Annotated[int, desc("Data order and initialisation seed.", ge=0)] = 0
    shm_size: Annotated[
        str,
        desc("Size of the /dev/shm memory volume for data loaders and NCCL.", pattern=QUANTITY),
    ] = "16Gi"
    resources: Annotated[Resources, desc("Extra requests/limits for training pods.")] = Field(
        default_factory=Resources
    )

    @property
    def procs_per_node(self) -> int:
        return self.processes_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def beta_for(self, iteration: int) -> float:
        return _per_iteration(self.beta_per_iteration, iteration, self.beta)

    def learning_rate_for(self, iteration: int) -> float:
        return _per_iteration(self.learning_rate_per_iteration, iteration, self.learning_rate)

    @model_validator(mode="after")
    def _check_batches(self) -> TrainingSpec:
        errors: list[FieldError] = []
        if self.max_prompt_length >= self.max_length:
            errors.append(
                FieldError(
                    "maxPromptLength",
                    f"must be less than maxLength ({self.max_length}), got {self.max_prompt_length}",
                )
            )
        per_step = self.micro_batch_size * self.world_size
        if self.global_batch_size % per_step:
            errors.append(
                FieldError(
                    "globalBatchSize",
                    "must be a multiple of microBatchSize × nodes × processesPerNode "
                    f"(gpusPerNode unless set) = {per_step}, got {self.global_batch_size}",
                )
            )
        raise_all(errors)
        return self


def _per_iteration(values: list[float] | None, iteration: int, default: float) -> float:
    if not values:
        return default
    return values[min(iteration, len(values) - 1)]
