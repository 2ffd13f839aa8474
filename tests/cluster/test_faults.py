"""Faults only a real control plane can show: the API server and etcd restarted mid-run, the
garbage collector removing a deleted run's children, a pod evicted by its node, the operator's
RBAC taken away. Steps are gated stand-ins (tests/cluster/gated.py): each runs until the test
opens the gate, so every fault lands while a step runs.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from spin_operator.naming import job_name
from tests.cluster import kit
from tests.cluster.harness import RealCluster
from tests.cluster.kit import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "faulty"
TIMEOUT = 300.0


def running_pods(c: RealCluster, job: str) -> int:
    return sum(
        (p.get("status") or {}).get("phase") == "Running"
        for p in c.pods()
        if (p["metadata"].get("labels") or {}).get("job-name") == job
        and not p["metadata"].get("deletionTimestamp")
    )


def start_gated(c: RealCluster, tmp_path: Path, iterations: int = 1) -> str:
    # finished Jobs and pods kept (retention.finishedJobs: Retain): the tests read them back
    c.apply(
        kit.spinrun_file(
            tmp_path, RUN, spec__iterations=iterations, spec__retention={"finishedJobs": "Retain"}
        )
    )
    gen = job_name(RUN, 0, "generate")
    wait_for(lambda: running_pods(c, gen) >= 2, TIMEOUT, f"both pods of {gen} running", 0.25)
    return gen


def finish_once(c: RealCluster, iterations: int = 1) -> None:
    run = c.wait_run(RUN, TIMEOUT)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics(RUN)
    expected = {job_name(RUN, 0, "check")} | {
        job_name(RUN, t, s) for t in range(iterations) for s in ("generate", "train", "evaluate")
    }
    created = c.job_creations()
    assert sorted(created) == sorted(expected), f"Job creations: {created}"


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_control_plane_restart_mid_run(
    cluster_gated: tuple[RealCluster, Path], tmp_path: Path, component: str
) -> None:
    """SIGKILL the API server (or etcd) while generation runs and start it again: every watch
    (the operator's, the Job controller's) breaks and resumes; the run finishes, each Job once."""
    c, gate = cluster_gated
    started = time.monotonic()
    start_gated(c, tmp_path)
    c.plane.restart(component, signal.SIGKILL)
    if component == "etcd":  # the API server's readiness depends on etcd again
        wait_for(c.plane._api_ready, 120, "the API server to be ready after etcd's restart")
    gate.touch()
    finish_once(c)
    print(f"\nCLUSTER {component} SIGKILL+restart mid-run: {time.monotonic() - started:.1f}s")


def test_deleting_a_spinrun_removes_its_children(
    cluster_gated: tuple[RealCluster, Path], tmp_path: Path
) -> None:
    """kubectl delete spinrun while pods run: the garbage collector (through ownerReferences)
    removes Jobs, pods and the training Service; nothing is left in the namespace."""
    c, _gate = cluster_gated
    started = time.monotonic()
    start_gated(c, tmp_path)
    c.kubectl("delete", "spinrun", RUN, "-n", c.namespace, "--timeout=120s")
    wait_for(lambda: not c.jobs() and not c.pods(), TIMEOUT, "Jobs and pods to be collected", 0.5)
    services = c.kubectl("get", "services", "-n", c.namespace, "-o", "name").stdout.split()
    assert services == [], services
    print(f"\nCLUSTER delete with children running: {time.monotonic() - started:.1f}s")


def test_evicted_pod_is_replaced_without_counting_as_a_failure(
    cluster_gated: tuple[RealCluster, Path], tmp_path: Path
) -> None:
    """The node evicts a generation pod (DisruptionTarget, exit 137): the Job's podFailurePolicy
    ignores it, the real Job controller starts a replacement, the step is not retried."""
    c, gate = cluster_gated
    gen = start_gated(c, tmp_path)
    victim = next(p for p in c.pods() if p["metadata"]["labels"].get("job-name") == gen)
    c.agent.evict(c.namespace, victim["metadata"]["name"])
    wait_for(lambda: running_pods(c, gen) >= 2, TIMEOUT, "a replacement pod running", 0.25)
    gate.touch()
    finish_once(c)
    evicted = next(p for p in c.pods() if p["metadata"]["name"] == victim["metadata"]["name"])
    assert any(
        cond["type"] == "DisruptionTarget" and cond["status"] == "True"
        for cond in evicted["status"]["conditions"]
    ), evicted["status"]
    run = c.run(RUN)
    assert run["status"]["iterations"][0]["generate"]["attempts"] == 1


def test_rbac_denial_surfaces_as_a_condition(
    cluster_gated: tuple[RealCluster, Path], tmp_path: Path
) -> None:
    """Take Job ``create`` away from the operator's ClusterRole (list/watch stay): the run must
    say so (a condition naming the denial) within a minute instead of retrying silently: the dry
    run of iteration 0's Jobs at start meets the API server's 403, the run fails before any Job
    exists, with a Warning event carrying the same message."""
    c, _gate = cluster_gated
    role = c.kubectl("get", "clusterrole", "-l", "app.kubernetes.io/instance=spin", "-o", "name")
    name = role.stdout.split()[0]
    rules = c.kubectl("get", name, "-o", "json")
    rule_list = json.loads(rules.stdout)["rules"]
    index = next(i for i, r in enumerate(rule_list) if "jobs" in r["resources"])
    verbs = [v for v in rule_list[index]["verbs"] if v != "create"]
    patch = [{"op": "replace", "path": f"/rules/{index}/verbs", "value": verbs}]
    c.kubectl("patch", name, "--type=json", "-p", json.dumps(patch))
    c.apply(kit.spinrun_file(tmp_path, RUN, spec__iterations=1))

    def denied() -> bool:
        conditions = (c.run(RUN).get("status") or {}).get("conditions") or []
        return any("forbidden" in (x.get("message") or "").lower() for x in conditions)

    wait_for(denied, 60, "a condition naming the RBAC denial", 0.5)
    run = c.run(RUN)
    assert run["status"]["phase"] == "Failed", run["status"]
    failed = next(x for x in run["status"]["conditions"] if x["type"] == "Failed")
    assert (
        failed["reason"] == "CreateRejected"
        and 'cannot create resource "jobs"' in failed["message"]
    ), failed
    assert c.jobs() == [] and c.job_creations() == []
    events = json.loads(c.kubectl("get", "events", "-n", c.namespace, "-o", "json").stdout)["items"]
    warnings = [
        e for e in events if e.get("reason") == "CreateRejected" and e.get("type") == "Warning"
    ]
    assert warnings and "forbidden" in warnings[0]["message"].lower(), [
        e.get("reason") for e in events
    ]
