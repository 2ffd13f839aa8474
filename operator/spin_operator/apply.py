"""Applying a decision to the API server: creates (with a dry run at start), deletes, suspends,
metadata and `/status` patches, events, and what API errors mean for the pass.

Order (`Applier.execute`): the dry run when the run starts, storage records and one metadata
patch, MLflow ids, Job/Service writes, one `/status` patch when the status changed, events,
then MLflow run ends and spool replays (`Tracking.settle`; a second patch records what MLflow
confirmed).

API errors on creates (docs/operations.md, "API errors"): 409 adopts or waits, 429/5xx back off
(at least as long as `Retry-After` says); a permanent refusal (400, 422, 403 other than an
exhausted quota) is recorded per step and the next pass fails the step with the API server's
message (a condition and a Warning event). When a run starts, every Job and Service of
iteration 0 is first sent with `dryRun=All`, so the API server's own validation and admission
refuse a bad spec before anything is written to storage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, cast

from spin_operator import observe
from spin_operator.api import types as api
from spin_operator.decision import (
    CreateStep,
    Decision,
    DeleteArtifacts,
    DeleteJob,
    DeleteService,
    Event,
    RecordSpec,
    SetFinalizer,
    SuspendJob,
)
from spin_operator.endpoints import StoragePools, report_outages
from spin_operator.kube import ApiError, Kube, job_path, service_path, spinrun_path
from spin_operator.metrics import Metrics
from spin_operator.naming import APPLIED_SPEC_ANNOTATION, FINALIZER, StepKind, job_name
from spin_operator.refusals import Refusals
from spin_operator.render import render
from spin_operator.settings import Settings
from spin_operator.steps import RunRef, jobs_of_iteration, plan_step
from spin_operator.tracking_actions import TrackingActions

log = logging.getLogger(__name__)
Key = tuple[str, str]  # namespace, run name
JSON = dict[str, Any]
EventPoster = Callable[[JSON, str, str, str], None]
WRITTEN_KEPT = 8  # a pass writes a run at most 3 times (metadata, status, status after MLflow)


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


def phases(runs: dict[Key, JSON]) -> list[str]:
    """The phase of every cached run (the phase gauge)."""
    return [str((b.get("status") or {}).get("phase") or "Pending") for b in runs.values()]


class Applier:
    def __init__(
        self,
        settings: Settings,
        kube: Kube,
        metrics: Metrics,
        storage: StoragePools,
        tracking: TrackingActions,
        refusals: Refusals,
        runs: dict[Key, JSON],
        on_job: Callable[[str | None, JSON], None],
        post_event: EventPoster | None = None,
        deletes_sent: set[tuple[str, str]] | None = None,
    ) -> None:
        self.settings = settings
        # (namespace, Job) deleted and not yet seen deleting by the watch (Facts.deletes_sent)
        self.deletes_sent = set() if deletes_sent is None else deletes_sent
        self.kube = kube
        self.metrics = metrics
        self.storage = storage
        self.tracking = tracking
        self.runs = runs  # the controller's run cache: a write's answer replaces the body there
        self.on_job = on_job  # a created Job goes into the Job cache at once
        self.post_event = post_event or _kopf_event
        self.refusals = refusals  # children the API server refused for good (refusals.py)
        # Per run, the resourceVersions of the bodies this process's own writes answered with,
        # in order, since the watch last brought the newest of them (Controller.on_run).
        self.written: dict[Key, list[str]] = {}

    async def execute(
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
            await self.tracking.ensure_ids(spec, run, d)
            report_outages(  # the run's storage endpoint skipped, its MLflow refusing
                new,
                spec,
                self.storage,
                self.tracking.tracking.refused(spec.tracking.uri),
                self.settings.mlflow_secret,
                body["metadata"].get("generation"),
            )
        for a in d.of_type(SuspendJob):
            await self._write(
                self.kube.patch(job_path(run.namespace, a.name), {"spec": {"suspend": a.suspend}})
            )
        # Creates before deletes: what a pass deletes (finished Jobs of recorded steps, a
        # succeeded training's Service, older or released attempts) is never what it creates, and
        # a delete is not waited for anyway, so the next Job's creation does not queue behind
        # them (at 100 runs a train -> evaluate transition waited ~0.5 s on its Service's delete).
        # The deletes run even when a create fails: freeing a count quota may be what it needs.
        try:
            if spec is not None:
                for c in d.of_type(CreateStep):
                    await self._create(key, spec, run, new, c)
        finally:
            await self._deletes(run, d)
        body = await self._patch_status(key, body, run, old, new)
        for a in d.of_type(Event):
            self.post(body, a)
        if spec is None:
            return True
        self.tracking.in_background(spec, run, new, d)
        # After the phase is written (so MLflow never holds it up): run ends and spool replays,
        # recorded in status.mlflow only once MLflow confirmed them. A kill before that patch, or
        # an MLflow that does not answer, leaves them out of the status: the reconciler asks again.
        written = new.model_copy(deep=True)
        settled = await self.tracking.tracking.settle(spec, run, new, d.actions, self.storage.run)
        await self._patch_status(key, body, run, written, new)
        return settled

    async def _deletes(self, run: RunRef, d: Decision) -> None:
        for a in d.actions:
            if isinstance(a, DeleteJob):
                # Foreground: the Job stays (marked deleting) until its pods are gone, so the
                # reconciler can tell when nothing writes any more (run deletion, retries).
                if (run.namespace, a.name) in self.deletes_sent:
                    continue
                if await self._write(
                    self.kube.delete(job_path(run.namespace, a.name), propagation="Foreground")
                ):  # None or False: already gone (404)
                    self.deletes_sent.add((run.namespace, a.name))
            elif isinstance(a, DeleteService):
                await self._write(self.kube.delete(service_path(run.namespace, a.name)))

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
        self._cache(key, updated)
        if old.phase != new.phase:
            self.metrics.transitions.labels(from_phase=old.phase, to_phase=new.phase).inc()
        self.metrics.set_phases(phases(self.runs))
        return updated or body

    def _cache(self, key: Key, updated: JSON) -> None:
        """A write's answer is the run's newest body: cache it, and note its version so that the
        watch events of the versions it replaced are known as older (`superseded`)."""
        if key not in self.runs:
            return
        self.runs[key] = updated
        rv = (updated.get("metadata") or {}).get("resourceVersion")
        if rv:
            self.written.setdefault(key, []).append(rv)
            del self.written[key][:-WRITTEN_KEPT]

    def superseded(self, key: Key, obj: JSON) -> bool:
        """True when `obj` (a watch event's body) is a version this process wrote and then
        wrote over: the cache already holds a newer body. Under load the watch brings the start's
        metadata patch after the status patch's answer was cached, and caching it put back a body
        without the recorded spec: a pass on it redid the start (dry runs, a 409 on the check
        Job). resourceVersions are opaque: only equality with the answers is used."""
        mine = self.written.get(key)
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if not mine or not rv:
            return False
        if rv in mine[:-1]:
            return True
        del self.written[key]  # the newest of ours, or someone else's write: back in step
        return False

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
                        await self.storage.run(observe.write_stored_spec, a.spec, run)
                    annotations[APPLIED_SPEC_ANNOTATION] = json.dumps(
                        a.spec.to_wire(), sort_keys=True, separators=(",", ":")
                    )
                elif isinstance(a, DeleteArtifacts) and d.spec is not None:
                    count = await self.storage.bulk(observe.delete_artifacts, d.spec, a.prefix)
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
        self._cache(key, updated)
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
        for kind in jobs_of_iteration(spec, 0):  # the check, then every step (the control's too)
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
                    what = (
                        f"{kind} of iteration 0: the API server refuses {obj['kind']} "
                        f"{obj['metadata']['name']} (dry run at start)"
                    )
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
                    what = (
                        f"{a.stage} of iteration {a.iteration}: the API server refuses "
                        f"{obj['kind']} {obj['metadata']['name']}"
                    )
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

    def post(self, body: JSON, event: Event) -> None:
        try:
            self.post_event(body, event.type, event.reason, event.message)
        except Exception as exc:  # events are best effort
            log.debug("event %s not posted: %s", event.reason, exc)


def _kopf_event(body: JSON, type_: str, reason: str, message: str) -> None:
    import kopf

    kopf.event(cast(Any, body), type=type_, reason=reason, message=message[:1000])
