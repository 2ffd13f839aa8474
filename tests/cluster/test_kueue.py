"""SPINRuns queued with Kueue on a real control plane (issues 13 and 14 item 6).

Kueue's controller manager is built from its Go module (tests/cluster/kueue.py). A run with
``spec.scheduling.queueName`` is admitted by Kueue and runs to completion; suspended mid-run its
Job is deleted (Kueue owns a queued Job's ``spec.suspend``: patching it started an endless fight)
and stays gone, the quota is released, and on resume the same attempt is queued again: every
finished iteration kept, no Job twice. Steps are stand-ins (tests/cluster/standin.py); the pods of
iteration 1 (or of every iteration, ``gate_all``) wait for a gate file the test creates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spin_operator.naming import job_name, parse_job_name
from tests.cluster import harness, kit
from tests.cluster import kueue as kq
from tests.cluster.harness import RealCluster
from tests.cluster.kit import wait_for
from tests.cluster.node_agent import LaunchHook
from tests.support.servers import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

GATED = Path(__file__).with_name("gated.py")
QUEUE = "spin"
TIMEOUT = 300
# Plenty for one run's Jobs; the quota test lowers one to what one generation Job holds.
QUOTA = {"cpu": "64", "memory": "256Gi", "ephemeral-storage": "1Ti", "nvidia.com/gpu": "8"}


@pytest.fixture(scope="module")
def kueue(
    real_cluster: harness.Session, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[kq.Kueue]:
    started = time.monotonic()
    binary = kq.build_kueue()
    built = time.monotonic() - started
    k = kq.Kueue(binary, real_cluster.plane, tmp_path_factory.mktemp("kueue"))
    try:
        k.start()
        print(
            f"\nKueue {kq.version_of(binary)}: binary ready in {built:.1f}s, "
            f"manager ready {time.monotonic() - started - built:.1f}s later"
        )
        yield k
    finally:
        k.stop()


def gated_hook(gate: Path, all_iterations: bool) -> LaunchHook:
    """Job pods run the stand-in; those of iteration >= 1 (every one with ``all_iterations``)
    first wait for ``gate``."""

    def hook(pod: dict, argv: list[str], env: dict[str, str]) -> list[str]:
        job = (pod["metadata"].get("labels") or {}).get("job-name")
        if job is None:
            return argv
        parsed = parse_job_name(job)
        standin = [str(kit.STANDIN), *argv]
        if all_iterations or (parsed is not None and parsed.iteration >= 1):
            return [str(kit.VENV_BIN / "python"), str(GATED), str(gate), *standin]
        return [str(kit.VENV_BIN / "python"), *standin]

    return hook


@pytest.fixture
def queued(
    request: pytest.FixtureRequest,
    real_cluster: harness.Session,
    kueue: kq.Kueue,
    tmp_path: Path,
    cluster_inputs: str,
    mlflow_server: MlflowServer,
) -> Iterator[tuple[RealCluster, Path]]:
    """The operator (helm), a fresh namespace with a LocalQueue ``spin`` of its own ClusterQueue,
    gated stand-in steps; the ClusterQueue goes afterwards."""
    mlflow_server.start()
    gate = tmp_path / "gate"
    hook = gated_hook(gate, all_iterations=getattr(request, "param", False))
    with harness.release(
        real_cluster, tmp_path, cluster_inputs, mlflow_server.uri, launch_hook=hook
    ) as c:
        c.kubectl("apply", "-f", "-", stdin=kq.queue_objects(c.namespace, QUEUE, QUOTA))
        kq.wait_queue(c.kubectl, c.namespace)
        try:
            yield c, gate
        finally:
            c.kubectl("delete", "clusterqueue", f"spin-{c.namespace}", "--wait=false", check=False)
            assert kueue.component is not None and kueue.component.running, kueue.tail()


def apply_run(c: RealCluster, tmp_path: Path, name: str) -> None:
    c.apply(
        kit.spinrun_file(
            tmp_path,
            name,
            spec__iterations=2,
            spec__scheduling={"queueName": QUEUE},
            spec__retention={"finishedJobs": "Retain"},
        )
    )


def suspend(c: RealCluster, name: str, on: bool) -> None:
    c.kubectl(
        "patch",
        "spinrun",
        name,
        "-n",
        c.namespace,
        "--type=merge",
        "-p",
        '{"spec": {"suspend": %s}}' % ("true" if on else "false"),
    )


def job(c: RealCluster, name: str) -> dict[str, Any] | None:
    return next((j for j in c.jobs() if j["metadata"]["name"] == name), None)


def admitted_and_running(c: RealCluster, name: str) -> bool:
    """Kueue admitted the Job (unsuspended it) and its pods run."""
    j = job(c, name)
    return bool(j and not j["spec"].get("suspend") and (j.get("status") or {}).get("active"))


def step(c: RealCluster, run: str, iteration: int, kind: str) -> dict[str, Any]:
    status = c.run(run).get("status") or {}
    its = status.get("iterations") or []
    return dict(its[iteration].get(kind) or {}) if len(its) > iteration else {}


def operator_job_patches(c: RealCluster) -> list[str]:
    return [
        (e.get("objectRef") or {}).get("name", "")
        for e in c.plane.audit(harness.OPERATOR_GROUP)
        if e.get("verb") == "patch"
        and (e.get("objectRef") or {}).get("resource") == "jobs"
        and (e.get("objectRef") or {}).get("namespace") == c.namespace
    ]


def test_suspend_and_resume_a_kueue_admitted_run(
    queued: tuple[RealCluster, Path], kueue: kq.Kueue, tmp_path: Path
) -> None:
    c, gate = queued
    run = "queued"
    started = time.monotonic()
    apply_run(c, tmp_path, run)
    gen1 = job_name(run, 1, "generate")
    try:
        wait_for(lambda: admitted_and_running(c, gen1), TIMEOUT, f"Kueue to admit {gen1}", 0.25)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{c.diagnostics(run)}\nkueue:\n{kueue.tail()}") from None
    first = [j["metadata"]["name"] for j in c.jobs()]  # iteration 0 done: its Jobs retained
    assert (c.run(run)["status"]["iterations"][0]["stage"]) == "Done"
    workloads = c.kubectl.json("get", "workloads", "-n", c.namespace)["items"]
    assert workloads and all(
        any(x["type"] == "Admitted" for x in (w.get("status") or {}).get("conditions") or [])
        for w in workloads
    ), workloads  # every Job of the run went through Kueue

    suspend(c, run, True)
    wait_for(lambda: job(c, gen1) is None, TIMEOUT, f"{gen1} deleted by the suspension", 0.25)
    held_from = time.monotonic()
    writes_at_suspend = len(kueue.job_writes(c.namespace))
    while time.monotonic() - held_from < 10:  # held: nothing comes back, nobody flips anything
        assert job(c, gen1) is None, "the suspended step's Job came back"
        time.sleep(0.5)
    status = c.run(run)["status"]
    assert status["phase"] == "Suspended", status
    suspended = next(x for x in status["conditions"] if x["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "SuspendedBySpec")
    assert step(c, run, 1, "generate")["message"].startswith("suspended"), status
    assert status["message"].endswith("(suspended)"), status
    assert len(kueue.job_writes(c.namespace)) == writes_at_suspend, "Kueue wrote to Jobs meanwhile"
    assert not [
        p
        for p in c.pods()
        if p["metadata"]["labels"].get("job-name") == gen1
        and p["status"].get("phase") in ("Pending", "Running")
    ]

    suspend(c, run, False)
    wait_for(lambda: admitted_and_running(c, gen1), TIMEOUT, f"Kueue to admit {gen1} again", 0.25)
    gate.touch()
    final = c.wait_run(run, TIMEOUT)
    assert final["status"]["phase"] == "Succeeded", c.diagnostics(run)
    elapsed = time.monotonic() - started

    its = final["status"]["iterations"]
    assert [it["stage"] for it in its] == ["Done", "Done"]
    assert all(it[k]["attempts"] == 1 for it in its for k in ("generate", "train", "evaluate"))
    created = c.job_creations()
    expected = [job_name(run, 0, "check")] + [
        job_name(run, t, k) for t in (0, 1) for k in ("generate", "train", "evaluate")
    ]
    # iteration 0 kept (its Jobs never created again); the suspended step's Job once more
    assert sorted(created) == sorted([*expected, gen1]), created
    assert set(first) == {
        job_name(run, 0, k) for k in ("check", "generate", "train", "evaluate")
    } | {gen1}
    # no fight: the operator never patched a queued Job, Kueue unsuspended each Job once
    assert operator_job_patches(c) == []
    writes = [(e.get("objectRef") or {}).get("name") for e in kueue.job_writes(c.namespace)]
    assert len(writes) <= 2 * len(created), writes
    print(
        f"\nCLUSTER Kueue-admitted run with suspend/resume: {elapsed:.1f}s "
        f"({len(created)} Job creations, {len(writes)} Job writes by Kueue)"
    )


@pytest.mark.parametrize("queued", [True], indirect=True, ids=["gate-all"])
def test_a_run_without_quota_waits_for_admission_until_a_suspension_frees_it(
    queued: tuple[RealCluster, Path], kueue: kq.Kueue, tmp_path: Path
) -> None:
    """The ClusterQueue's quota fits one generation Job: the second run's Job waits (status:
    waiting for Kueue admission) until the first run is suspended and its quota released."""
    c, _gate = queued
    apply_run(c, tmp_path, "first")
    gen_a, gen_b = job_name("first", 0, "generate"), job_name("second", 0, "generate")
    wait_for(lambda: admitted_and_running(c, gen_a), TIMEOUT, f"Kueue to admit {gen_a}", 0.25)
    workload = next(
        w
        for w in c.kubectl.json("get", "workloads", "-n", c.namespace)["items"]
        if w["metadata"]["ownerReferences"][0]["name"] == gen_a
    )
    # the one resource the Job uses that the queue covers, lowered to what this Job holds
    usage = workload["status"]["admission"]["podSetAssignments"][0]["resourceUsage"]
    resource = next(r for r in QUOTA if r in usage)
    c.kubectl(
        "patch",
        "clusterqueue",
        f"spin-{c.namespace}",
        "--type=json",
        "-p",
        json.dumps(
            [
                {
                    "op": "replace",
                    "value": usage[resource],
                    "path": f"/spec/resourceGroups/0/flavors/0/resources/{list(QUOTA).index(resource)}/nominalQuota",
                }
            ]
        ),
    )
    apply_run(c, tmp_path, "second")
    # its first Job, the check before generation, is the one that waits for quota
    check_b = job_name("second", 0, "check")
    wait_for(
        lambda: step(c, "second", 0, "check").get("message") == "waiting for Kueue admission",
        TIMEOUT,
        "the second run to wait for admission",
        0.25,
    )
    held_from = time.monotonic()
    while time.monotonic() - held_from < 5:  # no quota: it stays queued
        second = job(c, check_b)
        assert second is not None and second["spec"]["suspend"] is True
        time.sleep(0.5)
    status = c.run("second")["status"]
    assert status["phase"] == "Running" and status["message"].endswith(
        "(waiting for Kueue admission)"
    )
    suspended = next(x for x in status["conditions"] if x["type"] == "Suspended")
    assert suspended["status"] == "False"
    suspend(c, "first", True)
    wait_for(lambda: admitted_and_running(c, gen_b), TIMEOUT, f"Kueue to admit {gen_b}", 0.25)
    assert job(c, gen_a) is None and c.run("first")["status"]["phase"] == "Suspended"
