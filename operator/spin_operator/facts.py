"""What one pass of the controller knows: the spec it decides on, and the facts a decision asks for.

The reconciler is pure (reconciler.py); the controller builds its `Observed` from the watch
caches and fetches, only when a decision asks (`Decision.needs_*`), the facts the caches do not
hold: storage manifests, the stored spec's digest, Secrets, a GET for a Job the cache does not
have, the cause a bad-input exit left in storage, and what keeps a Job's pods from starting.
Storage calls run in one small thread pool per storage endpoint, each within a short budget and
behind a breaker per endpoint (`endpoints.StoragePools`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import aiohttp
from pydantic import ValidationError

from spin_operator import observe
from spin_operator.api import types as api
from spin_operator.artifact_reads import ArtifactReads
from spin_operator.decision import Decision, Observed, ObservedJob, referenced_secrets
from spin_operator.driver import Gathered
from spin_operator.endpoints import StoragePools
from spin_operator.kube import ApiError, Kube, job_path, secret_path
from spin_operator.metrics import Metrics
from spin_operator.naming import APPLIED_SPEC_ANNOTATION, FINALIZER, MANAGED_BY, MANAGED_BY_LABEL
from spin_operator.settings import Settings, check_policy, resolve_spec
from spin_operator.steps import RunRef, layout_of
from spin_operator.validation import InvalidSpec, Problem, cluster_problems, parse

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long Secrets found present count as present for the run's next steps. The reconciler asks
# before every Job it creates; GETting them each time was a request per step (3.5 of ~33 per
# iteration at N=20 on a real cluster, docs/benchmarks.md). A Secret deleted within this window
# shows up as the pods' CreateContainerConfigError instead (PodsBlocked, naming the Secret), as
# it does where RBAC lets the operator check nothing. A missing one is never cached.
SECRETS_TRUSTED = 300.0
Key = tuple[str, str]  # namespace, run name
JSON = dict[str, Any]
Listed = tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]  # pods, events of a namespace
JobCache = dict[Key, dict[str, tuple[str | None, ObservedJob]]]  # run -> Job -> (owner uid, Job)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def applied_spec(meta: JSON) -> api.SPINRunSpec | None:
    """The spec the run goes on with, from its applied-spec annotation (None: absent, unreadable)."""
    raw = (meta.get("annotations") or {}).get(APPLIED_SPEC_ANNOTATION)
    if not raw:
        return None
    try:
        return api.SPINRunSpec.model_validate(json.loads(raw))
    except (ValueError, ValidationError):
        return None


class Specs:
    """The spec each run's pass decides on. Validating a spec (models + CRD schema) is most of a
    pass's CPU; status and metadata writes trigger passes with an unchanged spec, so the last
    result is kept per run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._parsed: dict[Key, tuple[str, api.SPINRunSpec | InvalidSpec]] = {}

    def forget(self, key: Key) -> None:
        self._parsed.pop(key, None)

    def parse(self, key: Key, body: JSON) -> api.SPINRunSpec | InvalidSpec:
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

    def given(
        self, key: Key, body: JSON, run: RunRef, applied: api.SPINRunSpec | None
    ) -> api.SPINRunSpec | InvalidSpec:
        """The spec as written, with the operator's defaults, or why the operator refuses it."""
        try:
            parsed = self.parse(key, body)
            if isinstance(parsed, InvalidSpec):
                raise parsed
            resolved = resolve_spec(parsed, self.settings, applied)
            layout_of(resolved, run)  # the run prefix must be usable (an operator default too)
            # a local MLflow store: pods cannot share it
            if refused := cluster_problems(parsed, resolved.tracking.uri):
                raise InvalidSpec(refused)
            check_policy(parsed, resolved, run.namespace, self.settings)  # the admin's allow-lists
            return resolved
        except InvalidSpec as exc:
            return exc
        except ValueError as exc:  # a storage URI the layout cannot use, e.g. s3://b/a/../c
            return InvalidSpec([Problem("spec.storage.uri", str(exc))])

    def tracking_uri(self, key: Key) -> str | None:
        """The MLflow URI the run's last parsed spec names, else the operator's default."""
        cached = self._parsed.get(key)
        given = (
            cached[1].tracking.uri
            if cached is not None and isinstance(cached[1], api.SPINRunSpec)
            else None
        )
        return given or self.settings.mlflow_uri  # resolve_spec's default


