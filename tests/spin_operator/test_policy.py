"""spin_operator.policy: the admin's allow-lists, field by field (docs/security.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from spin_operator.api import types as api
from spin_operator.policy import Policy, registered_model
from spin_operator.settings import Settings, SettingsError, check_policy, resolve_spec
from spin_operator.templates import PodTemplate
from spin_operator.validation import InvalidSpec

BASE: dict[str, Any] = {
    "model": {"uri": "s3://models/sft"},
    "dataset": {"uri": "s3://data/sft.jsonl"},
}
SETTINGS = Settings(
    storage_uri="s3://runs/spin",
    s3_endpoint="http://minio.storage:9000",
    mlflow_uri="http://mlflow.mlops:5000",
)


def refused(
    extra: dict[str, Any], settings: Settings = SETTINGS, namespace: str = "team-a"
) -> list[str]:
    try:  # the models refuse some of it first (e.g. '..' segments), naming the same field
        written = api.SPINRunSpec.model_validate({**BASE, **extra})
    except ValidationError as exc:
        return ["spec." + ".".join(str(p) for p in err["loc"]) for err in exc.errors()]
    try:
        check_policy(written, resolve_spec(written, settings), namespace, settings)
    except InvalidSpec as exc:
        return [p.path for p in exc.problems]
    return []


def test_defaults_of_the_admin_are_allowed() -> None:
    assert refused({}) == []
    assert (
        refused({"tracking": {"experiment": "team-a/chat", "registeredModel": "team-a.chat"}}) == []
    )
    assert refused({"storage": {"uri": "s3://runs/spin/sub"}}) == []


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ({"storage": {"uri": "s3://corp-models/x"}}, "spec.storage.uri"),
        ({"storage": {"uri": "s3://runs/spin-other"}}, "spec.storage.uri"),  # component-wise prefix
        ({"storage": {"uri": "/etc"}}, "spec.storage.uri"),
        ({"storage": {"uri": "s3://runs/spin/../other-team"}}, "spec.storage.uri"),  # dot segments
        ({"storage": {"endpoint": "http://169.254.169.254"}}, "spec.storage.endpoint"),
        ({"tracking": {"uri": "http://127.0.0.1:8080"}}, "spec.tracking.uri"),
        ({"tracking": {"uri": "file:///var/run"}}, "spec.tracking.uri"),
        ({"tracking": {"experiment": "team-b"}}, "spec.tracking.experiment"),
        ({"tracking": {"experiment": "team-ab/x"}}, "spec.tracking.experiment"),
        ({"tracking": {"registeredModel": "chat"}}, "spec.tracking.registeredModel"),
        ({"tracking": {"registeredModel": "team-ab.chat"}}, "spec.tracking.registeredModel"),
        ({"scheduling": {"serviceAccountName": "default"}}, "spec.scheduling.serviceAccountName"),
    ],
)
def test_refused_naming_the_field(extra: dict[str, Any], path: str) -> None:
    assert refused(extra) == [path]


def test_allow_lists_global_and_per_namespace() -> None:
    policy = Policy.parse(
        json.dumps(
            {
                "serviceAccounts": ["spin-jobs"],
                "namespaces": {
                    "team-a": {
                        "storagePrefixes": ["s3://team-a-models"],
                        "s3Endpoints": ["https://s3.team-a.example"],
                        "trackingUris": ["http://mlflow.team-a:5000"],
                        "registeredModels": ["chat-prod"],
                    }
                },
            }
        )
    )
    settings = Settings(**{**SETTINGS.__dict__, "security": policy})
    own = {
        "storage": {"uri": "s3://team-a-models/runs", "endpoint": "https://s3.team-a.example/"},
        "tracking": {"uri": "http://mlflow.team-a:5000", "registeredModel": "chat-prod"},
        "scheduling": {"serviceAccountName": "spin-jobs"},
    }
    assert refused(own, settings) == []
    assert refused(own, settings, namespace="team-b") == [
        "spec.storage.endpoint",
        "spec.storage.uri",
        "spec.tracking.registeredModel",
        "spec.tracking.uri",
    ]


def test_a_pod_templates_service_account_is_the_admins() -> None:
    template = PodTemplate(
        name="gpu",
        pod={},
        scheduling={"serviceAccountName": "irsa-role"},
        allow_override=frozenset(),
        default=True,
    )
    settings = Settings(**{**SETTINGS.__dict__, "pod_templates": {"gpu": template}})
    assert refused({}, settings) == []
    resolved = resolve_spec(api.SPINRunSpec.model_validate(BASE), settings)
    assert resolved.scheduling.service_account_name == "irsa-role"


def test_registered_model_default_is_namespaced() -> None:
    spec = api.SPINRunSpec.model_validate(BASE)
    assert registered_model(spec, "team-a", "paper") == "team-a.paper"
    assert (
        refused({"tracking": {"registeredModel": registered_model(spec, "team-a", "paper")}}) == []
    )


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"storagePrefix": []}',
        '{"serviceAccounts": "x"}',
        '{"namespaces": {"a": {"namespaces": {}}}}',
    ],
)
def test_bad_setting_names_the_variable(raw: str) -> None:
    with pytest.raises(SettingsError, match="SPIN_SECURITY"):
        Settings.from_env({"SPIN_SECURITY": raw})


def test_secrets_are_checked_only_where_a_namespaced_grant_exists() -> None:
    clusterwide = Settings.from_env({"SPIN_SECRET_CHECK_NAMESPACES": "team-a, team-b"})
    assert clusterwide.may_read_secrets("team-a") and clusterwide.may_read_secrets("team-b")
    assert not clusterwide.may_read_secrets("kube-system") and not Settings().may_read_secrets(
        "team-a"
    )
    assert Settings.from_env({"SPIN_NAMESPACES": "team-c"}).may_read_secrets("team-c")  # its Role
