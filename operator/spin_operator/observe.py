"""Turning the outside world into the reconciler's `Observed` facts.

* `job_state`: a batch/v1 Job object -> `ObservedJob` (pure).
* `read_facts`, `read_stored_digest`, `write_stored_spec`, `delete_artifacts`: storage I/O
  through `spin_common.storage/manifest/layout` (blocking; the controller runs them in a small
  worker pool per storage endpoint). Only manifests count: a half-written artifact is never "done".
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from spin_common import manifest, storage
from spin_common.layout import shard_name
from spin_operator import yamlio
from spin_operator.api import types as api
from spin_operator.decision import ObservedJob, StorageFacts
from spin_operator.endpoints import at_endpoint
from spin_operator.naming import (
    ALL_STEP_KINDS,
    ATTEMPT_LABEL,
    ITERATION_LABEL,
    KUEUE_QUEUE_LABEL,
    STAGE_LABEL,
)
from spin_operator.steps import RunRef, layout_of, spec_digest


def owner_uid(job: Mapping[str, Any]) -> str | None:
    """The uid of the SPINRun controlling a child, if any."""
    for ref in job.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == api.KIND and ref.get("controller"):
            return str(ref.get("uid"))
    return None


def job_state(job: Mapping[str, Any]) -> ObservedJob | None:
    """The reconciler's view of a Job made by the operator (None for any other Job).

    Only the terminal conditions count (Complete/Failed, not SuccessCriteriaMet/FailureTarget):
    until then pods may still be running, and a retry must not overlap its predecessor.
    """
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        iteration, attempt = int(labels[ITERATION_LABEL]), int(labels[ATTEMPT_LABEL])
        stage = labels[STAGE_LABEL]
    except (KeyError, ValueError):
        return None
    if stage not in ALL_STEP_KINDS:
        return None
    spec, status = job.get("spec") or {}, job.get("status") or {}
    conditions = {
        c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"
    }
    reason = message = ""
    if "Complete" in conditions:
        state = "Succeeded"
    elif "Failed" in conditions:
        state = "Failed"
        reason = str(conditions["Failed"].get("reason") or "JobFailed")
        message = str(conditions["Failed"].get("message") or "")
        if status.get("failedIndexes"):  # generation: which shards ran out of retries
            message = f"{message} (failed shards: {status['failedIndexes']})".strip()
    elif spec.get("suspend"):
        state = "Suspended"
    elif (status.get("active") or 0) > 0 or (status.get("ready") or 0) > 0 or _ran(status):
        state = "Running"
    else:
        state = "Pending"
    # Pods worth a look (observe.pod_blockage): some active pod not ready, or none yet at all.
    # Our pods have no readiness probes, so ready = running. A Job whose outcome is decided
    # starts no more pods.
    starting = (
        state in ("Pending", "Running")
        and not {"SuccessCriteriaMet", "FailureTarget"} & conditions.keys()
        and ((status.get("ready") or 0) < (status.get("active") or 0) or not status.get("active"))
    )
    return ObservedJob(
        name=str(meta.get("name")),
        iteration=iteration,
        stage=stage,
        attempt=attempt,
        state=state,  # type: ignore[arg-type]
        reason=reason,
        message=message,
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        queued=KUEUE_QUEUE_LABEL in labels,
        deleting=bool(meta.get("deletionTimestamp")),
        starting=starting and not meta.get("deletionTimestamp"),
    )


def _ran(status: Mapping[str, Any]) -> bool:
    """Pods of the Job have run, and none is active now: the real Job controller counts a pod
    that finished in `uncountedTerminatedPods` first, then in `succeeded`, then sets
    SuccessCriteriaMet (FailureTarget), and only later Complete (Failed), each its own status
    write. Reading those in-between states as Pending wrote a Running step back to Pending just
    before it succeeded: one status patch per step for nothing (benchmarks, real cluster)."""
    uncounted = status.get("uncountedTerminatedPods") or {}
    conditions = {
        c.get("type") for c in status.get("conditions") or [] if c.get("status") == "True"
    }
    return bool(
        (status.get("succeeded") or 0) > 0
        or uncounted.get("succeeded")
        or {"SuccessCriteriaMet", "FailureTarget"} & conditions
    )


# Container waiting reasons that do not go away by waiting (unlike ContainerCreating or
# PodInitializing): the kubelet keeps retrying, the pod stays Pending, the Job shows nothing.
BLOCKING_WAITS = frozenset({
    "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})  # fmt: skip # a word list, packed


@dataclass(frozen=True)
class Blockage:
    """Why a Job's pods do not start, and since when a pod has waited ("" / None: nothing)."""

    reason: str = ""
    message: str = ""
    since: str | None = None


