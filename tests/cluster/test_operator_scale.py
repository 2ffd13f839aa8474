"""benchmarks/operator_scale.py --cluster real on a tiny N, so the benchmark cannot rot: the same
measurement (benchmarks/operator_scale_real.py) on this session's control plane, with what its
numbers must always satisfy (docs/benchmarks.md has the measured ones)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.operator_scale_real import InstantPods, measure, min_requests_per_iteration
from tests.cluster import harness
from tests.cluster.harness import RealCluster

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def instant_cluster(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str
) -> Iterator[RealCluster]:
    """The benchmark's setting: no MLflow, Job pods that write their artifacts and exit at once."""
    with harness.release(
        real_cluster, tmp_path, cluster_inputs, "", launch_hook=InstantPods(tmp_path / "scratch")
    ) as c:
        yield c


def test_real_mode_reports_every_key_for_two_runs(instant_cluster: RealCluster) -> None:
    result = measure(instant_cluster, runs=2, iterations=1, timeout=240)
    assert result["runs"] == result["runs_succeeded"] == 2, result
    assert result["transitions"] == 2 * 3, result  # check -> gen -> train -> eval in each run
    assert result["min_requests_per_iteration"] == min_requests_per_iteration(1) == 15
    assert result["requests_per_iteration"] >= result["min_requests_per_iteration"], result
    kinds = result["requests_by_kind"]
    assert kinds["create jobs"] == 4.0, kinds  # each Job (the check and 3 steps) created once
    assert kinds["delete jobs"] == 4.0, kinds  # ... and deleted once (it was twice)
    assert "list pods" not in kinds, kinds  # no look at pods of a Job that just started
    assert result["unfiltered_job_reads"] == 0, result  # the operator watches only its Jobs
    assert result["errors"] == {}, result
    assert result["p50_s"] is not None and 0 <= result["p50_s"] <= result["p99_s"], result
    assert result["rss_mb"] > 10, result
