"""Fixtures of the end-to-end suite (see tests/e2e/harness.py for what runs and how)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e import harness
from tests.support.executor import Executor
from tests.support.k8s_emulator import K8sApi
from tests.support.servers import MlflowServer, s3_client_for


@pytest.fixture
def executor(k8s_api: K8sApi, tmp_path: Path) -> Iterator[Executor]:
    """The kubelet/Job-controller stand-in alone, watching every namespace of ``k8s_api``."""
    with Executor(k8s_api.url, tmp_path / "pods", backoff_s=0.1, grace_s=1.0) as ex:
        yield ex
    assert not ex.errors, "executor errors:\n" + "\n".join(ex.errors)


@pytest.fixture(scope="session")
def e2e_inputs(moto_server: str, tiny_factory: Callable[..., Path], tiny_dataset_path: Path) -> str:
    """The bucket of examples/04-e2e.yaml with the tiny model and task uploaded (once)."""
    client = s3_client_for(moto_server)
    if harness.BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=harness.BUCKET)
    harness.upload_inputs(tiny_factory("unit", 0), tiny_dataset_path)
    return moto_server


@pytest.fixture
def e2e(
    k8s_api: K8sApi, tmp_path: Path, e2e_inputs: str, mlflow_server: MlflowServer
) -> Iterator[harness.Cluster]:
    """A cluster with the operator running, a fresh namespace with the S3 Secret, MLflow up."""
    mlflow_server.start()  # a previous outage test may have left it down
    with harness.cluster(k8s_api, tmp_path, e2e_inputs, mlflow_server.uri) as c:
        yield c


@pytest.fixture
def e2e_quick(
    k8s_api: K8sApi, tmp_path: Path, e2e_inputs: str, mlflow_server: MlflowServer
) -> Iterator[harness.Cluster]:
    """Like ``e2e``, but pods run tests/e2e/standin.py (artifacts in seconds) instead of the real
    steps: for load and admission tests, where the operator is what is under test."""
    mlflow_server.start()
    options = {"launch_hook": harness.quick_pods}
    with harness.cluster(k8s_api, tmp_path, e2e_inputs, mlflow_server.uri, options) as c:
        yield c
