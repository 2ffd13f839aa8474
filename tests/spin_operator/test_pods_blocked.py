"""Pods that cannot start surface on the SPINRun (issue 14, item 2).

The decision is the pure reconciler's: a Job whose pods are blocked (cause and message from
`observe.pod_blockage`) sets the PodsBlocked condition and posts one Warning event per new cause;
a pod waiting longer than failurePolicy.pendingTimeoutSeconds fails the step. The observation
(`observe.pod_blockage`) is a pure function of the Job, its pods and its events, tested here on
the shapes the kubelet, the scheduler and the Job controller write.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from spin_operator.conditions import get_condition
from spin_operator.decision import CreateStep, Decision, DeleteJob, Event
from spin_operator.observe import Blockage, job_state, pod_blockage
from spin_operator.reconciler import reconcile
from tests.spin_operator.reconciler_world import World, spin_object

CAUSES = [
    (
        "Unschedulable",
        "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector.",
    ),
    ("ImagePullBackOff", 'Back-off pulling image "registry/runtime:nope"'),
    ("CreateContainerConfigError", "couldn't find key AWS_ACCESS_KEY_ID in Secret ns/s3-creds"),
    ("FailedCreate", 'pods "run-i0-gen-0" is forbidden: violates PodSecurity "restricted:latest"'),
    (
        "FailedCreate",
        'pods "run-i0-gen-0" is forbidden: exceeded quota: gpu, requested: nvidia.com/gpu=1',
    ),
]


def started_at_generation(**spec: Any) -> tuple[World, str]:
    w = World(spin_object(**spec))
    w.past_the_check()
    w.reconcile()
    w.reconcile()  # the check Job, recorded as passed, is swept
    (job,) = w.active()
    assert job.stage == "generate" and len(w.jobs) == 1
    return w, job.name


def block(
    w: World, name: str, reason: str, message: str, since: str | None = "2026-01-01T00:00:00Z"
) -> None:
    w.jobs[name] = replace(
        w.jobs[name],
        starting=True,
        blocked_reason=reason,
        blocked_message=message,
        pending_since=since,
    )


def decide(w: World, now: str) -> Decision:
    """One pass at wall time `now` (the world's own clock wraps every hour)."""
    obs = replace(w.observed({0}, True, set(), True), now=now)
    d = reconcile(w.spec(), w.status, obs)
    w.check(d)
    w.apply(d)
    return d


@pytest.mark.parametrize(("reason", "message"), CAUSES)
def test_each_cause_becomes_a_condition_and_one_warning_event(reason: str, message: str) -> None:
    w, name = started_at_generation()
    block(w, name, reason, message)
    d = decide(w, "2026-01-01T00:01:00Z")
    c = get_condition(w.status.conditions, "PodsBlocked")
    assert c is not None and (c.status, c.reason) == ("True", reason)
    assert name in c.message and message in c.message and "generate of iteration 0" in c.message
    events = [e for e in d.of_type(Event) if e.type == "Warning"]
    assert [(e.reason, message in e.message) for e in events] == [(reason, True)]
    assert message in (w.status.iterations[0].generate.message or "")
    assert w.status.phase == "Running"  # blocked is not failed, until the timeout
    d = decide(w, "2026-01-01T00:02:00Z")  # the same cause again: no second event
    assert not [a for a in d.actions if getattr(a, "type", "") == "Warning"]


def test_cause_changes_reports_the_new_one_and_clears_when_pods_start() -> None:
    w, name = started_at_generation()
    block(w, name, "ErrImagePull", "pull failed")
    decide(w, "2026-01-01T00:01:00Z")
    block(w, name, "ImagePullBackOff", "Back-off pulling image")
    d = decide(w, "2026-01-01T00:02:00Z")
    assert [a.reason for a in d.actions if getattr(a, "type", "") == "Warning"] == [
        "ImagePullBackOff"
    ]
    w.jobs[name] = replace(
        w.jobs[name],
        state="Running",
        starting=False,
        blocked_reason="",
        blocked_message="",
        pending_since=None,
    )
    decide(w, "2026-01-01T00:03:00Z")
    c = get_condition(w.status.conditions, "PodsBlocked")
    assert c is not None and (c.status, c.reason, c.message) == ("False", "PodsStarted", "")
    assert w.status.iterations[0].generate.message is None


def test_no_condition_at_all_while_nothing_was_ever_blocked() -> None:
    w, name = started_at_generation()
    w.jobs[name] = replace(w.jobs[name], starting=True, pending_since="2026-01-01T00:00:00Z")
    decide(w, "2026-01-01T00:01:00Z")
    assert get_condition(w.status.conditions, "PodsBlocked") is None


@pytest.mark.parametrize(
    ("timeout", "waited", "fails"),
    [
        (3600, 3599, False),
        (3600, 3601, True),
        (60, 61, True),
        (60, 60, False),
        (0, 10**6, False),
    ],
)
def test_pending_timeout_fails_the_step_with_the_cause(
    timeout: int, waited: int, fails: bool
) -> None:
    w, name = started_at_generation(
        failurePolicy={"pendingTimeoutSeconds": timeout, "maxRetries": 2}
    )
    block(w, name, "Unschedulable", "0/3 nodes are available: insufficient nvidia.com/gpu")
    hours, rest = divmod(waited, 3600)
    now = f"2026-01-{1 + hours // 24:02d}T{hours % 24:02d}:{rest // 60:02d}:{rest % 60:02d}Z"
    d = decide(w, now)
    if not fails:
        assert w.status.phase == "Running" and not d.of_type(DeleteJob)
        return
    assert w.status.phase == "Failed" and not d.of_type(
        CreateStep
    )  # not retried: it would wait again
    failed = get_condition(w.status.conditions, "Failed")
    assert failed is not None and failed.reason == "PendingTimeout"
    assert (
        "pendingTimeoutSeconds" in failed.message
        and "insufficient nvidia.com/gpu" in failed.message
    )
    assert [a.name for a in d.of_type(DeleteJob)] == [name]
    assert w.status.iterations[0].generate.phase == "Failed"
    blocked = get_condition(w.status.conditions, "PodsBlocked")
    assert blocked is None or blocked.status == "False"


def test_a_timeout_without_a_known_cause_still_fails_and_says_pending() -> None:
    w, name = started_at_generation(failurePolicy={"pendingTimeoutSeconds": 60})
    w.jobs[name] = replace(w.jobs[name], starting=True, pending_since="2026-01-01T00:00:00.5Z")
    decide(w, "2026-01-01T00:05:00Z")
    assert w.status.phase == "Failed" and "pods still Pending" in (w.status.message or "")


def test_suspended_or_queued_jobs_never_time_out() -> None:
    w, name = started_at_generation(
        failurePolicy={"pendingTimeoutSeconds": 60}, scheduling={"queueName": "q"}
    )
    block(w, name, "Unschedulable", "x")
    w.jobs[name] = replace(w.jobs[name], state="Suspended")
    decide(w, "2026-01-02T00:00:00Z")
    assert w.status.phase == "Running"


def test_the_timeout_is_mutable_mid_run() -> None:
    w, name = started_at_generation()
    block(w, name, "ImagePullBackOff", "x")
    decide(w, "2026-01-01T00:10:00Z")
    assert w.status.phase == "Running"
    w.edit(failurePolicy={"pendingTimeoutSeconds": 300})
    decide(w, "2026-01-01T00:11:00Z")
    assert w.status.phase == "Failed"
    refused = get_condition(w.status.conditions, "SpecChangeRefused")
    assert refused is None or refused.status == "False"


def test_blocked_control_arm_steps_are_both_reported() -> None:
    w = World(spin_object(controlArm={"enabled": True}))
    w.past_the_check()
    w.reconcile()
    gen = w.active()[0].name
    w.succeed(gen)
    w.reconcile()
    names = sorted(j.name for j in w.active())
    assert len(names) == 2
    for n in names:
        block(w, n, "Unschedulable", f"no node for {n}")
    d = decide(w, "2026-01-01T00:01:00Z")
    c = get_condition(w.status.conditions, "PodsBlocked")
    assert c is not None and all(n in c.message for n in names)
    assert len([a for a in d.actions if getattr(a, "type", "") == "Warning"]) == 2


# --------------------------------------------------------------------------- observation


def job(name: str = "run-i0-gen", **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {
                "selfplay.dev/iteration": "0",
                "selfplay.dev/attempt": "0",
                "selfplay.dev/stage": "generate",
            },
        },
        "spec": {"parallelism": 2, "completions": 2},
        "status": {"startTime": "2026-01-01T00:00:01Z", **status},
    }


