"""`operator_scale.py --cluster real`: the same measurement against a real Kubernetes control plane.

What runs is tests/cluster's tier (tests/cluster/harness.py): etcd, kube-apiserver,
kube-controller-manager (its Job controller) and kube-scheduler built from the Go module proxy
(cached under ~/.cache/spin-operator/cluster), the node agent running bound pods as local
processes, moto for S3, and the operator as the Helm chart's Deployment (its own pod, its
ServiceAccount, exactly the chart's RBAC). Only the steps are stand-ins: a Job's pod writes what
its step would leave in S3 (tests/support/step_artifacts.py, from the agent's launch hook, in the
agent's process) and then runs `true`, so it finishes at once and the Job controller completes the
Job. What is measured is the operator and the API round trips a cluster really has.

Everything is read from the API server's audit log: the operator's requests (its ServiceAccount),
the Job controller's status writes (a Job's completion: the last one before the run's next Job)
and the operator's Job creations. Peak RSS and CPU time come from the operator's /proc entry; its
S3 requests from a counting proxy (tests/cluster/s3_proxy.py) that the chart's storage.endpoint
names, while the stand-ins write to moto directly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import shutil
import statistics
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from benchmarks.operator_scale import CHECK_REQUESTS, cpu_seconds, peak_rss_mb, percentile
from tests.cluster import harness, kit
from tests.cluster.controlplane import JOB_CONTROLLER, build_binary
from tests.cluster.s3_proxy import S3FaultProxy
from tests.support import step_artifacts
from tests.support.servers import moto_environment, moto_process, s3_client_for

TRUE = shutil.which("true") or "/bin/true"
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=spin-operator"
STEPS_PER_ITERATION = 3


def min_requests_per_iteration(iterations_per_run: int) -> float:
    """The least an operator could send per iteration here, from first principles.

    Per step (generate, train, evaluate): 1 Job create, 1 `/status` patch (the previous step's
    completion and this step's start fold into one) and 1 Event (users follow runs with
    `kubectl describe`); training's headless Service: 1 create. Per run, shared by its iterations:
    1 final status patch (Succeeded) and 1 `get` of the credentials Secret the spec references
    (the chart's `storage.credentialsSecret`: a missing Secret must fail the run before any Job),
    and the check Job that leads iteration 0 like any step (3). Nothing else is needed: Job state
    arrives over one label-selected watch, manifests are read from S3, the Service can be left to
    ownerReference garbage collection. So for 2 iterations 3 x 3 + 1 + 5/2 = 12.5. (The emulated
    mode's floor has no Secret: it references none.)
    """
    return STEPS_PER_ITERATION * 3 + 1 + (2 + CHECK_REQUESTS) / iterations_per_run


def spinrun(name: str, namespace: str, iterations: int) -> dict[str, Any]:
    """The emulated mode's SPINRun; storage (S3 prefix, Secret, endpoint) from the chart."""
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": kit.MODEL_URI},
            "dataset": {"uri": kit.DATASET_URI, "maxSamples": 64, "evalSamples": 8},
            "iterations": iterations,
            "generation": {"backend": "transformers", "replicas": 2, "gpusPerReplica": 0},
            "training": {"gpusPerNode": 0},
            "evaluation": {"enabled": True, "gpus": 0},
        },
    }


class InstantPods:
    """The agent's launch hook: a Job's pod writes its step's artifacts to S3, then runs `true`."""

    def __init__(self, scratch: pathlib.Path) -> None:
        self.scratch = scratch

    def __call__(self, pod: dict[str, Any], argv: list[str], env: dict[str, str]) -> list[str]:
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        if "job-name" not in labels:
            return argv  # the operator's own pod runs for real
        if env.get("PET_NODE_RANK", "0") == "0":  # only training's rank 0 saves the model
            index = int(env.get("JOB_COMPLETION_INDEX", "0"))
            step_artifacts.write_step(
                kit.STORAGE_URI,
                meta["namespace"],
                labels[step_artifacts.RUN_LABEL],
                int(labels[step_artifacts.ITERATION_LABEL]),
                labels[step_artifacts.STAGE_LABEL],
                self.scratch / meta["name"],
                shards=int(env.get("SPIN_NUM_SHARDS", "1")),
                indices=[index],
            )
        return [TRUE]


@contextlib.contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def stamp(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["stageTimestamp"]).timestamp()


def read_audit(path: pathlib.Path) -> list[dict[str, Any]]:
    events = []
    with path.open() as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def _namespace(event: dict[str, Any]) -> str | None:
    return (event.get("objectRef") or {}).get("namespace")


