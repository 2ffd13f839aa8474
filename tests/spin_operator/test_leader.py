"""Leader election (spin_operator.leader): two replicas, one Lease, only the holder reconciles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_operator.controller import Controller
from spin_operator.handlers import login
from spin_operator.kube import Kube
from spin_operator.leader import LeaseElector
from spin_operator.metrics import Metrics
from tests.spin_operator.operator_harness import NS, Cluster, emulated_cluster, spinrun

LEASE_NS = "spin-system"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path, monkeypatch.setenv, (NS, LEASE_NS)) as cluster:
        yield cluster


async def test_a_standby_takes_the_lease_only_after_it_expired(cluster: Cluster) -> None:
    a, b = Kube(login), Kube(login)
    try:
        first = LeaseElector(a, LEASE_NS, "op", "a", duration=3.0)
        second = LeaseElector(b, LEASE_NS, "op", "b", duration=3.0)
        assert await first.try_acquire()
        assert not await second.try_acquire()
        for _ in range(4):  # the holder renews: the standby never takes over
            await asyncio.sleep(1.0)
            assert await first.renew()
            assert not await second.try_acquire()
        stopped = time.monotonic()  # the holder dies: no more renewals
        while not await second.try_acquire():
            await asyncio.sleep(0.2)
        waited = time.monotonic() - stopped
        assert 3.0 <= waited < 6.0, waited
        lease = await b.get(f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NS}/leases/op")
        assert lease is not None
        assert (lease["spec"]["holderIdentity"], lease["spec"]["leaseTransitions"]) == ("b", 1)
        assert not await first.renew()  # the old holder learns it lost
    finally:
        await a.close()
        await b.close()


async def test_a_standby_controller_caches_but_does_not_reconcile(cluster: Cluster) -> None:
    controller = Controller(cluster.settings(leader_election=True), Kube(login), metrics=Metrics())
    passes: list[tuple[str, str]] = []

    async def reconcile(key: tuple[str, str]) -> bool:
        passes.append(key)
        return True

    controller.reconcile = reconcile  # type: ignore[method-assign]
    controller.on_run("ADDED", spinrun("standby"))
    await asyncio.sleep(0.1)
    assert passes == [] and (NS, "standby") in controller.runs
    controller.lead()
    await asyncio.sleep(0.1)
    assert passes == [(NS, "standby")]
    await controller.close()