def pod(
    name: str, phase: str = "Pending", job_name: str = "run-i0-gen", **status: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": f"2026-01-01T00:00:0{name[-1]}Z",
            "labels": {"batch.kubernetes.io/job-name": job_name},
        },
        "status": {"phase": phase, **status},
    }


def waiting(reason: str, message: str) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {"name": "generate", "state": {"waiting": {"reason": reason, "message": message}}}
        ]
    }


def failed_create(
    message: str, name: str = "run-i0-gen", at: str = "2026-01-01T00:00:05Z"
) -> dict[str, Any]:
    return {
        "type": "Warning",
        "reason": "FailedCreate",
        "message": message,
        "firstTimestamp": at,
        "lastTimestamp": at,
        "involvedObject": {"kind": "Job", "name": name},
    }


@pytest.mark.parametrize(
    "reason",
    [
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "InvalidImageName",
        "CreateContainerError",
    ],
)
def test_blocking_container_waits(reason: str) -> None:
    b = pod_blockage(
        job(active=2), [pod("p-1", **waiting(reason, "why")), pod("p-2", "Running")], []
    )
    assert b == Blockage(reason, "pod p-1: why", "2026-01-01T00:00:01Z")


def test_containers_being_created_are_pending_but_not_blocked() -> None:
    b = pod_blockage(
        job(active=2),
        [
            pod("p-1", **waiting("ContainerCreating", "")),
            pod("p-2", **waiting("PodInitializing", "")),
        ],
        [],
    )
    assert b == Blockage("", "", "2026-01-01T00:00:01Z")


