"""Leader election with a coordination.k8s.io/v1 Lease: only the holder reconciles.

Why: during a rollout, a node failure or with `replicas: 2`, two operator processes can be alive
at once; both would act on the same SPINRuns. Every replica watches (its caches stay warm), but
only the Lease holder runs reconcile passes (`Controller.leading`). A standby takes the Lease
once the holder has not renewed it for `leaseDurationSeconds` (as measured on the standby's own
clock, like client-go: no clock comparison between machines), or at once when the holder
released it on a clean stop. A holder that cannot renew within `renew_deadline` (2/3 of the
duration, so before any standby may take over) stops the process: its container restarts as a
standby. Writes use the Lease's resourceVersion, so two candidates never both win.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from spin_operator.kube import ApiError, Kube

log = logging.getLogger(__name__)
JSON = dict[str, Any]


def lease_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


def default_identity() -> str:
    """The pod name (downward API `POD_NAME`), else host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def _micro_time() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def exit_now() -> None:
    """Stop at once: a leader that lost its Lease must not finish anything it started."""
    logging.shutdown()
    os._exit(1)


class LeaseElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        duration: float = 15.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.duration = duration
        self.retry = duration / 5  # how often a standby looks and a holder renews
        self.renew_deadline = duration * 2 / 3
        self.on_lost = on_lost or (lambda: exit_now())  # looked up late: tests replace it
        self.leading = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    def _spec(self, lease: JSON | None, acquire: bool) -> JSON:
        old = (lease or {}).get("spec") or {}
        now = _micro_time()
        spec: JSON = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "renewTime": now,
        }
        if acquire:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + (
                1 if old.get("holderIdentity") else 0
            )
        return spec

    async def try_acquire(self) -> bool:
        """One look at the Lease; True when this process holds it afterwards."""
        lease = await self.kube.get(lease_path(self.namespace, self.name))
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(None, acquire=True),
            }
            try:
                await self.kube.create(lease_path(self.namespace), body)
            except ApiError as exc:
                if exc.status == 409:  # another candidate created it first
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("acquireTime"))
        now = time.monotonic()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        lease_for = float(spec.get("leaseDurationSeconds") or self.duration)
        if holder and holder != self.identity and now - self._observed_at < lease_for:
            return False  # held, and renewed within its duration as far as we have seen
        return await self._write(lease, acquire=holder != self.identity)

    async def _write(self, lease: JSON, acquire: bool) -> bool:
        patch = {
            "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
            "spec": self._spec(lease, acquire),
        }
        try:
            await self.kube.patch(lease_path(self.namespace, self.name), patch)
        except ApiError as exc:
            if exc.status in (404, 409):  # someone else wrote first (or deleted it): look again
                return False
            raise
        return True

    async def renew(self) -> bool:
        lease = await self.kube.get(lease_path(self.namespace, self.name))
        if (
            lease is None
            or ((lease.get("spec") or {}).get("holderIdentity") or "") != self.identity
        ):
            return False
        return await self._write(lease, acquire=False)

    async def run(self, on_leading: Callable[[], None]) -> None:
        """Wait for the Lease, call `on_leading`, then renew until the process ends."""
        while True:
            try:
                if await self.try_acquire():
                    break
            except (ApiError, OSError, asyncio.TimeoutError) as exc:  # noqa: UP041  # aiohttp raises asyncio's
                log.warning(
                    "leader election: cannot read the Lease %s/%s: %s",
                    self.namespace,
                    self.name,
                    exc,
                )
            await asyncio.sleep(self.retry)
        self.leading = True
        log.info(
            "leader election: %s holds the Lease %s/%s; reconciling",
            self.identity,
            self.namespace,
            self.name,
        )
        on_leading()
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(self.retry)
            try:
                # Bounded by the renew deadline: the client's own retries (429/5xx, Retry-After)
                # must never keep a leader reconciling after a standby may have taken the Lease.
                left = self.renew_deadline - (time.monotonic() - renewed)
                if await asyncio.wait_for(self.renew(), timeout=max(0.1, left)):
                    renewed = time.monotonic()
                    continue
                lost = "another replica holds the Lease"
            except (ApiError, OSError, asyncio.TimeoutError) as exc:  # noqa: UP041
                lost = f"cannot renew the Lease: {exc}"
                if time.monotonic() - renewed < self.renew_deadline:
                    log.warning("leader election: %s; retrying", lost)
                    continue
            self.leading = False
            log.error(
                "leader election: %s lost the Lease %s/%s (%s); stopping",
                self.identity,
                self.namespace,
                self.name,
                lost,
            )
            self.on_lost()
            return

    async def release(self) -> None:
        """On a clean stop: give the Lease up so a standby takes over without waiting."""
        if not self.leading:
            return
        self.leading = False
        try:
            lease = await self.kube.get(lease_path(self.namespace, self.name))
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                patch = {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {"holderIdentity": None, "renewTime": None},
                }
                await self.kube.patch(lease_path(self.namespace, self.name), patch)
        except (ApiError, OSError) as exc:
            log.warning("leader election: could not release the Lease: %s", exc)
