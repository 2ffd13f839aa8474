"""The kubelet stand-in (tests/cluster/node_agent.py) on the real API server: a pod's reported
state only moves forward, as a kubelet's does.

The final tier once ended in a teardown ERROR: the API server answered HTTP 422 ("may not be
transitioned to non-terminated state") to the agent for ``blocked-i0-check-...``, a pod held in
CreateContainerConfigError (tests/cluster/test_pods_blocked.py). Such a pod is resolved again on
each of its watch events, its own status writes among them, so it is nearly always between
resolving and writing Pending. Its deletion's thread reported it terminated meanwhile, and the
Pending write, decided before, landed after: a status going backwards. (A pod whose container
could start had the same race between the deletion check and the start: Running after Failed,
and a process nobody killed.)
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import harness, kit
from tests.cluster.controlplane import AuthApi
from tests.cluster.kit import wait_for
from tests.cluster.kubelet import ApiError
from tests.cluster.node_agent import NodeAgent, NodeSpec

pytestmark = [pytest.mark.cluster]

NODE = "agent-test-node"  # no Node object, no watch: the test drives the agent's steps itself
HOLD_S = 3.0  # how long a held write waits at most for a terminal one (the fixed agent's case)
KEEP = "spin-test/keep"  # a finalizer: the pod stays after the agent's DELETE, so writes reach it


def pod_body(name: str) -> dict[str, Any]:
    env = [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "NO_SUCH_KEY"}}}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "finalizers": [KEEP]},
        "spec": {
            "nodeName": NODE,  # bound already: no scheduler, and no agent of the session runs it
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [{"name": "main", "image": "local", "command": ["true"], "env": env}],
        },
    }


class SlowPendingWrites(AuthApi):
    """The administrator's client, each Pending status write held back until a terminal status
    write has landed (HOLD_S at most): a request slow under load, so that a write decided before a
    deletion arrives after the deletion's own."""

    def __init__(self, base: AuthApi) -> None:
        super().__init__(base.server, base.ca, base.cert)
        self.held = threading.Event()  # a Pending write is waiting
        self.terminal = threading.Event()  # a terminal status write has landed

    def request(self, method: str, path: str, body: Any = None, *, merge: bool = False) -> Any:
        phase = (
            ((body or {}).get("status") or {}).get("phase") if path.endswith("/status") else None
        )
        if phase == "Pending":
            self.held.set()
            self.terminal.wait(HOLD_S)
        answer = super().request(method, path, body, merge=merge)
        if phase in ("Succeeded", "Failed"):
            self.terminal.set()
        return answer


def test_a_pod_deleted_while_it_cannot_start_goes_straight_to_terminated(
    real_cluster: harness.Session, tmp_path: Path
) -> None:
    s = real_cluster
    api = s.plane.api()
    namespace = kit.new_namespace()
    s.kubectl("create", "namespace", namespace)
    path = f"/api/v1/namespaces/{namespace}/pods/blocked"
    try:
        wait_for(
            lambda: api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
            60,
            "the namespace's default ServiceAccount (pods are refused without it)",
            0.2,
        )
        api.request("POST", f"/api/v1/namespaces/{namespace}/pods", pod_body("blocked"))
        slow = SlowPendingWrites(api)
        agent = NodeAgent(slow, s.plane.url, tmp_path, [NodeSpec(NODE)])  # never started
        obj = api.get(path)
        pod = agent._admit(obj)
        # The pod's thread (NodeAgent._observe starts it): no such Secret, then Pending, held.
        starting = threading.Thread(target=agent._run, args=(pod, obj))
        starting.start()
        assert slow.held.wait(60), "the agent never wrote the pod's CreateContainerConfigError"
        # Deleted now; the deletion's thread (_observe starts it too) runs here.
        api.request("DELETE", path, {"kind": "DeleteOptions", "gracePeriodSeconds": 30})
        agent._delete(pod, 30.0)
        starting.join(60)

        assert agent.errors == []  # was: HTTP 422 ... may not be transitioned to non-terminated
        status = api.get(path)["status"]
        terminated = status["containerStatuses"][0]["state"].get("terminated")
        assert status["phase"] == "Failed" and terminated, status
        assert (terminated["reason"], terminated["exitCode"]) == ("ContainerStatusUnknown", 137)
        assert pod.proc is None  # nothing ran
    finally:
        with contextlib.suppress(ApiError):  # absent when the create failed
            api.request("PATCH", path, {"metadata": {"finalizers": None}}, merge=True)
        s.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
