"""A kubelet and Job controller stand-in: runs the pods of batch/v1 Jobs as local processes.

Why: the end-to-end tests need the operator's Jobs to *really run* (generation, training,
evaluation) while there is no cluster and no container runtime on these machines. The executor
watches Jobs through the Kubernetes HTTP API (the emulator here; nothing in it depends on the
emulator's internals), runs every pod as a local process group with the repository's virtualenv
on ``PATH``, and writes Pod and Job status back through the ``/status`` subresource the way the
Job controller and the kubelet would, so the operator observes what it would observe in a cluster.

What a pod gets, and what is emulated:

- **argv**: the container's ``command`` + ``args`` with Kubernetes ``$(VAR)`` expansion (``$$``
  escapes); the image is ignored (``python``/``torchrun`` resolve to the virtualenv's). A container
  without ``command`` fails to start (the image entrypoint is unknown here).
- **env**: a small base (``PATH``, ``HOME``, offline switches, ``OMP_NUM_THREADS=1``: each pod
  behaves like a 1-CPU container), then the container's ``env``/``envFrom`` in order:
  ``value``, ``secretKeyRef``/``configMapKeyRef`` read from the API, ``fieldRef`` (name,
  namespace, labels, annotations, ``status.podIP``). ``JOB_COMPLETION_INDEX`` and ``HOSTNAME`` are
  set for Indexed Jobs as Kubernetes does. Nothing of the test process's environment leaks in.
- **missing Secret/ConfigMap (or key)**: the pod stays ``Pending`` with the container waiting in
  ``CreateContainerConfigError`` (message ``secret "x" not found``), a Warning Event is posted, and
  the Job shows it as ``active`` but not ``ready`` — exactly what a cluster shows; like the
  kubelet, the executor retries and starts the pod once the Secret appears.
- **volumes**: ``/dev/shm`` mounts are ignored; every other ``mountPath`` is a directory (per pod
  for ``emptyDir``, per claim for PVCs, files written for ``secret``/``configMap`` volumes), and the
  mount path is rewritten to that directory in argv, env and ``workingDir``. The pod's own
  directory is its working directory and ``HOME``.
- **rendezvous hostnames**: before exec, every ``<host>.<service>[.<ns>[.svc[.cluster.local]]]``
  token of a Service in the pod's namespace, and the bare Service name when it is a whole argv
  element/env value or is followed by ``:<port>``, is rewritten to ``127.0.0.1`` — so the training
  Job's ``<job>-0.<headless svc>`` master resolves locally. Ports attached to rewritten hosts (and
  ``--master-port``/``--master_port``/``MASTER_PORT`` of such a pod) are mapped to a free local port
  per (Service, port), so concurrent multi-node Jobs do not collide on one host.
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

import base64
import contextlib
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support import job_driver as driver

log = logging.getLogger("executor")

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = (
    REPO / ".venv" / "bin"
    if (REPO / ".venv" / "bin" / "python").exists()
    else Path(sys.executable).parent
)
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
PORT_FLAGS = ("--master-port", "--master_port")
USER_AGENT = "executor"  # how the emulator's request log tells our calls from the operator's


# --------------------------------------------------------------------------- API client


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Api:
    """A minimal JSON client for a Kubernetes API server (no auth: the emulator on 127.0.0.1).

    One ``requests.Session`` per thread (sessions are not thread-safe); ``trust_env`` off so no
    proxy setting of the machine can route 127.0.0.1 elsewhere.
    """

    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")
        self._local = threading.local()
        self.open_watch: requests.Response | None = None

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            self._local.session = session
        return session

    def request(self, method: str, path: str, body: Any = None, *, merge: bool = False) -> Any:
        headers = {
            "Content-Type": "application/merge-patch+json" if merge else "application/json",
            "User-Agent": USER_AGENT,
        }
        data = None if body is None else json.dumps(body)
        resp = self.session.request(
            method, self.server + path, data=data, headers=headers, timeout=30
        )
        if resp.status_code >= 300:
            raise ApiError(resp.status_code, resp.text)
        return resp.json() if resp.content else None

    def get(self, path: str) -> Any:
        """The object at ``path``, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def abort_watch(self) -> None:
        """Unblock a watch read from another thread: shut its socket down (closing the response
        from another thread would wait on the reader's lock)."""
        resp = self.open_watch
        sock = (
            getattr(getattr(resp.raw, "connection", None), "sock", None)
            if resp is not None
            else None
        )
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def watch(
        self, path: str, resource_version: str | None, stop: threading.Event
    ) -> Iterator[dict]:
        """Watch events of ``path`` from ``resource_version`` until the stream ends or ``stop``."""
        params = {"watch": "true", "allowWatchBookmarks": "false"}
        if resource_version and resource_version.isdigit():
            params["resourceVersion"] = resource_version
        with self.session.get(
            self.server + path,
            params=params,
            stream=True,
            timeout=(10, None),
            headers={"User-Agent": USER_AGENT},
        ) as resp:
            if resp.status_code >= 300:
                raise ApiError(resp.status_code, resp.text)
            self.open_watch = resp
            for line in resp.iter_lines():
                if stop.is_set():
                    return
                if line.strip():
                    yield json.loads(line)


