"""What the operator lists and watches on a real API server (issue 14 item 7).

Other tenants' Jobs (no operator label, another namespace) exist while a run goes through. Every
list and watch of Jobs the operator sends must carry the operator's label selector (so the API
server sends only the operator's own Jobs), and every list must be paged (``limit``). The API
server's audit log records each request's URI with its query: that is what is checked.
"""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from spin_operator.naming import MANAGED_BY, MANAGED_BY_LABEL
from tests.cluster import kit
from tests.cluster.harness import OPERATOR_GROUP, RealCluster

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "watched"
STRANGERS = 5


def stranger_job(name: str) -> dict[str, Any]:
    """A suspended Job of another tenant (suspended: the node agent never runs its pods)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"team": "other"}},
        "spec": {
            "suspend": True,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "main",
                            "image": "busybox",
                            "command": ["true"],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                }
            },
        },
    }


def job_reads(c: RealCluster) -> list[tuple[str, dict[str, list[str]]]]:
    """(verb, query) of every list/watch of Jobs the operator sent."""
    out = []
    for event in c.plane.audit(OPERATOR_GROUP):
        ref = event.get("objectRef") or {}
        if ref.get("resource") == "jobs" and event.get("verb") in ("list", "watch"):
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(event["requestURI"]).query)
            out.append((event["verb"], query))
    return out


def test_job_lists_and_watches_are_filtered_by_the_server(
    cluster_quick: RealCluster, tmp_path: Path
) -> None:
    c = cluster_quick
    other = f"{c.namespace}-other"
    c.create_namespace(other, secret=False)
    for i in range(STRANGERS):
        c.plane.api().request(
            "POST", f"/apis/batch/v1/namespaces/{other}/jobs", stranger_job(f"batch-{i}")
        )
    started = time.monotonic()
    c.apply(kit.spinrun_file(tmp_path, RUN, spec__iterations=1))
    run = c.wait_run(RUN, 300)
    assert run["status"]["phase"] == "Succeeded", c.diagnostics(RUN)

    reads = job_reads(c)
    verbs = {verb for verb, _ in reads}
    assert verbs == {"list", "watch"}, f"the operator's Job reads: {reads}"
    selector = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
    unfiltered = [(v, q) for v, q in reads if q.get("labelSelector") != [selector]]
    assert not unfiltered, f"Job reads without the server-side selector: {unfiltered}"
    unpaged = [(v, q) for v, q in reads if v == "list" and not q.get("limit")]
    assert not unpaged, f"Job lists without a page size: {unpaged}"
    print(
        f"\nCLUSTER watch: {len(reads)} Job list/watch requests, all with labelSelector; "
        f"run {time.monotonic() - started:.1f}s"
    )
