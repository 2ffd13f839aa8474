"""Pod customization of a SPINRun's Jobs (`spec.pod`): env, pull secrets, volumes, a model cache,
affinity, labels and annotations — and the name of an admin-owned pod template.

Secrets never appear as values: an env var whose name looks like a credential (HF_TOKEN,
*_PASSWORD, *_SECRET, *_KEY, ...) must come from `valueFrom.secretKeyRef`, so a token cannot land
in the spec, the status, the logs or MLflow. Volumes and affinity are core/v1 objects passed
through as written (the API server validates them in the Job); everything else is typed here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field, model_validator

from spin_operator.api.base import FieldError, Model, desc, raise_all
from spin_operator.api.fields import DNS_SUBDOMAIN
from spin_operator.api.kube import DATA_KEY, label_value_error

ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
# Names that hold credentials by convention: their value must come from a Secret.
SECRET_NAME = re.compile(
    r"(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_KEY|PRIVATE_KEY)", re.I
)
PASSTHROUGH = {"x-kubernetes-preserve-unknown-fields": True}
STORAGE_SIZE = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"  # a positive byte quantity
# Set by the operator on every pod: a user value would break the step's contract.
RESERVED_ENV = re.compile(
    r"^(SPIN_.*|MLFLOW_TRACKING_URI|MLFLOW_RUN_ID|JOB_COMPLETION_INDEX|AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_ENDPOINT_URL_S3|AWS_REGION|MLFLOW_TRACKING_USERNAME|MLFLOW_TRACKING_PASSWORD|MLFLOW_TRACKING_TOKEN)$"
)


class KeySelector(Model):
    """A key of a Secret or ConfigMap in the SPINRun's namespace."""

    name: Annotated[str, desc("Secret or ConfigMap name.", pattern=DNS_SUBDOMAIN, max_length=253)]
    key: Annotated[str, desc("Key in it.", min_length=1, max_length=253, pattern=DATA_KEY)]
    optional: Annotated[bool | None, desc("Start the pod even if the key is missing.")] = None


