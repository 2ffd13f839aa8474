"""The admin's multi-tenant policy: what a SPINRun author may point the operator at.

The operator serves many namespaces with one identity: its own S3 and MLflow credentials (from the
chart) and its RBAC. Whatever a SPINRun names that the operator then talks to with that identity
must be something the cluster admin configured (docs/security.md):

* storage: the run prefix must lie under the operator's default `SPIN_STORAGE_URI` or an
  allow-listed prefix, and the S3 endpoint must be the default one or allow-listed: the operator
  reads, writes and (retention Delete) deletes there with its own keys;
* tracking: the MLflow URI must be the default one or allow-listed: the operator's MLflow
  credentials go there;
* MLflow names: the experiment is the namespace or `<namespace>/...`, the registered model is
  `<namespace>.<...>` (default `<namespace>.<run name>`), or an allow-listed name: one namespace
  cannot create versions in (or move the `best` alias of) another namespace's model;
* `spec.scheduling.serviceAccountName`: only allow-listed names (default: none), since a pod's
  ServiceAccount is an identity the author would otherwise borrow.

The policy comes from `SPIN_SECURITY` (JSON; the chart's `security` value); every list exists
globally and per namespace (`namespaces: {team-a: {...}}`, added to the global lists).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spin_operator.api import types as api

# JSON keys of SPIN_SECURITY / the chart's `security` value, and the Allowed field of each.
KEYS = {
    "storagePrefixes": "storage_prefixes",
    "s3Endpoints": "s3_endpoints",
    "trackingUris": "tracking_uris",
    "serviceAccounts": "service_accounts",
    "experiments": "experiments",
    "registeredModels": "registered_models",
}


class PolicyError(ValueError):
    """SPIN_SECURITY cannot be read."""


@dataclass(frozen=True)
class Allowed:
    storage_prefixes: tuple[str, ...] = ()
    s3_endpoints: tuple[str, ...] = ()
    tracking_uris: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    experiments: tuple[str, ...] = ()
    registered_models: tuple[str, ...] = ()

    def __or__(self, other: Allowed) -> Allowed:
        return Allowed(**{f: getattr(self, f) + getattr(other, f) for f in KEYS.values()})

    @classmethod
    def parse(cls, raw: Any, where: str) -> Allowed:
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{where}: expected a mapping")
        values: dict[str, tuple[str, ...]] = {}
        for key, value in raw.items():
            if key == "namespaces" and where == "SPIN_SECURITY":
                continue
            if key not in KEYS:
                raise PolicyError(f"{where}.{key}: unknown key (known: {', '.join(sorted(KEYS))})")
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise PolicyError(f"{where}.{key}: expected a list of non-empty strings")
            values[KEYS[key]] = tuple(value)
        return cls(**values)


@dataclass(frozen=True)
class Policy:
    everywhere: Allowed = Allowed()
    namespaces: Mapping[str, Allowed] = field(default_factory=dict)

    def of(self, namespace: str) -> Allowed:
        return self.everywhere | self.namespaces.get(namespace, Allowed())

    @classmethod
    def parse(cls, text: str | None) -> Policy:
        if not text:
            return cls()
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise PolicyError(f"SPIN_SECURITY: not JSON ({exc})") from None
        everywhere = Allowed.parse(raw, "SPIN_SECURITY")
        per_ns = raw.get("namespaces") or {}
        if not isinstance(per_ns, Mapping):
            raise PolicyError("SPIN_SECURITY.namespaces: expected a mapping of namespace to lists")
        return cls(
            everywhere,
            {ns: Allowed.parse(v, f"SPIN_SECURITY.namespaces.{ns}") for ns, v in per_ns.items()},
        )


def _under(uri: str, prefix: str) -> bool:
    """`uri` is `prefix` or below it, path component by component (s3://b/p allows s3://b/p/x,
    not s3://b/p2)."""
    uri, prefix = uri.rstrip("/"), prefix.rstrip("/")
    if any(part in (".", "..") for part in uri.split("/")):
        return False  # s3://b/p/../other would start with the prefix and name another place
    return uri == prefix or uri.startswith(prefix + "/")


def _same_url(a: str | None, b: str | None) -> bool:
    return (a or "").rstrip("/").lower() == (b or "").rstrip("/").lower()


def _unlisted_url(
    path: str, url: str, what: str, allowed: list[str | None], none: str, hint: str
) -> list[tuple[str, str]]:
    """[(path, message)] when `url` is none of the `allowed` URLs the operator may send its
    credentials to (`none`: how the message says that the list is empty); [] when it is one."""
    listed = [u for u in allowed if u]
    if any(_same_url(url, u) for u in listed):
        return []
    return [
        (
            path,
            f"{url!r} is not {what} the operator may send its credentials to "
            f"(allowed: {', '.join(listed) or none}); {hint}",
        )
    ]


def registered_model(spec: api.SPINRunSpec, namespace: str, name: str) -> str:
    """The registered model of a run: the spec's, else `<namespace>.<run name>` (model names cannot
    hold `/`; namespaces hold no `.`, so the prefix cannot be another namespace's)."""
    return spec.tracking.registered_model or f"{namespace}.{name}"


def experiment(spec: api.SPINRunSpec, namespace: str) -> str:
    return spec.tracking.experiment or namespace


def problems(
    written: api.SPINRunSpec,
    resolved: api.SPINRunSpec,
    namespace: str,
    policy: Policy,
    *,
    default_storage: str | None = None,
    default_endpoint: str | None = None,
    default_tracking: str | None = None,
) -> list[tuple[str, str]]:
    """(field path, message) for everything in a run that the admin's policy does not allow.

    `written` is the spec as the author wrote it (before pod templates and defaults: what an
    admin template sets is the admin's own choice), `resolved` the one the operator would act on.
    """
    allowed = policy.of(namespace)
    found: list[tuple[str, str]] = []
    hint = "an admin can allow it in the operator's `security` settings (docs/security.md)"
    storage = resolved.storage
    prefixes = [p for p in (default_storage, *allowed.storage_prefixes) if p]
    if storage.uri and not any(_under(storage.uri, p) for p in prefixes):
        where = ", ".join(prefixes) or "none"
        found.append(
            (
                "spec.storage.uri",
                f"{storage.uri!r} is not under a storage prefix the operator may use with its credentials (allowed: {where}); {hint}",
            )
        )
    if storage.uri and storage.uri.startswith("s3://") and storage.endpoint is not None:
        endpoints = [default_endpoint, *allowed.s3_endpoints]
        found += _unlisted_url(
            "spec.storage.endpoint",
            storage.endpoint,
            "an S3 endpoint",
            endpoints,
            "the default only",
            hint,
        )
    tracking = resolved.tracking
    if tracking.uri:
        uris = [default_tracking, *allowed.tracking_uris]
        found += _unlisted_url(
            "spec.tracking.uri", tracking.uri, "an MLflow server", uris, "none", hint
        )
    exp = tracking.experiment
    if (
        exp is not None
        and exp != namespace
        and not exp.startswith(namespace + "/")
        and exp not in allowed.experiments
    ):
        found.append(
            (
                "spec.tracking.experiment",
                f"{exp!r}: experiments of namespace {namespace} are {namespace!r} or '{namespace}/...'; {hint}",
            )
        )
    model = tracking.registered_model
    if (
        model is not None
        and not model.startswith(namespace + ".")
        and model not in allowed.registered_models
    ):
        found.append(
            (
                "spec.tracking.registeredModel",
                f"{model!r}: registered models of namespace {namespace} are named '{namespace}.<name>'; {hint}",
            )
        )
    account = written.scheduling.service_account_name
    if account is not None and account not in allowed.service_accounts:
        listed = ", ".join(allowed.service_accounts) or "none"
        found.append(
            (
                "spec.scheduling.serviceAccountName",
                f"{account!r} is not a ServiceAccount the admin allows SPINRun pods to use in {namespace} (allowed: {listed}); {hint}",
            )
        )
    return sorted(found)
