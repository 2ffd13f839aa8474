"""The periodic resync that repairs the controller's caches after a watch gap.

Why a resync at all: when a watch breaks for longer than the API server keeps history (410
Gone), kopf lists again and resumes watching, but it sends no DELETED event for what vanished
during the gap. A Job deleted then would stay in the controller's cache forever, and a run
deleted then would keep being reconciled. Every `Settings.resync_seconds` the operator lists its
children and runs again (server-side label selector, pages of `Settings.list_chunk_size`) and
makes the caches agree with the lists.

Race with the watch: an entry the watch (or the controller's own create) touched after the list
started may be newer than the list's snapshot, so only entries last touched before the list was
sent are changed; the next resync handles the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from spin_operator.api import types as api
from spin_operator.kube import Kube, job_path
from spin_operator.naming import MANAGED_BY, MANAGED_BY_LABEL, RUN_LABEL
from spin_operator.settings import Settings

log = logging.getLogger(__name__)
JSON = dict[str, Any]
Key = tuple[str, str]  # (namespace, run name)
JOB_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"


class Caches(Protocol):
    """What the resync reads and repairs of the controller (controller.Controller is one): its
    settings and client, the two caches with their last-touched stamps, and the entry points of
    watch events, which it replays for what the lists show that the caches miss."""

    @property
    def settings(self) -> Settings: ...
    @property
    def kube(self) -> Kube: ...
    @property
    def runs(self) -> dict[Key, JSON]: ...
    @property
    def jobs(self) -> dict[Key, dict[str, Any]]: ...
    @property
    def touched(self) -> dict[tuple[str, str, str], float]: ...
    @property
    def run_touched(self) -> dict[Key, float]: ...
    def kick(self, key: Key) -> None: ...
    def on_job(self, event_type: str | None, obj: JSON) -> None: ...
    def on_run(self, event_type: str | None, obj: JSON) -> None: ...


def job_paths(c: Caches) -> list[str]:
    return [job_path(ns) for ns in c.settings.namespaces] or ["/apis/batch/v1/jobs"]


def run_paths(c: Caches) -> list[str]:
    base = f"/apis/{api.GROUP}/{api.VERSION}"
    return [f"{base}/namespaces/{ns}/{api.PLURAL}" for ns in c.settings.namespaces] or [
        f"{base}/{api.PLURAL}"
    ]


async def resync(c: Caches) -> tuple[int, int]:
    """Make the Job and run caches agree with fresh lists; (Jobs, runs) dropped as gone."""
    started = time.monotonic()
    chunk = c.settings.list_chunk_size
    jobs: dict[tuple[str, str, str], JSON] = {}
    for path in job_paths(c):
        async for item in c.kube.pages(path, selector=JOB_SELECTOR, chunk=chunk):
            meta = item.get("metadata") or {}
            run = (meta.get("labels") or {}).get(RUN_LABEL)
            if run:
                jobs[(meta.get("namespace", ""), run, meta.get("name", ""))] = item
    runs: dict[tuple[str, str], JSON] = {}
    for path in run_paths(c):
        async for item in c.kube.pages(path, chunk=chunk):
            meta = item.get("metadata") or {}
            runs[(meta.get("namespace", ""), meta.get("name", ""))] = item

    def untouched(stamp: float | None) -> bool:
        return stamp is None or stamp < started

    dropped_jobs = 0
    for key, cached in list(c.jobs.items()):
        for name in list(cached):
            if (*key, name) not in jobs and untouched(c.touched.get((*key, name))):
                dropped_jobs += 1
                log.warning(
                    "%s/%s: Job %s is gone (deleted during a watch gap); dropped from the cache",
                    *key,
                    name,
                )
                del cached[name]
                c.touched[(*key, name)] = time.monotonic()
                if key in c.runs:
                    c.kick(key)
    for (ns, run, name), item in jobs.items():
        if name not in c.jobs.get((ns, run), {}) and untouched(c.touched.get((ns, run, name))):
            c.on_job("ADDED", item)
    dropped_runs = 0
    for key, body in list(c.runs.items()):
        if key not in runs and untouched(c.run_touched.get(key)):
            dropped_runs += 1
            log.warning(
                "%s/%s: the SPINRun is gone (deleted during a watch gap); dropped from the cache",
                *key,
            )
            c.on_run("DELETED", body)
    for key, item in runs.items():
        if key not in c.runs and untouched(c.run_touched.get(key)):
            c.on_run("ADDED", item)
    # Tombstones of what is gone from both the cache and the lists are no longer needed.
    for job in [
        j for j, t in c.touched.items() if t < started and j[2] not in c.jobs.get((j[0], j[1]), {})
    ]:
        del c.touched[job]
    for run_key in [k for k, t in c.run_touched.items() if t < started and k not in c.runs]:
        del c.run_touched[run_key]
    return dropped_jobs, dropped_runs
