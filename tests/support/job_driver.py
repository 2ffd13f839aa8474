"""A Job controller stand-in for operator tests: moves batch/v1 Jobs through their states, runs nothing.

The operator only ever sees Jobs through their status, so tests drive that status the way the
Job controller of Kubernetes >= 1.31 writes it: through the `/status` subresource, with the
resourceVersion it read (a conflict means re-read and retry), `startTime`, `active`/`ready`/
`succeeded`/`failed` counts, `completedIndexes` for Indexed Jobs, `completionTime` on success,
and the condition pairs `SuccessCriteriaMet`+`Complete` or `FailureTarget`+`Failed`, each with
reason and message. `spec.suspend` is honoured: a suspended Job shows `Suspended=True`, no active
pods and no startTime, and is never completed; resuming flips the condition and restarts the clock.

- `job_*_status(job, now)`: pure functions computing those statuses, for reuse by executors that
  really run pods;
- `JobDriver(url)`: commands over HTTP (`start`, `succeed`, `fail`, `sync_suspension`), usable from
  sync and async tests alike (blocking calls to a server on another thread);
- `JobDriver.auto(delay, on_complete)`: a background thread completing every Job it sees after
  `delay` seconds, calling `on_complete(job)` first (write the artifacts the runtime would write;
  return `Failure(...)` to fail the Job instead).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import queue
import socket
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

JSON = dict[str, Any]
MANAGED_BY_SPIN = "app.kubernetes.io/managed-by=spin-operator"

FAILURE_MESSAGES = {
    "BackoffLimitExceeded": "Job has reached the specified backoff limit",
    "DeadlineExceeded": "Job was active longer than specified deadline",
    "FailedIndexes": "Job has failed indexes",
    "PodFailurePolicy": "Container main for pod failed with exit code 1 matching FailJob rule at index 0",
}
SUCCESS_REASON, SUCCESS_MESSAGE = "CompletionsReached", "Reached expected number of succeeded pods"


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------- pure status logic


def completions(job: JSON) -> int:
    spec = job.get("spec") or {}
    return int(spec.get("completions") or spec.get("parallelism") or 1)


def is_indexed(job: JSON) -> bool:
    return (job.get("spec") or {}).get("completionMode") == "Indexed"


def index_ranges(indexes: list[int]) -> str:
    """Kubernetes' compressed index list: [0,1,2,5] -> "0-2,5"."""
    out: list[str] = []
    for i in sorted(set(indexes)):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == i - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{i}"
        elif out and "-" not in out[-1] and int(out[-1]) == i - 1:
            out[-1] = f"{out[-1]}-{i}"
        else:
            out.append(str(i))
    return ",".join(out)


def condition(job: JSON, kind: str) -> JSON | None:
    return next(
        (c for c in (job.get("status") or {}).get("conditions") or [] if c.get("type") == kind),
        None,
    )


def is_true(job: JSON, kind: str) -> bool:
    cond = condition(job, kind)
    return bool(cond and cond.get("status") == "True")


def job_state(job: JSON) -> str:
    """Pending | Running | Suspended | Succeeded | Failed, as the status shows it."""
    if is_true(job, "Complete"):
        return "Succeeded"
    if is_true(job, "Failed"):
        return "Failed"
    if is_true(job, "Suspended"):
        return "Suspended"
    return "Running" if (job.get("status") or {}).get("startTime") else "Pending"


def _set_condition(
    conditions: list[JSON], kind: str, status: str, reason: str, message: str, now: str
) -> list[JSON]:
    """Replace or append one condition; lastTransitionTime moves only when the status flips."""
    old = next((c for c in conditions if c.get("type") == kind), None)
    new = {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == status
        else now,
    }
    return [new if c is old else c for c in conditions] if old else [*conditions, new]


