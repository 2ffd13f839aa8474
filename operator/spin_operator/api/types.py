"""The SPINRun API (`selfplay.dev/v1alpha1`): the single source of truth.

The CRD (`spinctl crd`, `crds/`), the reference (`docs/api.md`) and `spinctl validate` are all
generated from these models. Field names follow Kubernetes conventions (camelCase on the wire);
every default lives here and is written into the CRD so `kubectl get -o yaml` shows it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from spin_operator.api.kube import (
    DATA_KEY,
    label_key_error,
    label_value_error,
    quantity_value,
    s3_uri_error,
)

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
MAX_ITERATIONS = 99
MAX_RETRIES = 9
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"

_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
S3_OR_PATH = rf"^(s3://{_BUCKET}(/.*)?|file:///.*|/.*|\.{{1,2}}(/.*)?)$"
MODEL_URI = rf"^(s3://{_BUCKET}(/.*)?|file:///.*|/.*|\.{{1,2}}(/.*)?|[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?)$"
# A data file, a directory (trailing `/`, or a last segment without a suffix, which may also be a
# name prefix of shards such as data/train_sft-), or a glob in the last segment (train_sft-*).
DATASET_URI = (
    rf"^(s3://{_BUCKET}/.+|file:///.+|/.+|\.{{1,2}}/.+|[^:]+)"
    r"(\.(jsonl|json|parquet)|/|/[^/.*]+|/[^/]*\*[^/]*)$"
)
HTTP_OR_PATH = r"^(https?://[^\s]+|file:///.*|/.*|sqlite:///.+|databricks.*)$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
# core/v1 resource.Quantity without a sign (a negative request or limit is refused): a number with
# at most one '.', then one binary (Ki..Ei), decimal (n, u, m, k, M..E) or exponent suffix.
QUANTITY = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][-+]?[0-9]+)?$"

# What each pattern means, for error messages a person can act on.
PATTERN_HELP = {
    S3_OR_PATH: "s3://bucket/prefix or a local path",
    MODEL_URI: "s3://bucket/prefix, a local path, or a hub id such as org/model",
    DATASET_URI: (
        "s3://bucket/key or a local path: a .jsonl, .json or .parquet file, a directory "
        "(ending in /), a name prefix of shards (data/train_sft-) or a glob (data/train_sft-*)"
    ),
    HTTP_OR_PATH: "http(s):// URL, sqlite:///path or a local path",
    DNS_SUBDOMAIN: "Kubernetes name: lowercase letters, digits, '-' and '.'",
    QUANTITY: "a non-negative Kubernetes quantity such as 8, 500m, 1.5 or 64Gi",
    DATA_KEY: "a Secret key: letters, digits, '-', '_' and '.'",
}


# Model, FieldError and friends live in base.py so api/pod.py can build on them too.
from spin_operator.api.base import FieldError, FieldErrors, Model, _desc, raise_all  # noqa: E402, F401

# --------------------------------------------------------------------------- references


class SecretRef(Model):
    """A reference to a Secret in the SPINRun's namespace. Values never appear in the spec."""

    name: Annotated[str, _desc("Secret name.", pattern=DNS_SUBDOMAIN, max_length=253)]


class S3CredentialsSecretRef(SecretRef):
    """Secret holding S3 credentials; exposed to Jobs as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY."""

    access_key_id_key: Annotated[
        str,
        _desc(
            "Key of the access key id in the Secret.",
            min_length=1,
            max_length=253,
            pattern=DATA_KEY,
        ),
    ] = "AWS_ACCESS_KEY_ID"
    secret_access_key_key: Annotated[
        str,
        _desc(
            "Key of the secret access key in the Secret.",
            min_length=1,
            max_length=253,
            pattern=DATA_KEY,
        ),
    ] = "AWS_SECRET_ACCESS_KEY"


