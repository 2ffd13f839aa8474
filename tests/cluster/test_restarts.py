"""The operator down while its Jobs finish, and a training pod killed, on the real control plane.

The operator's container is SIGKILLed and held down (CrashLoopBackOff until the test lets it
restart, ``RealCluster.kill_operator(hold=...)``) while the real Job controller finishes a step:
the restarted operator must take the finished step as done from the Job's status and the
manifests, and carry on - each step's Job created once (the API server's audit log), finished
iterations kept (manifest timestamps unchanged). Steps are gated stand-ins (tests/cluster/gated.py),
so each fault lands while the step it targets runs. (The operator killed *during* training, with
real steps, is tests/cluster/test_spinrun.py's, in the default suite.)
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import pytest

from spin_operator.naming import StepKind, job_name
from tests.cluster import kit
from tests.cluster.gated import job_gate
from tests.cluster.harness import RealCluster
from tests.cluster.kit import condition, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "restarts"
TIMEOUT = 300.0
STEPS: tuple[StepKind, ...] = ("generate", "train", "evaluate")


def steps(iterations: int) -> list[str]:
    """The check before iteration 0's generation, then each step of each iteration."""
    return [job_name(RUN, 0, "check")] + [
        job_name(RUN, t, stage) for t in range(iterations) for stage in STEPS
    ]


def prefix(c: RealCluster) -> str:
    return f"{kit.STORAGE_URI}/{c.namespace}/{RUN}"


def apply_run(c: RealCluster, tmp_path: Path, iterations: int) -> None:
    # finished Jobs and pods kept (retention.finishedJobs: Retain): the checks count every one
    c.apply(
        kit.spinrun_file(
            tmp_path, RUN, spec__iterations=iterations, spec__retention={"finishedJobs": "Retain"}
        )
    )


def job_pods(c: RealCluster, job: str) -> list[dict]:
    return [p for p in c.pods() if (p["metadata"].get("labels") or {}).get("job-name") == job]


def wait_pods_running(c: RealCluster, job: str, count: int) -> None:
    wait_for(
        lambda: (
            sum((p.get("status") or {}).get("phase") == "Running" for p in job_pods(c, job))
            >= count
        ),
        TIMEOUT,
        f"{count} running pods of {job}",
        0.25,
    )


def wait_job(c: RealCluster, job: str, kind: str) -> dict:
    return wait_for(lambda: condition(c.get("job", job), kind), TIMEOUT, f"Job {job} {kind}", 0.25)


def finish(c: RealCluster) -> dict:
    run = c.wait_run(RUN, TIMEOUT)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics(RUN)
    return run


def assert_each_step_once(c: RealCluster, iterations: int) -> None:
    """Every step's Job created exactly once by the operator (audit log), no retry Job, and each
    Job's pods ran once (the real Job controller made no replacement): nothing was redone."""
    expected = steps(iterations)
    created = c.job_creations()
    assert sorted(created) == sorted(expected), f"Job creations: {created}"
    assert {j["metadata"]["name"] for j in c.jobs()} == set(expected)
    pods = collections.Counter(p["metadata"]["labels"]["job-name"] for p in c.pods())
    planned = {name: 1 if name.endswith(("-eval", "-check")) else 2 for name in expected}
    assert dict(pods) == planned, f"pods per Job: {dict(pods)}"


def assert_unchanged(before: dict[str, str], after: dict[str, str]) -> None:
    changed = {k: (v, after.get(k)) for k, v in before.items() if after.get(k) != v}
    assert before and not changed, f"artifacts rewritten after the restart: {changed}"


def operator_down(c: RealCluster) -> tuple[threading.Event, int]:
    """SIGKILL the operator and keep it down until the returned event is set (and the restart
    count to wait for then)."""
    hold = threading.Event()
    restarts = c.kill_operator(hold)

    def crash_looping() -> bool:
        status = (c.operator_pod() or {}).get("status") or {}
        state = ((status.get("containerStatuses") or [{}])[0].get("state")) or {}
        return (state.get("waiting") or {}).get("reason") == "CrashLoopBackOff"

    wait_for(crash_looping, 30, "the operator container to be down (CrashLoopBackOff)", 0.1)
    return hold, restarts


def operator_up(c: RealCluster, down: tuple[threading.Event, int]) -> None:
    hold, restarts = down
    hold.set()
    c.wait_operator_restarted(restarts)