def job_running_status(job: JSON, now: str | None = None) -> JSON:
    """Pods created and running: active = min(parallelism, remaining completions)."""
    now = now or now_rfc3339()
    status = dict(job.get("status") or {})
    spec = job.get("spec") or {}
    conditions = list(status.get("conditions") or [])
    if is_true(job, "Suspended"):
        conditions = _set_condition(
            conditions, "Suspended", "False", "JobResumed", "Job resumed", now
        )
        status.pop("startTime", None)
    remaining = completions(job) - int(status.get("succeeded") or 0)
    status.update(
        {
            "startTime": status.get("startTime") or now,
            "ready": 0,
            "terminating": 0,
            "active": max(0, min(int(spec.get("parallelism") or 1), remaining)),
            "uncountedTerminatedPods": {},
        }
    )
    if conditions:
        status["conditions"] = conditions
    return status


def job_suspended_status(job: JSON, now: str | None = None) -> JSON:
    """Suspended: pods gone, no startTime, `Suspended=True` (reason JobSuspended)."""
    now = now or now_rfc3339()
    status = {k: v for k, v in (job.get("status") or {}).items() if k != "startTime"}
    status.update(
        {
            "active": 0,
            "ready": 0,
            "terminating": 0,
            "conditions": _set_condition(
                list(status.get("conditions") or []),
                "Suspended",
                "True",
                "JobSuspended",
                "Job suspended",
                now,
            ),
        }
    )
    return status


def job_succeeded_status(job: JSON, now: str | None = None) -> JSON:
    """Every completion succeeded: SuccessCriteriaMet then Complete, completionTime, all indexes."""
    now = now or now_rfc3339()
    status = dict(job.get("status") or {})
    conditions = list(status.get("conditions") or [])
    for kind in ("SuccessCriteriaMet", "Complete"):
        conditions = _set_condition(conditions, kind, "True", SUCCESS_REASON, SUCCESS_MESSAGE, now)
    n = completions(job)
    status.update(
        {
            "startTime": status.get("startTime") or now,
            "completionTime": now,
            "active": 0,
            "ready": 0,
            "terminating": 0,
            "succeeded": n,
            "uncountedTerminatedPods": {},
            "conditions": conditions,
        }
    )
    if is_indexed(job):
        status["completedIndexes"] = index_ranges(list(range(n)))
    return status


def job_failed_status(
    job: JSON,
    reason: str = "BackoffLimitExceeded",
    message: str | None = None,
    now: str | None = None,
    succeeded_indexes: list[int] | None = None,
) -> JSON:
    """The Job failed: FailureTarget then Failed with `reason`; no completionTime (as Kubernetes)."""
    now = now or now_rfc3339()
    message = message or FAILURE_MESSAGES.get(reason, reason)
    status = dict(job.get("status") or {})
    conditions = list(status.get("conditions") or [])
    for kind in ("FailureTarget", "Failed"):
        conditions = _set_condition(conditions, kind, "True", reason, message, now)
    spec = job.get("spec") or {}
    failed = int(spec.get("backoffLimit", 6)) + 1 if reason == "BackoffLimitExceeded" else 1
    status.update(
        {
            "startTime": status.get("startTime") or now,
            "active": 0,
            "ready": 0,
            "terminating": 0,
            "failed": failed,
            "uncountedTerminatedPods": {},
            "conditions": conditions,
        }
    )
    if is_indexed(job) and succeeded_indexes:
        status["completedIndexes"] = index_ranges(succeeded_indexes)
        status["succeeded"] = len(set(succeeded_indexes))
    return status


# ---------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class Failure:
    """Returned by an `on_complete` hook: fail the Job with this reason instead of completing it."""

    reason: str = "BackoffLimitExceeded"
    message: str | None = None


Hook = Callable[[JSON], "Failure | None"]


class DriverError(RuntimeError):
    pass


