"""The operator scale benchmark runs end to end on a small N (its numbers are judged in benchmarks/)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("spin_operator.handlers") is None,
    reason="needs spin_operator.handlers (the real operator)",
)


def test_benchmark_reports_every_key_for_two_runs() -> None:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from benchmarks.operator_scale import min_requests_per_iteration, run_benchmark

    result = run_benchmark(runs=2, iterations=1, timeout=60)
    assert result["runs"] == result["runs_succeeded"] == 2
    assert result["transitions"] == 2 * 3  # check -> gen -> train -> eval in each run
    assert result["min_requests_per_iteration"] == min_requests_per_iteration(1) == 14
    assert (
        result["requests_per_iteration"] >= result["min_requests_per_iteration"]
    )  # the floor is a floor
    assert result["p50_s"] is not None and result["p99_s"] >= result["p50_s"]
    assert result["rss_mb"] > 10
    assert result["requests_by_kind"]["create jobs"] == 4.0  # the check Job and 3 steps