def _is_job_pod(pod: Mapping[str, Any], job: str) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return job in (labels.get("batch.kubernetes.io/job-name"), labels.get("job-name"))


def pod_blockage(
    job: Mapping[str, Any], pods: list[Mapping[str, Any]], events: list[Mapping[str, Any]]
) -> Blockage:
    """What keeps the pods of `job` from starting (pure): a pod's container waiting for a reason
    that does not heal by itself, a pod the scheduler cannot place, or (no pod could be created)
    the Job controller's latest FailedCreate event — PodSecurity or a ResourceQuota refusing the
    pod. `pods` and `events` may hold other objects (the list is filtered here)."""
    meta, spec, status = job.get("metadata") or {}, job.get("spec") or {}, job.get("status") or {}
    name = str(meta.get("name"))
    mine = sorted(
        (p for p in pods if _is_job_pod(p, name)), key=lambda p: str(p["metadata"].get("name"))
    )
    waiting = [
        p
        for p in mine
        if (p.get("status") or {}).get("phase", "Pending") == "Pending"
        and not p["metadata"].get("deletionTimestamp")
    ]
    since = min(
        (
            str(p["metadata"].get("creationTimestamp"))
            for p in waiting
            if p["metadata"].get("creationTimestamp")
        ),
        default=None,
    )
    for pod in waiting:
        pname, pstatus = pod["metadata"].get("name"), pod.get("status") or {}
        for cs in [
            *(pstatus.get("initContainerStatuses") or []),
            *(pstatus.get("containerStatuses") or []),
        ]:
            wait = (cs.get("state") or {}).get("waiting") or {}
            if wait.get("reason") in BLOCKING_WAITS:
                return Blockage(
                    str(wait["reason"]),
                    f"pod {pname}: {wait.get('message') or wait['reason']}",
                    since,
                )
        for c in pstatus.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return Blockage(
                    str(c.get("reason") or "Unschedulable"),
                    f"pod {pname}: {c.get('message') or 'not scheduled'}",
                    since,
                )
    wanted = min(
        int(spec.get("parallelism") or 1),
        int(spec.get("completions") or 1) - int(status.get("succeeded") or 0),
    )
    live = [
        p for p in mine if (p.get("status") or {}).get("phase", "Pending") in ("Pending", "Running")
    ]
    if len(live) < wanted:
        refused = [
            e
            for e in events
            if e.get("reason") == "FailedCreate"
            and e.get("type") == "Warning"
            and (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") == "Job"
        ]
        newest_pod = max(
            (str(p["metadata"].get("creationTimestamp") or "") for p in mine), default=""
        )
        refused = [
            e for e in refused if _event_time(e) >= newest_pod
        ]  # not from before a pod got in
        if refused:
            latest = max(refused, key=_event_time)
            # Each refused pod has its own name, so each try is a new Event: the wait began at the
            # first of them, or when the Job started if it never had a pod.
            first = min(
                str(e.get("firstTimestamp") or e.get("eventTime") or _event_time(e))
                for e in refused
            )
            since = (
                first
                if mine
                else (status.get("startTime") or meta.get("creationTimestamp") or first)
            )
            return Blockage(
                "FailedCreate",
                str(latest.get("message") or "the Job cannot create its pods"),
                since,
            )
        if not mine:  # no pod yet: waiting since the Job started
            return Blockage(since=status.get("startTime") or meta.get("creationTimestamp"))
    return Blockage(since=since)


def _event_time(event: Mapping[str, Any]) -> str:
    return str(
        event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp") or ""
    )


# What of a results.json reaches the SPINRun's status: the ranking metric (evaluation.metric) and
# this fixed set, for the model and its θ0 baseline. results.json is written by the tenant's own
# code (a custom evaluation command): copying every key would let it grow the status object
# without bound. MLflow keeps every metric the step logs.
STATUS_METRICS = ("score", "exact_match", "real_logp_per_token", "num_examples", "truncation_rate")


def _metrics(results: Mapping[str, Any], ranking: str) -> dict[str, float]:
    keep = {*STATUS_METRICS, ranking}
    out: dict[str, float] = {}
    for prefix, section in (("", results.get("metrics")), ("baseline/", results.get("baseline"))):
        if isinstance(section, Mapping):
            for key in sorted(keep & {k for k in section if isinstance(k, str)}):
                value = section[key]
                if (
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                ):
                    out[f"{prefix}{key}"] = float(value)
    return out


def _evaluated(spec: api.SPINRunSpec, eval_dir: str, results: str) -> tuple[bool, dict[str, float]]:
    """(complete?, metrics) of one evaluation output (SPIN's or the control's)."""
    if not spec.evaluation.enabled:
        return False, {}
    custom = spec.evaluation.command is not None  # a custom command writes no manifest
    if manifest.is_complete(eval_dir) or (custom and storage.exists(results)):
        try:
            return True, _metrics(json.loads(storage.read_text(results)), spec.evaluation.metric)
        except (FileNotFoundError, ValueError, AttributeError):
            return False, {}
    return False, {}


def facts_final(spec: api.SPINRunSpec, facts: StorageFacts) -> bool:
    """True when every artifact of the iteration is complete, so its facts never change again
    and may be cached (the control arm's too: its steps may finish after SPIN's)."""
    spin = facts.generated and facts.model and (facts.evaluated or not spec.evaluation.enabled)
    control = not spec.control_arm.enabled or (facts.control_model and facts.control_evaluated)
    return spin and control


# The artifact each step writes, as a StorageFacts field that says it is complete.
COMPLETE_FIELD: dict[str, str] = {
    "check": "checked",
    "generate": "generated",
    "train": "model",
    "evaluate": "evaluated",
    "control-train": "control_model",
    "control-evaluate": "control_evaluated",
}


def read_facts(
    spec: api.SPINRunSpec,
    run: RunRef,
    iteration: int,
    stages: Collection[str] | None = None,
    base: StorageFacts | None = None,
) -> StorageFacts:
    """Which artifacts of `iteration` are complete. Raises OSError when storage is unreachable.

    `stages`: read only the artifacts of these steps (None: all of them); the facts of the others
    are taken from `base` (facts.py reads again only what a Job may have changed)."""
    want = set(COMPLETE_FIELD if stages is None else stages)
    found: dict[str, Any] = {}
    it = layout_of(spec, run).iteration(iteration)
    with at_endpoint(spec):
        if "generate" in want:
            shards = spec.generation.replicas
            manifests = manifest.shard_manifests(it.generated)
            meta = next((m.meta for m in manifests.values() if m.meta), None) or {}
            skipped = meta.get("dataset_skipped")
            found |= {
                "generated": all(shard_name(i, shards) in manifests for i in range(shards)),
                "dataset_rows": int(meta.get("dataset_rows") or 0),
                "dataset_skipped": {str(k): int(v) for k, v in skipped.items()}
                if isinstance(skipped, dict)
                else {},
            }
        if "train" in want:
            found["model"] = manifest.is_complete(it.model)
        if "evaluate" in want:
            found["evaluated"], found["metrics"] = _evaluated(spec, it.eval, it.eval_results)
        if spec.control_arm.enabled:
            if "control-train" in want:
                found["control_model"] = manifest.is_complete(it.control_model)
            if "control-evaluate" in want:
                found["control_evaluated"], found["control_metrics"] = _evaluated(
                    spec, it.control_eval, it.control_eval_results
                )
    if "check" in want and iteration == 0:
        found["checked"], found["check_profile"] = _check_report(spec, run)
    return dataclasses.replace(base or StorageFacts(), **found)


def _read_report(spec: api.SPINRunSpec, run: RunRef) -> dict[str, Any] | None:
    """The check's report (`spin_runtime check --output`), None when absent or unreadable."""
    with at_endpoint(spec):
        try:
            doc = json.loads(storage.read_text(layout_of(spec, run).iteration(0).check_report))
        except (FileNotFoundError, UnicodeDecodeError, ValueError):
            return None
    return doc if isinstance(doc, dict) else None


def _check_report(spec: api.SPINRunSpec, run: RunRef) -> tuple[bool, dict[str, Any]]:
    """(the check passed, its dataset profile): only a report that says ok counts as done."""
    doc = _read_report(spec, run)
    if doc is None or doc.get("ok") is not True:
        return False, {}
    profile = doc.get("dataset")
    return True, profile if isinstance(profile, dict) else {}


def read_stored_digest(spec: api.SPINRunSpec, run: RunRef) -> str | None:
    """Digest of the spec recorded at R/spinrun.yaml (None when there is none)."""
    uri = layout_of(spec, run).spec
    with at_endpoint(spec):
        try:
            doc = yamlio.load(storage.read_text(uri))
        except FileNotFoundError:
            return None
        except yamlio.YamlSyntaxError:
            return "unreadable"
    raw = doc.get("spec", doc) if isinstance(doc, dict) else None
    try:
        return spec_digest(api.SPINRunSpec.model_validate(raw))
    except ValueError:
        return "unreadable"  # never equal to a real digest: refuse rather than overwrite


def prefix_empty(spec: api.SPINRunSpec, run: RunRef) -> bool:
    """Nothing is stored under the run's prefix (one LIST: asked only when R/spinrun.yaml is
    absent, so normally of an empty prefix)."""
    with at_endpoint(spec):
        return not storage.list_files(layout_of(spec, run).prefix)


def write_stored_spec(spec: api.SPINRunSpec, run: RunRef) -> None:
    """R/spinrun.yaml: the spec as applied, so a later run on the same prefix can tell."""
    doc = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": run.name, "namespace": run.namespace, "uid": run.uid},
        "spec": spec.to_wire(),
    }
    with at_endpoint(spec):
        storage.write_text(layout_of(spec, run).spec, yaml.safe_dump(doc, sort_keys=False))