class JobDriver:
    """Writes Job status over the API as the Job controller would (blocking HTTP; any thread)."""

    def __init__(
        self,
        url: str,
        *,
        label_selector: str | None = MANAGED_BY_SPIN,
        namespace: str | None = None,
        user_agent: str = "job-driver",
    ) -> None:
        self.url = url.rstrip("/")
        self.label_selector = label_selector
        self.namespace = namespace
        self.user_agent = user_agent

    # -- HTTP

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "User-Agent": self.user_agent},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as rsp:
                return json.loads(rsp.read())  # type: ignore[no-any-return]
        except urllib.error.HTTPError as e:
            raise DriverError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from None

    def _jobs_path(self, namespace: str | None) -> str:
        return f"/apis/batch/v1/namespaces/{namespace}/jobs" if namespace else "/apis/batch/v1/jobs"

    def jobs(self) -> list[JSON]:
        """Jobs matching the driver's namespace and label selector."""
        params = {"labelSelector": self.label_selector} if self.label_selector else None
        return self._request("GET", self._jobs_path(self.namespace), params=params)["items"]  # type: ignore[no-any-return]

    def job(self, name: str, namespace: str = "default") -> JSON:
        return self._request("GET", f"{self._jobs_path(namespace)}/{name}")

    def _write_status(
        self, name: str, namespace: str, compute: Callable[[JSON], JSON | None]
    ) -> JSON:
        """Read, compute, write `/status` with the read resourceVersion; retry on 409 conflicts."""
        for _ in range(20):
            job = self.job(name, namespace)
            status = compute(job)
            if status is None:
                return job
            patch = {
                "metadata": {"resourceVersion": job["metadata"]["resourceVersion"]},
                "status": {
                    **{k: None for k in job.get("status") or {} if k not in status},
                    **status,
                },
            }
            try:
                return self._request(
                    "PATCH",
                    f"{self._jobs_path(namespace)}/{name}/status",
                    patch,
                    content_type="application/merge-patch+json",
                )
            except DriverError as e:
                if ": 409 " not in str(e):
                    raise
        raise DriverError(f"job {namespace}/{name}: status kept conflicting")

    # -- commands

    def start(self, name: str, namespace: str = "default") -> JSON:
        """Pods running (refused for a suspended Job: it has no pods)."""

        def compute(job: JSON) -> JSON:
            self._refuse_if_suspended(job)
            return job_running_status(job)

        return self._write_status(name, namespace, compute)

    def succeed(self, name: str, namespace: str = "default") -> JSON:
        def compute(job: JSON) -> JSON:
            self._refuse_if_suspended(job)
            return job_succeeded_status(job)

        return self._write_status(name, namespace, compute)

    def pods_finished(self, name: str, namespace: str = "default") -> JSON:
        """Every pod succeeded and the outcome is decided (SuccessCriteriaMet), `Complete` not
        written yet: the real Job controller's state between its pods' exit and completion."""

        def compute(job: JSON) -> JSON:
            self._refuse_if_suspended(job)
            status = job_succeeded_status(job)
            status["conditions"] = [
                c for c in status["conditions"] if c["type"] == "SuccessCriteriaMet"
            ]
            status.pop("completionTime", None)
            return status

        return self._write_status(name, namespace, compute)

    def fail(
        self,
        name: str,
        namespace: str = "default",
        reason: str = "BackoffLimitExceeded",
        message: str | None = None,
    ) -> JSON:
        return self._write_status(
            name, namespace, lambda job: job_failed_status(job, reason, message)
        )

    def sync_suspension(self, name: str, namespace: str = "default") -> JSON:
        """Reflect `spec.suspend` in status (Suspended condition / resumed and running)."""

        def compute(job: JSON) -> JSON | None:
            if job_state(job) in ("Succeeded", "Failed"):
                return None
            suspended = bool((job.get("spec") or {}).get("suspend"))
            if suspended and not is_true(job, "Suspended"):
                return job_suspended_status(job)
            if not suspended and (
                is_true(job, "Suspended") or not (job.get("status") or {}).get("startTime")
            ):
                return job_running_status(job)
            return None

        return self._write_status(name, namespace, compute)

    @staticmethod
    def _refuse_if_suspended(job: JSON) -> None:
        if (job.get("spec") or {}).get("suspend"):
            raise DriverError(
                f"job {job['metadata']['name']} is suspended: a suspended Job runs no pods"
            )

    @contextlib.contextmanager
    def auto(self, delay: float = 0.0, on_complete: Hook | None = None) -> Iterator[AutoDriver]:
        """Complete every matching Job `delay` s after it starts running, in a background thread."""
        driver = AutoDriver(self, delay, on_complete)
        driver.start()
        try:
            yield driver
        finally:
            driver.stop()