def _errors(ops: list[dict[str, Any]]) -> dict[str, int]:
    """Refused requests (HTTP >= 400) by code, verb and resource."""
    refused = collections.Counter(
        f"{code} {e['verb']} {(e.get('objectRef') or {}).get('resource')}"
        for e in ops
        if (code := (e.get("responseStatus") or {}).get("code", 200)) >= 400
    )
    return dict(sorted(refused.items()))


@dataclasses.dataclass(frozen=True)
class Transition:
    seconds: float  # the Job's completion to the next Job's creation
    job: str
    next_job: str
    completed: float  # when the Job completed (API server time)


def transitions(events: list[dict[str, Any]], namespace: str) -> list[Transition]:
    """Per run: each Job's completion (the Job controller's last status write before the run's
    next Job) to the operator's creation of that next Job (both as the API server stamped them)."""
    creations: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    writes: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        ref = e.get("objectRef") or {}
        if ref.get("resource") != "jobs" or ref.get("namespace") != namespace:
            continue
        if e["user"]["username"] == JOB_CONTROLLER:
            writes[ref.get("name", "")].append(stamp(e))
        elif (
            e.get("verb") == "create"
            and (e.get("responseStatus") or {}).get("code") == 201
            and "dryRun" not in e.get("requestURI", "")
        ):
            name = ref.get("name", "")
            creations[name.rsplit("-i", 1)[0]].append((stamp(e), name))
    out = []
    for jobs in creations.values():
        jobs.sort()
        for (_, name), (created, next_name) in itertools.pairwise(jobs):
            before = [t for t in writes.get(name, []) if t <= created]
            if before:
                out.append(Transition(created - max(before), name, next_name, max(before)))
    return out


def slowest(found: list[Transition], start: float, count: int = 5) -> list[list[Any]]:
    """The slowest transitions as [seconds, Job, next Job, seconds from the first SPINRun's
    creation to the Job's completion]: whether the tail is one wave (all early: the runs'
    starts) or spread over the run (the API server's latency under load)."""
    worst = sorted(found, key=lambda t: t.seconds)[-count:][::-1]
    return [[round(t.seconds, 2), t.job, t.next_job, round(t.completed - start, 1)] for t in worst]


def server_ms(ops: list[dict[str, Any]]) -> dict[str, float]:
    """p50/p99 of the operator's requests as the API server saw them (received to answered):
    the part of a transition that is the API server's, not the operator's."""
    took = sorted(
        1000
        * (stamp(e) - datetime.datetime.fromisoformat(e["requestReceivedTimestamp"]).timestamp())
        for e in ops
        if e.get("verb") != "watch"
    )
    if not took:
        return {}
    return {"p50": round(statistics.median(took), 1), "p99": round(percentile(took, 0.99), 1)}


def unfiltered_job_reads(events: list[dict[str, Any]]) -> int:
    """The operator's Job lists and watches without its label selector (all must carry it)."""
    count = 0
    for e in events:
        ref = e.get("objectRef") or {}
        if ref.get("resource") == "jobs" and e.get("verb") in ("list", "watch"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(e["requestURI"]).query)
            count += query.get("labelSelector") != [MANAGED_SELECTOR]
    return count


def run_real(
    runs: int, iterations: int, timeout: float, keep: pathlib.Path | None = None
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="spin-bench-real-") as tmp:
        workdir = pathlib.Path(tmp)
        binary = build_binary()
        with (
            moto_process(workdir / "moto.log") as endpoint,
            environment(moto_environment(endpoint, workdir)),
            harness.session(binary, workdir / "cluster") as s,
        ):
            s3_client_for(endpoint).create_bucket(Bucket=kit.BUCKET)
            # The operator's S3 endpoint (the chart's storage.endpoint) is a proxy that counts;
            # the stand-in pods write from this process straight to moto, so only the
            # operator's requests pass through it.
            proxy = S3FaultProxy(endpoint).start()
            try:
                with harness.release(
                    s, workdir, proxy.url, "", launch_hook=InstantPods(workdir / "scratch")
                ) as c:
                    try:
                        return measure(c, runs, iterations, timeout, proxy)
                    finally:
                        if keep is not None:
                            keep.mkdir(parents=True, exist_ok=True)
                            shutil.copy(c.plane.audit_log, keep / "audit.log")
                            if (operator_log := c.operator_log()) is not None:
                                shutil.copy(operator_log, keep / "operator.log")
            finally:
                proxy.stop()
    raise AssertionError("unreachable")


