"""Generation retries per shard on a real control plane (issue 14 item 12).

Shard 1 of the first generation Job fails once (exit 1). With ``backoffLimitPerIndex`` the real
Job controller lets shard 0 finish, fails only index 1 (``FailedIndexes``), and the operator's
next Job finishes the step; the run succeeds. Steps are stand-ins (tests/cluster/standin.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_operator.naming import job_name
from tests.cluster import harness, kit
from tests.cluster.harness import RealCluster
from tests.support.servers import MlflowServer

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "shards"
INDEX = "batch.kubernetes.io/job-completion-index"


@pytest.fixture
def flaky_shard(
    real_cluster: harness.Session, tmp_path: Path, cluster_inputs: str, mlflow_server: MlflowServer
) -> Iterator[RealCluster]:
    """Stand-in steps; shard 1 of the first generation Job exits 1 the first time it runs."""
    mlflow_server.start()
    failed_once = tmp_path / "failed-once"
    first = job_name(RUN, 0, "generate")

    def hook(pod: dict, argv: list[str], env: dict[str, str]) -> list[str]:
        meta = pod["metadata"]
        if "job-name" not in (meta.get("labels") or {}):
            return argv
        standin = [str(kit.VENV_BIN / "python"), str(kit.STANDIN), *argv]
        if (
            meta["labels"]["job-name"] == first
            and (meta.get("annotations") or {}).get(INDEX) == "1"
        ):
            fail = f'if [ ! -e "{failed_once}" ]; then touch "{failed_once}"; exit 1; fi; exec "$@"'
            return ["bash", "-c", fail, "shard", *standin]
        return standin

    with harness.release(
        real_cluster, tmp_path, cluster_inputs, mlflow_server.uri, launch_hook=hook
    ) as c:
        yield c


def test_a_failed_shard_does_not_stop_the_others(flaky_shard: RealCluster, tmp_path: Path) -> None:
    c = flaky_shard
    started = time.monotonic()
    # finished Jobs kept (retention.finishedJobs: Retain): both generation Jobs are read back
    c.apply(
        kit.spinrun_file(
            tmp_path, RUN, spec__iterations=1, spec__retention={"finishedJobs": "Retain"}
        )
    )
    run = c.wait_run(RUN, 300)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics(RUN)
    first, retry = job_name(RUN, 0, "generate"), job_name(RUN, 0, "generate", 1)
    job = c.get("job", first)
    assert job is not None
    status = job["status"]
    # the real Job controller: index 1 failed alone, index 0 finished meanwhile
    assert (status.get("failedIndexes"), status.get("completedIndexes")) == ("1", "0"), status
    failed = next(x for x in status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "FailedIndexes", failed
    shard0 = [
        p
        for p in c.pods()
        if p["metadata"]["labels"].get("job-name") == first
        and p["metadata"]["annotations"].get(INDEX) == "0"
    ]
    assert [p["status"]["phase"] for p in shard0] == ["Succeeded"]
    assert c.get("job", retry) is not None
    assert run["status"]["iterations"][0]["generate"]["attempts"] == 2
    created = c.job_creations()
    assert sorted(created) == sorted(
        [
            job_name(RUN, 0, "check"),
            first,
            retry,
            job_name(RUN, 0, "train"),
            job_name(RUN, 0, "evaluate"),
        ]
    )
    print(f"\nCLUSTER failed shard retried: {time.monotonic() - started:.1f}s")
