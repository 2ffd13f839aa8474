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
from tests.cluster.s3_proxy import S3FaultProxy

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def s3_proxy(cluster_inputs: str) -> Iterator[S3FaultProxy]:
    """The operator's S3 endpoint: a proxy that counts its requests (the stand-ins write past it)."""
    proxy = S3FaultProxy(cluster_inputs).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def instant_cluster(
    real_cluster: harness.Session, tmp_path: Path, s3_proxy: S3FaultProxy
) -> Iterator[RealCluster]:
    """The benchmark's setting: no MLflow, Job pods that write their artifacts and exit at once."""
    with harness.release(
        real_cluster, tmp_path, s3_proxy.url, "", launch_hook=InstantPods(tmp_path / "scratch")
    ) as c:
        yield c


def test_real_mode_reports_every_key_for_two_runs(
    instant_cluster: RealCluster, s3_proxy: S3FaultProxy
) -> None:
    result = measure(instant_cluster, runs=2, iterations=1, timeout=240, s3=s3_proxy)
    assert result["runs"] == result["runs_succeeded"] == 2, result
    assert result["transitions"] == 2 * 3, result  # check -> gen -> train -> eval in each run
    assert result["min_requests_per_iteration"] == min_requests_per_iteration(1) == 15
    assert result["requests_per_iteration"] >= result["min_requests_per_iteration"], result
    kinds = result["requests_by_kind"]
    assert kinds["create jobs"] == 4.0, kinds  # each Job (the check and 3 steps) created once
    assert kinds["delete jobs"] == 4.0, kinds  # ... and deleted once (it was twice)
    assert "list pods" not in kinds, kinds  # no look at pods of a Job that just started
    assert kinds["get secrets"] == 1.0, kinds  # once per run, not before each of its 4 Jobs
    # Per Job its creation and its pods running (at most: a pass may see both at once), and the
    # run's success: not a Pending written back while the Job controller completes the Job.
    assert kinds["patch spinruns/status"] <= 2 * 4 + 1, kinds
    # S3, per run: R/spinrun.yaml looked for (404), the prefix listed, R/spinrun.yaml written;
    # the check's report, the generated shards (a list and 2 manifests), the model's manifest,
    # the evaluation's manifest and results: each read once, after its Job finished. 10 if no
    # pass had to start over; every pass re-read every artifact before (30 per iteration).
    assert result["s3_requests_per_iteration"] <= 12, result
    assert result["s3_not_found_per_iteration"] <= 2, result  # only R/spinrun.yaml's absence
    assert result["unfiltered_job_reads"] == 0, result  # the operator watches only its Jobs
    assert result["errors"] == {}, result
    assert result["p50_s"] is not None and 0 <= result["p50_s"] <= result["p99_s"], result
    assert result["rss_mb"] > 10, result