def delete_artifacts(spec: api.SPINRunSpec, prefix: str) -> int:
    with at_endpoint(spec):
        return storage.delete_prefix(prefix)


def generated_digest(spec: api.SPINRunSpec, uri: str) -> str:
    """Content digest of a generated-data folder (all its shard manifests)."""
    with at_endpoint(spec):
        return manifest.digest(uri)


def read_bad_input(spec: api.SPINRunSpec, run: RunRef, iteration: int, stage: str) -> str:
    """The cause a step left when it exited with bad input (`spin_common.errors.BAD_INPUT_FILE` in
    its output folder), "" when there is none. One line, redacted, at most 1000 characters."""
    from spin_common.errors import BAD_INPUT_FILE
    from spin_common.redaction import redact_text

    if stage == "check":  # its report lists every problem, cause first
        doc = _read_report(spec, run)
        problems = doc.get("problems") if doc is not None else None
        if not isinstance(problems, list) or not problems:
            return ""
        return redact_text("; ".join(str(p).strip() for p in problems if str(p).strip()))[:1000]
    it = layout_of(spec, run).iteration(iteration)
    output = {"generate": it.generated, "train": it.model, "evaluate": it.eval}.get(stage)
    if output is None:
        return ""
    with at_endpoint(spec):
        try:
            text = storage.read_text(storage.join(output, BAD_INPUT_FILE))
        except (FileNotFoundError, UnicodeDecodeError):
            return ""
    return redact_text("; ".join(line.strip() for line in text.splitlines() if line.strip()))[:1000]
