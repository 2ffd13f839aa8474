"""20 SPINRuns applied at once (one ``kubectl apply`` of 20 documents) all complete.

The pods are tests/e2e/standin.py (``e2e_quick``): each writes its step's artifacts to S3 with
manifests in a second or two, so what is loaded is the operator, the API server, the executor
and S3, not the CPUs with 120 trainings. Each run still gets every Job, Service, Secret lookup
and manifest check of a real one.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e import harness
from tests.e2e.harness import Cluster, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUNS = 20
ITERATIONS = 2


def test_twenty_spinruns_at_once_all_complete(e2e_quick: Cluster, tmp_path: Path) -> None:
    c = e2e_quick
    names = [f"load-{i:02d}" for i in range(RUNS)]
    docs = [
        yaml.safe_load(
            harness.spinrun_file(tmp_path, name, spec__iterations=ITERATIONS).read_text()
        )
        for name in names
    ]
    manifest = tmp_path / "twenty.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    started = time.monotonic()
    applied = c.apply(manifest)
    assert applied.stdout.count(" created") == RUNS, applied.stdout

    def phases() -> collections.Counter[str] | None:
        runs = c.api.list("spinruns", c.namespace)
        counts = collections.Counter((r.get("status") or {}).get("phase", "None") for r in runs)
        return counts if sum(counts[p] for p in harness.TERMINAL) == RUNS else None

    try:
        final = wait_for(phases, 600, f"{RUNS} runs to finish", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{c.diagnostics()}") from None
    elapsed = time.monotonic() - started
    assert final["Succeeded"] == RUNS, final

    created = c.job_creations()
    per_run = collections.Counter(name.rsplit("-i", 1)[0] for name in created)
    # per run: the check before iteration 0, then 3 steps per iteration
    assert len(created) == len(set(created)) == RUNS * (ITERATIONS * 3 + 1), collections.Counter(
        created
    )
    assert set(per_run) == set(names) and set(per_run.values()) == {ITERATIONS * 3 + 1}
    operator = [
        e for e in c.api.requests.entries() if e.user_agent.startswith(harness.OPERATOR_AGENTS)
    ]
    server_errors = [e for e in operator if e.code >= 500]
    assert not server_errors, server_errors[:5]
    print(
        f"\nE2E load: {RUNS} runs x {ITERATIONS} iterations in {elapsed:.1f}s; "
        f"{len(operator)} operator requests; {len(c.executor.pods())} pods"
    )
