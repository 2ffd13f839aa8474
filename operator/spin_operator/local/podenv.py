"""`spec.pod` on one machine: what a local process gets of it, and a note for what it cannot get.

On a cluster `spec.pod` customizes every pod. Locally the steps are processes of this machine, so
only its env vars have a meaning: literal values are set as written; a `valueFrom` var (a Secret
or ConfigMap key, which exists only in the cluster) is taken from this shell's environment when it
is set there and otherwise named in a note, so `HF_TOKEN` from a Secret never silently vanishes.
Everything else (volumes, pull secrets, affinity, labels, the admin's pod template, ...) is
listed once as "applies to cluster pods only" instead of being dropped without a word.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from spin_operator.api import pod as api_pod

# spec.pod fields with no meaning for a local process (their camelCase names, as users write them).
CLUSTER_ONLY = (
    ("template", "template"),
    ("image_pull_secrets", "imagePullSecrets"),
    ("volumes", "volumes"),
    ("volume_mounts", "volumeMounts"),
    ("model_cache", "modelCache"),
    ("affinity", "affinity"),
    ("labels", "labels"),
    ("annotations", "annotations"),
)


@dataclass
class LocalPodEnv:
    """The env every local step process gets from `spec.pod`, and what to tell the user."""

    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def local_pod_env(pod: api_pod.PodSpec, environ: Mapping[str, str]) -> LocalPodEnv:
    out = LocalPodEnv()
    missing: list[str] = []
    for var in pod.env:
        if var.value is not None:
            out.env[var.name] = var.value
            continue
        source = var.value_from
        ref = source.secret_key_ref or source.config_map_key_ref if source else None
        kind = "Secret" if source is not None and source.secret_key_ref else "ConfigMap"
        if var.name in environ:
            # The process inherits it from this shell; the cluster object is not read here.
            out.env[var.name] = environ[var.name]
        elif ref is not None and ref.optional:
            continue  # optional on a cluster too: the pod starts without it
        else:
            where = f"{kind} {ref.name}, key {ref.key}" if ref is not None else "valueFrom"
            missing.append(f"{var.name} (from {where} on a cluster)")
    if missing:
        out.notes.append(
            "spec.pod.env: not set in this shell, so local steps run without "
            + ", ".join(missing)
            + "; export them to pass them on"
        )
    ignored = [f"spec.pod.{camel}" for name, camel in CLUSTER_ONLY if getattr(pod, name)]
    if ignored:
        out.notes.append(
            ", ".join(ignored) + ": apply to cluster pods only; local steps run as processes here"
        )
    return out
