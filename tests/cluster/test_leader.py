"""Two operator replicas with leader election on a real control plane; the leader SIGKILLed.

The chart runs ``replicas: 2`` with ``leaderElection.enabled``. Both pods watch; only the Lease
holder writes. While generation runs (gated stand-in steps), the leader's container is SIGKILLed
and its restart is held back (as on a node that stopped answering), so the standby must take the
Lease once it expired, and finish the run: each Job created exactly once (audit log), and no write
by the standby before it held the Lease.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness, kit
from tests.cluster.harness import OPERATOR_GROUP, RELEASE_NAMESPACE, RealCluster
from tests.cluster.kit import wait_for
from tests.cluster.test_faults import finish_once, start_gated
from tests.support.servers import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

LEASE_SECONDS = 6
GATED = Path(__file__).with_name("gated.py")
POD_NAME = "authentication.kubernetes.io/pod-name"
WRITES = ("create", "patch", "update", "delete")


@pytest.fixture
def two_operators(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[tuple[RealCluster, Path, Path]]:
    """Gated stand-in steps; two operator pods with ports of their own (they share this host's
    network) whose container, once restarted, waits while ``hold`` exists."""
    mlflow_server.start()
    gate, hold = tmp_path / "gate", tmp_path / "hold"

    def hook(pod: dict, argv: list[str], env: dict[str, str]) -> list[str]:
        if "job-name" in (pod["metadata"].get("labels") or {}):
            return [str(kit.VENV_BIN / "python"), str(GATED), str(gate), str(kit.STANDIN), *argv]
        env["SPIN_HEALTH_PORT"], env["SPIN_METRICS_PORT"] = (
            str(kit.free_port()),
            str(kit.free_port()),
        )
        wait = f'while [ -e "{hold}" ]; do sleep 0.2; done; exec "$@"'
        return ["bash", "-c", wait, "operator", *argv]

    values = {
        "replicas": "2",
        "leaderElection.enabled": "true",
        "leaderElection.leaseSeconds": str(LEASE_SECONDS),
    }
    with harness.release(
        real_cluster,
        tmp_path,
        cluster_inputs,
        mlflow_server.uri,
        launch_hook=hook,
        operator_values=values,
    ) as c:
        yield c, gate, hold


def lease(c: RealCluster) -> dict[str, Any]:
    path = f"/apis/coordination.k8s.io/v1/namespaces/{RELEASE_NAMESPACE}/leases"
    items = (c.plane.api().get(path) or {}).get("items") or []
    assert len(items) <= 1, items
    return items[0] if items else {}


def holder(c: RealCluster) -> str:
    return str((lease(c).get("spec") or {}).get("holderIdentity") or "")


def writers(c: RealCluster) -> list[tuple[str, str, str]]:
    """(pod, verb, resource) of every write the operator pods sent, in order."""
    out = []
    for event in c.plane.audit(OPERATOR_GROUP):
        if event.get("verb") not in WRITES:
            continue
        pod = ((event.get("user") or {}).get("extra") or {}).get(POD_NAME) or [""]
        out.append((pod[0], event["verb"], (event.get("objectRef") or {}).get("resource", "")))
    return out


def test_standby_takes_over_after_the_leader_is_killed(
    two_operators: tuple[RealCluster, Path, Path], tmp_path: Path
) -> None:
    c, gate, hold = two_operators
    pods = {p["metadata"]["name"] for p in c.pods(RELEASE_NAMESPACE)}
    assert len(pods) == 2, pods
    wait_for(lambda: holder(c) in pods, 60, "one operator pod to hold the Lease", 0.25)
    leader = holder(c)
    (standby,) = pods - {leader}
    start_gated(c, tmp_path)

    hold.touch()  # the killed container stays down: its Lease must expire
    c.agent.kill_container(c.agent.find(RELEASE_NAMESPACE, leader))
    killed = time.monotonic()
    wait_for(lambda: holder(c) == standby, 120, "the standby to take the Lease", 0.25)
    took = time.monotonic() - killed
    assert took >= LEASE_SECONDS * 0.8, f"the Lease moved after {took:.1f}s, before it expired"
    assert lease(c)["spec"]["leaseTransitions"] >= 1
    gate.touch()
    finish_once(c)  # the run finishes; each Job created exactly once

    writes = writers(c)
    first_lease_write = next(
        i for i, (pod, _, res) in enumerate(writes) if pod == standby and res == "leases"
    )
    early = [w for w in writes[:first_lease_write] if w[0] == standby]
    assert not early, f"the standby wrote before it held the Lease: {early}"
    by_leader = {res for pod, _, res in writes if pod == leader and res != "leases"}
    by_standby = {res for pod, _, res in writes[first_lease_write:] if pod == standby}
    assert "jobs" in by_leader and "jobs" in by_standby, (by_leader, by_standby)
    hold.unlink()
    print(
        f"\nCLUSTER leader SIGKILL: standby took the Lease after {took:.1f}s "
        f"(leaseSeconds {LEASE_SECONDS})"
    )