class EnvSource(Model):
    """Where an env var's value comes from (exactly one)."""

    secret_key_ref: Annotated[
        KeySelector | None, desc("A Secret key (for tokens and passwords).")
    ] = None
    config_map_key_ref: Annotated[KeySelector | None, desc("A ConfigMap key.")] = None

    @model_validator(mode="after")
    def _one(self) -> EnvSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise FieldError("secretKeyRef", "set exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(Model):
    """An environment variable of every container (HF_TOKEN, NCCL_*, HF_HUB_*, ...)."""

    name: Annotated[str, desc("Variable name.", pattern=ENV_NAME, max_length=256)]
    value: Annotated[str | None, desc("Literal value; not allowed for credential-like names.")] = (
        None
    )
    value_from: Annotated[EnvSource | None, desc("Value from a Secret or ConfigMap key.")] = None

    @model_validator(mode="after")
    def _checks(self) -> EnvVar:
        errors = []
        if (self.value is None) == (self.value_from is None):
            errors.append(FieldError("value", "set exactly one of value or valueFrom"))
        elif self.value is not None and SECRET_NAME.search(self.name):
            errors.append(
                FieldError(
                    "value",
                    f"{self.name} looks like a credential: give it as valueFrom.secretKeyRef "
                    "(a Secret), never as a value in the spec",
                )
            )
        raise_all(errors)
        return self


class LocalObjectReference(Model):
    """A reference by name to an object in the SPINRun's namespace."""

    name: Annotated[str, desc("Object name.", pattern=DNS_SUBDOMAIN, max_length=253)]


class VolumeMount(Model):
    """Where a volume of `volumes` appears in every container."""

    name: Annotated[
        str, desc("Name of a volume in pod.volumes.", pattern=DNS_SUBDOMAIN, max_length=63)
    ]
    mount_path: Annotated[
        str, desc("Absolute path in the container.", pattern=r"^/.*", max_length=4096)
    ]
    read_only: Annotated[bool, desc("Mount read-only.")] = False
    sub_path: Annotated[str | None, desc("Sub-path of the volume to mount.", max_length=4096)] = (
        None
    )


class ModelCache(Model):
    """A PersistentVolumeClaim for the model download cache instead of a per-pod emptyDir, so a
    model (or a hub download) is fetched once per cluster, not once per pod and iteration."""

    claim_name: Annotated[
        str,
        desc(
            "PersistentVolumeClaim name (ReadWriteMany for several pods).",
            pattern=DNS_SUBDOMAIN,
            max_length=253,
        ),
    ]
    sub_path: Annotated[str | None, desc("Sub-path of the claim to use.", max_length=4096)] = None


class PodSpec(Model):
    """What every pod of the run's Jobs gets in addition to what the operator sets."""

    template: Annotated[
        str | None,
        desc(
            "Admin-owned pod template to start from (the operator's podTemplates); none uses the default template if the admin set one.",
            pattern=DNS_SUBDOMAIN,
            max_length=63,
        ),
    ] = None
    env: Annotated[
        list[EnvVar], desc("Extra env vars; credentials only through valueFrom.secretKeyRef.")
    ] = Field(default_factory=list)
    image_pull_secrets: Annotated[
        list[LocalObjectReference], desc("Secrets to pull the runtime image with.")
    ] = Field(default_factory=list)
    volumes: Annotated[
        list[dict[str, Any]],
        desc(
            "core/v1 Volumes (each with a name), passed through to the pods.",
            json_schema_extra={"items": {"type": "object", **PASSTHROUGH}},
        ),
    ] = Field(default_factory=list)
    volume_mounts: Annotated[
        list[VolumeMount], desc("Mounts of those volumes in every container.")
    ] = Field(default_factory=list)
    model_cache: Annotated[
        ModelCache | None, desc("PVC for the model download cache (default: an emptyDir per pod).")
    ] = None
    cache_size_limit: Annotated[
        str,
        desc(
            "sizeLimit of the per-pod model cache (an emptyDir; not used with modelCache): the "
            "kubelet evicts a pod that writes more, instead of the node running out of disk.",
            pattern=STORAGE_SIZE,
        ),
    ] = "200Gi"
    affinity: Annotated[
        dict[str, Any] | None,
        desc("core/v1 Affinity of the pods, passed through.", json_schema_extra=PASSTHROUGH),
    ] = None
    labels: Annotated[
        dict[str, Annotated[str, Field(max_length=63)]], desc("Extra pod labels.")
    ] = Field(default_factory=dict)
    annotations: Annotated[dict[str, str], desc("Extra pod annotations.")] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _names(self) -> PodSpec:
        errors = []
        names = [v.get("name") for v in self.volumes]
        for i, name in enumerate(names):
            if not isinstance(name, str) or not re.fullmatch(DNS_SUBDOMAIN, name):
                errors.append(
                    FieldError(
                        f"volumes[{i}].name",
                        "every volume needs a name (lowercase letters, digits, '-')",
                    )
                )
        known = {n for n in names if isinstance(n, str)} | {"spin-cache", "dshm"}
        for i, mount in enumerate(self.volume_mounts):
            if mount.name not in known:
                errors.append(
                    FieldError(
                        f"volumeMounts[{i}].name", f"no volume named {mount.name!r} in pod.volumes"
                    )
                )
        for name in names:
            if name in ("spin-cache", "dshm"):
                errors.append(
                    FieldError(
                        "volumes", f"{name!r} is the operator's own volume: pick another name"
                    )
                )
        for key in self.labels:
            if not re.fullmatch(LABEL_KEY, key) or len(key.rsplit("/", 1)[-1]) > 63:
                errors.append(
                    FieldError(
                        f"labels.{key}",
                        "not a valid label key (prefix/name, name up to 63 characters)",
                    )
                )
        for key, value in self.labels.items():
            if (why := label_value_error(value)) is not None:
                errors.append(FieldError(f"labels.{key}", why))
        env = [e.name for e in self.env]
        for i, name in enumerate(env):
            if RESERVED_ENV.match(name):
                errors.append(
                    FieldError(
                        f"env[{i}].name",
                        f"{name} is set by the operator (storage, tracking, the step's contract)",
                    )
                )
        for dup in sorted({n for n in env if env.count(n) > 1}):
            errors.append(FieldError("env", f"{dup} is set twice"))
        raise_all(errors)
        return self