# --------------------------------------------------------------------------- pod launch helpers


class ConfigError(Exception):
    """A pod's configuration cannot be resolved yet (CreateContainerConfigError)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined vars substituted, others kept, ``$$`` -> ``$``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def free_port() -> int:
    """A local port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class HostRewriter:
    """Rewrites Service hostnames of one namespace to 127.0.0.1 (see the module docstring)."""

    namespace: str
    services: list[str]
    port_for: Callable[[str, int], int]
    touched: set[str] = field(default_factory=set)

    def _pattern(self, service: str) -> re.Pattern[str]:
        ns = re.escape(self.namespace)
        return re.compile(
            r"(?<![A-Za-z0-9.\-])(?P<pod>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\.)?"
            + re.escape(service)
            + rf"(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?::(?P<port>\d+))?(?![A-Za-z0-9.\-])"
        )

    def rewrite(self, text: str) -> str:
        for service in self.services:
            whole = text == service

            def sub(match: re.Match[str], service: str = service, whole: bool = whole) -> str:
                port = match.group("port")
                if not (match.group("pod") or port or whole):
                    return match.group(0)  # a bare name inside a longer value: not an address
                self.touched.add(service)
                return "127.0.0.1" + (f":{self.port_for(service, int(port))}" if port else "")

            text = self._pattern(service).sub(sub, text)
        return text

    def map_port(self, value: str) -> str:
        """Map a bare port value (``--master-port``) when exactly one Service was rewritten."""
        if len(self.touched) == 1 and value.isdigit():
            return str(self.port_for(next(iter(self.touched)), int(value)))
        return value


# --------------------------------------------------------------------------- state


@dataclass
class PodRecord:
    """One pod of one Job, backed by (at most) one local process group."""

    namespace: str
    job: str
    job_uid: str
    name: str
    index: int | None
    directory: Path
    created: str = field(default_factory=driver.now_rfc3339)
    phase: str = "Pending"  # Pending | Running | Succeeded | Failed
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    started: str | None = None
    finished: str | None = None
    disruption: bool = False
    controller_killed: bool = False  # terminated by the controller: never counted as a failure
    action: str | None = None  # podFailurePolicy verdict once evaluated
    event_posted: bool = False

    @property
    def active(self) -> bool:
        return self.phase in ("Pending", "Running")

    @property
    def log_path(self) -> Path:
        return self.directory / "log.txt"