def measure(
    c: harness.RealCluster,
    runs: int,
    iterations: int,
    timeout: float,
    s3: S3FaultProxy | None = None,
) -> dict[str, Any]:
    """The measurement on a release; `s3`: the proxy in front of the operator's S3 endpoint
    (its requests are counted: `s3_requests_per_iteration`, `s3_not_found_per_iteration`)."""
    pod = c.operator_pod()
    assert pod is not None, "no operator pod after helm install --wait"
    pid = c.agent.find(harness.RELEASE_NAMESPACE, pod["metadata"]["name"]).proc.pid  # type: ignore[union-attr]
    api = c.plane.api()
    time.sleep(2.0)  # let the operator's startup (discovery, first lists) settle: not per-iteration
    baseline = len(read_audit(c.plane.audit_log))
    s3_before = collections.Counter(s3.answered) if s3 is not None else None
    load_before = os.getloadavg()[0]
    start = time.time()
    path = f"/apis/selfplay.dev/v1alpha1/namespaces/{c.namespace}/spinruns"
    for i in range(runs):
        api.request("POST", path, spinrun(f"bench-{i:04d}", c.namespace, iterations))

    def phases() -> collections.Counter[str]:
        items = (api.get(path) or {}).get("items", [])
        return collections.Counter((r.get("status") or {}).get("phase", "None") for r in items)

    deadline = time.monotonic() + timeout
    while sum((counts := phases())[p] for p in kit.TERMINAL) < runs:
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
    wall = time.time() - start
    rss, cpu = peak_rss_mb(pid), cpu_seconds(pid)
    s3_answered = s3.answered - s3_before if s3 is not None and s3_before is not None else None
    events = read_audit(c.plane.audit_log)[baseline:]
    everywhere = [e for e in events if harness.OPERATOR_GROUP in (e["user"].get("groups") or [])]
    # This measurement's runs are in c.namespace: in a shared test cluster the operator also
    # acts for an earlier test's runs (their namespace terminating, their Jobs deleted), which
    # would count as this benchmark's requests. Cluster-scoped requests (None) stay in.
    ops = [e for e in everywhere if _namespace(e) in (None, c.namespace)]
    found = transitions(events, c.namespace)
    lat = [t.seconds for t in found]
    by_kind: collections.Counter[str] = collections.Counter()
    for e in ops:
        ref = e.get("objectRef") or {}
        resource = ref.get("resource", "?") + (
            f"/{ref['subresource']}" if "subresource" in ref else ""
        )
        dry = " (dry run)" if "dryRun" in e.get("requestURI", "") else ""
        by_kind[f"{e['verb']} {resource}{dry}"] += 1
    # Lease renewals (leader election, when on) are per second, not per iteration.
    leases = sum(v for k, v in by_kind.items() if " leases" in k)
    total = runs * iterations
    return {
        "cluster": "real",
        "runs": runs,
        "p50_s": round(statistics.median(lat), 4) if lat else None,
        "p99_s": round(percentile(lat, 0.99), 4) if lat else None,
        "requests_per_iteration": round((len(ops) - leases) / total, 2),
        "min_requests_per_iteration": round(min_requests_per_iteration(iterations), 2),
        "rss_mb": round(rss, 1),
        "unfiltered_job_reads": unfiltered_job_reads(everywhere),
        "iterations_per_run": iterations,
        "runs_succeeded": counts["Succeeded"],
        "transitions": len(lat),
        "slowest_transitions": slowest(found, start),
        "operator_request_server_ms": server_ms(ops),
        "wall_s": round(wall, 2),
        "requests_by_kind": {k: round(v / total, 2) for k, v in sorted(by_kind.items())},
        "errors": _errors(ops),
        # Refusals for runs of other namespaces: in a shared test cluster, the runs of an earlier
        # test whose namespace is terminating (events there are refused 403, patches of runs
        # already gone 404). Not this measurement's runs, so apart from `errors`.
        "errors_elsewhere": _errors(
            [e for e in everywhere if _namespace(e) not in (None, c.namespace)]
        ),
        **(
            {
                "s3_requests_per_iteration": round(sum(s3_answered.values()) / total, 2),
                "s3_not_found_per_iteration": round(s3_answered[404] / total, 2),
            }
            if s3_answered is not None
            else {}
        ),
        "operator_cpu_s": cpu,
        "operator_cpu_ms_per_iteration": round(1000 * cpu / total, 1),
        "pods": len(c.pods()),
        "load_avg_1m": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "cpus": os.cpu_count(),
    }
