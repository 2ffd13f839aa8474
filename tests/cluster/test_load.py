"""20 SPINRuns applied at once on the real control plane, stand-in pods: all complete, each Job
created exactly once (the API server's audit log), no 5xx answered to the operator."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster import kit
from tests.cluster.harness import OPERATOR_GROUP, RealCluster
from tests.cluster.kit import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUNS = 20
ITERATIONS = 2


def test_twenty_spinruns_at_once_all_complete(cluster_quick: RealCluster, tmp_path: Path) -> None:
    c = cluster_quick
    names = [f"load-{i:02d}" for i in range(RUNS)]
    docs = [
        yaml.safe_load(kit.spinrun_file(tmp_path, n, spec__iterations=ITERATIONS).read_text())
        for n in names
    ]
    manifest = tmp_path / "twenty.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    audited_before = len(c.plane.audit(OPERATOR_GROUP))
    started = time.monotonic()
    applied = c.apply(manifest)
    assert applied.stdout.count(" created") == RUNS, applied.stdout
    path = f"/apis/selfplay.dev/v1alpha1/namespaces/{c.namespace}/spinruns"

    def phases() -> collections.Counter[str] | None:
        runs = (c.plane.api().get(path) or {}).get("items", [])
        counts = collections.Counter((r.get("status") or {}).get("phase", "None") for r in runs)
        return counts if sum(counts[p] for p in kit.TERMINAL) == RUNS else None

    try:
        final = wait_for(phases, 900, f"{RUNS} runs to finish", interval=1.0)
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
    events = c.plane.audit(OPERATOR_GROUP)[audited_before:]
    server_errors = [e for e in events if (e.get("responseStatus") or {}).get("code", 200) >= 500]
    assert not server_errors, server_errors[:3]
    print(
        f"\nCLUSTER load: {RUNS} runs x {ITERATIONS} iterations in {elapsed:.1f}s; "
        f"{len(events)} operator requests; {len(c.pods())} pods"
    )
