"""Operator settings come from the environment; bad values name the variable."""

from __future__ import annotations

import pytest

from spin_operator.api import types as api
from spin_operator.settings import DEFAULT_IMAGE, Settings, SettingsError, resolve_spec
from spin_operator.validation import InvalidSpec


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.clusterwide and s.runtime_image == DEFAULT_IMAGE
    assert (s.metrics_port, s.health_port, s.log_level) == (9090, 8080, "INFO")


def test_values() -> None:
    s = Settings.from_env(
        {
            "SPIN_NAMESPACES": " team-a, team-b ,",
            "SPIN_RUNTIME_IMAGE": "img:1",
            "SPIN_STORAGE_URI": "s3://bkt/p",
            "SPIN_S3_ENDPOINT": "http://minio:9000",
            "SPIN_S3_REGION": "eu-1",
            "SPIN_S3_SECRET": "s3",
            "SPIN_MLFLOW_URI": "http://mlflow:5000",
            "SPIN_MLFLOW_SECRET": "ml",
            "SPIN_LOG_LEVEL": "debug",
            "SPIN_METRICS_PORT": "9100",
            "SPIN_HEALTH_PORT": "0",
        }
    )
    assert s.namespaces == ("team-a", "team-b") and not s.clusterwide
    assert (s.storage_uri, s.s3_secret, s.mlflow_uri, s.log_level) == (
        "s3://bkt/p",
        "s3",
        "http://mlflow:5000",
        "DEBUG",
    )
    assert (s.metrics_port, s.health_port) == (9100, 0)


def test_watch_settings() -> None:
    assert (Settings.from_env({}).resync_seconds, Settings.from_env({}).list_chunk_size) == (
        300.0,
        500,
    )
    s = Settings.from_env({"SPIN_RESYNC_SECONDS": "0", "SPIN_LIST_CHUNK_SIZE": "50"})
    assert (s.resync_seconds, s.list_chunk_size) == (0.0, 50)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SPIN_METRICS_PORT", "abc"),
        ("SPIN_HEALTH_PORT", "70000"),
        ("SPIN_LOG_LEVEL", "LOUD"),
        ("SPIN_RESYNC_SECONDS", "-1"),
        ("SPIN_RESYNC_SECONDS", "5m"),
        ("SPIN_LIST_CHUNK_SIZE", "0"),
    ],
)
def test_bad_values_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


def _spec(**extra: object) -> api.SPINRunSpec:
    return api.SPINRunSpec.model_validate(
        {"model": {"uri": "m/x"}, "dataset": {"uri": "/d.jsonl"}, **extra}
    )


def test_resolve_fills_unset_fields_from_the_operator() -> None:
    s = Settings(
        storage_uri="s3://bkt/runs",
        s3_endpoint="http://minio:9000",
        s3_secret="s3",
        mlflow_uri="http://m:5000",
        mlflow_secret="ml",
    )
    spec = resolve_spec(_spec(), s)
    assert spec.storage.uri == "s3://bkt/runs" and spec.storage.endpoint == "http://minio:9000"
    assert (
        spec.storage.credentials_secret is not None and spec.storage.credentials_secret.name == "s3"
    )
    assert spec.tracking.uri == "http://m:5000"
    assert (
        spec.tracking.credentials_secret is not None
        and spec.tracking.credentials_secret.name == "ml"
    )


def test_resolve_keeps_explicit_values_and_local_paths_get_no_s3_settings() -> None:
    s = Settings(storage_uri="s3://bkt/runs", s3_secret="s3")
    spec = resolve_spec(_spec(storage={"uri": "/data/runs"}), s)
    assert spec.storage.uri == "/data/runs" and spec.storage.credentials_secret is None


def test_resolve_prefers_what_the_run_started_with() -> None:
    started = resolve_spec(_spec(), Settings(storage_uri="s3://old-bkt/runs"))
    spec = resolve_spec(_spec(), Settings(storage_uri="s3://new-bkt/runs"), started)
    assert spec.storage.uri == "s3://old-bkt/runs"


def test_resolve_without_any_storage_names_the_field() -> None:
    with pytest.raises(InvalidSpec) as err:
        resolve_spec(_spec(), Settings())
    assert err.value.problems[0].path == "spec.storage.uri"
