"""Prometheus metrics of the operator, served on SPIN_METRICS_PORT (`/metrics`).

Each `Metrics` has its own registry, so tests can run several operators in one process and
assert on exact values.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Running", "Suspended", "Succeeded", "Failed")


class Metrics:
    """The operator's instruments (names prefixed `spin_operator_`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Gauge(
            "spin_operator_runs", "SPINRuns by phase", ["phase"], registry=self.registry
        )
        self.transitions = Counter(
            "spin_operator_phase_transitions_total",
            "SPINRun phase transitions",
            ["from_phase", "to_phase"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "spin_operator_reconcile_duration_seconds",
            "Time to reconcile one SPINRun (facts, actions, status)",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.errors = Counter(
            "spin_operator_reconcile_errors_total",
            "Reconcile passes that could not finish",
            ["kind"],
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "spin_operator_jobs_created_total",
            "Jobs created, by stage",
            ["stage"],
            registry=self.registry,
        )
        self.resync_dropped = Counter(
            "spin_operator_resync_dropped_total",
            "Cached objects a resync found gone (missed watch events)",
            ["kind"],
            registry=self.registry,
        )
        for phase in PHASES:
            self.runs.labels(phase=phase).set(0)

    def set_phases(self, phases: Iterable[str]) -> None:
        counts = Tally(phases)
        for phase in PHASES:
            self.runs.labels(phase=phase).set(counts.get(phase, 0))

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when absent): for tests and the benchmark."""
        found = self.registry.get_sample_value(name, labels)
        return float(found or 0.0)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics in a background thread; port 0 disables it."""
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