class AutoDriver:
    """The background half of `JobDriver.auto`: a watch thread feeding a worker thread."""

    def __init__(self, driver: JobDriver, delay: float, on_complete: Hook | None) -> None:
        self.driver = driver
        self.delay = delay
        self.on_complete = on_complete
        self.completed: list[str] = []  # "namespace/name" in completion order
        self.finished_at: dict[
            str, float
        ] = {}  # "namespace/name" -> time.time() its final status was written
        self.failed: list[str] = []
        self.errors: list[str] = []  # hook or API failures (tests should assert it stays empty)
        self._events: queue.Queue[JSON | None] = queue.Queue()
        self._due: dict[tuple[str, str], float] = {}
        self._stopping = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._threads = [
            threading.Thread(target=self._watch, name="job-driver-watch", daemon=True),
            threading.Thread(target=self._work, name="job-driver-work", daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._events.put(None)
        with contextlib.suppress(OSError):
            if self._conn is not None and self._conn.sock is not None:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=10)

    def _watch(self) -> None:
        """Stream Job events (resuming after the last resourceVersion; relist on 410)."""
        since = None
        parsed = urllib.parse.urlsplit(self.driver.url)
        while not self._stopping.is_set():
            params = {"watch": "true", "allowWatchBookmarks": "true"}
            if self.driver.label_selector:
                params["labelSelector"] = self.driver.label_selector
            if since is None:
                listing = self.driver._request(
                    "GET",
                    self.driver._jobs_path(self.driver.namespace),
                    params={k: v for k, v in params.items() if k == "labelSelector"},
                )
                since = listing["metadata"]["resourceVersion"]
                for job in listing["items"]:
                    self._events.put({"type": "ADDED", "object": job})
            params["resourceVersion"] = since
            try:
                self._conn = http.client.HTTPConnection(
                    parsed.hostname or "127.0.0.1", parsed.port, timeout=None
                )
                self._conn.request(
                    "GET",
                    self.driver._jobs_path(self.driver.namespace)
                    + "?"
                    + urllib.parse.urlencode(params),
                    headers={"User-Agent": self.driver.user_agent},
                )
                for line in self._conn.getresponse():
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        since = None  # expired: relist
                        break
                    since = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._events.put(event)
            except (OSError, http.client.HTTPException, ValueError):
                if not self._stopping.is_set():
                    time.sleep(0.05)
            finally:
                if self._conn is not None:
                    self._conn.close()

    def _work(self) -> None:
        while True:
            timeout = max(0.0, min(self._due.values()) - time.monotonic()) if self._due else None
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                event = {}
            if event is None:
                return
            try:
                if event:
                    self._observe(event)
                now = time.monotonic()
                for key in [k for k, t in self._due.items() if t <= now]:
                    del self._due[key]
                    self._complete(*key)
            except Exception as e:  # keep driving other Jobs; the test sees it in .errors
                self.errors.append("".join(traceback.format_exception(e)))

    def _observe(self, event: JSON) -> None:
        job = event["object"]
        key = (job["metadata"]["namespace"], job["metadata"]["name"])
        if event["type"] == "DELETED" or job["metadata"].get("deletionTimestamp"):
            self._due.pop(key, None)
            return
        state = job_state(job)
        if state in ("Succeeded", "Failed"):
            return
        suspended = bool(job["spec"].get("suspend"))
        if suspended:
            self._due.pop(key, None)
            if state != "Suspended":
                self.driver.sync_suspension(key[1], key[0])
        elif key not in self._due:
            if state != "Running":
                self.driver.sync_suspension(key[1], key[0])
            self._due[key] = time.monotonic() + self.delay

    def _complete(self, namespace: str, name: str) -> None:
        try:
            job = self.driver.job(name, namespace)
        except DriverError:
            return  # deleted meanwhile
        if (
            job["spec"].get("suspend")
            or job_state(job) in ("Succeeded", "Failed")
            or job["metadata"].get("deletionTimestamp")
        ):
            return
        outcome = self.on_complete(job) if self.on_complete else None
        if isinstance(outcome, Failure):
            self.driver.fail(name, namespace, outcome.reason, outcome.message)
            self.failed.append(f"{namespace}/{name}")
        else:
            self.driver.succeed(name, namespace)
            self.completed.append(f"{namespace}/{name}")
        self.finished_at[f"{namespace}/{name}"] = time.time()
