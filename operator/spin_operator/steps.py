"""What each step of a SPIN iteration runs: (spec, iteration, stage) -> `StepPlan`.

Shared by the operator (render.py turns a plan into a Job) and local mode (`spinctl run` starts
the same argv as local processes), so it holds no Kubernetes manifest details: only the runtime
argv of docs/runtime.md, environment, process counts and resource needs. Artifact URIs come from
`spin_common.layout`, the one place that names them.

This module also defines which spec fields may change after a run started (`MUTABLE_FIELDS`)
and the digest of the rest (`spec_digest`): the immutable part is what determines the artifacts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spin_common.layout import RunLayout
from spin_common.train_config import LoraSettings, TrainConfig
from spin_operator.api import types as api
from spin_operator.naming import (
    CHECK,
    CONTROL_KINDS,
    STEP_KINDS,
    StepKind,
    job_name,
    pod_hostname,
    service_name,
)
from spin_operator.settings import POD_CACHE_DIR, Settings

__all__ = [
    "CONTROL_KINDS",
    "CONTROL_OF",
    "MASTER_PORT",
    "MUTABLE_FIELDS",
    "NODE_RANK_ENV",
    "STEP_KINDS",
    "RunRef",
    "SecretKey",
    "StepKind",
    "StepPlan",
    "beside",
    "changed_fields",
    "layout_of",
    "merge_mutable",
    "plan_step",
    "spec_digest",
    "steps_of",
]

# torchrun reads each of its flags from PET_<FLAG> when the flag is absent: the training argv
# carries no topology; the plan's env holds the static part, and render() sets the node rank
# from the pod's completion index (`batch.kubernetes.io/job-completion-index`), local mode from
# its process index. Nothing is rewritten in argv.
NODE_RANK_ENV = "PET_NODE_RANK"
MASTER_PORT = 29500

# Wire paths (relative to spec) that may change while a run is going: they do not change what
# any artifact contains, only when and where Jobs run. Everything else is fixed at start.
MUTABLE_FIELDS: tuple[str, ...] = (
    "suspend",
    "iterations",
    "stopping",
    "failurePolicy",
    "scheduling",
    "pod",
    "retention",
    "dataset.maxSkippedFraction",  # gates the run; changes no artifact
    "dataset.checkResources",
    "generation.image",
    "generation.resources",
    "training.image",
    "training.resources",
    "evaluation.image",
    "evaluation.resources",
    "evaluation.metric",
    "evaluation.mode",
)


@dataclass(frozen=True)
class RunRef:
    """Identity of a run: where its artifacts live and what MLflow tags it with."""

    namespace: str
    name: str
    uid: str = ""


@dataclass(frozen=True)
class SecretKey:
    """An environment variable taken from a Secret key (never a value)."""

    secret: str
    key: str
    optional: bool = False


@dataclass(frozen=True)
class StepPlan:
    """One step attempt, independent of how it is executed.

    `argv` is what every pod (or local process group) runs. For training it is a torchrun
    command whose topology is in `env` as torchrun's own variables (`PET_NNODES`,
    `PET_NPROC_PER_NODE`, `PET_MASTER_ADDR` = `<job>-0.<service>`, `PET_MASTER_PORT`); each pod
    adds its `PET_NODE_RANK` (see `local_env` for local mode).
    """

    stage: StepKind
    iteration: int
    attempt: int
    job_name: str
    pods: int
    processes_per_pod: int
    argv: tuple[str, ...]
    env: Mapping[str, str]
    secret_env: Mapping[str, SecretKey]
    gpus_per_pod: int
    image: str
    requests: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, str] = field(default_factory=dict)
    shm_size: str | None = None
    output_uri: str = ""
    master_addr: str | None = None

    @property
    def rendezvous(self) -> bool:
        """True when pods must find each other (the training Job's headless Service)."""
        return self.master_addr is not None

    def local_env(self, node_rank: int, master_port: int) -> dict[str, str]:
        """What a local process of pod `node_rank` adds to `env`: its rank, and the master on
        this machine (a free port per Job, so concurrent Jobs never collide)."""
        if not self.rendezvous:
            return {}
        return {
            NODE_RANK_ENV: str(node_rank),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(master_port),
        }


# The check Job's resources when spec.dataset.checkResources is empty: modest, CPU only.
CHECK_RESOURCES = api.Resources(requests={"cpu": "500m", "memory": "1Gi"}, limits={"memory": "4Gi"})
# The control arm's step that runs beside a SPIN step (spec.controlArm): same stage, same inputs.
CONTROL_OF: dict[StepKind, StepKind] = {"train": "control-train", "evaluate": "control-evaluate"}
# The env var that makes the runtime's MLflow logger prefix every key (runlog.METRIC_PREFIX_ENV).
CONTROL_METRIC_PREFIX = "control/"


def steps_of(spec: api.SPINRunSpec) -> tuple[StepKind, ...]:
    """The SPIN steps of every iteration, in order (the control arm's run beside them)."""
    return STEP_KINDS if spec.evaluation.enabled else STEP_KINDS[:2]


def beside(spec: api.SPINRunSpec, kind: StepKind) -> tuple[StepKind, ...]:
    """The steps of the stage SPIN step `kind` leads: itself, and its control with controlArm."""
    partner = CONTROL_OF.get(kind) if spec.control_arm.enabled else None
    return (kind,) if partner is None else (kind, partner)


def jobs_of_iteration(spec: api.SPINRunSpec, iteration: int) -> tuple[StepKind, ...]:
    """Every step with a Job in `iteration`, in order: the check that leads iteration 0 (on a
    cluster), then each SPIN step with its control beside it (controlArm)."""
    lead: tuple[StepKind, ...] = (CHECK,) if iteration == 0 else ()
    return lead + tuple(k for kind in steps_of(spec) for k in beside(spec, kind))


def layout_of(spec: api.SPINRunSpec, run: RunRef) -> RunLayout:
    """The run prefix R = <storage.uri>/<namespace>/<name> (storage must be resolved)."""
    if not spec.storage.uri:
        raise ValueError("spec.storage.uri is not set (resolve operator defaults first)")
    return RunLayout.for_run(spec.storage.uri, run.namespace, run.name)


def _model_flags(spec: api.SPINRunSpec) -> list[str]:
    flags = []
    if spec.model.tokenizer:
        flags += ["--tokenizer", spec.model.tokenizer]
    if spec.model.chat_template:
        flags += ["--chat-template", spec.model.chat_template]
    return flags


def _selection_flags(spec: api.SPINRunSpec, training: bool = True) -> list[str]:
    d = spec.dataset
    flags = ["--dataset", d.uri]
    if training:
        flags += ["--max-samples", str(d.max_samples)]
    return [
        *flags, "--eval-samples", str(d.eval_samples), "--seed", str(d.seed),
        "--max-skipped-fraction", repr(d.max_skipped_fraction),
    ]  # fmt: skip # argv: a flag beside its value


def _check_argv(spec: api.SPINRunSpec, layout: RunLayout) -> list[str]:
    """The check of the dataset and θ0 before iteration 0's generation (docs/runtime.md#check):
    the same dataset flags and model overrides as `generate`, the report into the run's storage."""
    return [
        "python", "-m", "spin_runtime", "check",
        "--model", spec.model.uri,
        *_model_flags(spec),
        *_selection_flags(spec, training=False),
        "--output", layout.iteration(0).check_report,
    ]  # fmt: skip # argv: a flag beside its value


def _generate_argv(spec: api.SPINRunSpec, layout: RunLayout, t: int) -> list[str]:
    g = spec.generation
    return [
        "python", "-m", "spin_runtime", "generate",
        "--model", layout.model_for_iteration(t, spec.model.uri),
        *_model_flags(spec),
        *_selection_flags(spec),
        "--output", layout.iteration(t).generated,
        "--iteration", str(t),
        "--backend", g.backend,
        "--temperature", repr(g.temperature),
        "--top-p", repr(g.top_p),
        "--top-k", str(g.top_k),
        "--max-new-tokens", str(g.max_new_tokens),
        "--batch-size", str(g.batch_size),
        "--sampling-seed", str(g.seed + t),
        "--tensor-parallel-size", str(max(1, g.gpus_per_replica)),
        "--dtype", g.dtype,
    ]  # fmt: skip # argv: a flag beside its value


def _train_argv(
    spec: api.SPINRunSpec, layout: RunLayout, t: int, control: bool = False
) -> list[str]:
    tr = spec.training
    it = layout.iteration(t)
    if (
        control
    ):  # same data, batch, epochs and schedule: the same optimizer steps on the same prompts
        model, output, work = (
            layout.control_model_for_iteration(t, spec.model.uri),
            it.control_model,
            it.control_train_work,
        )
        lr = spec.control_arm.learning_rate or tr.learning_rate_for(t)
    else:
        model, output, work = layout.model_for_iteration(t, spec.model.uri), it.model, it.train_work
        lr = tr.learning_rate_for(t)
    # The runtime's own settings class writes the flags (spin_common/train_config.py), so a
    # knob cannot drift between what the operator sends and what `train` parses.
    cfg = TrainConfig(
        model=model,
        data=layout.training_data_for_iteration(t, tr.mix_previous_iterations),
        output=output,
        work_dir=work,
        tokenizer=spec.model.tokenizer,
        chat_template=spec.model.chat_template,
        iteration=t,
        seed=tr.seed,
        beta=tr.beta_for(t),
        learning_rate=lr,
        epochs=tr.epochs,
        global_batch_size=tr.global_batch_size,
        micro_batch_size=tr.micro_batch_size,
        max_length=tr.max_length,
        max_prompt_length=tr.max_prompt_length,
        optimizer=tr.optimizer,
        weight_decay=tr.weight_decay,
        lr_scheduler=tr.lr_scheduler,
        warmup_ratio=tr.warmup_ratio,
        max_grad_norm=tr.max_grad_norm,
        precision=tr.precision,
        gradient_checkpointing=tr.gradient_checkpointing,
        strategy=tr.strategy,
        prompt_sharing=tr.prompt_sharing,
        truncated_answers=tr.truncated_answers,
        drop_identical_pairs=tr.drop_identical_pairs,
        objective="sft" if control else "spin",
        lora=None
        if tr.peft is None
        else LoraSettings(
            rank=tr.peft.rank,
            alpha=tr.peft.alpha,
            dropout=tr.peft.dropout,
            target_modules=list(tr.peft.target_modules),
        ),
    )
    return ["torchrun", "-m", "spin_runtime", "train", *cfg.to_argv()]  # topology: PET_* env


def _evaluate_argv(
    spec: api.SPINRunSpec, layout: RunLayout, t: int, control: bool = False
) -> list[str]:
    ev = spec.evaluation
    if ev.command is not None:
        return list(ev.command)
    it = layout.iteration(t)
    model, output = (it.control_model, it.control_eval) if control else (it.model, it.eval)
    argv = ["python", "-m", "spin_runtime", "evaluate", "--model", model]
    if ev.baseline and t == 0 and not control:  # θ0's score is SPIN's baseline, once
        argv += ["--baseline-model", spec.model.uri]
    return [
        *argv,
        *_selection_flags(spec, training=False),
        "--max-new-tokens", str(ev.max_new_tokens),
        "--output", output,
    ]  # fmt: skip # argv: a flag beside its value


def _secret_env(spec: api.SPINRunSpec) -> dict[str, SecretKey]:
    env: dict[str, SecretKey] = {}
    s3 = spec.storage.credentials_secret
    if s3 is not None:
        env["AWS_ACCESS_KEY_ID"] = SecretKey(s3.name, s3.access_key_id_key)
        env["AWS_SECRET_ACCESS_KEY"] = SecretKey(s3.name, s3.secret_access_key_key)
    ml = spec.tracking.credentials_secret
    if ml is not None and spec.tracking.uri:
        for var in (
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
        ):
            env[var] = SecretKey(ml.name, var, optional=True)
    return env


def plan_step(
    spec: api.SPINRunSpec,
    settings: Settings,
    run: RunRef,
    iteration: int,
    stage: StepKind,
    attempt: int = 0,
    mlflow_run_id: str | None = None,
) -> StepPlan:
    """The plan of step `stage` of `iteration` (attempt `attempt`) for a resolved spec."""
    layout = layout_of(spec, run)
    it = layout.iteration(iteration)
    name = job_name(run.name, iteration, stage, attempt)
    env: dict[str, str] = {"SPIN_CACHE_DIR": settings.cache_dir or POD_CACHE_DIR}
    if spec.model.revision:  # the runtime pins this hub id to this revision (models.resolve)
        env["SPIN_HUB_MODEL"], env["SPIN_HUB_REVISION"] = spec.model.uri, spec.model.revision
    if spec.storage.endpoint:
        env["AWS_ENDPOINT_URL_S3"] = spec.storage.endpoint
    if spec.storage.region:
        env["AWS_REGION"] = spec.storage.region
    if spec.tracking.uri:
        env["MLFLOW_TRACKING_URI"] = spec.tracking.uri
        env["SPIN_TRACKING_SPOOL_DIR"] = it.tracking_spool  # MLflow calls made during an outage
        if mlflow_run_id:
            env["MLFLOW_RUN_ID"] = mlflow_run_id
    master_addr = None
    shm = None
    secret_env = _secret_env(spec)
    if stage == "check":
        if iteration != 0:
            raise ValueError(f"the check runs before iteration 0 only, not iteration {iteration}")
        # CPU only (no GPU is requested: render sets NVIDIA_VISIBLE_DEVICES=void) and nothing to
        # track: the storage credentials reach it, MLflow's do not (the operator records the
        # report's dataset profile itself).
        env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "SPIN_TRACKING_"))}
        secret_env = {k: v for k, v in secret_env.items() if not k.startswith("MLFLOW_")}
        # generation.image when set: the image iteration 0 would pull anyway (it holds the runtime)
        argv, pods, procs, gpus, image = (
            _check_argv(spec, layout),
            1,
            1,
            0,
            spec.generation.image,
        )
        resources, output = spec.dataset.check_resources, it.check
        if not (resources.requests or resources.limits):
            resources = CHECK_RESOURCES
    elif stage == "generate":
        g = spec.generation
        argv, pods, procs, gpus, image = (
            _generate_argv(spec, layout, iteration),
            g.replicas,
            1,
            g.gpus_per_replica,
            g.image,
        )
        env["SPIN_NUM_SHARDS"] = str(g.replicas)
        resources, output = g.resources, it.generated
        shm = spec.training.shm_size if g.gpus_per_replica > 1 else None  # vLLM tensor parallel
    elif stage in ("train", "control-train"):
        tr = spec.training
        control = stage == "control-train"
        master_addr = f"{pod_hostname(name, 0)}.{service_name(name)}"
        argv = _train_argv(spec, layout, iteration, control)
        env |= {
            "PET_NNODES": str(tr.nodes),
            "PET_NPROC_PER_NODE": str(tr.procs_per_node),
            "PET_MASTER_ADDR": master_addr,
            "PET_MASTER_PORT": str(MASTER_PORT),
        }
        pods, procs, gpus, image = tr.nodes, tr.procs_per_node, tr.gpus_per_node, tr.image
        resources, output, shm = (
            tr.resources,
            it.control_model if control else it.model,
            tr.shm_size,
        )
    else:
        ev = spec.evaluation
        control = stage == "control-evaluate"
        argv, pods, procs, gpus, image = (
            _evaluate_argv(spec, layout, iteration, control),
            1,
            1,
            ev.gpus,
            ev.image,
        )
        model, output = (it.control_model, it.control_eval) if control else (it.model, it.eval)
        resources = ev.resources
        if ev.command is not None:
            env |= {
                "SPIN_MODEL_URI": model,
                "SPIN_EVAL_OUTPUT": output,
                "SPIN_ITERATION": str(iteration),
            }
    if stage in CONTROL_KINDS and spec.tracking.uri:
        env["SPIN_METRIC_PREFIX"] = CONTROL_METRIC_PREFIX  # both arms on one iteration run
    return StepPlan(
        stage=stage,
        iteration=iteration,
        attempt=attempt,
        job_name=name,
        pods=pods,
        processes_per_pod=procs,
        argv=tuple(argv),
        env=env,
        secret_env=secret_env,
        gpus_per_pod=gpus,
        image=image or settings.runtime_image,
        requests=dict(resources.requests),
        limits=dict(resources.limits),
        shm_size=shm,
        output_uri=output,
        master_addr=master_addr,
    )


