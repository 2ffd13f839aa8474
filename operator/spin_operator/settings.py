"""Operator settings, read once from the environment (the table in docs/design.md).

The Helm chart sets these variables; `spinctl operator` reads them at start. A malformed value
stops the operator with a message naming the variable instead of surfacing later as a wrong Job.
Defaults for unset spec fields (storage, tracking) live here and are resolved into each run's
spec once, when the run starts (see `resolve_spec`), so changing an operator setting later never
moves an existing run's artifacts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from spin_operator.api import types as api
from spin_operator.policy import Policy, PolicyError, problems
from spin_operator.templates import PodTemplate, TemplateError, apply_template, load_templates

VERSION = "0.1.0"
DEFAULT_IMAGE = f"ghcr.io/spin-operator/runtime:{VERSION}"
# The model-download cache inside pods (an emptyDir mounted there by render.py).
POD_CACHE_DIR = "/var/cache/spin"


class SettingsError(ValueError):
    """An operator environment variable has a value the operator cannot use."""


@dataclass(frozen=True)
class Settings:
    """Everything the operator takes from its environment."""

    namespaces: tuple[str, ...] = ()
    runtime_image: str = DEFAULT_IMAGE
    storage_uri: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_secret: str | None = None
    mlflow_uri: str | None = None
    mlflow_secret: str | None = None
    log_level: str = "INFO"
    metrics_port: int = 9090
    health_port: int = 8080
    cache_dir: str = POD_CACHE_DIR
    # Admin pod templates (SPIN_POD_TEMPLATES); None where they are not known (local mode, plan).
    pod_templates: dict[str, PodTemplate] | None = None
    # Watch scale and drift (docs/operations.md, "Watches and resync"): lists are fetched in pages
    # of `list_chunk_size` objects; every `resync_seconds` (0 = never) the children are re-listed
    # and what vanished during a watch gap is dropped from the caches.
    list_chunk_size: int = 500
    resync_seconds: float = 300.0
    # Leader election (leader.py): only the holder of Lease `lease_namespace/lease_name` reconciles.
    leader_election: bool = False
    lease_name: str = "spin-operator"
    lease_namespace: str = "default"
    lease_seconds: float = 15.0
    lease_identity: str = ""  # default: POD_NAME (downward API), else host and pid
    # The admin's allow-lists for what SPINRuns may point the operator at (SPIN_SECURITY).
    security: Policy = field(default_factory=Policy)
    # Cluster-wide mode: namespaces where RBAC lets the operator `get` Secrets (the chart's
    # rbac.secretCheckNamespaces); a namespaced operator may in each watched namespace.
    secret_check_namespaces: tuple[str, ...] = ()

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    def may_read_secrets(self, namespace: str) -> bool:
        """Whether RBAC grants `get secrets` in `namespace` (never cluster-wide: docs/security.md)."""
        return namespace in self.namespaces or namespace in self.secret_check_namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def integer(
            name: str, default: int, low: int, high: int | None = None, what: str = "a whole number"
        ) -> int:
            """A bounded whole number; `what` names it in the error ("a port number")."""
            raw = text(name)
            if raw is None:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r}: expected {what}") from None
            if high is not None and not low <= value <= high:
                raise SettingsError(f"{name}={raw!r}: expected {what} {low}..{high}")
            if value < low:
                raise SettingsError(f"{name}={raw!r}: expected a number >= {low}")
            return value

        level = (text("SPIN_LOG_LEVEL") or "INFO").upper()
        if not isinstance(logging.getLevelName(level), int):
            raise SettingsError(f"SPIN_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR")
        namespaces = tuple(
            n.strip() for n in (text("SPIN_NAMESPACES") or "").split(",") if n.strip()
        )
        templates_file = text("SPIN_POD_TEMPLATES")
        try:
            templates = load_templates(templates_file) if templates_file else {}
        except TemplateError as exc:
            raise SettingsError(f"SPIN_POD_TEMPLATES: {exc}") from None

        def flag(name: str) -> bool:
            raw = (text(name) or "false").lower()
            if raw not in ("true", "false"):
                raise SettingsError(f"{name}={raw!r}: expected true or false")
            return raw == "true"

        try:
            security = Policy.parse(text("SPIN_SECURITY"))
        except PolicyError as exc:
            raise SettingsError(str(exc)) from None
        secret_check = tuple(
            n.strip() for n in (text("SPIN_SECRET_CHECK_NAMESPACES") or "").split(",") if n.strip()
        )
        return cls(
            security=security,
            secret_check_namespaces=secret_check,
            namespaces=namespaces,
            runtime_image=text("SPIN_RUNTIME_IMAGE") or DEFAULT_IMAGE,
            storage_uri=text("SPIN_STORAGE_URI"),
            s3_endpoint=text("SPIN_S3_ENDPOINT"),
            s3_region=text("SPIN_S3_REGION"),
            s3_secret=text("SPIN_S3_SECRET"),
            mlflow_uri=text("SPIN_MLFLOW_URI"),
            mlflow_secret=text("SPIN_MLFLOW_SECRET"),
            log_level=level,
            # a port of 0 disables the endpoint (tests use it)
            metrics_port=integer("SPIN_METRICS_PORT", 9090, 0, 65535, "a port number"),
            health_port=integer("SPIN_HEALTH_PORT", 8080, 0, 65535, "a port number"),
            pod_templates=templates,
            list_chunk_size=integer("SPIN_LIST_CHUNK_SIZE", 500, 1),
            resync_seconds=float(integer("SPIN_RESYNC_SECONDS", 300, 0)),
            leader_election=flag("SPIN_LEADER_ELECTION"),
            lease_name=text("SPIN_LEASE_NAME") or "spin-operator",
            lease_namespace=text("SPIN_LEASE_NAMESPACE") or text("POD_NAMESPACE") or "default",
            lease_seconds=float(integer("SPIN_LEASE_SECONDS", 15, 3)),
            lease_identity=text("POD_NAME") or "",
        )


def resolve_spec(
    spec: api.SPINRunSpec, settings: Settings, started: api.SPINRunSpec | None = None
) -> api.SPINRunSpec:
    """`spec` with its unset storage/tracking fields filled in: from `started` (the spec the run
    started with) when there is one, else from the operator's defaults. A run therefore keeps the
    defaults it started with even if the operator's settings change later.

    Raises `validation.InvalidSpec` naming `spec.storage.uri` when neither the spec nor the
    operator says where artifacts go: nothing can run without a run prefix.
    """
    from spin_operator.validation import InvalidSpec, Problem

    s3_secret = api.S3CredentialsSecretRef(name=settings.s3_secret) if settings.s3_secret else None
    mlflow_secret = api.SecretRef(name=settings.mlflow_secret) if settings.mlflow_secret else None
    storage_defaults = (
        started.storage
        if started
        else api.StorageSpec(
            uri=settings.storage_uri,
            endpoint=settings.s3_endpoint,
            region=settings.s3_region,
            credentials_secret=s3_secret,
        )
    )
    tracking_defaults = (
        started.tracking
        if started
        else api.TrackingSpec(uri=settings.mlflow_uri, credentials_secret=mlflow_secret)
    )
    storage = spec.storage.model_copy()
    storage.uri = storage.uri or storage_defaults.uri
    if storage.uri is None:
        raise InvalidSpec(
            [
                Problem(
                    "spec.storage.uri",
                    "not set, and the operator has no default (SPIN_STORAGE_URI)",
                )
            ]
        )
    if storage.uri.startswith("s3://"):
        storage.endpoint = storage.endpoint or storage_defaults.endpoint
        storage.region = storage.region or storage_defaults.region
        storage.credentials_secret = (
            storage.credentials_secret or storage_defaults.credentials_secret
        )
    tracking = spec.tracking.model_copy()
    tracking.uri = tracking.uri or tracking_defaults.uri
    if tracking.uri:
        tracking.credentials_secret = (
            tracking.credentials_secret or tracking_defaults.credentials_secret
        )
    return apply_template(
        spec.model_copy(update={"storage": storage, "tracking": tracking}), settings.pod_templates
    )


def check_policy(
    written: api.SPINRunSpec, resolved: api.SPINRunSpec, namespace: str, settings: Settings
) -> None:
    """Raises `validation.InvalidSpec` naming each field of `resolved` that points the operator's
    identity somewhere the admin did not allow (spin_operator.policy, docs/security.md)."""
    from spin_operator.validation import InvalidSpec, Problem

    found = problems(
        written,
        resolved,
        namespace,
        settings.security,
        default_storage=settings.storage_uri,
        default_endpoint=settings.s3_endpoint,
        default_tracking=settings.mlflow_uri,
    )
    if found:
        raise InvalidSpec([Problem(path, message) for path, message in found])
