"""The models refuse what a real API server refuses in the Jobs they become (issue 14 item 1):
tolerations, label syntax, quantities, Secret keys, requests above limits, S3 URIs with '..' —
each problem at its field path, so `spinctl validate` and the operator name it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from spin_operator.api import types as api
from spin_operator.api.kube import label_key_error, label_value_error, quantity_value
from spin_operator.decision import CreateStep, Event, Observed, RecordSpec
from spin_operator.naming import job_name
from spin_operator.reconciler import reconcile
from spin_operator.settings import Settings, resolve_spec
from spin_operator.validation import parse, problems_of
from tests.spin_operator.reconciler_world import NAME, NAMESPACE, spin_object


def paths(**spec: Any) -> dict[str, str]:
    return {p.path: p.message for p in problems_of(spin_object(**spec))}


@pytest.mark.parametrize(
    ("toleration", "field", "words"),
    [
        ({"value": "x", "effect": "NoSchedule"}, "operator", "must be Exists when key is empty"),
        (
            {"key": "k", "operator": "Exists", "value": "x"},
            "value",
            "must be empty when operator is Exists",
        ),
        (
            {"key": "k", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 30},
            "tolerationSeconds",
            "NoExecute",
        ),
        ({"key": "bad key", "value": "v"}, "key", "not a valid label key"),
        ({"key": "k", "value": "not valid!"}, "value", "not a valid label value"),
    ],
)
def test_tolerations_as_the_api_server_checks_them(
    toleration: dict[str, Any], field: str, words: str
) -> None:
    found = paths(scheduling={"tolerations": [toleration]})
    assert list(found) == [f"spec.scheduling.tolerations[0].{field}"], found
    assert words in found[f"spec.scheduling.tolerations[0].{field}"]


@pytest.mark.parametrize(
    "toleration",
    [
        {"operator": "Exists"},
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},
        {
            "key": "nvidia.com/gpu",
            "value": "present",
            "effect": "NoExecute",
            "tolerationSeconds": 60,
        },
    ],
)
def test_valid_tolerations_pass(toleration: dict[str, Any]) -> None:
    assert paths(scheduling={"tolerations": [toleration]}) == {}


def test_node_selector_label_syntax() -> None:
    found = paths(
        scheduling={"nodeSelector": {"bad key": "v", "pool": "a b", "kubernetes.io/arch": "amd64"}}
    )
    assert set(found) == {
        "spec.scheduling.nodeSelector.bad key",
        "spec.scheduling.nodeSelector.pool",
    }, found
    assert "label key" in found["spec.scheduling.nodeSelector.bad key"]
    assert "label value" in found["spec.scheduling.nodeSelector.pool"]


@pytest.mark.parametrize("bad", ["1.2.3", "-4", "4Kb", "1e", "", "m"])
def test_malformed_or_negative_quantities(bad: str) -> None:
    found = paths(generation={"resources": {"requests": {"cpu": bad}}})
    assert list(found) == ["spec.generation.resources.requests.cpu"], found


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", "0.5"),
        ("1Gi", "1073741824"),
        ("1.5", "1.5"),
        ("2e3", "2000"),
        ("+8", "8"),
        (".5k", "500"),
    ],
)
def test_quantity_values(text: str, value: str) -> None:
    assert quantity_value(text) == Decimal(value)
    assert paths(training={"resources": {"limits": {"memory": text}}}) == {}


def test_requests_above_limits_name_the_request() -> None:
    found = paths(
        training={
            "resources": {
                "requests": {"cpu": "9", "memory": "2Gi"},
                "limits": {"cpu": "8", "memory": "2048Mi"},
            }
        }
    )
    assert list(found) == ["spec.training.resources.requests.cpu"], found
    assert "above the limit 8" in found["spec.training.resources.requests.cpu"]


def test_secret_keys() -> None:
    found = paths(
        storage={
            "uri": "s3://bkt/runs",
            "credentialsSecret": {"name": "s3", "accessKeyIdKey": "my key"},
        },
        pod={
            "env": [
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "my key"}}}
            ]
        },
    )
    assert set(found) == {
        "spec.storage.credentialsSecret.accessKeyIdKey",
        "spec.pod.env[0].valueFrom.secretKeyRef.key",
    }, found
    assert all("Secret key" in m for m in found.values())


@pytest.mark.parametrize("uri", ["s3://bkt/a/../b", "s3://bkt/./b", "s3://bkt/a//b"])
def test_s3_uris_with_dot_segments_are_invalid(uri: str) -> None:
    found = paths(storage={"uri": uri})
    assert list(found) == ["spec.storage.uri"], found
    found = paths(model={"uri": uri})
    assert list(found) == ["spec.model.uri"], found


def test_pod_label_values() -> None:
    found = paths(pod={"labels": {"team": "a/b"}})
    assert list(found) == ["spec.pod.labels.team"], found


def test_label_helpers() -> None:
    assert label_key_error("example.com/name") is None
    assert label_key_error("/name") is not None
    assert (
        label_key_error("Example.com/name") is not None
    )  # the prefix is a lowercase DNS subdomain
    assert label_key_error("a" * 64) is not None
    assert label_value_error("") is None and label_value_error("a" * 64) is not None


def test_reconciler_fails_a_refused_start_once() -> None:
    """The pure decision: a refusal recorded for an iteration-0 Job fails the run before it
    starts (nothing created, nothing recorded), with one Warning event; the same refusal on the
    next pass repeats no event."""
    spec = resolve_spec(parse(spin_object()), Settings())
    refusal = (
        "CreateRejected",
        "train of iteration 0: the API server refuses Job x: Forbidden: no",
    )
    observed = Observed(
        namespace=NAMESPACE,
        name=NAME,
        uid="u",
        now="2026-01-01T00:00:00Z",
        stored_spec_checked=True,
        missing_secrets=frozenset(),
        rejected={job_name(NAME, 0, "train"): refusal},
    )
    first = reconcile(spec, api.SPINRunStatus(), observed)
    assert first.status.phase == "Failed" and first.status.spec_hash is None
    assert not first.of_type(CreateStep) and not first.of_type(RecordSpec)
    assert first.of_type(Event) == [Event("Warning", "CreateRejected", refusal[1])]
    failed = next(c for c in first.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason, failed.message) == ("True", "CreateRejected", refusal[1])
    again = reconcile(spec, first.status, observed)
    assert again.status.phase == "Failed" and not again.of_type(Event)
