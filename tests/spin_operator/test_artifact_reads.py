"""What the operator reads from storage per iteration (artifact_reads.py): each step's artifact
once when its Job finished, nothing for steps that had no Job on a run started on an empty
prefix, nothing again once complete. Counted on the wire (moto, a botocore hook on the
operator's storage threads) for a whole run, and as a pure pass sequence."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spin_common import storage
from spin_operator.api import types as api
from spin_operator.artifact_reads import ArtifactReads
from spin_operator.decision import ObservedJob, StorageFacts
from spin_operator.policy import Allowed, Policy
from tests.spin_operator.operator_harness import (
    Cluster,
    OperatorProcess,
    emulated_cluster,
    spinrun,
)


class S3Requests:
    """S3 requests made from the operator's storage threads (endpoints.StoragePools names them
    `spin-storage_*`), as (operation, HTTP status): the test's own artifact writes do not count."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self._hooked: set[int] = set()
        self._lock = threading.Lock()

    def hook(self, client: Any) -> Any:
        with self._lock:
            if id(client) not in self._hooked:
                self._hooked.add(id(client))
                client.meta.events.register("after-call.s3", self._after)
        return client

    def _after(self, http_response: Any, event_name: str = "", **_: object) -> None:
        if threading.current_thread().name.startswith("spin-storage"):
            with self._lock:
                self.seen.append((event_name.rsplit(".", 1)[-1], int(http_response.status_code)))


@pytest.fixture
def s3_requests(monkeypatch: pytest.MonkeyPatch) -> S3Requests:
    counter = S3Requests()
    make = storage.s3_client
    monkeypatch.setattr(storage, "s3_client", lambda: counter.hook(make()))
    return counter


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path, monkeypatch.setenv) as cluster:
        yield cluster


async def test_a_run_reads_each_artifact_once_after_its_job(
    cluster: Cluster, s3_bucket: str, moto_server: str, s3_requests: S3Requests
) -> None:
    prefix = s3_bucket + "/runs"
    cluster.storage = prefix  # type: ignore[assignment] # the harness writes artifacts there
    allowed = Policy(Allowed(storage_prefixes=(s3_bucket,), s3_endpoints=(moto_server,)))
    op = await OperatorProcess(cluster.settings(storage_uri=None, security=allowed)).start()
    try:
        body = spinrun("counted", iterations=2, storage={"uri": prefix, "endpoint": moto_server})
        await cluster.api.acreate(body)
        status = await cluster.run_to_end("counted", timeout=60)
    finally:
        await op.stop()
    assert status["phase"] == "Succeeded", status
    by_op = collections.Counter(op for op, _ in s3_requests.seen)
    misses = [(op, code) for op, code in s3_requests.seen if code == 404]
    # The start: R/spinrun.yaml looked for (absent: the one 404), the prefix listed (empty),
    # R/spinrun.yaml written. Then per
    # iteration, each artifact read once, after its Job finished: the generated shards (one
    # list, one GET per shard manifest: 2), the model's manifest, the evaluation's manifest and
    # results; iteration 0 also the check's report. 3 + 2 x (3 + 1 + 2) + 1 = 16 requests.
    # Before artifact_reads.py every pass that asked re-read the whole iteration: 60 here, 26 404s.
    assert misses == [("GetObject", 404)], s3_requests.seen
    assert by_op == {"GetObject": 12, "ListObjectsV2": 3, "PutObject": 1}, s3_requests.seen


# --------------------------------------------------------------------------- the bookkeeping alone

SPEC = api.SPINRunSpec.model_validate(
    {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/sft.jsonl"},
        "iterations": 2,
    }
)


def job(stage: str, state: str, t: int = 0, attempt: int = 0) -> ObservedJob:
    return ObservedJob(f"r-i{t}-{stage}-{attempt}", t, stage, attempt, state)  # type: ignore[arg-type]


def status_with(**attempts: int) -> api.SPINRunStatus:
    it = api.IterationStatus(iteration=0, stage="Generating", check=api.StepStatus())
    for step, n in attempts.items():
        getattr(it, step).attempts = n
    return api.SPINRunStatus(iterations=[it])


def test_a_fresh_run_reads_a_step_only_once_its_job_finished() -> None:
    reads = ArtifactReads()
    reads.started("uid", True)  # nothing under the prefix when the run started
    assert reads.plan(SPEC, "uid", 0, [], status_with())[1] == set()  # no Job yet: nothing
    running = [job("check", "Running")]
    assert reads.plan(SPEC, "uid", 0, running, status_with(check=1))[1] == set()  # still running
    done = [job("check", "Succeeded")]
    facts, stages = reads.plan(SPEC, "uid", 0, done, status_with(check=1))
    assert stages == {"check"}
    reads.update(SPEC, "uid", 0, done, StorageFacts(checked=True), stages)
    # complete: never again, whatever passes follow (the Job deleted, the next step created)
    assert reads.plan(SPEC, "uid", 0, [], status_with(check=1))[1] == set()
    gen = [job("generate", "Pending")]
    facts, stages = reads.plan(SPEC, "uid", 0, gen, status_with(check=1, generate=1))
    assert (facts.checked, stages) == (True, set())


def test_a_step_incomplete_after_its_job_is_read_again_only_when_its_jobs_change() -> None:
    reads = ArtifactReads()
    reads.started("uid", True)
    failed = [job("generate", "Failed")]
    stages = reads.plan(SPEC, "uid", 0, failed, status_with(generate=1))[1]
    assert stages == {"generate"}
    reads.update(SPEC, "uid", 0, failed, StorageFacts(), stages)
    assert reads.plan(SPEC, "uid", 0, failed, status_with(generate=1))[1] == set()
    retried = [*failed, job("generate", "Succeeded", attempt=1)]
    assert reads.plan(SPEC, "uid", 0, retried, status_with(generate=2))[1] == {"generate"}


def test_a_job_gone_unseen_still_gets_its_step_read() -> None:
    """The status records an attempt whose Job this process never saw (deleted meanwhile):
    its artifact may be complete, so it is read, not assumed absent."""
    reads = ArtifactReads()
    reads.started("uid", True)
    assert reads.plan(SPEC, "uid", 0, [], status_with(train=1))[1] == {"train"}


def test_without_an_empty_prefix_seen_every_artifact_is_read_once() -> None:
    """After a restart, or a run resumed from storage: everything once, then as above."""
    for looked in (True, False):
        reads = ArtifactReads()
        if looked:
            reads.started("uid", False)  # the prefix held something: a resumed run
        stages = reads.plan(SPEC, "uid", 1, [], status_with())[1]
        assert stages == {"generate", "train", "evaluate"}
        reads.update(SPEC, "uid", 1, [], StorageFacts(generated=True), stages)
        assert reads.plan(SPEC, "uid", 1, [], status_with())[1] == set()
        changed = SPEC.model_copy(
            update={"generation": SPEC.generation.model_copy(update={"replicas": 3})}
        )
        assert reads.plan(changed, "uid", 1, [], status_with())[1] == {
            "generate",
            "train",
            "evaluate",
        }
