"""Fixtures of the real-control-plane tier (see tests/cluster/harness.py for what runs)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster import harness, kit
from tests.cluster.controlplane import build_binary
from tests.cluster.gated import job_gate
from tests.support.servers import MlflowServer, s3_client_for

GATED = Path(__file__).with_name("gated.py")


@pytest.fixture(scope="session")
def control_plane_binary() -> Path:
    """tests/cluster/build.sh's binary: built once per machine and version (cached in
    ~/.cache/spin-operator/cluster), so only the first session on a machine pays for it."""
    started = time.monotonic()
    binary = build_binary()
    print(f"\ncontrol plane binary {binary} ready in {time.monotonic() - started:.1f}s")
    return binary


@pytest.fixture(scope="session")
def real_cluster(
    control_plane_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[harness.Session]:
    """One control plane and node agent for the whole session (starting one costs ~10 s)."""
    with harness.session(control_plane_binary, tmp_path_factory.mktemp("cluster")) as s:
        yield s
    assert not s.agent.errors, "node agent errors:\n" + "\n".join(s.agent.errors)


@pytest.fixture(scope="session")
def cluster_inputs(
    moto_server: str, tiny_factory: Callable[..., Path], tiny_dataset_path: Path
) -> str:
    """The bucket of examples/04-e2e.yaml with the tiny model and task uploaded (once)."""
    client = s3_client_for(moto_server)
    if kit.BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=kit.BUCKET)
    kit.upload_inputs(tiny_factory("unit", 0), tiny_dataset_path)
    return moto_server


@pytest.fixture
def cluster(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[harness.RealCluster]:
    """The operator installed by helm, a fresh restricted namespace with the S3 Secret, MLflow up."""
    mlflow_server.start()
    with harness.release(real_cluster, tmp_path, cluster_inputs, mlflow_server.uri) as c:
        yield c


@pytest.fixture
def cluster_quick(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[harness.RealCluster]:
    """Like ``cluster``, but Job pods run tests/cluster/standin.py (artifacts in seconds)."""
    mlflow_server.start()
    with harness.release(
        real_cluster, tmp_path, cluster_inputs, mlflow_server.uri, launch_hook=quick_pods
    ) as c:
        yield c


@pytest.fixture
def cluster_gated(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[tuple[harness.RealCluster, Path]]:
    """Like ``cluster_quick``, but each stand-in step waits until the returned gate file exists
    (or its Job's own gate, ``tests.cluster.gated.job_gate``): the test decides when steps
    finish, so a fault lands mid-step every time."""
    mlflow_server.start()
    gate = tmp_path / "gate"

    def hook(pod: dict, argv: list[str], env: dict[str, str]) -> list[str]:
        job = (pod["metadata"].get("labels") or {}).get("job-name")
        if job is None:
            return argv
        gates = os.pathsep.join([str(gate), str(job_gate(gate, job))])
        return [str(kit.VENV_BIN / "python"), str(GATED), gates, str(kit.STANDIN), *argv]

    with harness.release(
        real_cluster, tmp_path, cluster_inputs, mlflow_server.uri, launch_hook=hook
    ) as c:
        yield c, gate


def quick_pods(pod: dict, argv: list[str], env: dict[str, str]) -> list[str]:
    """Job pods (not the operator) run tests/cluster/standin.py with the original argv after it."""
    if "job-name" not in (pod["metadata"].get("labels") or {}):
        return argv
    return [str(kit.VENV_BIN / "python"), str(kit.STANDIN), *argv]
