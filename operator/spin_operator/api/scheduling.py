"""Where child pods run and what they get: tolerations, resource requests and limits, and the
scheduling section of the spec (`spec.scheduling`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from spin_operator.api.base import FieldError, Model, desc, raise_all
from spin_operator.api.fields import DNS_SUBDOMAIN, QUANTITY
from spin_operator.api.kube import label_key_error, label_value_error, quantity_value


class Toleration(Model):
    """A pod toleration (core/v1 Toleration)."""

    key: Annotated[str | None, desc("Taint key; empty with Exists matches every taint.")] = None
    operator: Annotated[Literal["Exists", "Equal"], desc("Exists or Equal.")] = "Equal"
    value: Annotated[str | None, desc("Taint value for Equal.")] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        desc("Taint effect to match; empty matches all."),
    ] = None
    toleration_seconds: Annotated[
        int | None, desc("For NoExecute: how long the pod stays bound.", ge=0)
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
        desc("Resource requests, e.g. {cpu: '8', memory: 64Gi}."),
    ] = Field(default_factory=dict)
    limits: Annotated[
        dict[str, Annotated[str, Field(pattern=QUANTITY)]],
        desc("Resource limits. GPUs are added from gpusPerReplica/gpusPerNode."),
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


class SchedulingSpec(Model):
    """Where and how child pods are scheduled."""

    queue_name: Annotated[
        str | None,
        desc(
            "Kueue LocalQueue (sets kueue.x-k8s.io/queue-name on Jobs).",
            pattern=DNS_SUBDOMAIN,
            max_length=63,
        ),
    ] = None
    priority_class_name: Annotated[
        str | None, desc("PriorityClass of child pods.", pattern=DNS_SUBDOMAIN, max_length=253)
    ] = None
    node_selector: Annotated[dict[str, str], desc("Node selector of child pods.")] = Field(
        default_factory=dict
    )
    tolerations: Annotated[list[Toleration], desc("Tolerations of child pods.")] = Field(
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
        desc(
            "ServiceAccount of child pods (e.g. for IRSA/workload identity); the operator accepts only names its admin allows (chart value security.serviceAccounts).",
            pattern=DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    gpu_resource_name: Annotated[
        str, desc("Extended resource name of a GPU.", pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$")
    ] = "nvidia.com/gpu"