def test_unschedulable_pod() -> None:
    cond = {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/2 nodes are available",
            }
        ]
    }
    b = pod_blockage(job(active=2), [pod("p-2", **cond), pod("p-1", "Running")], [])
    assert (b.reason, b.message, b.since) == (
        "Unschedulable",
        "pod p-2: 0/2 nodes are available",
        "2026-01-01T00:00:02Z",
    )


def test_failed_create_when_pods_are_missing_latest_event_wins() -> None:
    events = [
        failed_create("old quota", at="2026-01-01T00:00:03Z"),
        failed_create("violates PodSecurity", at="2026-01-01T00:00:09Z"),
        failed_create("other job", name="other"),
        {**failed_create("normal"), "type": "Normal"},
    ]
    b = pod_blockage(job(), [], events)
    # never had a pod: it has waited since the Job started, however many refusals (Events) came
    assert b == Blockage("FailedCreate", "violates PodSecurity", "2026-01-01T00:00:01Z")


def test_failed_create_after_some_pods_got_in_waits_since_the_first_later_refusal() -> None:
    running = pod("p-1", "Running")  # created 00:00:01
    events = [
        failed_create("before", at="2026-01-01T00:00:00Z"),
        failed_create("quota", at="2026-01-01T00:00:07Z"),
        failed_create("quota again", at="2026-01-01T00:00:30Z"),
    ]
    b = pod_blockage(job(active=1), [running], events)
    assert b == Blockage("FailedCreate", "quota again", "2026-01-01T00:00:07Z")


