"""The operator's I/O loop around the pure reconciler, independent of kopf's decorators.

Watch events (fed by handlers.py) keep two caches: the latest SPINRun bodies and the child Jobs
by run. A run is reconciled in one task at a time (events arriving meanwhile coalesce into one
more pass). Each pass builds `Observed` from the caches, asks the reconciler, fetches only the
facts it asks for (storage manifests, Secrets, a GET for a Job the cache does not have), then
applies the decision: metadata patch, MLflow ids, Job/Service writes, one `/status` patch when
the status changed, events, then MLflow run ends and spool replays (`Tracking.settle`; a second
patch records what MLflow confirmed). Nothing polls: a pass that could not finish (storage, API
or MLflow down) schedules one retry with backoff.

API errors on creates (docs/operations.md, "API errors"): 409 adopts or waits, 429/5xx back off
(at least as long as `Retry-After` says); a permanent refusal (400, 422, 403 other than an
exhausted quota) is recorded per step and the next pass fails the step with the API server's
message (a condition and a Warning event). When a run starts, every Job and Service of
iteration 0 is first sent with `dryRun=All`, so the API server's own validation and admission
refuse a bad spec before anything is written to storage.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import aiohttp
from pydantic import ValidationError

from spin_operator import observe, resync
from spin_operator.api import types as api
from spin_operator.kube import ApiError, Kube, job_path, secret_path, service_path, spinrun_path
from spin_operator.metrics import Metrics
from spin_operator.naming import (
    APPLIED_SPEC_ANNOTATION,
    CHECK,
    FINALIZER,
    RUN_LABEL,
    StepKind,
    job_name,
)
from spin_operator.reconciler import (
    CreateStep,
    Decision,
    DeleteArtifacts,
    DeleteJob,
    DeleteService,
    EnsureIterationRun,
    EnsureParentRun,
    Event,
    Observed,
    ObservedJob,
    RecordSpec,
    RegisterModel,
    SetFinalizer,
    StorageFacts,
    SuspendJob,
    reconcile,
    referenced_secrets,
)
from spin_operator.refusals import Refusals
from spin_operator.render import render
from spin_operator.settings import Settings, check_policy, resolve_spec
from spin_operator.steps import RunRef, beside, layout_of, plan_step, steps_of
from spin_operator.track import Tracking
from spin_operator.validation import InvalidSpec, Problem, cluster_problems, parse

log = logging.getLogger(__name__)
T = TypeVar("T")
Key = tuple[str, str]  # namespace, run name
JSON = dict[str, Any]
EventPoster = Callable[[JSON, str, str, str], None]
MAX_ROUNDS = api.MAX_ITERATIONS + 10
# The run whose pass is making API calls (each pass runs in its own task, so its own context):
# a `Warning` header the API server sends on those calls becomes an event on that SPINRun.
_PASS: contextvars.ContextVar[Key | None] = contextvars.ContextVar("spin_pass", default=None)


class Retry(Exception):
    """The pass cannot finish now (storage/API unavailable, a name held by a stranger);
    `after`: the least wait the API server asked for (Retry-After)."""

    def __init__(self, message: str, after: float | None = None):
        super().__init__(message)
        self.after = after


class Again(Exception):
    """The API server refused a child for good: decide again now, with the refusal as a fact."""


class Stale(Exception):
    """A write met a newer version of the SPINRun (409) or none (404): the watch brings it."""


@dataclass
class Gathered:
    """Facts fetched during one pass because the reconciler asked for them."""

    storage: dict[int, StorageFacts] = field(default_factory=dict)
    missing_secrets: frozenset[str] | None = None
    gone: set[str] = field(default_factory=set)
    stored_checked: bool = False
    stored_digest: str | None = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
        pod_check: float = 20.0,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.tracking = tracking or Tracking()
        self.metrics = metrics or Metrics()
        self.post_event = post_event or _kopf_event
        self.retry_base, self.retry_max = retry_base, retry_max
        self.runs: dict[Key, JSON] = {}
        # Validating a spec (models + CRD schema) is most of a pass's CPU; status and metadata
        # writes trigger passes with an unchanged spec, so the last result is kept per run.
        self._parsed: dict[Key, tuple[str, api.SPINRunSpec | InvalidSpec]] = {}
        self.jobs: dict[Key, dict[str, tuple[str | None, ObservedJob]]] = {}
        # When each cache entry last changed (monotonic; kept after a delete): resync.py changes
        # only entries older than its lists.
        self.touched: dict[tuple[str, str, str], float] = {}
        self.run_touched: dict[Key, float] = {}
        self._facts: dict[tuple[str, int], StorageFacts] = {}  # complete iterations only
        self._causes: dict[tuple[str, str], str] = {}  # (run uid, Job) -> a bad-input exit's cause
        # Jobs whose pods are not all running: their latest body, and what their pods and events
        # said ((run uid, Job) -> (monotonic time of the look, blockage)); looked at again every
        # `pod_check` seconds while they wait, since a stuck pod changes nothing on the Job.
        self.pod_check = pod_check
        self._starting: dict[tuple[str, str], JSON] = {}
        self._blocked: dict[tuple[str, str], tuple[float, observe.Blockage]] = {}
        self._rechecks: dict[Key, asyncio.TimerHandle] = {}
        self._running: dict[Key, asyncio.Task[None]] = {}
        self._dirty: set[Key] = set()
        self._retries: dict[Key, tuple[asyncio.TimerHandle, int]] = {}
        self.refusals = Refusals()  # children the API server refused for good (refusals.py)
        self._tracking_pending: dict[Key, bool] = {}  # MLflow has not confirmed what the run needs
        self.tracking.on_recovered = self._mlflow_back
        self._background: set[asyncio.Task[Any]] = set()
        self._resync_task: asyncio.Task[None] | None = None
        self.leading = not settings.leader_election  # else only once leader.py holds the Lease
        # one small pool per storage endpoint: a store that hangs holds up only the runs that use it
        self._storage: dict[str | None, concurrent.futures.ThreadPoolExecutor] = {}
        self._warned: dict[Key, set[str]] = {}  # API warnings already posted as events, per run
        kube.on_warning = self._api_warning

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
            self._post(body, Event("Warning", "ApiWarning", f"{method} {path}: {text}"))

    # ------------------------------------------------------------------ watch events

    def on_run(self, event_type: str | None, obj: JSON) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if self.settings.resync_seconds > 0:  # tombstones only the resync reads (and prunes)
            self.run_touched[key] = time.monotonic()
        if event_type == "DELETED":
            self.runs.pop(key, None)
            self._parsed.pop(key, None)
            self._tracking_pending.pop(key, None)
            self.refusals.forget(key)
            self._warned.pop(key, None)
            self._cancel_retry(key)
            uid = meta.get("uid")
            jobs = self.jobs.get(key, {})
            for name in [n for n, (owner, _) in jobs.items() if owner == uid]:
                del jobs[name]
            self._facts = {k: v for k, v in self._facts.items() if k[0] != uid}
            self._causes = {k: v for k, v in self._causes.items() if k[0] != uid}
            self._blocked = {k: v for k, v in self._blocked.items() if k[0] != uid}
            recheck = self._rechecks.pop(key, None)
            if recheck is not None:
                recheck.cancel()
            self.metrics.set_phases(self._phases())
            return
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
        if job.starting and event_type != "DELETED":
            self._starting[(key[0], job.name)] = obj
        else:
            self._starting.pop((key[0], job.name), None)
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
            pages = resync.list_pages(
                self.kube, path, selector=resync.JOB_SELECTOR, chunk=self.settings.list_chunk_size
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
        if any(j.starting for j in self._run_jobs(run)):
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
            uri = self._tracking_uri(key)
            delay = min(delay, max(self.retry_base, self.tracking.down_for(uri) + 0.1))
        loop = asyncio.get_running_loop()
        self._retries[key] = (loop.call_later(delay, self.kick, key), count + 1)

    def _tracking_uri(self, key: Key) -> str | None:
        cached = self._parsed.get(key)
        given = (
            cached[1].tracking.uri
            if cached is not None and isinstance(cached[1], api.SPINRunSpec)
            else None
        )
        return given or self.settings.mlflow_uri  # resolve_spec's default

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

    def _phases(self) -> list[str]:
        return [str((b.get("status") or {}).get("phase") or "Pending") for b in self.runs.values()]

    # ------------------------------------------------------------------ one pass

    def _parse(self, key: Key, body: JSON) -> api.SPINRunSpec | InvalidSpec:
        """`validation.parse` of the run, reused while apiVersion, kind, name and spec are unchanged."""
        meta = body.get("metadata") or {}
        digest = json.dumps(
            [body.get("apiVersion"), body.get("kind"), meta.get("name"), body.get("spec")],
            sort_keys=True,
            default=str,
        )
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == digest:
            return cached[1]
        try:
            result: api.SPINRunSpec | InvalidSpec = parse(body)
        except InvalidSpec as exc:
            result = exc
        self._parsed[key] = (digest, result)
        return result

    async def reconcile(self, key: Key) -> bool:
        """One pass; True when every needed fact was available and every action applied."""
        body = self.runs.get(key)
        if body is None:
            return True
        meta = body["metadata"]
        run = RunRef(meta["namespace"], meta["name"], meta.get("uid", ""))
        applied = self._applied(meta)
        try:
            parsed = self._parse(key, body)
            if isinstance(parsed, InvalidSpec):
                raise parsed
            resolved = resolve_spec(parsed, self.settings, applied)
            layout_of(resolved, run)  # the run prefix must be usable (an operator default too)
            if refused := cluster_problems(
                parsed, resolved.tracking.uri
            ):  # a local MLflow store: pods cannot share it
                raise InvalidSpec(refused)
            check_policy(parsed, resolved, run.namespace, self.settings)  # the admin's allow-lists
            given: api.SPINRunSpec | InvalidSpec = resolved
        except InvalidSpec as exc:
            given = exc
        except ValueError as exc:  # a storage URI the layout cannot use, e.g. s3://b/a/../c
            given = InvalidSpec([Problem("spec.storage.uri", str(exc))])
        try:
            status = api.SPINRunStatus.model_validate(body.get("status") or {})
        except ValidationError:
            log.warning("%s/%s: unreadable status; starting from storage and children", *key)
            status = api.SPINRunStatus()
        await self._look_at_pods(run)
        facts = Gathered()
        decision = None
        for _ in range(MAX_ROUNDS):
            decision = reconcile(
                given,
                status,
                self._observed(
                    body,
                    run,
                    applied,
                    facts,
                    self.refusals.of(key, body, None if isinstance(given, InvalidSpec) else given),
                ),
            )
            if decision.complete or not await self._gather(decision, run, facts):
                break
        assert decision is not None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s/%s: phase %s -> %s, actions %s, still needed %s", *key, status.phase, decision.status.phase,
                [type(a).__name__ + (f"({getattr(a, 'name', '')})" if hasattr(a, "name") else "") for a in decision.actions],
                {k: v for k, v in (("storage", decision.needs_storage), ("secrets", decision.needs_secrets),
                                   ("jobs", decision.needs_jobs), ("storedSpec", decision.needs_stored_spec)) if v},
            )  # fmt: skip
        settled = await self._execute(key, body, run, status, decision)
        self._tracking_pending[key] = not settled
        return decision.complete and settled

    async def _look_at_pods(self, run: RunRef) -> None:
        """For each Job still waiting for pods, at most every `pod_check` seconds: its pods (and,
        when they do not explain the wait, its events) -> `observe.pod_blockage`. Best effort: a
        failed look leaves the last one (the step then just waits, as before)."""
        now = time.monotonic()
        for job in self._run_jobs(run):
            k = (run.uid, job.name)
            body = self._starting.get((run.namespace, job.name))
            if body is None:
                self._blocked.pop(k, None)
                continue
            seen = self._blocked.get(k)
            if seen is not None and now - seen[0] < self.pod_check * 0.9:
                continue
            try:
                pods = await self.kube.request("GET", f"/api/v1/namespaces/{run.namespace}/pods",
                                               params={"labelSelector": f"batch.kubernetes.io/job-name={job.name}"})  # fmt: skip
                found = observe.pod_blockage(body, pods.get("items") or [], [])
                if not found.reason:
                    selector = f"involvedObject.kind=Job,involvedObject.name={job.name}"
                    events = await self.kube.request("GET", f"/api/v1/namespaces/{run.namespace}/events",
                                                     params={"fieldSelector": selector})  # fmt: skip
                    found = observe.pod_blockage(
                        body, pods.get("items") or [], events.get("items") or []
                    )
            except (ApiError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:  # noqa: UP041
                # best effort: a dropped connection must not fail the pass this look serves
                level = logging.DEBUG if getattr(exc, "status", None) == 404 else logging.WARNING
                log.log(
                    level,
                    "%s/%s: cannot look at the pods of Job %s: %s",
                    run.namespace,
                    run.name,
                    job.name,
                    exc,
                )
                continue
            self._blocked[k] = (now, found)

    def _applied(self, meta: JSON) -> api.SPINRunSpec | None:
        raw = (meta.get("annotations") or {}).get(APPLIED_SPEC_ANNOTATION)
        if not raw:
            return None
        try:
            return api.SPINRunSpec.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            return None

    def _run_jobs(self, run: RunRef) -> tuple[ObservedJob, ...]:
        return tuple(
            j for uid, j in self.jobs.get((run.namespace, run.name), {}).values() if uid == run.uid
        )

    def _observed(
        self,
        body: JSON,
        run: RunRef,
        applied: api.SPINRunSpec | None,
        g: Gathered,
        rejected: dict[str, tuple[str, str]],
    ) -> Observed:
        meta = body["metadata"]
        # a Job failed on bad input carries the runtime's own cause, not Kubernetes' exit-code line
        jobs = tuple(
            dataclasses.replace(j, message=cause)
            if (cause := self._causes.get((run.uid, j.name)))
            else j
            for j in self._run_jobs(run)
        )
        jobs = tuple(  # what keeps its pods from starting (looked at in _look_at_pods)
            dataclasses.replace(
                j, blocked_reason=b.reason, blocked_message=b.message, pending_since=b.since
            )
            if j.starting
            and (b := self._blocked.get((run.uid, j.name), (0.0, None))[1]) is not None
            else j
            for j in jobs
        )
        return Observed(
            namespace=run.namespace,
            name=run.name,
            uid=run.uid,
            generation=int(meta.get("generation") or 1),
            now=_now(),
            deleting=bool(meta.get("deletionTimestamp")),
            finalizer=FINALIZER in (meta.get("finalizers") or []),
            jobs=jobs,
            gone_jobs=frozenset(g.gone),
            missing_secrets=g.missing_secrets,
            storage=dict(g.storage),
            stored_spec_checked=g.stored_checked,
            stored_spec_digest=g.stored_digest,
            applied_spec=applied,
            rejected=dict(rejected),
        )

    async def _in_storage(self, fn: Callable[..., T], spec: api.SPINRunSpec, *args: Any) -> T:
        """`fn(spec, *args)` in the worker pool of the run's storage endpoint."""
        endpoint = spec.storage.endpoint if (spec.storage.uri or "").startswith("s3://") else None
        pool = self._storage.get(endpoint)
        if pool is None:
            pool = self._storage[endpoint] = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="spin-storage"
            )
        return await asyncio.get_running_loop().run_in_executor(pool, fn, spec, *args)

    async def _gather(self, d: Decision, run: RunRef, g: Gathered) -> bool:
        """Fetch what `d` asks for; False when something could not be fetched (act partially)."""
        spec = d.spec
        if spec is None:
            return False
        try:
            if d.needs_stored_spec:
                g.stored_digest = await self._in_storage(observe.read_stored_digest, spec, run)
                g.stored_checked = True
            if d.needs_secrets:
                g.missing_secrets = await self._missing_secrets(spec, run)
            for name in d.needs_jobs:
                found = await self.kube.get(job_path(run.namespace, name))
                if found is None:
                    g.gone.add(name)
                else:
                    self.on_job("ADDED", found)
            for t in sorted(d.needs_storage):
                facts = self._facts.get((run.uid, t))
                if facts is None:
                    facts = await self._in_storage(observe.read_facts, spec, run, t)
                if observe.facts_final(spec, facts):
                    self._facts[(run.uid, t)] = facts
                g.storage[t] = facts
            for job in self._run_jobs(
                run
            ):  # once per Job: the cause a bad-input exit left in storage
                if (
                    job.state == "Failed"
                    and job.reason == "PodFailurePolicy"
                    and (run.uid, job.name) not in self._causes
                ):
                    cause = await self._in_storage(
                        observe.read_bad_input, spec, run, job.iteration, job.stage
                    )
                    self._causes[(run.uid, job.name)] = cause
        except (OSError, ApiError) as exc:
            log.warning(
                "%s/%s: cannot read what the decision needs: %s", run.namespace, run.name, exc
            )
            self.metrics.errors.labels(kind="facts").inc()
            return False
        return True

    async def _missing_secrets(self, spec: api.SPINRunSpec, run: RunRef) -> frozenset[str]:
        """Referenced Secrets that do not exist, where RBAC lets the operator look (a namespaced
        grant only, docs/security.md); elsewhere none are reported and a missing Secret shows up
        as the pods' CreateContainerConfigError instead."""
        if not self.settings.may_read_secrets(run.namespace):
            return frozenset()
        missing = set()
        for name in referenced_secrets(spec):
            try:
                if await self.kube.get(secret_path(run.namespace, name)) is None:
                    missing.add(name)
            except ApiError as exc:
                if exc.status != 403:
                    raise
                log.info(
                    "%s/%s: no RBAC grant to check Secret %s; not checked",
                    run.namespace,
                    run.name,
                    name,
                )
        return frozenset(missing)

    # ------------------------------------------------------------------ applying a decision

    async def _execute(
        self, key: Key, body: JSON, run: RunRef, old: api.SPINRunStatus, d: Decision
    ) -> bool:
        """Apply `d`; False when MLflow has not confirmed every run end and replay it asked for."""
        new, spec = d.status, d.spec
        if spec is not None and old.spec_hash is None and new.spec_hash is not None:
            await self._dry_run(
                key, spec, run
            )  # before R/spinrun.yaml: a refused spec leaves nothing
        fresh = await self._metadata(key, body, run, d)
        if fresh is None:
            return (
                True  # gone (finalizer released) or a conflict: the next event brings the new state
            )
        body = fresh
        if spec is not None:
            await self._ensure_tracking(spec, run, d)
        for a in d.actions:
            if isinstance(a, DeleteJob):
                # Foreground: the Job stays (marked deleting) until its pods are gone, so the
                # reconciler can tell when nothing writes any more (run deletion, retries).
                await self._write(
                    self.kube.delete(job_path(run.namespace, a.name), propagation="Foreground")
                )
            elif isinstance(a, DeleteService):
                await self._write(self.kube.delete(service_path(run.namespace, a.name)))
            elif isinstance(a, SuspendJob):
                await self._write(
                    self.kube.patch(
                        job_path(run.namespace, a.name), {"spec": {"suspend": a.suspend}}
                    )
                )
        if spec is not None:
            for a in d.of_type(CreateStep):
                await self._create(key, spec, run, new, a)
        body = await self._patch_status(key, body, run, old, new)
        for a in d.of_type(Event):
            self._post(body, a)
        if spec is None:
            return True
        self._background_tracking(spec, run, new, d)
        # After the phase is written (so MLflow never holds it up): run ends and spool replays,
        # recorded in status.mlflow only once MLflow confirmed them. A kill before that patch, or
        # an MLflow that does not answer, leaves them out of the status: the reconciler asks again.
        written = new.model_copy(deep=True)
        settled = await self.tracking.settle(spec, run, new, d.actions)
        await self._patch_status(key, body, run, written, new)
        return settled

    async def _patch_status(
        self, key: Key, body: JSON, run: RunRef, old: api.SPINRunStatus, new: api.SPINRunStatus
    ) -> JSON:
        """One `/status` merge patch from `old` to `new` (none when equal); the updated body."""
        old_wire, new_wire = old.to_wire(), new.to_wire()
        if new_wire == old_wire:
            return body
        patch = {k: None for k in old_wire if k not in new_wire} | new_wire
        rv = body["metadata"].get("resourceVersion")
        try:
            updated: JSON = await self.kube.patch(
                spinrun_path(run.namespace, run.name, status=True),
                {"metadata": {"resourceVersion": rv}, "status": patch},
            )
        except ApiError as exc:
            if exc.status in (404, 409):  # our snapshot was stale: its newer version is on
                raise Stale from exc  # its way through the watch and triggers a new pass
            raise
        if key in self.runs:
            self.runs[key] = updated
        if old.phase != new.phase:
            self.metrics.transitions.labels(from_phase=old.phase, to_phase=new.phase).inc()
        self.metrics.set_phases(self._phases())
        return updated or body

    async def _write(self, call: Any) -> Any:
        try:
            return await call
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise Retry(f"API write failed: {exc}", exc.retry_after) from exc

    async def _metadata(self, key: Key, body: JSON, run: RunRef, d: Decision) -> JSON | None:
        """Storage records first (R/spinrun.yaml, artifact deletion), then one metadata patch."""
        meta = body["metadata"]
        annotations: dict[str, str] = {}
        finalizers: list[str] | None = None
        for a in d.actions:
            try:
                if isinstance(a, RecordSpec):
                    if a.store:
                        await self._in_storage(observe.write_stored_spec, a.spec, run)
                    annotations[APPLIED_SPEC_ANNOTATION] = json.dumps(
                        a.spec.to_wire(), sort_keys=True, separators=(",", ":")
                    )
                elif isinstance(a, DeleteArtifacts) and d.spec is not None:
                    count = await self._in_storage(observe.delete_artifacts, d.spec, a.prefix)
                    log.info(
                        "%s/%s: deleted %d artifact file(s) under %s",
                        run.namespace,
                        run.name,
                        count,
                        a.prefix,
                    )
            except OSError as exc:
                raise Retry(f"storage: {exc}") from exc
            if isinstance(a, SetFinalizer):
                current = list(meta.get("finalizers") or [])
                finalizers = (
                    [*current, FINALIZER] if a.present else [f for f in current if f != FINALIZER]
                )
        if not annotations and finalizers is None:
            return body
        patch: JSON = {"resourceVersion": meta.get("resourceVersion")}
        if annotations:
            patch["annotations"] = annotations
        if finalizers is not None:
            patch["finalizers"] = finalizers
        try:
            updated = await self.kube.patch(
                spinrun_path(run.namespace, run.name), {"metadata": patch}
            )
        except ApiError as exc:
            if exc.status in (404, 409):
                raise Stale from exc
            raise
        if key in self.runs:
            self.runs[key] = updated
        released = (
            finalizers is not None and FINALIZER not in finalizers and meta.get("deletionTimestamp")
        )
        return None if released or not updated.get("metadata") else updated

    def _refused(
        self,
        key: Key,
        spec: api.SPINRunSpec,
        name: str,
        message: str,
        reason: str = "CreateRejected",
    ) -> None:
        if not self.refusals.record(key, self.runs.get(key), spec, name, (reason, message)):
            raise Retry(f"{name} refused again: {message}")  # decided on already: never loop on it
        self.metrics.errors.labels(kind="rejected").inc()
        raise Again(message)

    def _objects(
        self,
        key: Key,
        spec: api.SPINRunSpec,
        run: RunRef,
        t: int,
        kind: StepKind,
        attempt: int,
        mlflow_run_id: str | None,
    ) -> tuple[str, list[JSON]]:
        """The Job name and rendered objects of a step attempt. A spec that cannot be laid out
        or rendered (a URI the layout refuses) fails the step as InvalidSpec instead of raising
        on every pass."""
        try:
            plan = plan_step(spec, self.settings, run, t, kind, attempt, mlflow_run_id)
            return plan.job_name, render(plan, spec, run)
        except ValueError as exc:
            self._refused(
                key,
                spec,
                job_name(run.name, t, kind, attempt),
                f"{kind} of iteration {t}: {exc}",
                "InvalidSpec",
            )
            raise  # unreachable: _refused raises

    async def _dry_run(self, key: Key, spec: api.SPINRunSpec, run: RunRef) -> None:
        """Send iteration 0's Jobs and Services with dryRun=All: the API server validates and
        admits them (schema, PodSecurity, quota limits, RBAC) without storing anything. A
        permanent refusal fails the run before it starts; anything else is left to the real
        create (a quota in use now, a Job already there from before a restart)."""
        # the check that leads iteration 0, then every step (the control arm's too)
        kinds: list[StepKind] = [CHECK, *(k for lead in steps_of(spec) for k in beside(spec, lead))]
        for kind in kinds:
            name, objects = self._objects(key, spec, run, 0, kind, 0, None)
            for obj in objects:
                path = (
                    job_path(run.namespace) if obj["kind"] == "Job" else service_path(run.namespace)
                )
                try:
                    await self.kube.create(path, obj, dry_run=True)
                except ApiError as exc:
                    if not exc.permanent:
                        log.info(
                            "%s/%s: dry run of %s %s: %s (left to the real create)",
                            *key,
                            obj["kind"],
                            name,
                            exc,
                        )
                        continue
                    what = f"{kind} of iteration 0: the API server refuses {obj['kind']} {obj['metadata']['name']} (dry run at start)"
                    self._refused(key, spec, name, f"{what}: {exc.reason}: {exc.message}")

    async def _create(
        self, key: Key, spec: api.SPINRunSpec, run: RunRef, status: api.SPINRunStatus, a: CreateStep
    ) -> None:
        it = next((i for i in status.iterations if i.iteration == a.iteration), None)
        name, objects = self._objects(
            key, spec, run, a.iteration, a.stage, a.attempt, it.mlflow_run_id if it else None
        )
        for obj in objects:
            is_job = obj["kind"] == "Job"
            path = job_path(run.namespace) if is_job else service_path(run.namespace)
            created: JSON | None
            try:
                created = await self.kube.create(path, obj)
            except ApiError as exc:
                if exc.permanent:  # the same request would be refused again: fail the step
                    what = f"{a.stage} of iteration {a.iteration}: the API server refuses {obj['kind']} {obj['metadata']['name']}"
                    self._refused(key, spec, name, f"{what}: {exc.reason}: {exc.message}")
                if exc.status != 409:  # 429, 5xx, a quota in use, ...: back off
                    raise Retry(
                        f"cannot create {obj['kind']} {name}: {exc}", exc.retry_after
                    ) from exc
                if not is_job:
                    continue  # the Service of an earlier try of this pass: same spec, keep it
                created = await self.kube.get(job_path(run.namespace, name)) or {}
                if observe.owner_uid(created) != run.uid:
                    raise Retry(f"Job {name} exists but belongs to another object") from exc
                log.info("%s/%s: adopted existing Job %s", run.namespace, run.name, name)
            if is_job and created:
                self.on_job("ADDED", created)
                self.metrics.jobs_created.labels(stage=a.stage).inc()

    async def _ensure_tracking(self, spec: api.SPINRunSpec, run: RunRef, d: Decision) -> None:
        """MLflow ids the Jobs of this decision need (MLFLOW_RUN_ID), written into the status."""
        wanted = [a.iteration for a in d.of_type(EnsureIterationRun)]
        new = d.status
        if not (d.of_type(EnsureParentRun) or wanted) or not spec.tracking.uri:
            return
        if new.mlflow is None or new.mlflow.run_id is None:
            new.mlflow = await self.tracking.ensure_parent(spec, run) or new.mlflow
        parent = new.mlflow.run_id if new.mlflow else None
        for t in wanted:
            it = next((i for i in new.iterations if i.iteration == t), None)
            if parent and it is not None and it.mlflow_run_id is None:
                it.mlflow_run_id = await self.tracking.ensure_iteration(spec, parent, t, run)

    def _background_tracking(
        self, spec: api.SPINRunSpec, run: RunRef, status: api.SPINRunStatus, d: Decision
    ) -> None:
        """Model registration and dataset inputs: in the background, never holding up the pass."""
        actions = d.of_type(RegisterModel)
        trains = [
            a.iteration for a in d.of_type(CreateStep) if a.stage == "train" and a.attempt == 0
        ]
        if not (actions or trains) or not spec.tracking.uri:
            return
        parent = status.mlflow.run_id if status.mlflow else None
        by_iter = {i.iteration: i.mlflow_run_id for i in status.iterations}

        async def send() -> None:
            for t in trains:
                rid = by_iter.get(t)
                if rid:
                    await self._log_inputs(spec, run, rid, t, status.dataset)
            for a in actions:
                rid = by_iter.get(a.iteration) or (
                    parent and await self.tracking.ensure_iteration(spec, parent, a.iteration, run)
                )
                if rid:
                    await self.tracking.register(
                        spec, run, rid, a.iteration, a.model_uri, dict(a.metrics)
                    )

        task = asyncio.create_task(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _log_inputs(
        self,
        spec: api.SPINRunSpec,
        run: RunRef,
        run_id: str,
        t: int,
        rows: api.DatasetStatus | None = None,
    ) -> None:
        """What iteration t trains on, as dataset inputs of its MLflow run: the generated data
        (digest: the union of the shard manifests) and the SFT dataset (digest of its URI and
        selection; the operator never downloads the dataset to hash its content)."""
        d = spec.dataset
        selection = f"{d.uri}|seed={d.seed}|max={d.max_samples}|eval={d.eval_samples}"
        datasets = [("sft", d.uri, hashlib.sha256(selection.encode()).hexdigest(), "sft")]
        for uri in layout_of(spec, run).training_data_for_iteration(
            t, spec.training.mix_previous_iterations
        ):
            try:
                digest = await self._in_storage(observe.generated_digest, spec, uri)
            except OSError as exc:  # IncompleteArtifactError included: nothing to record
                log.debug("no digest for %s: %s", uri, exc)
                continue
            name = uri.rstrip("/").split("/")[-2] + "/generated"
            datasets.append((name, uri, digest, "training"))
        await self.tracking.log_inputs(spec, run_id, datasets, rows)

    def _post(self, body: JSON, event: Event) -> None:
        try:
            self.post_event(body, event.type, event.reason, event.message)
        except Exception as exc:  # events are best effort
            log.debug("event %s not posted: %s", event.reason, exc)

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
        if self._background:
            await asyncio.wait(list(self._background), timeout=grace)
        for task in [*self._running.values(), *self._background]:
            task.cancel()
        await self.kube.close()
        self.tracking.close()
        for pool in self._storage.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._storage.clear()


def _kopf_event(body: JSON, type_: str, reason: str, message: str) -> None:
    import kopf

    kopf.event(cast(Any, body), type=type_, reason=reason, message=message[:1000])