def _jobs_of(jobs: tuple[ObservedJob, ...], t: int) -> tuple[tuple[str, str], ...]:
    """(name, state) of iteration `t`'s Jobs, sorted: what its storage facts depend on."""
    return tuple(sorted((j.name, j.state) for j in jobs if j.iteration == t))


class Facts:
    """Builds `Observed` from the Job cache and fetches what a decision asks for."""

    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        metrics: Metrics,
        storage: StoragePools,
        jobs: JobCache,
        on_job: Callable[[str | None, JSON], None],
        pod_check: float,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics
        self.storage = storage
        self.jobs = jobs  # the controller's Job cache (read only here)
        self.on_job = on_job  # a Job fetched by GET goes into that cache as a watch event would
        self.artifacts = ArtifactReads()  # what was read per iteration, what to read again
        self._causes: dict[tuple[str, str], str] = {}  # (run uid, Job) -> a bad-input exit's cause
        # Jobs whose pods are not all running: their latest body, and what their pods and events
        # said ((run uid, Job) -> (monotonic time of the look, blockage)); looked at again every
        # `pod_check` seconds while they wait, since a stuck pod changes nothing on the Job.
        self.pod_check = pod_check
        self._starting: dict[tuple[str, str], JSON] = {}
        self._blocked: dict[tuple[str, str], tuple[float, observe.Blockage]] = {}
        # When each such Job was first seen waiting ((run uid, Job) -> monotonic): the first look
        # is `pod_check` seconds later, since a Job created a moment ago has no pods to blame yet
        # and looking at once cost two requests per step for nothing (benchmarks, real cluster).
        self._waiting_since: dict[tuple[str, str], float] = {}
        # namespace -> (monotonic time, the list of its pods and FailedCreate events, shared)
        self._listed: dict[str, tuple[float, asyncio.Future[Listed]]] = {}
        # Called with a run whose pass went on without the pod look it was due, once the lists
        # are in and changed what is known of its Jobs' pods (the controller reconciles it).
        self.on_looked: Callable[[RunRef], None] | None = None
        # Jobs the operator asked to delete ((namespace, Job); the Applier adds them): a
        # Foreground delete leaves the Job in place until its pods are gone, and passes triggered
        # before the watch brings its deletionTimestamp must not send the delete again (they
        # did: two per Job). They count as deleting until the watch says so itself.
        self.deletes_sent: set[tuple[str, str]] = set()
        # Runs whose referenced Secrets all existed: (their names, monotonic time of the GETs).
        self._secrets_found: dict[str, tuple[frozenset[str], float]] = {}

    def job_seen(self, namespace: str, job: ObservedJob, obj: JSON, deleted: bool) -> None:
        """A watch event for a Job: keep its body while its pods are worth a look."""
        if job.starting and not deleted:
            self._starting[(namespace, job.name)] = obj
        else:
            self._starting.pop((namespace, job.name), None)
        if deleted or job.deleting:
            self.deletes_sent.discard((namespace, job.name))  # the watch tells from here on

    def forget(self, uid: str | None) -> None:
        """The run is gone: drop what was learnt about its children."""
        self.artifacts.forget(uid)
        self._secrets_found.pop(uid or "", None)
        self._causes = {k: v for k, v in self._causes.items() if k[0] != uid}
        self._blocked = {k: v for k, v in self._blocked.items() if k[0] != uid}
        self._waiting_since = {k: v for k, v in self._waiting_since.items() if k[0] != uid}

    def run_jobs(self, run: RunRef) -> tuple[ObservedJob, ...]:
        return tuple(
            j for uid, j in self.jobs.get((run.namespace, run.name), {}).values() if uid == run.uid
        )

    async def look_at_pods(self, run: RunRef) -> None:
        """For each Job still waiting for pods, at most every `pod_check` seconds: its pods and
        its FailedCreate events (from the namespace's shared lists) -> `observe.pod_blockage`.
        Best effort: a failed look leaves the last one (the step then just waits, as before).

        Never waited for: while the namespace's lists are still on their way the pass goes on
        with the last look; when they are in, what they say is recorded and `on_looked` asks for
        another pass if it changed anything. A pass held on them also held the run's next Job:
        at 250 runs the events list (a field selector the API server serves by scanning every
        event of the namespace) took 7-12 s, and each Job that finished meanwhile waited as long
        for its successor (the p99 of 4.4 s)."""
        now = time.monotonic()
        due: list[tuple[str, str]] = []
        for job in self.run_jobs(run):
            k = (run.uid, job.name)
            if (run.namespace, job.name) not in self._starting:
                self._blocked.pop(k, None)
                self._waiting_since.pop(k, None)
                continue
            since = self._waiting_since.setdefault(k, now)
            seen = self._blocked.get(k)
            last = since if seen is None else seen[0]
            if now - last >= self.pod_check * 0.9:
                due.append(k)
        if not due:
            return
        listed = self._pods_and_events(run.namespace)
        if not listed.done():
            listed.add_done_callback(lambda f: self._looked(run, due, f))
            return
        try:
            self._record(run, due, listed.result())
        except (ApiError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:  # noqa: UP041
            # best effort: a dropped connection must not fail the pass this look serves
            level = logging.DEBUG if getattr(exc, "status", None) == 404 else logging.WARNING
            log.log(
                level,
                "%s/%s: cannot look at the pods of its Jobs: %s",
                run.namespace,
                run.name,
                exc,
            )

    def _record(self, run: RunRef, due: list[tuple[str, str]], listed: Listed) -> bool:
        """Each due Job's blockage from the lists; True when one differs from the last look."""
        pods, events = listed
        now, changed = time.monotonic(), False
        for k in due:
            body = self._starting.get((run.namespace, k[1]))
            if body is None:  # its pods started (or it went) meanwhile
                continue
            found = observe.pod_blockage(body, pods, events)
            before = self._blocked.get(k)
            self._blocked[k] = (now, found)
            changed |= found != (before[1] if before is not None else observe.Blockage())
        return changed

    def _looked(
        self, run: RunRef, due: list[tuple[str, str]], future: asyncio.Future[Listed]
    ) -> None:
        """The lists a pass of `run` went on without are in: record what they say, and ask for
        another pass only when that changed (most looks find nothing new: no pass for those).
        A failed list records nothing (`_listed_in` logs it; the next due look lists again)."""
        if future.cancelled() or future.exception() is not None:
            return
        if self._record(run, due, future.result()) and self.on_looked is not None:
            self.on_looked(run)

    def _pods_and_events(self, namespace: str) -> asyncio.Future[Listed]:
        """The operator's pods and the Jobs' FailedCreate events in `namespace`: one list of
        each, shared by every Job waiting there until half a `pod_check` after it came in.
        Listing per Job cost two requests per waiting Job every `pod_check` seconds: at 250
        runs, whose pods the Job controller creates late, more than all other requests together
        (docs/benchmarks.md)."""
        now = time.monotonic()
        seen = self._listed.get(namespace)
        if seen is None or (seen[1].done() and now - seen[0] >= self.pod_check * 0.5):
            future = asyncio.ensure_future(self._list(namespace))
            seen = self._listed[namespace] = (now, future)
            future.add_done_callback(lambda f: self._listed_in(namespace, f))
        return seen[1]

    def _listed_in(self, namespace: str, future: asyncio.Future[Listed]) -> None:
        """The lists came in: fresh from now on; a failed one is listed again by the next look."""
        if self._listed.get(namespace, (0.0, None))[1] is not future:
            return
        exc = None if future.cancelled() else future.exception()
        if future.cancelled() or exc is not None:
            del self._listed[namespace]
            # best effort: the steps then just wait, as before the look
            level = logging.DEBUG if getattr(exc, "status", None) == 404 else logging.WARNING
            log.log(level, "%s: cannot look at the pods of waiting Jobs: %s", namespace, exc)
        else:
            self._listed[namespace] = (time.monotonic(), future)

    async def _list(self, namespace: str) -> Listed:
        pods = await self.kube.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            params={"labelSelector": f"{MANAGED_BY_LABEL}={MANAGED_BY}"},
        )
        events = await self.kube.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/events",
            params={"fieldSelector": "involvedObject.kind=Job,reason=FailedCreate"},
        )
        return pods.get("items") or [], events.get("items") or []

    def observed(
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
            for j in self.run_jobs(run)
        )
        jobs = tuple(  # deleted by this operator: deleting, whether or not the watch said so yet
            dataclasses.replace(j, deleting=True)
            if (run.namespace, j.name) in self.deletes_sent
            else j
            for j in jobs
        )
        jobs = tuple(  # what keeps its pods from starting (looked at in look_at_pods)
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

    async def gather(self, d: Decision, run: RunRef, g: Gathered) -> bool:
        """Fetch what `d` asks for; False when something could not be fetched (act partially)."""
        spec = d.spec
        if spec is None:
            return False
        try:
            if d.needs_stored_spec:
                g.stored_digest = await self.storage.run(observe.read_stored_digest, spec, run)
                g.stored_checked = True
                if not self.artifacts.knows(run.uid):  # the first look at the prefix only
                    empty = g.stored_digest is None and await self.storage.run(
                        observe.prefix_empty, spec, run
                    )
                    self.artifacts.started(run.uid, empty)
            if d.needs_secrets:
                g.missing_secrets = await self._missing_secrets(spec, run)
            for name in d.needs_jobs:
                found = await self.kube.get(job_path(run.namespace, name))
                if found is None:
                    g.gone.add(name)
                else:
                    self.on_job("ADDED", found)
            for t in sorted(d.needs_storage):
                jobs = self.run_jobs(run)
                facts, stages = self.artifacts.plan(spec, run.uid, t, jobs, d.status)
                if stages:  # only what a Job may have changed since it was last read
                    facts = await self.storage.run(observe.read_facts, spec, run, t, stages, facts)
                    self.artifacts.update(spec, run.uid, t, jobs, facts, stages)
                g.storage[t] = facts
                g.storage_jobs[t] = _jobs_of(jobs, t)
            for job in self.run_jobs(
                run
            ):  # once per Job: the cause a bad-input exit left in storage
                if (
                    job.state == "Failed"
                    and job.reason == "PodFailurePolicy"
                    and (run.uid, job.name) not in self._causes
                ):
                    cause = await self.storage.run(
                        observe.read_bad_input, spec, run, job.iteration, job.stage
                    )
                    self._causes[(run.uid, job.name)] = cause
        except (OSError, ApiError) as exc:
            log.warning(
                "%s/%s: cannot read what the decision needs: %s", run.namespace, run.name, exc
            )
            self.metrics.errors.labels(kind="facts").inc()
            return False
        self._drop_stale_storage(run, g)
        return True

    def _drop_stale_storage(self, run: RunRef, g: Gathered) -> None:
        """Forget the storage facts of every iteration whose Jobs changed since they were read.

        The pass decides from the Job cache as it is when gather returns (`observed` follows
        without an await), but the facts were planned and read on the Jobs before the awaits
        above, during which the watch goes on. A Job that finished meanwhile, with its artifact
        unread while it ran (artifact_reads.py skips running steps), looked like a Job that
        succeeded without writing it: ArtifactIncomplete and a needless retry (the tier's
        `<run>-i<t>-ctrain-r1`, when the control's training ended while SPIN's was being read).
        The reconciler then asks for them again, and the next read sees the Job finished."""
        jobs = self.run_jobs(run)
        for t, seen in list(g.storage_jobs.items()):
            if _jobs_of(jobs, t) != seen:
                g.storage.pop(t, None)
                del g.storage_jobs[t]

    async def _missing_secrets(self, spec: api.SPINRunSpec, run: RunRef) -> frozenset[str]:
        """Referenced Secrets that do not exist, where RBAC lets the operator look (a namespaced
        grant only, docs/security.md); elsewhere none are reported and a missing Secret shows up
        as the pods' CreateContainerConfigError instead."""
        if not self.settings.may_read_secrets(run.namespace):
            return frozenset()
        names = frozenset(referenced_secrets(spec))
        seen = self._secrets_found.get(run.uid)
        if seen is not None and seen[0] == names and time.monotonic() - seen[1] < SECRETS_TRUSTED:
            return frozenset()
        missing = set()
        for name in sorted(names):
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
        if not missing:
            self._secrets_found[run.uid] = (names, time.monotonic())
        return frozenset(missing)