# --------------------------------------------------------------------------- spec changes


def _drop(wire: dict[str, Any], path: str) -> None:
    head, _, rest = path.partition(".")
    if rest:
        if isinstance(wire.get(head), dict):
            _drop(wire[head], rest)
    else:
        wire.pop(head, None)


def _get(wire: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = wire
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def immutable_view(spec: api.SPINRunSpec) -> dict[str, Any]:
    """The spec's wire form without `MUTABLE_FIELDS`: what the run's artifacts depend on."""
    wire = spec.model_dump(mode="json", by_alias=True)  # defaults included: explicit == default
    for path in MUTABLE_FIELDS:
        _drop(wire, path)
    if not spec.control_arm.enabled:
        # off (the default) leaves the digest of runs started before the field existed unchanged
        wire.pop("controlArm", None)
    return wire


def spec_digest(spec: api.SPINRunSpec) -> str:
    """A short stable digest of `immutable_view` (status.specHash)."""
    canonical = json.dumps(immutable_view(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _leaf_diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _leaf_diff(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [prefix]


def changed_fields(started: api.SPINRunSpec, current: api.SPINRunSpec) -> list[str]:
    """Immutable fields (as `spec.a.b` paths) whose value differs between the two specs."""
    return _leaf_diff(immutable_view(started), immutable_view(current), "spec")


def merge_mutable(started: api.SPINRunSpec, current: api.SPINRunSpec) -> api.SPINRunSpec:
    """`started` with the mutable fields of `current`: the spec a run goes on with when an
    immutable field changed. Raises pydantic's ValidationError if the mix breaks a cross-field
    rule (e.g. stopping.patience without evaluation)."""
    wire = started.model_dump(mode="json", by_alias=True)
    new = current.model_dump(mode="json", by_alias=True)
    for path in MUTABLE_FIELDS:
        found, value = _get(new, path)
        head, _, leaf = path.rpartition(".")
        target = _get(wire, head)[1] if head else wire
        if found and isinstance(target, dict):
            target[leaf] = value
    return api.SPINRunSpec.model_validate(wire)
