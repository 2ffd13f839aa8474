"""A kubelet and Job controller stand-in: runs the pods of batch/v1 Jobs as local processes.

Why: the end-to-end tests need the operator's Jobs to *really run* (generation, training,
evaluation) while there is no cluster and no container runtime on these machines. The executor
watches Jobs through the Kubernetes HTTP API (the emulator here; nothing in it depends on the
emulator's internals), runs every pod as a local process group with the repository's virtualenv
on ``PATH``, and writes Pod and Job status back through the ``/status`` subresource the way the
Job controller and the kubelet would, so the operator observes what it would observe in a cluster.

What a pod gets, and what is emulated:

- **containers**: started as ``tests/support/kubelet.py`` describes (argv with ``$(VAR)``
  expansion, env from values, Secrets, ConfigMaps and the downward API, volumes as local
  directories, Service hostnames such as the training master ``<job>-0.<svc>`` rewritten to
  127.0.0.1). ``JOB_COMPLETION_INDEX`` and ``HOSTNAME`` (``<job>-<index>``) are set for Indexed
  Jobs as Kubernetes does. A container without ``command`` fails to start (``StartError``: the
  image entrypoint is unknown here). ``launch_hook`` may replace what runs (load tests).
- **missing Secret/ConfigMap (or key)**: the pod stays ``Pending`` with the container waiting in
  ``CreateContainerConfigError`` (message ``secret "x" not found``), a Warning Event is posted, and
  the Job shows it as ``active`` but not ``ready`` — what a cluster shows; like the kubelet, the
  executor retries and starts the pod once the Secret appears.
- **Job semantics**: ``suspend`` (active pods are terminated and not counted; ``Suspended``
  condition; ``startTime`` reset on resume), ``parallelism``, ``completions``, ``completionMode:
  Indexed`` (one pod per pending index, ``completedIndexes``), ``backoffLimit`` (``Failed``,
  ``BackoffLimitExceeded``), ``backoffLimitPerIndex`` (``failedIndexes``), ``podFailurePolicy``
  (``onExitCodes`` and ``onPodConditions``; ``FailJob``/``FailIndex``/``Ignore``/``Count``),
  ``activeDeadlineSeconds`` (``DeadlineExceeded``). Status carries ``active``, ``ready``,
  ``terminating``, ``succeeded``, ``failed``, ``startTime``, ``completionTime`` and the
  conditions of Kubernetes >= 1.31 (``SuccessCriteriaMet`` + ``Complete``; ``FailureTarget`` +
  ``Failed`` once the pods are gone), each with reason and message. Conditions and times come
  from ``tests/support/job_driver.py``'s pure status functions and are written through its
  ``/status`` writer (resourceVersion-checked, retried on conflict). A replacement pod starts
  ``backoff_s`` after a failure (Kubernetes: 10 s doubling; short here for tests).
- **Pods in the API**: each pod is also created as a Pod object (owned by its Job, the usual
  Job labels and completion-index annotation) whose status follows the process, so
  ``kubectl get pods`` works; ``pods_in_api=False`` skips that to save requests under load.
- **deletion**: deleting a Job (directly or by garbage collection through ownerReferences), or
  marking it for deletion, terminates its processes (SIGTERM, SIGKILL after ``grace_s``).
- **faults**: :meth:`Executor.kill_pod` SIGKILLs a running pod's process group (exit code 137,
  like an OOM or a crash); ``disruption=True`` also gives the pod a ``DisruptionTarget`` condition
  as a node drain/eviction would.

Not emulated: restartPolicy ``OnFailure`` (treated as ``Never``), ``successPolicy``, TTL after
finished, init/sidecar containers (only the first container runs), resource limits, probes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import job_driver as driver
from tests.support.kubelet import (
    INDEX_ANNOTATION,
    USER_AGENT,
    Api,
    ConfigError,
    Kubelet,
    PodContext,
    PodRecord,
)

log = logging.getLogger("executor")


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class PodInfo:
    """A snapshot of a pod for tests (safe to read from any thread)."""

    namespace: str
    job: str
    index: int | None
    name: str
    phase: str
    exit_code: int | None
    reason: str
    argv: tuple[str, ...]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class JobState:
    """What the controller remembers of one Job (keyed by uid, so a recreated Job starts fresh)."""

    uid: str
    pods: list[PodRecord] = field(default_factory=list)
    started_at: float | None = None  # monotonic, for activeDeadlineSeconds
    suspended: bool = False
    completed: bool = False
    failure: tuple[str, str] | None = None  # (reason, message) once the Job is doomed
    finished: bool = False
    not_before: float = 0.0  # no replacement pod before this monotonic time
    failed_indexes: set[int] = field(default_factory=set)
    adopted: bool = False  # already finished when first seen: its status is not ours to write


@dataclass
class PodLaunch:
    """What is about to be executed; a ``launch_hook`` may change ``argv``/``env`` (load tests)."""

    job: dict[str, Any]
    index: int | None
    argv: list[str]
    env: dict[str, str]
    directory: Path


# --------------------------------------------------------------------------- the executor


class Executor:
    """Watches Jobs on ``server`` and runs their pods under ``workdir`` (see module docstring)."""

    def __init__(
        self,
        server: str,
        workdir: Path,
        *,
        namespace: str | None = None,
        pods_in_api: bool = True,
        backoff_s: float = 0.5,
        grace_s: float = 2.0,
        resync_s: float = 0.5,
        base_env: dict[str, str] | None = None,
        launch_hook: Callable[[PodLaunch], None] | None = None,
    ) -> None:
        self.api = Api(server)
        self._driver = driver.JobDriver(server, label_selector=None, user_agent=USER_AGENT)
        self.workdir = Path(workdir)
        self.namespace = namespace
        self.pods_in_api = pods_in_api
        self.backoff_s, self.grace_s, self.resync_s = backoff_s, grace_s, resync_s
        self.launch_hook = launch_hook
        self.kubelet = Kubelet(self.api, self.workdir, base_env)
        self._jobs: dict[tuple[str, str], JobState] = {}
        self._latest: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._history: list[PodRecord] = []  # every pod ever started, for no-redo assertions
        self.errors: list[str] = []  # unexpected controller errors, for tests to assert on

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Executor:
        for target, name in (
            (self._watch_jobs, "executor-watch"),
            (self._control, "executor-control"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop watching and kill every pod process (SIGKILL: the test is over).

        The watch thread is a daemon blocked on its stream: it is closed, not joined (it ends
        with the API server at the latest).
        """
        self._stop.set()
        self._queue.put(None)
        self.api.abort_watch()
        with self._lock:
            for pod in self._history:
                self._signal(pod, signal.SIGKILL)
        for thread in self._threads:
            if thread.name == "executor-control":
                thread.join(timeout=10)

    def __enter__(self) -> Executor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test API

    def pods(self, job: str | None = None, namespace: str | None = None) -> list[PodInfo]:
        """Every pod started so far (all Jobs, including deleted ones), oldest first."""
        with self._lock:
            return [
                _info(p)
                for p in self._history
                if (job is None or p.job == job) and (namespace is None or p.namespace == namespace)
            ]

    def wait_for_pod(self, predicate: Callable[[PodInfo], bool], timeout: float = 60.0) -> PodInfo:
        """Block until some pod satisfies ``predicate`` (re-checked on every pod change)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for pod in self.pods():
                    if predicate(pod):
                        return pod
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no pod matched within {timeout}s; pods: {self.pods()}")
                self._changed.wait(remaining)

    def kill_pod(
        self,
        job: str,
        index: int | None = 0,
        *,
        namespace: str = "default",
        disruption: bool = False,
    ) -> PodInfo:
        """SIGKILL the running pod of ``job``/``index`` (exit code 137), as a crash or OOM would.

        ``index`` is None for a non-Indexed Job. ``disruption`` marks the pod as a node drain
        would (``DisruptionTarget``), which podFailurePolicy ``onPodConditions`` rules match.
        """
        with self._lock:
            for pod in self._history:
                if (pod.namespace, pod.job, pod.index) == (
                    namespace,
                    job,
                    index,
                ) and pod.phase == "Running":
                    pod.disruption = disruption
                    self._signal(pod, signal.SIGKILL)
                    return _info(pod)
        raise LookupError(f"no running pod for {namespace}/{job} index {index}")

    # ------------------------------------------------------------------ watch

    def _jobs_path(self) -> str:
        return (
            f"/apis/batch/v1/namespaces/{self.namespace}/jobs"
            if self.namespace
            else "/apis/batch/v1/jobs"
        )

    def _watch_jobs(self) -> None:
        """List + watch Jobs forever; every event enqueues its Job for the control loop."""
        while not self._stop.is_set():
            try:
                listing = self.api.request("GET", self._jobs_path())
                seen: set[tuple[str, str]] = set()
                for item in listing.get("items", []):
                    seen.add(self._offer(item))
                with self._lock:
                    gone = [key for key in self._jobs if key not in seen]
                for key in gone:  # deleted while no watch was open
                    self._offer_deleted(key)
                rv = (listing.get("metadata") or {}).get("resourceVersion")
                for event in self.api.watch(self._jobs_path(), rv, self._stop):
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        break  # e.g. 410 Gone: relist
                    if event.get("type") == "DELETED":
                        meta = obj.get("metadata", {})
                        self._offer_deleted((meta.get("namespace", "default"), meta["name"]))
                    else:
                        self._offer(obj)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.debug("job watch restarts after %r", exc)
                self._stop.wait(0.5)

    def _offer(self, job: dict[str, Any]) -> tuple[str, str]:
        meta = job.get("metadata", {})
        key = (meta.get("namespace", "default"), meta["name"])
        with self._lock:
            self._latest[key] = job
        self._queue.put(key)
        return key

    def _offer_deleted(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._latest[key] = None
        self._queue.put(key)

    # ------------------------------------------------------------------ control loop

    def _control(self) -> None:
        next_sweep = time.monotonic()
        while not self._stop.is_set():
            try:
                key = self._queue.get(timeout=self.resync_s)
            except queue.Empty:
                key = None
            if self._stop.is_set():
                return
            pending = {key} if key else set()
            while True:  # coalesce a burst of events into one pass per Job
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more:
                    pending.add(more)
            if time.monotonic() >= next_sweep:  # retries, deadlines, stuck pods
                with self._lock:
                    pending.update(k for k, s in self._jobs.items() if not s.finished)
                next_sweep = time.monotonic() + self.resync_s
            for item in pending:
                try:
                    self._reconcile(item)
                except Exception as exc:
                    log.exception("reconcile %s failed", item)
                    self.errors.append(f"{item}: {exc!r}")

    def _reconcile(self, key: tuple[str, str]) -> None:
        """One level-triggered pass over one Job (under the lock: pod threads wait briefly)."""
        with self._lock:
            self._reconcile_locked(key)

    def _reconcile_locked(self, key: tuple[str, str]) -> None:
        job = self._latest.get(key)
        state = self._jobs.get(key)
        if job is None:  # deleted (or never seen)
            if state is not None:
                self._terminate_all(state)
            return
        meta = job["metadata"]
        uid = meta.get("uid") or f"{key}@{meta.get('creationTimestamp', '')}"
        if state is not None and state.uid != uid:  # same name, new Job
            self._terminate_all(state)
            state = None
        if state is None:
            state = JobState(uid=uid)
            if driver.is_true(job, "Complete") or driver.is_true(job, "Failed"):
                state.finished = state.adopted = True  # finished before we started: leave it be
            self._jobs[key] = state
        if meta.get("deletionTimestamp"):
            self._terminate_all(state)
            return
        if not state.finished:
            self._step(job, state)
        if not state.adopted:
            self._write_status(job, state)

    def _step(self, job: dict[str, Any], state: JobState) -> None:
        """Advance one Job: suspend/resume, evaluate failures, finish, or start pods."""
        spec = job.get("spec", {})
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions", 1) if spec.get("completions") is not None else 1)
        parallelism = int(spec.get("parallelism", 1) if spec.get("parallelism") is not None else 1)
        if spec.get("suspend"):
            for pod in state.pods:
                if pod.active:
                    self._terminate(pod)
            state.suspended, state.started_at = True, None
            return
        state.suspended = False
        if state.started_at is None:
            state.started_at = time.monotonic()
        if state.failure is None:
            self._evaluate_failures(job, state, indexed)
        if state.failure is not None:
            self._fail(state)
            return
        done = self._succeeded_indexes(state) if indexed else set()
        succeeded = sum(1 for p in state.pods if p.phase == "Succeeded")
        if (indexed and len(done) >= completions) or (not indexed and succeeded >= completions):
            for pod in state.pods:
                if pod.active:
                    self._terminate(pod)
            state.completed = state.finished = True
            return
        if indexed and state.failed_indexes and len(done | state.failed_indexes) >= completions:
            state.failure = ("FailedIndexes", "Job has failed indexes")
            self._fail(state)
            return
        for pod in state.pods:  # the kubelet retries pods stuck on a missing Secret/ConfigMap
            if pod.phase == "Pending" and pod.proc is None and not pod.controller_killed:
                self._launch(job, pod)
        if time.monotonic() < state.not_before:
            return
        active = [p for p in state.pods if p.active]
        room = max(0, parallelism - len(active))
        todo: Sequence[int | None]
        if indexed:
            busy = {p.index for p in active} | done | state.failed_indexes
            todo = [i for i in range(completions) if i not in busy and i is not None][:room]
        else:
            todo = [None] * max(0, min(room, completions - succeeded - len(active)))
        for index in todo:
            self._start_pod(job, state, index)

    def _succeeded_indexes(self, state: JobState) -> set[int]:
        return {p.index for p in state.pods if p.phase == "Succeeded" and p.index is not None}

    def _evaluate_failures(self, job: dict[str, Any], state: JobState, indexed: bool) -> None:
        """Apply podFailurePolicy and the backoff limits to pods that failed since last time."""
        spec = job.get("spec", {})
        rules = (spec.get("podFailurePolicy") or {}).get("rules", [])
        per_index = spec.get("backoffLimitPerIndex")
        for pod in state.pods:
            if pod.phase != "Failed" or pod.action is not None or pod.controller_killed:
                continue
            pod.action = "Count"
            for number, rule in enumerate(rules):
                if _rule_matches(rule, pod):
                    pod.action = rule.get("action", "Count")
                    if pod.action == "FailJob":
                        container = _container(job).get("name", "main")
                        state.failure = (
                            "PodFailurePolicy",
                            f"Container {container} for pod {pod.namespace}/{pod.name} failed with exit "
                            f"code {pod.exit_code} matching FailJob rule at index {number}",
                        )
                    break
            if pod.action != "Ignore":
                state.not_before = time.monotonic() + self.backoff_s
            if indexed and pod.index is not None and per_index is not None:
                failures = sum(
                    1
                    for p in state.pods
                    if p.index == pod.index and p.action in ("Count", "FailIndex")
                )
                if pod.action == "FailIndex" or failures > int(per_index):
                    state.failed_indexes.add(pod.index)
        if state.failure is not None:
            return
        failed = _counted_failures(state)
        limit = spec.get("backoffLimit", 6)
        if per_index is None and limit is not None and failed > int(limit):
            state.failure = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        deadline = spec.get("activeDeadlineSeconds")
        if (
            deadline is not None
            and state.started_at is not None
            and time.monotonic() - state.started_at > float(deadline)
        ):
            state.failure = ("DeadlineExceeded", "Job was active longer than specified deadline")

    def _fail(self, state: JobState) -> None:
        """Terminate the remaining pods; the Job is Failed once every one of them is gone."""
        for pod in state.pods:
            if pod.active:
                self._terminate(pod)
        if not any(p.active for p in state.pods):
            state.finished = True

    # ------------------------------------------------------------------ status

    def _job_status(self, job: dict[str, Any], state: JobState) -> dict[str, Any] | None:
        """The status the Job controller would write for ``job`` (as currently stored), or None
        when it already shows it. Conditions, times and their transitions come from the job
        driver's pure status functions (shared with the operator's tests); the counts are ours."""
        if driver.is_true(job, "Complete") or driver.is_true(job, "Failed"):
            return None  # a finished Job's status never changes again
        indexed = driver.is_indexed(job)
        done = sorted(self._succeeded_indexes(state))
        current = dict(job.get("status") or {})
        if state.completed:
            base = driver.job_succeeded_status(job)
        elif state.finished and state.failure is not None:
            base = driver.job_failed_status(job, *state.failure, succeeded_indexes=done)
        elif state.suspended:
            base = current if driver.is_true(job, "Suspended") else driver.job_suspended_status(job)
        else:
            base = driver.job_running_status(job)
        counts: dict[str, Any] = {
            "active": sum(1 for p in state.pods if p.active and not p.controller_killed),
            "ready": sum(1 for p in state.pods if p.phase == "Running" and not p.controller_killed),
            "terminating": sum(1 for p in state.pods if p.active and p.controller_killed),
            "succeeded": sum(1 for p in state.pods if p.phase == "Succeeded"),
            "failed": _counted_failures(state),
            "completedIndexes": driver.index_ranges(done) if indexed and done else None,
            "failedIndexes": driver.index_ranges(sorted(state.failed_indexes))
            if job["spec"].get("backoffLimitPerIndex") is not None and state.failed_indexes
            else None,
        }
        status = {k: v for k, v in {**base, **counts}.items() if v is not None}
        return None if status == current else status

    def _write_status(self, job: dict[str, Any], state: JobState) -> None:
        """Write through the job driver (read, compute, PATCH with the read resourceVersion,
        retry on conflict); checked against the cached Job first so an unchanged Job costs no
        request."""
        if self._job_status(job, state) is None:
            return
        meta = job["metadata"]
        try:
            self._driver._write_status(
                meta["name"],
                meta.get("namespace", "default"),
                lambda fresh: self._job_status(fresh, state),
            )
        except driver.DriverError as exc:
            if ": 404 " not in str(exc):  # a deleted Job needs no status
                raise

    # ------------------------------------------------------------------ pods

    def _start_pod(self, job: dict[str, Any], state: JobState, index: int | None) -> None:
        meta = job["metadata"]
        namespace = meta.get("namespace", "default")
        suffix = secrets.token_hex(3)[:5]
        name = (
            f"{meta['name']}-{index}-{suffix}" if index is not None else f"{meta['name']}-{suffix}"
        )
        pod = PodRecord(
            namespace, meta["name"], state.uid, name, index, self.workdir / namespace / name
        )
        pod.directory.mkdir(parents=True, exist_ok=True)
        with self._changed:
            state.pods.append(pod)
            self._history.append(pod)
            self._changed.notify_all()
        if self.pods_in_api:
            self.kubelet.create_pod_object(job, pod)
        self._launch(job, pod)

    def _launch(self, job: dict[str, Any], pod: PodRecord) -> None:
        """Resolve the pod's config and exec it; a config error leaves it Pending (retried)."""
        if not _container(job).get("command"):
            self._start_error(
                pod, "the container has no command (image entrypoints are unknown here)"
            )
            return
        try:
            argv, env, cwd = self._resolve(job, pod)
        except ConfigError as exc:
            first = pod.reason != "CreateContainerConfigError"
            pod.reason, pod.message = "CreateContainerConfigError", str(exc)
            if first:
                self._publish(pod)
                self.kubelet.post_event(pod, "Failed", f"Error: {exc}")
            return
        launch = PodLaunch(job, pod.index, argv, env, pod.directory)
        if self.launch_hook is not None:
            self.launch_hook(launch)
        pod.argv, pod.env = launch.argv, dict(launch.env)
        try:
            with open(pod.log_path, "ab") as out:
                pod.proc = subprocess.Popen(
                    launch.argv,
                    cwd=cwd,
                    env=launch.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        except OSError as exc:
            self._start_error(pod, f"failed to start container: {exc}")
            return
        with self._changed:
            pod.phase, pod.reason, pod.message, pod.started = (
                "Running",
                "",
                "",
                driver.now_rfc3339(),
            )
            self._changed.notify_all()
        self._publish(pod)
        threading.Thread(
            target=self._wait, args=(pod,), name=f"pod-{pod.name}", daemon=True
        ).start()

    def _publish(self, pod: PodRecord) -> None:
        if self.pods_in_api:
            self.kubelet.publish(pod)

    def _start_error(self, pod: PodRecord, message: str) -> None:
        """The container could not start: the pod fails with exit code 128 (StartError)."""
        with self._changed:
            pod.phase, pod.exit_code, pod.reason, pod.message = "Failed", 128, "StartError", message
            pod.started = pod.finished = driver.now_rfc3339()
            self._changed.notify_all()
        self._publish(pod)
        self._queue.put((pod.namespace, pod.job))

    def _wait(self, pod: PodRecord) -> None:
        assert pod.proc is not None
        code = pod.proc.wait()
        code = 128 - code if code < 0 else code  # killed by a signal: the runtime's 128+N
        with self._changed:
            pod.exit_code, pod.finished = code, driver.now_rfc3339()
            pod.phase = "Succeeded" if code == 0 else "Failed"
            pod.reason = "Completed" if code == 0 else "Error"
            self._changed.notify_all()
        with contextlib.suppress(Exception):
            self._publish(pod)
        self._queue.put((pod.namespace, pod.job))

    def _resolve(
        self, job: dict[str, Any], pod: PodRecord
    ) -> tuple[list[str], dict[str, str], Path]:
        """argv, env and cwd of a Job pod's first container (ConfigError if a ref is missing)."""
        template = job["spec"]["template"]
        meta = template.get("metadata") or {}
        labels = {**(meta.get("labels") or {}), "batch.kubernetes.io/job-name": pod.job}
        annotations = dict(meta.get("annotations") or {})
        env: dict[str, str] = {}
        if pod.index is not None:
            annotations[INDEX_ANNOTATION] = labels[INDEX_ANNOTATION] = str(pod.index)
            env["JOB_COMPLETION_INDEX"] = str(pod.index)
        context = PodContext(
            pod.namespace,
            pod.name,
            f"{pod.job}-{pod.index}" if pod.index is not None else pod.name,
            pod.directory,
            labels,
            annotations,
        )
        spec = template.get("spec") or {}
        return self.kubelet.resolve_container(context, spec, _container(job), env)

    def _terminate(self, pod: PodRecord) -> None:
        """Controller-initiated termination (suspend, Job failed/complete, deleted): not a failure."""
        if not pod.active:
            return
        pod.controller_killed = True
        if pod.proc is None:  # never started (config error): just gone
            pod.phase, pod.reason, pod.finished = "Failed", "Terminated", driver.now_rfc3339()
            with self._changed:
                self._changed.notify_all()
            self._publish(pod)
            return
        self._signal(pod, signal.SIGTERM)
        timer = threading.Timer(self.grace_s, self._signal, args=(pod, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    def _terminate_all(self, state: JobState) -> None:
        for pod in state.pods:
            self._terminate(pod)
        state.finished = True

    @staticmethod
    def _signal(pod: PodRecord, sig: int) -> None:
        if pod.proc is not None and pod.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pod.proc.pid, sig)


# --------------------------------------------------------------------------- pure helpers


def _container(job: dict[str, Any]) -> dict[str, Any]:
    containers = job["spec"]["template"].get("spec", {}).get("containers") or [{}]
    return dict(containers[0])


def _counted_failures(state: JobState) -> int:
    return sum(
        1
        for p in state.pods
        if p.phase == "Failed" and not p.controller_killed and p.action != "Ignore"
    )


def _rule_matches(rule: dict[str, Any], pod: PodRecord) -> bool:
    """One podFailurePolicy rule against a failed pod (single-container pods)."""
    codes = rule.get("onExitCodes")
    if codes is not None:
        values = {int(v) for v in codes.get("values", [])}
        if codes.get("operator") == "In":
            return pod.exit_code in values
        return pod.exit_code not in values and pod.exit_code != 0
    for pattern in rule.get("onPodConditions") or []:
        if (
            pattern.get("type") == "DisruptionTarget"
            and pattern.get("status", "True") == "True"
            and pod.disruption
        ):
            return True
    return False


def _info(pod: PodRecord) -> PodInfo:
    return PodInfo(
        pod.namespace,
        pod.job,
        pod.index,
        pod.name,
        pod.phase,
        pod.exit_code,
        pod.reason,
        tuple(pod.argv),
        pod.log_path,
        dict(pod.env),
    )