def test_failed_create_ignored_once_every_pod_exists() -> None:
    b = pod_blockage(
        job(active=2), [pod("p-1", "Running"), pod("p-2", "Running")], [failed_create("stale")]
    )
    assert b == Blockage()


def test_no_pod_yet_waits_since_the_job_started() -> None:
    assert pod_blockage(job(), [], []) == Blockage(since="2026-01-01T00:00:01Z")


def test_other_jobs_pods_and_finished_pods_do_not_count() -> None:
    other = pod("x-1", job_name="other", **waiting("ImagePullBackOff", "not ours"))
    done = pod("p-1", "Succeeded")
    b = pod_blockage(job(active=1, succeeded=1), [other, done, pod("p-2", "Running")], [])
    assert b == Blockage()


@pytest.mark.parametrize(
    ("status", "starting"),
    [
        ({}, True),
        ({"active": 2, "ready": 0}, True),
        ({"active": 2, "ready": 1}, True),
        ({"active": 2, "ready": 2}, False),
        ({"active": 1, "ready": 1, "succeeded": 1}, False),
        ({"conditions": [{"type": "Complete", "status": "True"}]}, False),
    ],
)
def test_which_jobs_are_worth_a_look(status: dict[str, Any], starting: bool) -> None:
    observed = job_state(job(**status))
    assert observed is not None and observed.starting is starting


def test_suspended_job_is_not_worth_a_look() -> None:
    body = job()
    body["spec"]["suspend"] = True
    observed = job_state(body)
    assert observed is not None and not observed.starting


# --------------------------------------------------------------------------- the looks (facts.py)