class Toleration(Model):
    """A pod toleration (core/v1 Toleration)."""

    key: Annotated[str | None, _desc("Taint key; empty with Exists matches every taint.")] = None
    operator: Annotated[Literal["Exists", "Equal"], _desc("Exists or Equal.")] = "Equal"
    value: Annotated[str | None, _desc("Taint value for Equal.")] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        _desc("Taint effect to match; empty matches all."),
    ] = None
    toleration_seconds: Annotated[
        int | None, _desc("For NoExecute: how long the pod stays bound.", ge=0)
    ] = None

    @model_validator(mode="after")
    def _as_the_api_server(self) -> Toleration:
        """The API server's own toleration rules (ValidateTolerations), refused here first."""
        errors = []
        if self.key:
            if (why := label_key_error(self.key)) is not None:
                errors.append(FieldError("key", why))
        elif self.operator != "Exists":
            errors.append(
                FieldError(
                    "operator",
                    "must be Exists when key is empty (an empty key with Exists matches every taint)",
                )
            )
        if self.operator == "Exists" and self.value:
            errors.append(FieldError("value", "must be empty when operator is Exists"))
        elif (
            self.operator == "Equal"
            and self.value
            and (why := label_value_error(self.value)) is not None
        ):
            errors.append(FieldError("value", why))
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            errors.append(
                FieldError(
                    "tolerationSeconds",
                    "needs effect NoExecute (only NoExecute evicts after a while)",
                )
            )
        raise_all(errors)
        return self


class Resources(Model):
    """Container resource requests and limits (quantities as in core/v1)."""

    requests: Annotated[
        dict[str, Annotated[str, Field(pattern=QUANTITY)]],
        _desc("Resource requests, e.g. {cpu: '8', memory: 64Gi}."),
    ] = Field(default_factory=dict)
    limits: Annotated[
        dict[str, Annotated[str, Field(pattern=QUANTITY)]],
        _desc("Resource limits. GPUs are added from gpusPerReplica/gpusPerNode."),
    ] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        errors = []
        for name, request in sorted(self.requests.items()):
            limit = self.limits.get(name)
            if limit is not None and quantity_value(request) > quantity_value(limit):
                errors.append(
                    FieldError(
                        f"requests.{name}", f"{request} is above the limit {limit} (limits.{name})"
                    )
                )
        raise_all(errors)
        return self


from spin_operator.api.pod import PodSpec  # noqa: E402

# --------------------------------------------------------------------------- spec sections


class UriModel(Model):
    """A section with a `uri` (s3:// or a path): an s3:// URI has no empty, `.` or `..` key
    segment (S3 keys are not paths: `s3://bkt/a/../b` would name another key)."""

    @field_validator("uri", check_fields=False)
    @classmethod
    def _s3_segments(cls, uri: str | None) -> str | None:
        if (why := s3_uri_error(uri)) is not None:
            raise ValueError(why)
        return uri


class ModelSpec(UriModel):
    """The base model θ0 that iteration 0 starts from (typically an SFT checkpoint)."""

    uri: Annotated[
        str,
        _desc(
            "HF-format checkpoint: s3://bucket/prefix, a local path, or a hub id "
            "(e.g. alignment-handbook/zephyr-7b-sft-full).",
            pattern=MODEL_URI,
            max_length=1024,
        ),
    ]
    revision: Annotated[
        str | None,
        _desc(
            "Hub revision (commit sha, tag or branch) of a hub-id uri, pinned so every pod and "
            "iteration starts from the same weights.",
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
            max_length=255,
        ),
    ] = None
    tokenizer: Annotated[
        str | None,
        _desc("Tokenizer to use instead of the model's own.", pattern=MODEL_URI, max_length=1024),
    ] = None
    chat_template: Annotated[
        str | None,
        _desc(
            "Jinja chat template file (s3:// or path) overriding the tokenizer's. "
            "Generation, training and evaluation all format prompts with it.",
            pattern=S3_OR_PATH,
            max_length=1024,
        ),
    ] = None


