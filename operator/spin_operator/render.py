"""StepPlan -> Kubernetes manifests: a batch/v1 Job per step attempt (+ a headless Service for
training). Pure: the owner reference is passed in, nothing is read from or sent to a cluster.

Choices a long GPU Job needs, and why:
* Indexed Jobs: generation shard i and training node rank i are the pod's completion index, so a
  replaced pod redoes exactly its own part; index 0 of a training Job is the torchrun master,
  reachable as `<job>-0.<service>` through the headless Service (publishNotReadyAddresses: the
  name must resolve before any pod is Ready).
* `restartPolicy: Never` + `podReplacementPolicy: Failed`: a new pod only once the old one is
  gone, so two pods never share a hostname/rank. `failurePolicy.backoffLimit` (default 0: the
  operator retries with a fresh Job) means, per step (`_failure_settings`):
  - generation: `backoffLimitPerIndex` — a failed shard is retried alone, the other shards go on;
    a Job whose shard ran out of retries fails only after the others finished, and the next Job
    skips every shard whose manifest is complete (`generate` exits 0 at once for those);
  - single-node training and evaluation: `backoffLimit` — a new pod restarts every local rank;
  - multi-node training: always `backoffLimit: 0` and disruptions count — torchrun's static
    rendezvous cannot take a replaced rank, so any rank's failure or eviction fails the Job (the
    Job controller then stops the other ranks) and the group restarts as the operator's next
    Job, from the last complete epoch checkpoint.
* The check before iteration 0's generation (`<run>-i0-check`): one CPU pod (no GPU request,
  NVIDIA_VISIBLE_DEVICES=void), `spec.dataset.checkResources`, `backoffLimit: 0`, the same
  restricted pod, Secrets and ServiceAccount as every step; its exit 2 fails the run before
  any GPU Job exists.
* `podFailurePolicy`: exit codes that won't heal (2 = bad input per docs/runtime.md, 126/127 =
  cannot execute) fail the Job at once; disruptions (preemption, drain) do not count as failures.
* `ttlSecondsAfterFinished` unset: a Job stays until the status records its step (the
  reconciler then deletes it, `_sweep_recorded` in step_rules.py), so its outcome is never lost
  to a TTL that fired before the operator saw it; Jobs go with the SPINRun through ownerReferences.
* With a Kueue queue the Job is created suspended, as Kueue expects, and Kueue starts it.
* Pods pass PodSecurity `restricted`: a numeric non-root user (the runtime image's `spin`,
  RUNTIME_UID), seccomp RuntimeDefault, every capability dropped, no privilege escalation; no
  ServiceAccount token (steps never call the API server); NVIDIA_VISIBLE_DEVICES=void without GPUs
  (a GPU node's runtime would otherwise expose every GPU to a pod that requested none); an
  ephemeral-storage request and a sizeLimit on the emptyDir model cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spin_operator.api import types as api
from spin_operator.naming import KUEUE_QUEUE_LABEL, service_name, step_labels
from spin_operator.settings import POD_CACHE_DIR
from spin_operator.steps import MASTER_PORT, NODE_RANK_ENV, RunRef, StepPlan

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

UNHEALABLE_EXIT_CODES = [2, 126, 127]
RUNTIME_UID = (
    65532  # the `spin` user of images/runtime/Dockerfile (numeric: runAsNonRoot can check it)
)
# Scheduling hint for the model cache and logs, unless the step's resources name ephemeral-storage.
EPHEMERAL_STORAGE_REQUEST = "10Gi"
CHECK_EPHEMERAL_STORAGE_REQUEST = "1Gi"
CACHE_VOLUME = "spin-cache"
SHM_VOLUME = "dshm"


def owner_reference(api_version: str, kind: str, name: str, uid: str) -> dict[str, Any]:
    """The controller reference children carry (the same shape `kopf.adopt` writes)."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def run_owner(run: RunRef) -> dict[str, Any]:
    return owner_reference(api.API_VERSION, api.KIND, run.name, run.uid)