class ListingKube:
    """Answers the two namespace-wide lists of a look; counts them."""

    def __init__(self, pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        self.pods, self.events = pods, events
        self.calls: list[tuple[str, dict[str, str]]] = []

    async def request(
        self, method: str, path: str, params: dict[str, str] | None = None, **_: Any
    ) -> dict[str, Any]:
        self.calls.append((path, dict(params or {})))
        await asyncio.sleep(0.01)  # both runs' looks are in flight at once
        return {"items": self.pods if path.endswith("/pods") else self.events}


async def test_runs_waiting_in_one_namespace_share_one_list_of_pods_and_events() -> None:
    """Each waiting Job's cause from one list of the operator's pods and one of FailedCreate
    events per namespace, not two requests per Job (at 250 runs those were half of all)."""
    from spin_operator.endpoints import StoragePools
    from spin_operator.facts import Facts
    from spin_operator.metrics import Metrics
    from spin_operator.settings import Settings
    from spin_operator.steps import RunRef

    a, b = job("a-i0-gen"), job("b-i0-gen")
    for body, uid in ((a, "uid-a"), (b, "uid-b")):
        body["metadata"]["namespace"] = "team-a"
        body["metadata"]["ownerReferences"] = [{"kind": "SPINRun", "controller": True, "uid": uid}]
    kube = ListingKube(
        [
            pod("a-1", job_name="a-i0-gen", **waiting("ImagePullBackOff", "no such image")),
            pod("b-1", job_name="b-i0-gen"),
        ],
        [failed_create("exceeded quota", name="b-i0-gen")],
    )
    jobs = {}
    facts = Facts(Settings(), kube, Metrics(), StoragePools(), jobs, lambda *_: None, 20.0)  # type: ignore[arg-type]
    runs = [RunRef("team-a", "a", "uid-a"), RunRef("team-a", "b", "uid-b")]
    for run, body in zip(runs, (a, b), strict=True):
        seen = job_state(body)
        assert seen is not None and seen.starting
        jobs[(run.namespace, run.name)] = {seen.name: (run.uid, seen)}
        facts.job_seen(run.namespace, seen, body, deleted=False)
        facts._waiting_since[(run.uid, seen.name)] = time.monotonic() - 30  # waited pod_check
    looked: list[RunRef] = []
    facts.on_looked = looked.append
    # The passes do not wait for the lists (a slow list held each run's next Job): both go on,
    # and each run is handed back for another pass once the shared lists are in.
    await asyncio.gather(*(facts.look_at_pods(run) for run in runs))
    assert facts._blocked == {}
    while len(looked) < 2:
        await asyncio.sleep(0.01)
    assert sorted(r.name for r in looked) == ["a", "b"]  # each found a cause: a pass for each
    assert sorted(path for path, _ in kube.calls) == [
        "/api/v1/namespaces/team-a/events",
        "/api/v1/namespaces/team-a/pods",
    ]
    assert {"labelSelector": "app.kubernetes.io/managed-by=spin-operator"} in [
        params for _, params in kube.calls
    ]
    blocked = {name: (b.reason, b.message) for (_, name), (_, b) in facts._blocked.items()}
    assert blocked == {
        "a-i0-gen": ("ImagePullBackOff", "pod a-1: no such image"),
        "b-i0-gen": ("FailedCreate", "exceeded quota"),  # 1 of its 2 pods: the quota refused
    }


async def test_a_slow_look_at_pods_never_holds_a_pass() -> None:
    """At 250 runs the namespace's FailedCreate events took 7-12 s to list: a pass waiting for
    them held the run's next Job as long. The pass goes on at once; the lists' finding is
    recorded when they are in, and the run is handed back (`on_looked`) only when it changed."""
    from spin_operator.endpoints import StoragePools
    from spin_operator.facts import Facts
    from spin_operator.metrics import Metrics
    from spin_operator.settings import Settings
    from spin_operator.steps import RunRef

    gate = asyncio.Event()
    stuck = pod("a-1", job_name="a-i0-gen", **waiting("ImagePullBackOff", "no such image"))

    class SlowKube:
        fail = False
        pods: list[dict[str, Any]] = [stuck]

        async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
            await gate.wait()
            if self.fail:
                raise OSError("connection reset")
            return {"items": self.pods if path.endswith("/pods") else []}

    body = job("a-i0-gen")
    body["metadata"]["namespace"] = "team-a"
    body["metadata"]["ownerReferences"] = [{"kind": "SPINRun", "controller": True, "uid": "u"}]
    seen = job_state(body)
    assert seen is not None and seen.starting
    run, k = RunRef("team-a", "a", "u"), ("u", seen.name)
    kube = SlowKube()
    jobs = {("team-a", "a"): {seen.name: ("u", seen)}}
    facts = Facts(Settings(), kube, Metrics(), StoragePools(), jobs, lambda *_: None, 20.0)  # type: ignore[arg-type]
    looked: list[RunRef] = []
    facts.on_looked = looked.append
    facts.job_seen("team-a", seen, body, deleted=False)
    facts._waiting_since[k] = time.monotonic() - 30
    await asyncio.wait_for(facts.look_at_pods(run), timeout=1.0)  # the list hangs: no wait
    await asyncio.wait_for(facts.look_at_pods(run), timeout=1.0)  # one list, still in flight
    assert k not in facts._blocked and not looked
    gate.set()
    while not looked:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert looked == [run]  # the cause is new: one more pass (the second look's adds nothing)
    assert facts._blocked[k][1].reason == "ImagePullBackOff"
    # the same finding again: recorded, no pass asked for
    facts._blocked[k] = (time.monotonic() - 30, facts._blocked[k][1])
    facts._listed.clear()
    looked.clear()
    gate.clear()
    await facts.look_at_pods(run)
    gate.set()
    await asyncio.sleep(0.05)
    assert looked == [] and time.monotonic() - facts._blocked[k][0] < 1
    # a failed list: nothing recorded, nobody handed back, the next due look lists again
    facts._blocked[k] = (time.monotonic() - 30, facts._blocked[k][1])
    facts._listed.clear()
    kube.fail = True
    gate.clear()
    await facts.look_at_pods(run)
    gate.set()
    await asyncio.sleep(0.05)
    assert looked == [] and "team-a" not in facts._listed
    assert time.monotonic() - facts._blocked[k][0] >= 29
