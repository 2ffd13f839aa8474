"""What the emulated API server does to an object before storing it: CRD and built-in admission.

CRDs: prune unknown fields (or refuse them under `fieldValidation=Strict`), apply structural
defaults, validate the schema and CEL rules. SPINRuns use `crd_schema.admission_errors`, the
project's single statement of what the real server refuses; it is cached on the part of the
object it depends on, because the operator patches status often and CEL compilation is slow.
Built-ins: the defaults and immutable fields of Jobs and Services that the operator meets.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from tests.support import crd_schema

ErrorsFn = Callable[[dict[str, Any]], list[str]]


def prune(schema: dict[str, Any], obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """Drop fields the structural schema does not declare; return (pruned, dropped paths)."""
    if isinstance(obj, list) and "items" in schema:
        items, dropped = [], []
        for i, value in enumerate(obj):
            v, d = prune(schema["items"], value, f"{path}[{i}]")
            items.append(v)
            dropped += d
        return items, dropped
    if not isinstance(obj, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return obj, []
    if "properties" not in schema:
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            pairs = {k: prune(extra, v, f"{path}.{k}" if path else k) for k, v in obj.items()}
            return {k: v for k, (v, _) in pairs.items()}, [p for _, d in pairs.values() for p in d]
        return obj, []
    out, dropped = {}, []
    for key, value in obj.items():
        child = f"{path}.{key}" if path else key
        prop = schema["properties"].get(key)
        if prop is None:
            dropped.append(child)
        elif key == "metadata" and path == "":
            out[key] = (
                value  # ObjectMeta is validated by the server itself, never pruned by the CRD
            )
        else:
            out[key], d = prune(prop, value, child)
            dropped += d
    return out, dropped


def schema_errors(schema: dict[str, Any]) -> ErrorsFn:
    """Structural-schema errors (no CEL) for CRDs created through the API."""
    validator = jsonschema.Draft4Validator(schema)

    def errors(obj: dict[str, Any]) -> list[str]:
        return [
            f"{'.'.join(str(p) for p in e.absolute_path)}: Invalid value: {e.message}"
            for e in validator.iter_errors(obj)
        ]

    return errors


@functools.lru_cache(maxsize=4096)
def _cached_admission_errors(canonical: str) -> tuple[str, ...]:
    return tuple(crd_schema.admission_errors(json.loads(canonical)))


@functools.cache
def _status_validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(crd_schema.root_schema()["properties"].get("status", {}))


def spinrun_errors(obj: dict[str, Any]) -> list[str]:
    """`crd_schema.admission_errors`, split so status-only writes skip the CEL recompilation.

    The non-status part depends only on spec and metadata.name (the CRD's root rule), so it is
    cached on exactly those; status is checked against its own sub-schema.
    """
    meta = obj.get("metadata") or {}
    key = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
    key["metadata"] = {"name": meta.get("name", "")}
    errors = list(_cached_admission_errors(json.dumps(key, sort_keys=True)))
    if "status" in obj:
        errors += [
            f"status{''.join('.' + str(p) for p in e.absolute_path)}: Invalid value: {e.message}"
            for e in _status_validator().iter_errors(obj["status"])
        ]
    return errors


# CRDs whose admission is more than their schema: the project's own SPINRun.
KNOWN_ERRORS: dict[str, ErrorsFn] = {"spinruns.selfplay.dev": spinrun_errors}


@dataclass
class CrdAdmission:
    """Admission of one custom resource version: prune, default, validate."""

    schema: dict[str, Any]
    errors: ErrorsFn

    def admit(self, obj: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
        """(stored object, unknown field paths, validation errors)."""
        pruned, unknown = prune(self.schema, obj)
        defaulted = crd_schema.apply_defaults(self.schema, pruned)
        return defaulted, unknown, self.errors(defaulted)


def crd_admission(crd: dict[str, Any], version: str) -> CrdAdmission:
    """The admission of `version` of a CustomResourceDefinition object."""
    entry = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = (entry.get("schema") or {}).get("openAPIV3Schema") or {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    errors = KNOWN_ERRORS.get(crd["metadata"]["name"]) or schema_errors(schema)
    return CrdAdmission(schema, errors)


# --------------------------------------------------------------------------- built-ins


def default_job(job: dict[str, Any]) -> dict[str, Any]:
    """batch/v1 Job defaults and the controller's selector/labels, as the API server stores them."""
    job = copy.deepcopy(job)
    spec = job.setdefault("spec", {})
    uid = job["metadata"]["uid"]
    name = job["metadata"]["name"]
    if "parallelism" not in spec:
        spec["parallelism"] = 1
        spec.setdefault("completions", 1)
    spec.setdefault("backoffLimit", 6)
    spec.setdefault("completionMode", "NonIndexed")
    spec.setdefault("suspend", False)
    spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
    labels = {
        "batch.kubernetes.io/controller-uid": uid,
        "batch.kubernetes.io/job-name": name,
        "controller-uid": uid,
        "job-name": name,
    }
    if not spec.get("manualSelector"):
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    template = spec.setdefault("template", {})
    tmeta = template.setdefault("metadata", {})
    tmeta["labels"] = {**(tmeta.get("labels") or {}), **labels}
    pod = template.setdefault("spec", {})
    pod.setdefault("restartPolicy", "Never")
    pod.setdefault("terminationGracePeriodSeconds", 30)
    pod.setdefault("dnsPolicy", "ClusterFirst")
    pod.setdefault("schedulerName", "default-scheduler")
    for c in pod.get("containers") or []:
        c.setdefault(
            "imagePullPolicy",
            "Always" if str(c.get("image", "")).endswith(":latest") else "IfNotPresent",
        )
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
    return job


def job_errors(job: dict[str, Any]) -> list[tuple[str, str]]:
    """The Job validation rules an operator can trip over."""
    spec = job.get("spec") or {}
    errors: list[tuple[str, str]] = []
    pod = (spec.get("template") or {}).get("spec") or {}
    if not pod.get("containers"):
        errors.append(("spec.template.spec.containers", "Required value"))
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        errors.append(
            (
                "spec.template.spec.restartPolicy",
                f'Unsupported value: "{pod.get("restartPolicy")}": supported values: "OnFailure", "Never"',
            )
        )
    if spec.get("completionMode") == "Indexed" and spec.get("completions") is None:
        errors.append(("spec.completions", "Required value: when completion mode is Indexed"))
    if spec.get("completionMode") not in ("NonIndexed", "Indexed"):
        errors.append(("spec.completionMode", f'Unsupported value: "{spec.get("completionMode")}"'))
    for fld in (
        "parallelism",
        "completions",
        "backoffLimit",
        "activeDeadlineSeconds",
        "ttlSecondsAfterFinished",
    ):
        value = spec.get(fld)
        if value is not None and (not isinstance(value, int) or value < 0):
            errors.append(
                (f"spec.{fld}", f"Invalid value: {value!r}: must be greater than or equal to 0")
            )
    for i, c in enumerate(pod.get("containers") or []):
        if not c.get("name"):
            errors.append((f"spec.template.spec.containers[{i}].name", "Required value"))
        if not c.get("image"):
            errors.append((f"spec.template.spec.containers[{i}].image", "Required value"))
        for e in c.get("env") or []:
            if "value" in e and "valueFrom" in e:
                errors.append(
                    (
                        f"spec.template.spec.containers[{i}].env",
                        "Invalid value: may not have both value and valueFrom",
                    )
                )
    return errors


def job_update_errors(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    """Job fields immutable after creation (the template only while the Job is not suspended)."""
    errors = []
    o, n = old.get("spec") or {}, new.get("spec") or {}
    for fld in (
        "selector",
        "completionMode",
        "manualSelector",
        "podFailurePolicy",
        "backoffLimitPerIndex",
    ):
        if o.get(fld) != n.get(fld):
            errors.append((f"spec.{fld}", "Invalid value: field is immutable"))
    if o.get("template") != n.get("template") and not (
        o.get("suspend") and _only_scheduling_changed(o["template"], n.get("template") or {})
    ):
        errors.append(("spec.template", "Invalid value: field is immutable"))
    if o.get("completions") != n.get("completions") and not (
        n.get("completionMode") == "Indexed" and n.get("completions") == n.get("parallelism")
    ):
        errors.append(("spec.completions", "Invalid value: field is immutable"))
    return errors


def _only_scheduling_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    mutable = ("nodeSelector", "tolerations", "affinity", "schedulingGates")

    def strip(t: dict[str, Any]) -> dict[str, Any]:
        spec = {k: v for k, v in (t.get("spec") or {}).items() if k not in mutable}
        return {**t, "spec": spec, "metadata": {}}

    return strip(old) == strip(new)


def default_service(svc: dict[str, Any], cluster_ip: str) -> dict[str, Any]:
    """Service defaults; `cluster_ip` is allocated by the caller (headless Services keep None)."""
    svc = copy.deepcopy(svc)
    spec = svc.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    if "clusterIP" not in spec:
        spec["clusterIP"] = cluster_ip
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", port.get("port"))
    svc["status"] = {"loadBalancer": {}}
    return svc


def service_errors(svc: dict[str, Any]) -> list[tuple[str, str]]:
    spec = svc.get("spec") or {}
    errors = []
    if spec.get("clusterIP") != "None" and not spec.get("ports"):
        errors.append(("spec.ports", "Required value"))
    for i, port in enumerate(spec.get("ports") or []):
        if not isinstance(port.get("port"), int) or not 0 < port["port"] < 65536:
            errors.append(
                (
                    f"spec.ports[{i}].port",
                    f"Invalid value: {port.get('port')!r}: must be between 1 and 65535",
                )
            )
        if len(spec.get("ports") or []) > 1 and not port.get("name"):
            errors.append((f"spec.ports[{i}].name", "Required value"))
    return errors


def service_update_errors(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, str]]:
    if (old.get("spec") or {}).get("clusterIP") != (new.get("spec") or {}).get("clusterIP"):
        return [("spec.clusterIP", "Invalid value: field is immutable")]
    return []