def test_operator_killed_during_generation_sees_the_job_finish(
    cluster_gated: tuple[RealCluster, Path], tmp_path: Path
) -> None:
    """SIGKILL while generation runs; the Job completes while no operator watches; the restarted
    operator takes the finished step as done and goes on to training."""
    c, gate = cluster_gated
    started = time.monotonic()
    apply_run(c, tmp_path, iterations=1)
    gen = job_name(RUN, 0, "generate")
    wait_pods_running(c, gen, 2)
    down = operator_down(c)
    gate.touch()
    wait_job(c, gen, "Complete")
    before = kit.artifact_stamps(prefix(c))
    assert len([k for k in before if k.endswith(".manifest.json")]) == 2, before
    # nothing happened while the operator was down (the check ran before generation)
    assert c.job_creations() == [job_name(RUN, 0, "check"), gen]
    operator_up(c, down)
    run = finish(c)
    print(f"\nCLUSTER operator down while generation finished: {time.monotonic() - started:.1f}s")
    assert_each_step_once(c, 1)
    assert_unchanged(before, kit.artifact_stamps(prefix(c)))
    assert run["status"]["iterations"][0]["generate"]["attempts"] == 1


def test_operator_killed_between_iterations(
    cluster_gated: tuple[RealCluster, Path], tmp_path: Path
) -> None:
    """SIGKILL during iteration 0's evaluation; it completes with no operator: iteration 0 is
    done and nothing of iteration 1 exists. The restarted operator starts iteration 1 from θ1."""
    c, gate = cluster_gated
    started = time.monotonic()
    for job in (job_name(RUN, 0, "generate"), job_name(RUN, 0, "train")):
        job_gate(gate, job).touch()  # iteration 0 runs through to its evaluation, which waits
    apply_run(c, tmp_path, iterations=2)
    evaluation = job_name(RUN, 0, "evaluate")
    wait_pods_running(c, evaluation, 1)
    down = operator_down(c)
    gate.touch()
    wait_job(c, evaluation, "Complete")
    assert {j["metadata"]["name"] for j in c.jobs()} == set(steps(1))
    before = kit.artifact_stamps(prefix(c))
    assert "iter-000/eval/_MANIFEST.json" in before, before
    operator_up(c, down)
    run = finish(c)
    print(f"\nCLUSTER operator down between iterations: {time.monotonic() - started:.1f}s")
    assert run["status"]["progress"] == "2/2"
    assert_each_step_once(c, 2)
    assert_unchanged(before, kit.artifact_stamps(prefix(c)))
    # iteration 1 started from θ1: its training read iteration 0's model
    train1 = next(p for p in job_pods(c, job_name(RUN, 1, "train")))
    argv = c.agent.find(c.namespace, train1["metadata"]["name"]).argv
    assert any(f"{prefix(c)}/iter-000/model" in a for a in argv), argv


def test_training_pod_killed_is_retried_with_a_new_job(
    cluster_gated: tuple[RealCluster, Path], tmp_path: Path
) -> None:
    """Rank 0 SIGKILLed (exit 137): the real Job controller fails the Job (multi-node training has
    backoffLimit 0), the operator creates the retry Job ``-r1``, which trains to completion;
    generation is not redone."""
    c, gate = cluster_gated
    started = time.monotonic()
    job_gate(gate, job_name(RUN, 0, "generate")).touch()
    apply_run(c, tmp_path, iterations=1)
    train = job_name(RUN, 0, "train")
    wait_pods_running(c, train, 2)
    generated = kit.artifact_stamps(prefix(c))
    rank0 = next(
        p
        for p in job_pods(c, train)
        if p["metadata"]["annotations"].get("batch.kubernetes.io/job-completion-index") == "0"
    )
    killed = c.agent.find(c.namespace, rank0["metadata"]["name"])
    c.agent.kill_container(killed)
    failed = wait_job(c, train, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded", failed
    gate.touch()
    run = finish(c)
    print(f"\nCLUSTER training pod killed, retried: {time.monotonic() - started:.1f}s")
    retry = job_name(RUN, 0, "train", attempt=1)
    created = c.job_creations()
    assert created.count(train) == 1 and created.count(retry) == 1, created
    assert created.count(job_name(RUN, 0, "generate")) == 1, created
    assert run["status"]["iterations"][0]["train"]["attempts"] == 2
    assert killed.exit_code == 137
    assert [p["status"]["phase"] for p in job_pods(c, retry)] == ["Succeeded"] * 2
    after = kit.artifact_stamps(prefix(c))
    assert_unchanged(generated, {k: v for k, v in after.items() if k in generated})
