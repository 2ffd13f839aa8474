"""Pods that cannot start surface on the SPINRun, on the real control plane (issue 14, item 2).

Each cause comes from the component that produces it on a cluster: the kubelet stand-in leaves a
pod Pending in CreateContainerConfigError when its Secret lacks the key, the real scheduler marks
a pod Unschedulable when no node matches its nodeSelector, and PodSecurity admission refuses the
Job controller's pod (a FailedCreate event on the Job, no pod at all) when it mounts a hostPath.
Wanted: within a minute a PodsBlocked condition and a Warning event on the SPINRun naming the
cause, then the step fails once failurePolicy.pendingTimeoutSeconds has passed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import kit
from tests.cluster.harness import RealCluster
from tests.cluster.kit import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

RUN = "blocked"
TIMEOUT_S = 45  # pendingTimeoutSeconds of these runs

CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    # spec changes, PodsBlocked reason, a piece of the cause the message must carry
    "missing-secret-key": (
        {"spec__storage__credentialsSecret__accessKeyIdKey": "NO_SUCH_KEY"},
        "CreateContainerConfigError", "NO_SUCH_KEY",
    ),
    "unschedulable": (
        {"spec__scheduling__nodeSelector": {"spin-test/no-such-node": "x"}},
        "Unschedulable", "node",
    ),
    "podsecurity": (
        {"spec__pod__volumes": [{"name": "host", "hostPath": {"path": "/tmp"}}]},
        "FailedCreate", "PodSecurity",
    ),
}  # fmt: skip # a table: one case per line


def condition(run: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conditions = (run.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_), None)


def run_events(c: RealCluster) -> list[dict[str, Any]]:
    out = c.kubectl(
        "get",
        "events",
        "-n",
        c.namespace,
        "--field-selector",
        f"involvedObject.name={RUN},involvedObject.kind=SPINRun",
        "-o",
        "json",
    )
    return list(json.loads(out.stdout).get("items") or [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_blocked_pods_surface_then_the_pending_timeout_fails_the_step(
    cluster_quick: RealCluster, tmp_path: Path, case: str
) -> None:
    c = cluster_quick
    changes, reason, cause = CASES[case]
    c.apply(
        kit.spinrun_file(
            tmp_path,
            RUN,
            spec__iterations=1,
            spec__failurePolicy={"maxRetries": 2, "pendingTimeoutSeconds": TIMEOUT_S},
            **changes,
        )
    )
    wait_for(lambda: c.jobs(), 120, "the check Job (the first Job, before any generation)", 0.5)
    created = time.monotonic()

    def blocked() -> dict[str, Any] | None:
        found = condition(c.run(RUN), "PodsBlocked")
        return found if found and found.get("status") == "True" else None

    try:
        found = wait_for(blocked, 60, "PodsBlocked=True on the SPINRun", 0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{c.diagnostics(RUN)}") from None
    seen = time.monotonic() - created
    assert found["reason"] == reason and cause in found["message"], found
    warnings = [
        e for e in run_events(c) if e.get("type") == "Warning" and e.get("reason") == reason
    ]
    assert warnings and cause in warnings[0]["message"], run_events(c)

    run = c.wait_run(RUN, 180)
    failed = condition(run, "Failed")
    assert run["status"]["phase"] == "Failed" and failed and failed["reason"] == "PendingTimeout", (
        c.diagnostics(RUN)
    )
    assert cause in failed["message"] and "pendingTimeoutSeconds" in failed["message"]
    # the check's pod was the one blocked: failed, not retried, and no generation Job started
    it = run["status"]["iterations"][0]
    assert (it["check"]["attempts"], it["generate"]["attempts"]) == (1, 0)
    print(
        f"\nCLUSTER {case}: PodsBlocked {seen:.1f}s after the Job, Failed {time.monotonic() - created:.1f}s after"
    )