def _metadata(
    plan: StepPlan, run: RunRef, owner: Mapping[str, Any], queue: str | None
) -> dict[str, Any]:
    labels = step_labels(run.name, plan.iteration, plan.stage, plan.attempt)
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    return {
        "name": plan.job_name,
        "namespace": run.namespace,
        "labels": labels,
        "ownerReferences": [dict(owner)],
    }


def literal(value: str) -> str:
    """`value` as the kubelet must pass it on: it expands `$(VAR)` in a container's command, args
    and env values and turns `$$` into `$`, so doubling every `$` keeps the text exactly as
    written. Without this a URI or command holding `$(AWS_SECRET_ACCESS_KEY)` would reach the
    runtime (and its logs and MLflow params) with the Secret's value in it. (The operator writes
    no `$(...)` reference of its own: the node rank comes through the downward API.)"""
    return value.replace("$", "$$")


def _env(plan: StepPlan, custom: api.PodSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": literal(v)} for k, v in plan.env.items()]
    if plan.rendezvous:  # torchrun's --node-rank: the pod's completion index (Indexed Job)
        index = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
        env.append({"name": NODE_RANK_ENV, "valueFrom": {"fieldRef": {"fieldPath": index}}})
    if plan.gpus_per_pod == 0 and not any(e.name == "NVIDIA_VISIBLE_DEVICES" for e in custom.env):
        env.append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"})
    for name, ref in plan.secret_env.items():
        selector: dict[str, Any] = {"name": ref.secret, "key": ref.key}
        if ref.optional:
            selector["optional"] = True
        env.append({"name": name, "valueFrom": {"secretKeyRef": selector}})
    return env


def _resources(plan: StepPlan, gpu_resource: str) -> dict[str, Any]:
    limits = dict(plan.limits)
    requests = dict(plan.requests)
    if plan.gpus_per_pod > 0:
        limits[gpu_resource] = str(plan.gpus_per_pod)
        requests.pop(gpu_resource, None)  # extended resources: request defaults to the limit
    if "ephemeral-storage" not in requests and "ephemeral-storage" not in limits:
        # the check downloads nothing but config, tokenizer and safetensors headers
        requests["ephemeral-storage"] = (
            CHECK_EPHEMERAL_STORAGE_REQUEST if plan.stage == "check" else EPHEMERAL_STORAGE_REQUEST
        )
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _pod_spec(
    plan: StepPlan, scheduling: api.SchedulingSpec, custom: api.PodSpec
) -> dict[str, Any]:
    cache_mount: dict[str, Any] = {
        "name": CACHE_VOLUME,
        "mountPath": plan.env.get("SPIN_CACHE_DIR", POD_CACHE_DIR),
    }
    cache: dict[str, Any] = {"emptyDir": {"sizeLimit": custom.cache_size_limit}}
    if custom.model_cache:  # one download per cluster instead of one per pod
        cache = {"persistentVolumeClaim": {"claimName": custom.model_cache.claim_name}}
        if custom.model_cache.sub_path:
            cache_mount["subPath"] = custom.model_cache.sub_path
    mounts = [cache_mount]
    volumes: list[dict[str, Any]] = [{"name": CACHE_VOLUME, **cache}]
    if plan.shm_size:
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        volumes.append(
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": plan.shm_size}}
        )
    container: dict[str, Any] = {
        "name": plan.stage,
        "image": plan.image,
        "command": [literal(arg) for arg in plan.argv],
        "env": _env(plan, custom) + [e.to_wire() for e in custom.env],
        "resources": _resources(plan, scheduling.gpu_resource_name),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if plan.rendezvous:
        container["ports"] = [{"name": "rendezvous", "containerPort": MASTER_PORT}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,  # no Service env vars injected into long-lived pods
        "automountServiceAccountToken": False,  # steps never call the API server
        # PodSecurity "restricted" (enforced on many clusters) rejects pods without runAsNonRoot;
        # a numeric user lets the kubelet verify it for any image (a named USER cannot be checked).
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNTIME_UID,
            "runAsGroup": RUNTIME_UID,
            "fsGroup": RUNTIME_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    mounts += [m.to_wire() for m in custom.volume_mounts]
    volumes += [dict(v) for v in custom.volumes]
    if custom.image_pull_secrets:
        pod["imagePullSecrets"] = [r.to_wire() for r in custom.image_pull_secrets]
    if custom.affinity:
        pod["affinity"] = dict(custom.affinity)
    if plan.rendezvous:
        pod["subdomain"] = service_name(plan.job_name)
    if scheduling.service_account_name:
        pod["serviceAccountName"] = scheduling.service_account_name
    if scheduling.priority_class_name:
        pod["priorityClassName"] = scheduling.priority_class_name
    if scheduling.node_selector:
        pod["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod["tolerations"] = [t.to_wire() for t in scheduling.tolerations]
    return pod


def _failure_settings(plan: StepPlan, backoff_limit: int) -> dict[str, Any]:
    """backoffLimit / backoffLimitPerIndex and the podFailurePolicy of one step (module doc)."""
    # Bad input fails every shard and rank the same way (each reads the whole dataset and the
    # same model): fail the whole Job at once rather than per index.
    unhealable = {
        "action": "FailJob",
        "onExitCodes": {
            "containerName": plan.stage,
            "operator": "In",
            "values": UNHEALABLE_EXIT_CODES,
        },
    }
    disruption_ignored = {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    settings: dict[str, Any] = {"podReplacementPolicy": "Failed"}
    if plan.stage == "check":
        # one pod, minutes at most: a failure that may heal is the operator's retry (a new Job)
        settings["backoffLimit"] = 0
        rules = [unhealable, disruption_ignored]
    elif plan.stage == "generate":
        settings["backoffLimitPerIndex"] = backoff_limit
        rules = [unhealable, disruption_ignored]
    elif plan.rendezvous and plan.pods > 1:
        settings["backoffLimit"] = 0  # group restart only: see the module doc
        rules = [unhealable]
    else:
        settings["backoffLimit"] = backoff_limit
        rules = [unhealable, disruption_ignored]
    settings["podFailurePolicy"] = {"rules": rules}
    return settings


def render_job(
    plan: StepPlan, spec: api.SPINRunSpec, run: RunRef, owner: Mapping[str, Any]
) -> dict[str, Any]:
    """The Job of one step attempt. `spec` supplies scheduling and failure settings."""
    queue = spec.scheduling.queue_name
    meta = _metadata(plan, run, owner, queue)
    job_spec: dict[str, Any] = {
        "completions": plan.pods,
        "parallelism": plan.pods,
        "completionMode": "Indexed",
        **_failure_settings(plan, spec.failure_policy.backoff_limit),
        "template": {
            "metadata": _pod_metadata(plan, spec, run),
            "spec": _pod_spec(plan, spec.scheduling, spec.pod),
        },
    }
    if spec.failure_policy.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.failure_policy.active_deadline_seconds
    if queue:
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def _pod_metadata(plan: StepPlan, spec: api.SPINRunSpec, run: RunRef) -> dict[str, Any]:
    """The user's labels and annotations; the operator's own labels win (it selects by them)."""
    meta: dict[str, Any] = {
        "labels": {
            **spec.pod.labels,
            **step_labels(run.name, plan.iteration, plan.stage, plan.attempt),
        }
    }
    if spec.pod.annotations:
        meta["annotations"] = dict(spec.pod.annotations)
    return meta


def render_service(plan: StepPlan, run: RunRef, owner: Mapping[str, Any]) -> dict[str, Any] | None:
    """The headless Service that gives training pods stable DNS names; None for other steps."""
    if not plan.rendezvous:
        return None
    labels = step_labels(run.name, plan.iteration, plan.stage, plan.attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(plan.job_name),
            "namespace": run.namespace,
            "labels": dict(labels),
            "ownerReferences": [dict(owner)],
        },
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT}],
        },
    }


def render(
    plan: StepPlan, spec: api.SPINRunSpec, run: RunRef, owner: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every object of one step attempt, Service first (it must exist before pods resolve it)."""
    owner = owner or run_owner(run)
    service = render_service(plan, run, owner)
    return [*([service] if service else []), render_job(plan, spec, run, owner)]
