"""The operator's I/O loop around the pure reconciler, independent of kopf's decorators.

Watch events (fed by handlers.py) keep two caches: the latest SPINRun bodies and the child Jobs
by run. A run is reconciled in one task at a time (events arriving meanwhile coalesce into one
more pass). Each pass is the driver's (driver.py) over the Kubernetes `Cluster` (kube_cluster.py):
`Observed` from the caches, the reconciler, only the facts it asks for (facts.py), then the
decision applied (apply.py). Nothing polls: a pass that could not finish (storage, API or MLflow
down) schedules one retry with backoff; a Job whose pods wait is looked at again every
`pod_check` seconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

from pydantic import ValidationError

from spin_operator import observe, resync
from spin_operator.api import types as api
from spin_operator.apply import Again, Applier, EventPoster, Retry, Stale, phases
from spin_operator.decision import Event, ObservedJob
from spin_operator.driver import Cluster, drive
from spin_operator.facts import Facts, Specs, StoragePools
from spin_operator.kube import Kube
from spin_operator.kube_cluster import KubeCluster
from spin_operator.metrics import Metrics
from spin_operator.naming import RUN_LABEL
from spin_operator.refusals import Refusals
from spin_operator.settings import Settings
from spin_operator.steps import RunRef
from spin_operator.track import Tracking
from spin_operator.tracking_actions import TrackingActions
from spin_operator.validation import InvalidSpec

log = logging.getLogger(__name__)
Key = tuple[str, str]  # namespace, run name
JSON = dict[str, Any]
# The run whose pass is making API calls (each pass runs in its own task, so its own context):
# a `Warning` header the API server sends on those calls becomes an event on that SPINRun.
_PASS: contextvars.ContextVar[Key | None] = contextvars.ContextVar("spin_pass", default=None)
# Passes of runs not started yet (no spec recorded in the status) that may run at once. A start
# costs ~12 API calls (Secret, dry runs of iteration 0's Jobs and Service, annotation, check
# Job, status, events) against ~3 for a Job-to-Job transition, and every call of every pass
# queues on the same client's connections (kube.CONNECTIONS) and the same storage pool: when
# hundreds of runs were created at once, each running run's next Job waited behind the whole
# wave of starts (p99 39 s at 250 runs, 8-11 s at 100, all in the first wave). With starts
# held to a few at a time, a transition waits behind at most these few; the starts themselves
# go at the API server's pace either way.
STARTS_AT_ONCE = 4


def _status_of(key: Key, body: JSON) -> api.SPINRunStatus:
    try:
        return api.SPINRunStatus.model_validate(body.get("status") or {})
    except ValidationError:
        log.warning("%s/%s: unreadable status; starting from storage and children", *key)
        return api.SPINRunStatus()


class Controller:
    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        *,
        tracking: Tracking | None = None,
        metrics: Metrics | None = None,
        post_event: EventPoster | None = None,
        retry_base: float = 2.0,
        retry_max: float = 60.0,
        pod_check: float | None = None,
        storage: StoragePools | None = None,
    ) -> None:
        self._settings = settings
        self.kube = kube
        self.tracking = tracking or Tracking()
        self.metrics = metrics or Metrics()
        self.retry_base, self.retry_max = retry_base, retry_max
        self.runs: dict[Key, JSON] = {}
        self.jobs: dict[Key, dict[str, tuple[str | None, ObservedJob]]] = {}
        # When each cache entry last changed (monotonic; kept after a delete): resync.py changes
        # only entries older than its lists.
        self.touched: dict[tuple[str, str, str], float] = {}
        self.run_touched: dict[Key, float] = {}
        self.specs = Specs(settings)
        pod_check = settings.pod_check_seconds if pod_check is None else pod_check
        # a pool, a budget per call and a breaker per storage endpoint (endpoints.py)
        storage = self._storage = storage or StoragePools()

        def on_job(event_type: str | None, obj: JSON) -> None:
            self.on_job(event_type, obj)  # looked up late: a test may replace it (test_resync)

        self.facts = Facts(settings, kube, self.metrics, storage, self.jobs, on_job, pod_check)
        self.facts.on_looked = lambda run: self.kick((run.namespace, run.name))
        self.refusals = Refusals()  # children the API server refused for good (refusals.py)
        self.tracked = TrackingActions(self.tracking, storage)
        self.applier = Applier(
            settings,
            kube,
            self.metrics,
            storage,
            self.tracked,
            self.refusals,
            self.runs,
            on_job,
            post_event,
            deletes_sent=self.facts.deletes_sent,
        )
        self.pod_check = pod_check
        self._rechecks: dict[Key, asyncio.TimerHandle] = {}
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._dirty: set[Key] = set()
        self._retries: dict[Key, tuple[asyncio.TimerHandle, int]] = {}
        self._starts = asyncio.Semaphore(STARTS_AT_ONCE)  # see STARTS_AT_ONCE
        self._tracking_pending: dict[Key, bool] = {}  # MLflow has not confirmed what the run needs
        self.tracking.on_recovered = self._mlflow_back
        self._resync_task: asyncio.Task[None] | None = None
        self.leading = not settings.leader_election  # else only once leader.py holds the Lease
        self._warned: dict[Key, set[str]] = {}  # API warnings already posted as events, per run
        kube.on_warning = self._api_warning

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """New settings reach every part of a pass (tests change defaults between passes)."""
        self._settings = self.specs.settings = self.facts.settings = settings
        self.applier.settings = settings

    def _api_warning(self, method: str, path: str, text: str) -> None:
        """An API server `Warning` header (deprecated field, ignored value, ...) on a call made
        for a run: one Warning event per distinct text on that SPINRun (kube.py logs them all)."""
        key = _PASS.get()
        body = self.runs.get(key) if key is not None else None
        if key is None or body is None or method == "GET":
            return
        seen = self._warned.setdefault(key, set())
        if text not in seen:
            seen.add(text)
            self.applier.post(body, Event("Warning", "ApiWarning", f"{method} {path}: {text}"))

    # ------------------------------------------------------------------ watch events

    def on_run(self, event_type: str | None, obj: JSON) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if self.settings.resync_seconds > 0:  # tombstones only the resync reads (and prunes)
            self.run_touched[key] = time.monotonic()
        if event_type == "DELETED":
            self.runs.pop(key, None)
            self.applier.written.pop(key, None)
            self.specs.forget(key)
            self._tracking_pending.pop(key, None)
            self.refusals.forget(key)
            self._warned.pop(key, None)
            self._cancel_retry(key)
            uid = meta.get("uid")
            jobs = self.jobs.get(key, {})
            for name in [n for n, (owner, _) in jobs.items() if owner == uid]:
                del jobs[name]
                self.facts.deletes_sent.discard((key[0], name))
            self.facts.forget(uid)
            recheck = self._rechecks.pop(key, None)
            if recheck is not None:
                recheck.cancel()
            self.metrics.set_phases(phases(self.runs))
            return
        if self.applier.superseded(key, obj):
            return  # an older version than the cached answer of our own later write
        self.runs[key] = obj
        self.kick(key)

    def on_job(self, event_type: str | None, obj: JSON) -> None:
        meta = obj.get("metadata") or {}
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        job = observe.job_state(obj)
        if run is None or job is None:
            return
        key = (meta.get("namespace", ""), run)
        jobs = self.jobs.setdefault(key, {})
        before = jobs.get(job.name)
        if self.settings.resync_seconds > 0:  # tombstones only the resync reads (and prunes)
            self.touched[(*key, job.name)] = time.monotonic()
        self.facts.job_seen(key[0], job, obj, deleted=event_type == "DELETED")
        if event_type == "DELETED":
            jobs.pop(job.name, None)
        else:
            jobs[job.name] = (observe.owner_uid(obj), job)
            if before == jobs[job.name]:
                return  # e.g. a pod became ready: nothing the reconciler looks at
        if key in self.runs:
            self.kick(key)

    async def prime(self) -> None:
        """Fill the Job cache with one LIST before watching starts, so a restarted operator
        never mistakes a Job it has not heard of yet for a deleted one."""
        for path in resync.job_paths(self):
            pages = self.kube.pages(
                path, selector=resync.JOB_SELECTOR, chunk=self.settings.list_chunk_size
            )
            async for item in pages:
                self.on_job("ADDED", item)

    def start_resync(self) -> None:
        if self._resync_task is None and self.settings.resync_seconds > 0:
            self._resync_task = asyncio.create_task(self.resync_forever(), name="resync")

    async def resync_forever(self) -> None:
        """Every `settings.resync_seconds`: re-list children and runs, drop what is gone."""
        while self.settings.resync_seconds > 0:
            await asyncio.sleep(self.settings.resync_seconds)
            try:
                jobs, runs = await resync.resync(self)
            except (
                Exception
            ) as exc:  # a failed resync (API down, 410 mid-list) waits for the next one
                log.warning("resync failed (next in %.0fs): %s", self.settings.resync_seconds, exc)
                continue
            self.metrics.resync_dropped.labels(kind="job").inc(jobs)
            self.metrics.resync_dropped.labels(kind="spinrun").inc(runs)

    # ------------------------------------------------------------------ scheduling

    def lead(self) -> None:
        """This replica now holds the Lease (leader.py): reconcile every cached run."""
        self.leading = True
        for key in list(self.runs):
            self.kick(key)

    def kick(self, key: Key) -> None:
        if not self.leading:  # a standby replica only keeps its caches warm
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running[key] = asyncio.create_task(
            self._loop(key), name=f"reconcile {key[0]}/{key[1]}"
        )

    async def _loop(self, key: Key) -> None:
        try:
            while True:
                self._dirty.discard(key)
                await self._guarded(key)
                if key not in self._dirty:
                    break
        finally:
            self._running.pop(key, None)

    async def _guarded(self, key: Key) -> None:
        started = time.monotonic()
        after: float | None = None
        _PASS.set(key)
        try:
            complete = await self.reconcile(key)
        except Stale:
            log.debug("%s/%s: the SPINRun changed meanwhile; waiting for its watch event", *key)
            complete = True  # the newer version's event (or DELETED) starts the next pass
        except Again:
            self._dirty.add(key)  # _loop runs the next pass at once
            complete = True
        except Retry as exc:
            log.warning("%s/%s: %s; retrying later", *key, exc)
            self.metrics.errors.labels(kind="retry").inc()
            complete = False
            after = exc.after
        except Exception:
            log.exception("%s/%s: reconcile failed; retrying later", *key)
            self.metrics.errors.labels(kind="exception").inc()
            complete = False
        finally:
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)
        if complete:
            self._cancel_retry(key)
        elif key in self.runs:
            self._schedule_retry(key, after)
        self._schedule_recheck(key)

    def _schedule_recheck(self, key: Key) -> None:
        """While a Job of the run waits for pods, look again in `pod_check` seconds: a pod stuck
        in ImagePullBackOff or a Job refused its pods changes nothing the watch would bring."""
        handle = self._rechecks.pop(key, None)
        if handle is not None:
            handle.cancel()
        body = self.runs.get(key)
        if body is None:
            return
        run = RunRef(key[0], key[1], (body.get("metadata") or {}).get("uid", ""))
        if any(j.starting for j in self.facts.run_jobs(run)):
            self._rechecks[key] = asyncio.get_running_loop().call_later(
                self.pod_check, self.kick, key
            )

    def _schedule_retry(self, key: Key, after: float | None = None) -> None:
        handle, count = self._retries.get(key, (None, 0))
        if handle is not None:
            handle.cancel()
        delay = min(self.retry_max, self.retry_base * 2**count)
        if after is not None:  # the API server's Retry-After: never sooner (bounded by retry_max)
            delay = max(delay, min(after, self.retry_max))
        if self._tracking_pending.get(key):  # next try when MLflow calls resume, not later
            uri = self.specs.tracking_uri(key)
            delay = min(delay, max(self.retry_base, self.tracking.down_for(uri) + 0.1))
        loop = asyncio.get_running_loop()
        self._retries[key] = (loop.call_later(delay, self.kick, key), count + 1)

    def _mlflow_back(self, uri: str) -> None:
        """MLflow answers again: retry now every run waiting for it (spool replays, run ends)."""
        for key in [
            k for k, pending in self._tracking_pending.items() if pending and k in self.runs
        ]:
            log.info("%s/%s: MLflow at %s answers again; delivering what waits for it", *key, uri)
            self.kick(key)

    def _cancel_retry(self, key: Key) -> None:
        handle, _ = self._retries.pop(key, (None, 0))
        if handle is not None:
            handle.cancel()

    # ------------------------------------------------------------------ one pass

    async def reconcile(self, key: Key) -> bool:
        """One pass (driver.py); True when every needed fact was available and every action
        applied. A run not started yet waits for one of STARTS_AT_ONCE first."""
        body = self.runs.get(key)
        if body is None:
            return True
        status = _status_of(key, body)
        # A run with Jobs has started, whatever this body says: the watch event of the start's
        # metadata patch can arrive after the status patch's answer was cached and put back a
        # body without the recorded spec (seen at 100 runs: a check Job's end waited 57 s here).
        if status.spec_hash is not None or self.jobs.get(key):
            return await self._pass(key, body, status)
        async with self._starts:
            body = self.runs.get(key)  # the newest version: the wait may have been long
            if body is None:
                return True
            return await self._pass(key, body, _status_of(key, body))

    async def _pass(self, key: Key, body: JSON, status: api.SPINRunStatus) -> bool:
        spec, cluster = await self.open_pass(key, body)
        outcome = await drive(spec, status, cluster, f"{key[0]}/{key[1]}")
        self._tracking_pending[key] = not outcome.applied
        return outcome.settled

    async def open_pass(
        self, key: Key, body: JSON
    ) -> tuple[api.SPINRunSpec | InvalidSpec, Cluster]:
        """The spec a pass of the run decides on (or why it is refused) and the cluster it runs
        against: the API server, over this controller's caches (tests pass an in-memory one)."""
        cluster = KubeCluster(key, body, self.specs, self.facts, self.applier, self.refusals)
        await self.facts.look_at_pods(cluster.run)  # what keeps pods from starting, if anything
        return cluster.spec, cluster

    async def close(self, grace: float = 10.0) -> None:
        """Stop: MLflow bookkeeping in flight gets `grace` seconds to land, the rest is cancelled."""
        # First, so that no timer (retry, pod re-check) re-armed by a pass still running can
        # start a new pass against the client and pools closed below.
        self.leading = False
        for handle, _ in self._retries.values():
            handle.cancel()
        if self._resync_task is not None:
            self._resync_task.cancel()
        for recheck in self._rechecks.values():
            recheck.cancel()
        if self.tracked.background:
            await asyncio.wait(list(self.tracked.background), timeout=grace)
        for task in [*self._running.values(), *self.tracked.background]:
            task.cancel()
        await self.kube.close()
        self.tracking.close()
        self._storage.close()