@dataclass(frozen=True)
class PodContext:
    """Who a container runs as: what the downward API and the kubelet's naming give it."""

    namespace: str
    name: str
    hostname: str
    directory: Path
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def field_ref(self, path: str) -> str:
        """A downward-API ``fieldRef`` value."""
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
            "spec.nodeName": "executor",
        }
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return (self.labels if match.group(1) == "labels" else self.annotations).get(
                match.group(2), ""
            )
        return ""


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
        self.base_env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "NO_PROXY": "127.0.0.1,localhost",
            "OMP_NUM_THREADS": "1",
        }
        self.base_env.update(base_env or {})
        self._jobs: dict[tuple[str, str], JobState] = {}
        self._latest: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ports: dict[tuple[str, str, int], int] = {}
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
            self._create_pod_object(job, pod)
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
                self._post_event(pod, "Failed", f"Error: {exc}")
            return
        launch = PodLaunch(job, pod.index, argv, env, pod.directory)
        if self.launch_hook is not None:
            self.launch_hook(launch)
        pod.argv = launch.argv
        try:
            with open(pod.log_path, "ab") as out:
                pod.proc = subprocess.Popen(
                    launch.argv, cwd=cwd, env=launch.env, stdout=out, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
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
            pod.namespace, pod.name, f"{pod.job}-{pod.index}" if pod.index is not None else pod.name,
            pod.directory, labels, annotations,
        )  # fmt: skip
        return self.resolve_container(context, template.get("spec") or {}, _container(job), env)

    def resolve_container(
        self,
        pod: PodContext,
        pod_spec: dict[str, Any],
        container: dict[str, Any],
        env: dict[str, str] | None = None,
    ) -> tuple[list[str], dict[str, str], Path]:
        """argv, env and cwd of ``container`` as the kubelet would start it, on this machine.

        Public so the harness can start a Deployment's container (the operator, from the
        chart) exactly like Job pods: same env resolution, mounts and hostname rewriting.
        Raises ConfigError when a referenced Secret/ConfigMap (or key) is missing.
        """
        mounts = self._mounts(pod_spec, container, pod)
        env = dict(env or {})
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind in ("secretRef", "configMapRef"):
                if kind in source:
                    ref = source[kind]
                    data = self._data(
                        pod.namespace, kind[:-3], ref["name"], ref.get("optional", False)
                    )
                    env.update({prefix + k: v for k, v in data.items()})
        env["HOSTNAME"] = pod.hostname
        for var in container.get("env", []):
            env[var["name"]] = self._env_value(var, env, pod)
        rewriter = HostRewriter(
            pod.namespace,
            self._services(pod.namespace),
            lambda svc, port: self._port_for(pod.namespace, svc, port),
        )
        argv = [
            expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])
        ]

        def local(value: str) -> str:
            return rewriter.rewrite(_rewrite_mounts(value, mounts))

        argv = [local(a) for a in argv]
        env = {k: local(v) for k, v in env.items()}
        for i, arg in enumerate(argv):
            if arg in PORT_FLAGS and i + 1 < len(argv):
                argv[i + 1] = rewriter.map_port(argv[i + 1])
            elif arg.startswith(tuple(f + "=" for f in PORT_FLAGS)):
                flag, value = arg.split("=", 1)
                argv[i] = f"{flag}={rewriter.map_port(value)}"
        if "MASTER_PORT" in env:
            env["MASTER_PORT"] = rewriter.map_port(env["MASTER_PORT"])
        full_env = {**self.base_env, "HOME": str(pod.directory), **env}
        cwd = (
            Path(_rewrite_mounts(container["workingDir"], mounts))
            if container.get("workingDir")
            else pod.directory
        )
        cwd.mkdir(parents=True, exist_ok=True)
        return argv, full_env, cwd

    def _env_value(self, var: dict[str, Any], env: dict[str, str], pod: PodContext) -> str:
        if "value" in var:
            return expand(str(var["value"]), env)
        source = var.get("valueFrom") or {}
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in source:
                ref = source[kind]
                optional = bool(ref.get("optional", False))
                data = self._data(pod.namespace, kind[: -len("KeyRef")], ref["name"], optional)
                if ref["key"] not in data:
                    if optional:
                        return ""
                    what = "Secret" if kind == "secretKeyRef" else "ConfigMap"
                    raise ConfigError(
                        f"couldn't find key {ref['key']} in {what} {pod.namespace}/{ref['name']}"
                    )
                return data[ref["key"]]
        if "fieldRef" in source:
            return pod.field_ref(source["fieldRef"]["fieldPath"])
        return ""

    def _data(self, namespace: str, kind: str, name: str, optional: bool) -> dict[str, str]:
        """String data of a Secret (base64-decoded) or ConfigMap; ConfigError when missing."""
        plural = "secrets" if kind == "secret" else "configmaps"
        obj = self.api.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        if obj is None:
            if optional:
                return {}
            raise ConfigError(f'{kind} "{name}" not found')
        data = (
            {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            if kind == "secret"
            else dict(obj.get("data") or {})
        )
        data.update(obj.get("stringData") or {})  # in case the server did not fold it into data
        return data

    def _services(self, namespace: str) -> list[str]:
        listing = self.api.get(f"/api/v1/namespaces/{namespace}/services") or {}
        names = [s["metadata"]["name"] for s in listing.get("items", [])]
        return sorted(names, key=len, reverse=True)  # longest first: no prefix shadowing

    def _port_for(self, namespace: str, service: str, port: int) -> int:
        with self._lock:
            return self._ports.setdefault((namespace, service, port), free_port())

    def _mounts(
        self, pod_spec: dict[str, Any], container: dict[str, Any], pod: PodContext
    ) -> dict[str, Path]:
        """mountPath -> local directory, with secret/configMap volume files written."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            path = mount["mountPath"].rstrip("/") or "/"
            if path == "/dev/shm":
                continue
            volume = volumes.get(mount["name"], {})
            if "persistentVolumeClaim" in volume:
                local = (
                    self.workdir
                    / pod.namespace
                    / "_pvc"
                    / volume["persistentVolumeClaim"]["claimName"]
                )
            else:
                local = pod.directory / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            for kind, key in (("secret", "secretName"), ("configMap", "name")):
                if kind in volume:
                    ref = volume[kind]
                    for item, value in self._data(
                        pod.namespace, kind, ref[key], ref.get("optional", False)
                    ).items():
                        (local / item).write_text(value)
            mounts[path] = local / mount["subPath"] if mount.get("subPath") else local
        return mounts

    def _terminate(self, pod: PodRecord) -> None:
        """Controller-initiated termination (suspend, Job failed/complete, deleted): not a failure."""
        if not pod.active:
            return
        pod.controller_killed = True
        if pod.proc is None:  # never started (config error): just gone
            pod.phase, pod.reason, pod.finished = "Failed", "Terminated", driver.now_rfc3339()
            with self._changed:
                self._changed.notify_all()
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

    # ------------------------------------------------------------------ Pod objects and events

    def _create_pod_object(self, job: dict[str, Any], pod: PodRecord) -> None:
        meta = job["metadata"]
        template = job["spec"]["template"]
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update({"batch.kubernetes.io/job-name": pod.job, "job-name": pod.job})
        if meta.get("uid"):
            labels.update(
                {"batch.kubernetes.io/controller-uid": meta["uid"], "controller-uid": meta["uid"]}
            )
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        spec = dict(template.get("spec") or {})
        spec["nodeName"] = "executor"
        if pod.index is not None:
            labels[INDEX_ANNOTATION] = str(pod.index)
            annotations[INDEX_ANNOTATION] = str(pod.index)
            spec["hostname"] = f"{pod.job}-{pod.index}"
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": pod.job,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        if meta.get("uid"):
            owner["uid"] = meta["uid"]
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": labels,
                         "annotations": annotations, "ownerReferences": [owner]},
            "spec": spec,
        }  # fmt: skip
        try:
            self.api.request("POST", f"/api/v1/namespaces/{pod.namespace}/pods", body)
        except ApiError as exc:
            log.warning("pod %s not created in the API: %s", pod.name, exc)

    def _publish(self, pod: PodRecord) -> None:
        """Write the pod's status to its Pod object (as the kubelet does)."""
        if not self.pods_in_api:
            return
        container = "main"
        state: dict[str, Any]
        if pod.phase == "Pending":
            state = {
                "waiting": {"reason": pod.reason or "ContainerCreating", "message": pod.message}
            }
        elif pod.phase == "Running":
            state = {"running": {"startedAt": pod.started}}
        else:
            state = {"terminated": {"exitCode": pod.exit_code, "reason": pod.reason, "message": pod.message,
                                    "startedAt": pod.started, "finishedAt": pod.finished}}  # fmt: skip
        ready = "True" if pod.phase == "Running" else "False"
        conditions = [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ]
        if pod.disruption:
            conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                               "message": "Pod was terminated in response to imminent node shutdown."})  # fmt: skip
        status = {
            "phase": pod.phase, "podIP": "127.0.0.1", "hostIP": "127.0.0.1", "startTime": pod.created,
            "conditions": conditions,
            "containerStatuses": [{"name": container, "ready": ready == "True", "restartCount": 0,
                                   "image": "", "imageID": "", "state": state}],
        }  # fmt: skip
        try:
            self.api.request("PATCH", f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status",
                             {"status": status}, merge=True)  # fmt: skip
        except ApiError as exc:
            log.debug("pod %s status not written: %s", pod.name, exc)

    def _post_event(self, pod: PodRecord, reason: str, message: str) -> None:
        if pod.event_posted:
            return
        pod.event_posted = True
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{pod.name}.{secrets.token_hex(8)}", "namespace": pod.namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": pod.name, "namespace": pod.namespace},
            "reason": reason, "message": message, "type": "Warning", "count": 1,
            "firstTimestamp": driver.now_rfc3339(), "lastTimestamp": driver.now_rfc3339(), "source": {"component": "kubelet"},
        }  # fmt: skip
        with contextlib.suppress(Exception):
            self.api.request("POST", f"/api/v1/namespaces/{pod.namespace}/events", body)


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


def _rewrite_mounts(value: str, mounts: dict[str, Path]) -> str:
    """Replace a mount path by its local directory where it starts the value or follows ``=``
    (``/cache/x``, ``--cache-dir=/cache``); longest mount path first."""
    for path in sorted(mounts, key=len, reverse=True):
        pattern = r"(?:^|(?<==))" + re.escape(path) + r"(?=/|$)"
        local = str(mounts[path]).replace("\\", "\\\\")  # a replacement string, not a function
        value = re.sub(pattern, local, value)
    return value


def _info(pod: PodRecord) -> PodInfo:
    return PodInfo(pod.namespace, pod.job, pod.index, pod.name, pod.phase, pod.exit_code, pod.reason,
                   tuple(pod.argv), pod.log_path)  # fmt: skip
