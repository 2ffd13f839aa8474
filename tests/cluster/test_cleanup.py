"""Deleting a run and cleaning up after it, on the real control plane (issue 14, items 4, 9, 10).

* Item 9: with ``retention.onDelete: Delete`` the run prefix is deleted only once every pod is
  gone. The steps here keep uploading for a few seconds after SIGTERM (tests/cluster/lingering.py,
  a checkpoint upload in the grace period): the Jobs are deleted with propagationPolicy
  Foreground, the garbage collector waits for the pods, and only then does the operator delete
  the prefix, so nothing written during termination is left behind.
* Item 10: the Jobs (and pods) of a finished run go once its status records their steps.
* Item 4: the chart's aggregated ClusterRoles let a user with the default ``edit`` role create
  SPINRuns in a namespace, and one with ``view`` read but not create them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_operator.naming import job_name
from tests.cluster import harness, kit
from tests.cluster.harness import RealCluster
from tests.cluster.kit import wait_for
from tests.support.servers import MlflowServer, s3_client_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

LINGERING = Path(__file__).with_name("lingering.py")
TIMEOUT = 240.0


@pytest.fixture
def cluster_lingering(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[RealCluster]:
    """Job pods run until deleted, and upload for a while after SIGTERM (lingering.py)."""
    mlflow_server.start()

    def hook(pod: dict, argv: list[str], env: dict[str, str]) -> list[str]:
        if "job-name" not in (pod["metadata"].get("labels") or {}):
            return argv
        if argv[1:4] == ["-m", "spin_runtime", "check"]:
            return argv  # the check before iteration 0 runs and finishes: generation comes after it
        return [str(kit.VENV_BIN / "python"), str(LINGERING), *argv]

    with harness.release(
        real_cluster, tmp_path, cluster_inputs, mlflow_server.uri, launch_hook=hook
    ) as c:
        yield c


def objects_under(c: RealCluster, prefix: str) -> list[str]:
    listing = s3_client_for(c.s3_endpoint).list_objects_v2(Bucket=kit.BUCKET, Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents") or []]


def test_artifacts_deleted_only_after_every_pod_is_gone(
    cluster_lingering: RealCluster, tmp_path: Path
) -> None:
    c = cluster_lingering
    run = "wiped"
    c.apply(
        kit.spinrun_file(tmp_path, run, spec__iterations=1, spec__retention={"onDelete": "Delete"})
    )
    gen = job_name(run, 0, "generate")

    def running() -> bool:
        pods = [p for p in c.pods() if (p["metadata"].get("labels") or {}).get("job-name") == gen]
        return len(pods) == 2 and all(
            (p.get("status") or {}).get("phase") == "Running" for p in pods
        )

    wait_for(running, TIMEOUT, f"both pods of {gen} running", 0.25)
    prefix = f"runs/{c.namespace}/{run}/"
    assert objects_under(c, prefix), "the run recorded nothing under its prefix"
    c.kubectl("delete", "spinrun", run, "-n", c.namespace, "--wait=false")
    wait_for(
        lambda: c.get("spinrun", run) is None, TIMEOUT, "the SPINRun gone (finalizer released)", 0.5
    )
    assert not c.jobs() and not [
        p for p in c.pods() if "job-name" in (p["metadata"].get("labels") or {})
    ]
    left = objects_under(c, prefix)
    assert left == [], f"written after the prefix was deleted: {left}"


def test_finished_jobs_go_once_recorded(cluster_quick: RealCluster, tmp_path: Path) -> None:
    c = cluster_quick
    c.apply(kit.spinrun_file(tmp_path, "tidy", spec__iterations=1))
    run = c.wait_run("tidy", TIMEOUT)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics("tidy")
    wait_for(lambda: not c.jobs(), 60, "the finished run's Jobs deleted", 0.5)
    wait_for(lambda: not c.pods(), 60, "their pods deleted", 0.5)
    expected = {job_name("tidy", 0, s) for s in ("check", "generate", "train", "evaluate")}
    assert sorted(c.job_creations()) == sorted(expected)  # each once: nothing re-run after deletion
    assert c.run("tidy")["status"]["phase"] == "Succeeded"


def can_i(c: RealCluster, user: str, verb: str, *extra: str) -> bool:
    proc = c.kubectl(
        "auth",
        "can-i",
        verb,
        "spinruns.selfplay.dev",
        *extra,
        "-n",
        c.namespace,
        "--as",
        user,
        check=False,
    )
    return proc.stdout.strip() == "yes"


def test_edit_users_create_spinruns_and_view_users_read_them(
    cluster_quick: RealCluster, tmp_path: Path
) -> None:
    c = cluster_quick
    c.kubectl(
        "create",
        "rolebinding",
        "alice-edit",
        "--clusterrole=edit",
        "--user=alice",
        "-n",
        c.namespace,
    )
    c.kubectl(
        "create", "rolebinding", "bob-view", "--clusterrole=view", "--user=bob", "-n", c.namespace
    )
    # the clusterrole-aggregation controller copies the chart's rules into edit and view
    wait_for(
        lambda: can_i(c, "alice", "create") and can_i(c, "bob", "list"), 60, "aggregated rules", 0.5
    )
    for verb in ("get", "list", "watch", "create", "update", "patch", "delete"):
        assert can_i(c, "alice", verb), verb
        assert can_i(c, "bob", verb) == (verb in ("get", "list", "watch")), verb
    assert can_i(c, "alice", "get", "--subresource=status")
    assert not can_i(c, "alice", "patch", "--subresource=status")
    path = kit.spinrun_file(tmp_path, "by-alice", spec__iterations=1)
    created = c.kubectl("--as", "alice", "create", "-n", c.namespace, "-f", str(path), check=False)
    assert created.returncode == 0, created.stderr
    assert (
        c.kubectl(
            "--as", "bob", "get", "spinrun", "by-alice", "-n", c.namespace, check=False
        ).returncode
        == 0
    )
    denied = c.kubectl(
        "--as", "bob", "delete", "spinrun", "by-alice", "-n", c.namespace, check=False
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
