"""Prometheus metrics: per-instance registries, phase gauge, served over HTTP."""

from __future__ import annotations

import urllib.request

from spin_operator.metrics import PHASES, Metrics
from tests.support.servers import free_port


def test_phase_gauge_counts_every_phase() -> None:
    m = Metrics()
    m.set_phases(["Running", "Running", "Failed"])
    assert [m.value("spin_operator_runs", phase=p) for p in PHASES] == [0, 2, 0, 0, 1]
    m.set_phases([])
    assert m.value("spin_operator_runs", phase="Running") == 0


def test_instances_do_not_share_values() -> None:
    a, b = Metrics(), Metrics()
    a.jobs_created.labels(stage="train").inc()
    assert a.value("spin_operator_jobs_created_total", stage="train") == 1
    assert b.value("spin_operator_jobs_created_total", stage="train") == 0


def test_served_on_the_metrics_port() -> None:
    m = Metrics()
    m.transitions.labels(from_phase="Running", to_phase="Succeeded").inc()
    m.reconcile_seconds.observe(0.01)
    port = free_port()
    m.serve(port, addr="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert (
        'spin_operator_phase_transitions_total{from_phase="Running",to_phase="Succeeded"} 1.0'
        in text
    )
    assert "spin_operator_reconcile_duration_seconds_count 1.0" in text