class DatasetSpec(UriModel):
    """The SFT dataset: prompts and their human (real) responses."""

    uri: Annotated[
        str,
        _desc(
            "JSONL, JSON or parquet data (s3:// or path) with OpenAI-style `messages` or "
            "`prompt`/`response` fields: one file, a directory of shards (ending in /), a name "
            "prefix of shards (data/train_sft-) or a glob (data/train_sft-*). See docs/datasets.md.",
            pattern=DATASET_URI,
            max_length=1024,
        ),
    ]
    max_samples: Annotated[
        int, _desc("Training prompts to use after shuffling; 0 uses all.", ge=0)
    ] = 0
    eval_samples: Annotated[
        int,
        _desc(
            "Held-out prompts (taken first after shuffling, never trained on) for the "
            "per-epoch SPIN metrics and the built-in evaluation.",
            ge=0,
        ),
    ] = 256
    seed: Annotated[
        int, _desc("Seed of the shuffle: every iteration sees the same prompts.", ge=0)
    ] = 0
    max_skipped_fraction: Annotated[
        float,
        _desc(
            "Largest fraction of rows that may be skipped as unusable (not UTF-8, not JSON, no "
            "assistant answer, ...; see docs/datasets.md) before the run fails, before any "
            "generation, with the reasons and line numbers. 0 tolerates no bad row.",
            ge=0,
            le=1,
        ),
    ] = 0.01
    check_resources: Annotated[
        Resources,
        _desc(
            "Requests/limits of the check Job that parses the dataset and checks θ0 before "
            "iteration 0's generation (one CPU pod, no GPU). Empty: requests cpu 500m and "
            "memory 1Gi, limit memory 4Gi. The dataset's parsed rows are held in memory: raise "
            "memory for a large dataset."
        ),
    ] = Field(default_factory=Resources)


class GenerationSpec(Model):
    """Step 1 of each iteration: θt answers every prompt (an Indexed Job, one shard per pod)."""

    image: Annotated[
        str | None, _desc("Runtime image; defaults to the operator's runtime image.", min_length=1)
    ] = None
    backend: Annotated[
        Literal["vllm", "transformers"],
        _desc("vllm for GPUs; transformers for CPU or small models."),
    ] = "vllm"
    replicas: Annotated[int, _desc("Pods (shards) generating in parallel.", ge=1, le=1024)] = 1
    gpus_per_replica: Annotated[
        int, _desc("GPUs per pod; vLLM uses them for tensor parallelism.", ge=0, le=64)
    ] = 1
    temperature: Annotated[
        float, _desc("Sampling temperature (the paper's vLLM path: 1.0; 0 is greedy).", ge=0, le=10)
    ] = 1.0
    top_p: Annotated[float, _desc("Nucleus sampling mass.", gt=0, le=1)] = 1.0
    top_k: Annotated[int, _desc("Top-k sampling; -1 disables.", ge=-1)] = -1
    max_new_tokens: Annotated[
        int, _desc("Token limit of each generated answer.", ge=1, le=65536)
    ] = 256
    seed: Annotated[int, _desc("Sampling seed (offset by iteration).", ge=0)] = 0
    batch_size: Annotated[int, _desc("Prompts per batch (transformers backend).", ge=1)] = 64
    dtype: Annotated[
        Literal["auto", "bfloat16", "float16", "float32"], _desc("Weights dtype for generation.")
    ] = "auto"
    resources: Annotated[Resources, _desc("Extra requests/limits for generation pods.")] = Field(
        default_factory=Resources
    )


class PeftSpec(Model):
    """A LoRA adapter on θt (peft) instead of full fine-tuning; θt+1 is published merged, the adapter in iter-t/model/adapter."""

    # θt stays the reference and the fresh adapter is zero, so SPIN's first loss is still ln 2;
    # generation, evaluation and the next iteration load the merged checkpoint unchanged.

    method: Annotated[Literal["lora"], _desc("Adapter type.")] = "lora"
    rank: Annotated[int, _desc("LoRA rank r.", ge=1, le=4096)] = 16
    alpha: Annotated[
        int, _desc("LoRA alpha; the update is scaled by alpha / rank.", ge=1, le=65536)
    ] = 32
    dropout: Annotated[float, _desc("Dropout on the adapter's input.", ge=0, lt=1)] = 0.0
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")]],
        _desc(
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
        str | None, _desc("Runtime image; defaults to the operator's runtime image.", min_length=1)
    ] = None
    nodes: Annotated[int, _desc("Pods (nodes) of the torchrun job.", ge=1, le=512)] = 1
    gpus_per_node: Annotated[int, _desc("GPUs per node.", ge=0, le=64)] = 1
    processes_per_node: Annotated[
        int | None,
        _desc("torchrun processes per node; defaults to gpusPerNode (1 when no GPU).", ge=1, le=64),
    ] = None
    beta: Annotated[float, _desc("SPIN β: the loss temperature.", gt=0, le=100)] = 0.1
    beta_per_iteration: Annotated[
        list[Annotated[float, Field(gt=0, le=100)]] | None,
        _desc(
            "β of iteration t at index t; iterations past the list use its last value "
            "(the official scripts raise β to 5.0 in the last iteration).",
            min_length=1,
            max_length=MAX_ITERATIONS,
        ),
    ] = None
    learning_rate: Annotated[float, _desc("Peak learning rate.", gt=0, le=1)] = 5e-7
    learning_rate_per_iteration: Annotated[
        list[Annotated[float, Field(gt=0, le=1)]] | None,
        _desc(
            "Learning rate of iteration t at index t; later iterations use the last value "
            "(paper: 5e-7, 5e-7, 1e-7, ...).",
            min_length=1,
            max_length=MAX_ITERATIONS,
        ),
    ] = None
    epochs: Annotated[int, _desc("Epochs over the iteration's pairs.", ge=1, le=100)] = 2
    global_batch_size: Annotated[
        int, _desc("Pairs per optimizer step across all processes.", ge=1)
    ] = 64
    micro_batch_size: Annotated[int, _desc("Pairs per process per forward pass.", ge=1)] = 1
    max_length: Annotated[int, _desc("Max tokens of prompt + response.", ge=2, le=1048576)] = 1024
    max_prompt_length: Annotated[int, _desc("Max prompt tokens (must be < maxLength).", ge=1)] = 512
    optimizer: Annotated[Literal["rmsprop", "adamw"], _desc("Optimizer (paper: RMSprop).")] = (
        "rmsprop"
    )
    weight_decay: Annotated[float, _desc("Weight decay.", ge=0, le=1)] = 0.0
    lr_scheduler: Annotated[
        Literal["linear", "cosine", "constant"], _desc("Schedule after warmup.")
    ] = "linear"
    warmup_ratio: Annotated[float, _desc("Fraction of steps spent warming up.", ge=0, lt=1)] = 0.1
    max_grad_norm: Annotated[float, _desc("Gradient clipping norm; 0 disables.", ge=0)] = 1.0
    precision: Annotated[
        Literal["auto", "bf16", "fp32"], _desc("auto: bf16 on GPU, fp32 on CPU.")
    ] = "auto"
    gradient_checkpointing: Annotated[bool, _desc("Trade compute for activation memory.")] = False
    peft: Annotated[
        PeftSpec | None,
        _desc("Train a LoRA adapter instead of all weights (unset: full fine-tuning)."),
    ] = None
    prompt_sharing: Annotated[
        Literal["auto", "on", "off"],
        _desc(
            "Score each pair as one row (the prompt computed once) instead of two. auto: only "
            "when checked exact for the model at start (full-attention layers, no window "
            "shorter than a row, shared and separate layouts within 1e-4 nats on the run's own "
            "pairs); on: the same check, but the training Job fails when it does not pass."
        ),
    ] = "auto"
    truncated_answers: Annotated[
        Literal["keep", "drop"],
        _desc(
            "Generated answers cut by maxNewTokens: keep trains on them as sampled (no EOS "
            "appended), drop leaves their pairs out."
        ),
    ] = "keep"
    drop_identical_pairs: Annotated[
        bool,
        _desc(
            "Leave out pairs whose generated answer is token for token the real one: they add "
            "no gradient but dilute each step's mean and count as wrong in the accuracy. "
            "Counted in the metrics either way."
        ),
    ] = True
    strategy: Annotated[
        Literal["auto", "ddp", "fsdp"],
        _desc("auto: DDP when the model fits on one GPU, else FSDP2."),
    ] = "auto"
    mix_previous_iterations: Annotated[
        int,
        _desc(
            "Previous iterations whose generated answers are mixed into the training pairs "
            "(1 as in the paper).",
            ge=0,
            le=MAX_ITERATIONS,
        ),
    ] = 1
    seed: Annotated[int, _desc("Data order and initialisation seed.", ge=0)] = 0
    shm_size: Annotated[
        str,
        _desc("Size of the /dev/shm memory volume for data loaders and NCCL.", pattern=QUANTITY),
    ] = "16Gi"
    resources: Annotated[Resources, _desc("Extra requests/limits for training pods.")] = Field(
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


class EvaluationSpec(Model):
    """Optional step 3 of each iteration: score θt+1 on the held-out prompts."""

    enabled: Annotated[bool, _desc("Run an evaluation Job after each training step.")] = True
    command: Annotated[
        list[Annotated[str, Field(min_length=1)]] | None,
        _desc(
            "Custom evaluation argv (no shell). It gets SPIN_MODEL_URI, SPIN_EVAL_OUTPUT and "
            "SPIN_ITERATION and must write results.json there; default: the built-in "
            "`python -m spin_runtime evaluate` (exact match, real-answer log-likelihood).",
            min_length=1,
        ),
    ] = None
    image: Annotated[str | None, _desc("Image for a custom command.", min_length=1)] = None
    baseline: Annotated[bool, _desc("At iteration 0, also evaluate θ0 for comparison.")] = True
    max_new_tokens: Annotated[int, _desc("Token limit of greedy answers.", ge=1, le=65536)] = 256
    gpus: Annotated[int, _desc("GPUs of the evaluation pod.", ge=0, le=64)] = 1
    resources: Annotated[
        Resources, _desc("CPU/memory/ephemeral-storage requests and limits of the evaluation pod.")
    ] = Field(default_factory=Resources)
    metric: Annotated[
        str,
        _desc(
            "Metric in results.json that ranks iterations (best alias, stopping). `auto`: the "
            "built-in evaluation's `score`, chosen by the data: exact_match for short answers, "
            "real_logp_per_token (real answers' log-likelihood per token) for free text such as "
            "chat, where exact match is ~0 for every model; exact_match for a custom command "
            "that writes no `score`.",
            min_length=1,
            pattern=r"^[A-Za-z0-9_./-]+$",
        ),
    ] = "auto"
    mode: Annotated[Literal["max", "min"], _desc("Whether a higher or lower metric is better.")] = (
        "max"
    )


class ControlArmSpec(Model):
    """An equal-compute SFT control: does SPIN beat plain SFT continued for the same steps?"""

    enabled: Annotated[
        bool,
        _desc(
            "Per iteration, beside SPIN's training Job, train a plain SFT model (cross-entropy "
            "on the real answers) for the same optimizer steps on the same prompts, continuing "
            "from the previous control checkpoint (θ0 at iteration 0), and evaluate it by the "
            "same evaluation. Status, the ControlArm condition and MLflow (`control/` metrics) "
            "compare both arms; the best alias stays on SPIN's models.",
        ),
    ] = False
    learning_rate: Annotated[
        float | None,
        _desc(
            "Peak learning rate of the SFT control; default: SPIN's learning rate of the "
            "iteration (same optimizer, schedule, batch and epochs either way).",
            gt=0,
        ),
    ] = None


class StoppingSpec(Model):
    """Early stopping: SPIN can regress in later iterations (e.g. with too high a learning rate)."""

    patience: Annotated[
        int | None,
        _desc("Stop when the evaluation metric has not improved for this many iterations.", ge=1),
    ] = None
    min_delta: Annotated[float, _desc("Smallest change that counts as an improvement.", ge=0)] = 0.0


class StorageSpec(UriModel):
    """Where checkpoints, generated data and manifests live."""

    uri: Annotated[
        str | None,
        _desc(
            "Prefix (s3://bucket/prefix or a path); the run writes under <uri>/<namespace>/<name>. "
            "Defaults to the operator's setting.",
            pattern=S3_OR_PATH,
            max_length=1024,
        ),
    ] = None
    endpoint: Annotated[
        str | None,
        _desc(
            "S3 endpoint URL for S3-compatible stores; the operator accepts only its default or endpoints its admin allows.",
            pattern=r"^https?://[^\s]+$",
        ),
    ] = None
    region: Annotated[str | None, _desc("S3 region.", pattern=r"^[a-z0-9-]+$")] = None
    credentials_secret: Annotated[
        S3CredentialsSecretRef | None,
        _desc("Secret with S3 credentials; none uses the pod's identity."),
    ] = None


class TrackingSpec(Model):
    """MLflow: one parent run per SPINRun, one nested run per iteration, a model version each."""

    uri: Annotated[
        str | None,
        _desc(
            "MLflow tracking URI; defaults to the operator's setting. The operator accepts only its default or URIs its admin allows.",
            pattern=HTTP_OR_PATH,
        ),
    ] = None
    experiment: Annotated[
        str | None,
        _desc(
            "Experiment name; defaults to the SPINRun's namespace. The operator accepts the namespace or `<namespace>/...` (or a name its admin allows).",
            min_length=1,
            max_length=500,
        ),
    ] = None
    registered_model: Annotated[
        str | None,
        _desc(
            "Registered model name for the iterations' checkpoints; defaults to `<namespace>.<SPINRun name>`. The operator accepts `<namespace>.<name>` (or a name its admin allows).",
            min_length=1,
            max_length=256,
        ),
    ] = None
    credentials_secret: Annotated[
        SecretRef | None,
        _desc("Secret with MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN keys."),
    ] = None


class SchedulingSpec(Model):
    """Where and how child pods are scheduled."""

    queue_name: Annotated[
        str | None,
        _desc(
            "Kueue LocalQueue (sets kueue.x-k8s.io/queue-name on Jobs).",
            pattern=DNS_SUBDOMAIN,
            max_length=63,
        ),
    ] = None
    priority_class_name: Annotated[
        str | None, _desc("PriorityClass of child pods.", pattern=DNS_SUBDOMAIN, max_length=253)
    ] = None
    node_selector: Annotated[dict[str, str], _desc("Node selector of child pods.")] = Field(
        default_factory=dict
    )
    tolerations: Annotated[list[Toleration], _desc("Tolerations of child pods.")] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _labels(self) -> SchedulingSpec:
        errors = []
        for key, value in self.node_selector.items():
            if (why := label_key_error(key)) is not None:
                errors.append(FieldError(f"nodeSelector.{key}", f"key: {why}"))
            if (why := label_value_error(value)) is not None:
                errors.append(FieldError(f"nodeSelector.{key}", why))
        raise_all(errors)
        return self

    service_account_name: Annotated[
        str | None,
        _desc(
            "ServiceAccount of child pods (e.g. for IRSA/workload identity); the operator accepts only names its admin allows (chart value security.serviceAccounts).",
            pattern=DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    gpu_resource_name: Annotated[
        str, _desc("Extended resource name of a GPU.", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    ] = "nvidia.com/gpu"


class FailurePolicySpec(Model):
    """How failed steps are retried."""

    max_retries: Annotated[
        int, _desc("New Jobs created for a failed step before the run fails.", ge=0, le=MAX_RETRIES)
    ] = 2
    backoff_limit: Annotated[
        int,
        _desc(
            "Pod restarts within one Job before it fails: per shard for generation (backoffLimitPerIndex); "
            "not used by multi-node training, whose ranks restart together as the next Job.",
            ge=0,
            le=100,
        ),
    ] = 0
    active_deadline_seconds: Annotated[int | None, _desc("Wall-clock limit of each Job.", ge=1)] = (
        None
    )
    pending_timeout_seconds: Annotated[
        int,
        _desc(
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
        _desc("Retain keeps checkpoints and data in storage; Delete removes the run prefix."),
    ] = "Retain"
    finished_jobs: Annotated[
        Literal["Delete", "Retain"],
        _desc(
            "Delete removes a step's Jobs and their pods once the status records the step as "
            "succeeded (so they do not pile up); Retain keeps them until the SPINRun is deleted "
            "(for debugging). Jobs of a step that failed the run are always kept.",
        ),
    ] = "Delete"


class SPINRunSpec(Model):
    """Desired state of a SPIN run: the model, the data, and how each iteration runs."""

    model: Annotated[ModelSpec, _desc("Base model θ0.")]
    dataset: Annotated[DatasetSpec, _desc("SFT dataset.")]
    iterations: Annotated[int, _desc("SPIN iterations to run.", ge=1, le=MAX_ITERATIONS)] = 3
    generation: Annotated[GenerationSpec, _desc("Generation step.")] = Field(
        default_factory=GenerationSpec
    )
    training: Annotated[TrainingSpec, _desc("Training step.")] = Field(default_factory=TrainingSpec)
    evaluation: Annotated[EvaluationSpec, _desc("Evaluation step.")] = Field(
        default_factory=EvaluationSpec
    )
    stopping: Annotated[StoppingSpec, _desc("Early stopping rule.")] = Field(
        default_factory=StoppingSpec
    )
    control_arm: Annotated[
        ControlArmSpec, _desc("Equal-compute SFT control arm (off by default).")
    ] = Field(default_factory=ControlArmSpec)
    storage: Annotated[StorageSpec, _desc("Artifact storage.")] = Field(default_factory=StorageSpec)
    tracking: Annotated[TrackingSpec, _desc("MLflow tracking.")] = Field(
        default_factory=TrackingSpec
    )
    scheduling: Annotated[SchedulingSpec, _desc("Pod scheduling.")] = Field(
        default_factory=SchedulingSpec
    )
    pod: Annotated[
        PodSpec,
        _desc(
            "Pod customization of every Job: env, pull secrets, volumes, model cache, affinity, labels."
        ),
    ] = Field(default_factory=PodSpec)
    failure_policy: Annotated[FailurePolicySpec, _desc("Retries.")] = Field(
        default_factory=FailurePolicySpec
    )
    suspend: Annotated[
        bool, _desc("Suspend running Jobs and start nothing new; false resumes.")
    ] = False
    retention: Annotated[RetentionSpec, _desc("Artifact retention.")] = Field(
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


# --------------------------------------------------------------------------- status

Phase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]
Stage = Literal["Checking", "Generating", "Training", "Evaluating", "Done"]


class Condition(Model):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: Annotated[
        str, _desc("Ready, Complete, Progressing, Suspended, Failed, SpecChangeRefused, ...")
    ]
    status: Annotated[Literal["True", "False", "Unknown"], _desc("True, False or Unknown.")]
    reason: Annotated[str, _desc("CamelCase machine-readable reason.")] = ""
    message: Annotated[str, _desc("Human-readable details.")] = ""
    last_transition_time: Annotated[
        str | None, _desc("RFC 3339 time of the last status change.")
    ] = None
    observed_generation: Annotated[int | None, _desc("Spec generation the condition reflects.")] = (
        None
    )


class StepStatus(Model):
    """One step (check, generate, train or evaluate) of an iteration."""

    job_name: Annotated[str | None, _desc("Name of the current (latest) Job of this step.")] = None
    attempts: Annotated[int, _desc("Jobs created for this step so far.", ge=0)] = 0
    phase: Annotated[
        Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"], _desc("Step phase.")
    ] = "Pending"
    start_time: Annotated[str | None, _desc("When the first Job of the step was created.")] = None
    completion_time: Annotated[str | None, _desc("When the step finished.")] = None
    message: Annotated[str | None, _desc("Last failure reason, if any.")] = None


class ControlArmStatus(Model):
    """The SFT control of one iteration and how SPIN's model compares to it."""

    model_uri: Annotated[str | None, _desc("The control model this iteration starts from.")] = None
    output_model_uri: Annotated[str | None, _desc("The control checkpoint it produced.")] = None
    metrics: Annotated[dict[str, float], _desc("The control's evaluation results.")] = Field(
        default_factory=dict
    )
    metric: Annotated[
        str | None, _desc("The metric both arms are compared by (evaluation.metric).")
    ] = None
    spin_score: Annotated[float | None, _desc("SPIN's model (θt+1) on that metric.")] = None
    control_score: Annotated[float | None, _desc("The control model on that metric.")] = None
    spin_advantage: Annotated[
        float | None,
        _desc(
            "How much SPIN beat the control: spinScore - controlScore (negated for mode min); negative when the control is ahead."
        ),
    ] = None


class IterationStatus(Model):
    """One SPIN iteration t: θt -> θt+1."""

    iteration: Annotated[int, _desc("Iteration index t (0-based).", ge=0)]
    stage: Annotated[Stage, _desc("Current stage of this iteration.")] = "Generating"
    check: Annotated[
        StepStatus | None,
        _desc(
            "Iteration 0 only: the check of the dataset and θ0 (a CPU Job) that runs before any "
            "generation."
        ),
    ] = None
    generate: Annotated[StepStatus, _desc("Generation step.")] = Field(default_factory=StepStatus)
    train: Annotated[StepStatus, _desc("Training step.")] = Field(default_factory=StepStatus)
    evaluate: Annotated[StepStatus, _desc("Evaluation step.")] = Field(default_factory=StepStatus)
    control_train: Annotated[
        StepStatus | None, _desc("SFT control training step (controlArm.enabled).")
    ] = None
    control_evaluate: Annotated[
        StepStatus | None, _desc("SFT control evaluation step (controlArm.enabled).")
    ] = None
    control: Annotated[
        ControlArmStatus | None,
        _desc("The SFT control arm and SPIN's score against it (controlArm.enabled)."),
    ] = None
    start_time: Annotated[str | None, _desc("When the iteration started.")] = None
    completion_time: Annotated[str | None, _desc("When the iteration finished.")] = None
    model_uri: Annotated[str | None, _desc("θt, the model this iteration starts from.")] = None
    output_model_uri: Annotated[str | None, _desc("θt+1, the checkpoint it produced.")] = None
    data_uri: Annotated[str | None, _desc("Generated data of this iteration.")] = None
    metrics: Annotated[
        dict[str, float],
        _desc(
            "Summary metrics (evaluation results): evaluation.metric and score, exact_match, "
            "real_logp_per_token, num_examples, truncation_rate, each also as baseline/<key> for "
            "θ0; every other metric is in MLflow only.",
        ),
    ] = Field(default_factory=dict)
    mlflow_run_id: Annotated[str | None, _desc("Nested MLflow run of this iteration.")] = None


class DatasetStatus(Model):
    """What the dataset check found: rows read, rows usable, rows skipped and why."""

    rows: Annotated[int, _desc("Rows read (blank lines are not rows).", ge=0)] = 0
    usable: Annotated[int, _desc("Rows that parse into a prompt and its answer.", ge=0)] = 0
    skipped: Annotated[int, _desc("Rows skipped as unusable.", ge=0)] = 0
    skipped_by_reason: Annotated[
        dict[str, int], _desc("Skipped rows per reason (e.g. `not JSON`, `empty response`).")
    ] = Field(default_factory=dict)


class MlflowStatus(Model):
    """Where the run is tracked."""

    run_id: Annotated[str | None, _desc("Parent MLflow run id.")] = None
    experiment_id: Annotated[str | None, _desc("MLflow experiment id.")] = None
    url: Annotated[str | None, _desc("Link to the parent run in the MLflow UI.")] = None
    finished: Annotated[
        list[str],
        _desc(
            "Ids of the MLflow runs (parent and iterations) that MLflow confirmed ended, each after "
            "every call its Jobs spooled during an outage was delivered. The operator keeps ending "
            "the others of a finished iteration or run until MLflow confirms."
        ),
    ] = Field(default_factory=list)
    spooled_calls: Annotated[
        int | None,
        _desc(
            "Tracking calls that Jobs spooled while MLflow was unreachable and that are not "
            "delivered yet (0: none pending; unset: no spool checked yet).",
            ge=0,
        ),
    ] = None


class SPINRunStatus(Model):
    """Observed state, written only by the operator."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    phase: Annotated[Phase, _desc("Pending, Running, Suspended, Succeeded or Failed.")] = "Pending"
    iteration: Annotated[
        int, _desc("Current iteration t (0-based): it trains θt into θt+1.", ge=0)
    ] = 0
    stage: Annotated[Stage | None, _desc("Current stage.")] = None
    progress: Annotated[str | None, _desc("Iterations completed out of the total, e.g. 1/3.")] = (
        None
    )
    best_iteration: Annotated[
        int | None, _desc("Iteration whose output model scored best so far (t: its model is θt+1).")
    ] = None
    best_model: Annotated[
        str | None,
        _desc("The best model so far by name, θt+1 for bestIteration t (θ0 is the base)."),
    ] = None
    observed_generation: Annotated[
        int | None, _desc("Last spec generation the operator acted on.")
    ] = None
    conditions: Annotated[list[Condition], _desc("Standard conditions.")] = Field(
        default_factory=list
    )
    iterations: Annotated[list[IterationStatus], _desc("One entry per started iteration.")] = Field(
        default_factory=list
    )
    mlflow: Annotated[MlflowStatus | None, _desc("MLflow tracking.")] = None
    dataset: Annotated[
        DatasetStatus | None,
        _desc("Dataset rows usable and skipped (from the check before iteration 0's generation)."),
    ] = None
    start_time: Annotated[str | None, _desc("When the run started.")] = None
    completion_time: Annotated[str | None, _desc("When the run finished.")] = None
    message: Annotated[str | None, _desc("Human-readable summary of the current state.")] = None
    spec_hash: Annotated[
        str | None, _desc("Digest of the spec fields that cannot change after start.")
    ] = None
