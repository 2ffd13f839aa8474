"""The real-control-plane tier: what runs, and how the user's tools reach it.

- ``ControlPlane`` (tests/cluster/controlplane.py): etcd + kube-apiserver + kube-controller-manager
  + kube-scheduler built from the Go module proxy, production flags (RBAC, PodSecurity,
  OwnerReferencesPermissionEnforcement, ServiceAccount tokens, TLS).
- ``NodeAgent`` (tests/cluster/node_agent.py): three Nodes (one with 2 ``nvidia.com/gpu``) whose
  bound pods run as local process groups.
- the user's tools: ``.tools/bin/kubectl`` and ``.tools/bin/helm`` with an administrator's
  kubeconfig (client certificate). The CRD goes in with ``kubectl apply`` (validation on); the
  chart with ``helm install --skip-crds --wait`` - so the operator is the chart's Deployment, its
  pod scheduled by the real scheduler, run by the agent, authenticated by its ServiceAccount's
  projected token and limited to exactly the chart's RBAC.
- S3 (moto) and MLflow (a real server) from tests/support/servers.py, shared with the fast tests.

Every test namespace (and the release namespace) is labelled
``pod-security.kubernetes.io/enforce: restricted``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster import kit
from tests.cluster.controlplane import ControlPlane
from tests.cluster.kit import Kubectl, wait_for
from tests.cluster.node_agent import LaunchHook, NodeAgent, NodeSpec

RELEASE = "spin"
RELEASE_NAMESPACE = kit.RELEASE_NAMESPACE
CRD = kit.REPO / "crds" / "selfplay.dev_spinruns.yaml"
RESTRICTED = "pod-security.kubernetes.io/enforce=restricted"
NODES = [NodeSpec("node-a"), NodeSpec("node-b"), NodeSpec("gpu-node", gpus=2)]
OPERATOR_GROUP = f"system:serviceaccounts:{RELEASE_NAMESPACE}"


def helm(kubeconfig: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(kit.HELM), "--kubeconfig", str(kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}\n{proc.stdout}")
    return proc


@dataclass
class RealCluster:
    """One test's view: the control plane, the agent, the operator's release, a namespace."""

    plane: ControlPlane
    agent: NodeAgent
    kubectl: Kubectl
    namespace: str
    workdir: Path
    s3_endpoint: str
    mlflow_uri: str
    values: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)  # the test's (create_namespace)

    # ------------------------------------------------------------------ namespaces and runs

    def create_namespace(self, name: str, *, secret: bool = True) -> None:
        self.kubectl("create", "namespace", name)
        if name != RELEASE_NAMESPACE:
            self.namespaces.append(name)
        self.kubectl("label", "namespace", name, RESTRICTED, "--overwrite")
        if secret:
            literals = [f"--from-literal={k}={v}" for k, v in kit.S3_CREDENTIALS.items()]
            self.kubectl("create", "secret", "generic", kit.S3_SECRET, "-n", name, *literals)

    def apply(
        self, path: Path = kit.EXAMPLE, namespace: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply -f`` with client-side and server-side (strict) validation on."""
        return self.kubectl(
            "apply", "-n", namespace or self.namespace, "-f", str(path), check=check
        )

    def get(self, resource: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        ns = namespace or self.namespace
        proc = self.kubectl("get", resource, name, "-n", ns, "-o", "json", check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(proc.stderr)
        return dict(json.loads(proc.stdout))

    def run(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        path = (
            f"/apis/selfplay.dev/v1alpha1/namespaces/{namespace or self.namespace}/spinruns/{name}"
        )
        return dict(self.plane.api().get(path) or {})

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        path = f"/apis/batch/v1/namespaces/{namespace or self.namespace}/jobs"
        return list((self.plane.api().get(path) or {}).get("items", []))

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        path = f"/api/v1/namespaces/{namespace or self.namespace}/pods"
        return list((self.plane.api().get(path) or {}).get("items", []))

    def job_creations(self, namespace: str | None = None) -> list[str]:
        """Names of Jobs the operator created (201s in the API server's audit log), in order."""
        ns = namespace or self.namespace
        return [
            ref.get("name", "")
            for event in self.plane.audit(OPERATOR_GROUP)
            if event.get("verb") == "create"
            and (ref := event.get("objectRef") or {}).get("resource") == "jobs"
            and ref.get("namespace") == ns
            and (event.get("responseStatus") or {}).get("code") == 201
            and "dryRun=All"
            not in (event.get("requestURI") or "")  # the start's check stores nothing
        ]

    def wait_run(
        self,
        name: str,
        timeout: float,
        phases: tuple[str, ...] = kit.TERMINAL,
        namespace: str | None = None,
    ) -> dict[str, Any]:
        try:
            return wait_for(
                lambda: (
                    (r := self.run(name, namespace)).get("status", {}).get("phase") in phases and r
                ),
                timeout,
                f"{name} to reach {'/'.join(phases)}",
                interval=0.5,
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics(name, namespace)}") from None

    # ------------------------------------------------------------------ the operator's pod

    def operator_pod(self) -> dict[str, Any] | None:
        pods = self.pods(RELEASE_NAMESPACE)
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        return live[0] if live else None

    def operator_log(self) -> Path | None:
        pod = self.operator_pod()
        if pod is None:
            return None
        return self.agent.workdir / RELEASE_NAMESPACE / pod["metadata"]["name"] / "log.txt"

    def kill_operator(self, hold: threading.Event | None = None) -> int:
        """SIGKILL the operator container (an OOM kill, say); the agent restarts it, as a
        kubelet does for ``restartPolicy: Always`` - with ``hold``, only once it is set (the
        operator stays down meanwhile). Returns the restart count to wait for."""
        pod = self.operator_pod()
        assert pod is not None, "no operator pod"
        local = self.agent.find(RELEASE_NAMESPACE, pod["metadata"]["name"])
        before = local.restarts
        self.agent.kill_container(local, hold)
        return before + 1

    def wait_operator_restarted(self, restarts: int, timeout: float = 120) -> None:
        """Until the operator's container has restarted ``restarts`` times and runs again."""

        def restarted() -> bool:
            pod = self.operator_pod() or {}
            status = pod.get("status") or {}
            container = (status.get("containerStatuses") or [{}])[0]
            return container.get("restartCount", 0) >= restarts and "running" in (
                container.get("state") or {}
            )

        wait_for(restarted, timeout, "the operator container to be restarted", interval=0.25)

    def diagnostics(self, name: str | None = None, namespace: str | None = None) -> str:
        ns = namespace or self.namespace
        lines = []
        if name:
            lines.append("status: " + json.dumps(self.run(name, ns).get("status"), indent=1)[:4000])
        for job in self.jobs(ns):
            lines.append(f"job {job['metadata']['name']}: {json.dumps(job.get('status'))[:600]}")
        for pod in self.pods(ns):
            status = pod.get("status") or {}
            lines.append(
                f"pod {pod['metadata']['name']} {status.get('phase')} node={pod['spec'].get('nodeName')}"
            )
            with contextlib.suppress(KeyError):
                local = self.agent.find(ns, pod["metadata"]["name"])
                if local.exit_code not in (0, None):
                    lines.append("  log: " + kit.tail(local.log_path, 1500).replace("\n", "\n  "))
        events = self.kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp", check=False)
        lines.append("events:\n" + events.stdout[-3000:])
        log = self.operator_log()
        lines.append("operator log:\n" + (kit.tail(log, 6000) if log else "<no operator pod>"))
        return "\n".join(lines)


@dataclass
class Session:
    """What lives for the whole test session: the control plane, the agent, kubectl."""

    plane: ControlPlane
    agent: NodeAgent
    kubectl: Kubectl
    timings: dict[str, float]


@contextlib.contextmanager
def session(binary: Path, workdir: Path) -> Iterator[Session]:
    timings: dict[str, float] = {}
    started = time.monotonic()
    plane = ControlPlane(binary, workdir / "plane")
    try:
        plane.start()
        timings["control_plane_start_s"] = time.monotonic() - started
        kubectl = Kubectl(plane.admin_kubeconfig)
        started = time.monotonic()
        kubectl("apply", "-f", str(CRD))  # validation on: the CRD itself is checked
        # Polled here, not `kubectl wait`: right after the create the CRD has no status.conditions
        # yet, and kubectl wait then fails at once instead of waiting.
        wait_for(lambda: _established(kubectl), 60, "the SPINRun CRD to be Established", 0.2)
        # Established is not yet served: the API server publishes a new CRD in discovery and
        # OpenAPI asynchronously, and kubectl (explain, apply) fails with "couldn't find resource"
        # until it does (seen about 1 run in 2 right after Established).
        wait_for(
            lambda: _served(kubectl), 60, "the SPINRun CRD to be served (discovery, OpenAPI)", 0.2
        )
        timings["crd_s"] = time.monotonic() - started
        with NodeAgent(plane.api(), plane.url, workdir / "pods", NODES) as agent:
            yield Session(plane, agent, kubectl, timings)
    finally:
        plane.stop()


@contextlib.contextmanager
def release(
    s: Session,
    workdir: Path,
    s3_endpoint: str,
    mlflow_uri: str,
    launch_hook: LaunchHook | None = None,
    operator_values: dict[str, str] | None = None,
) -> Iterator[RealCluster]:
    """``helm install`` the chart (its Deployment runs through the agent) and a fresh namespace;
    ``helm uninstall`` afterwards."""
    namespace = kit.new_namespace()
    values = {
        # The admin lets the operator check Secrets in the test namespace (a namespaced Role,
        # docs/security.md): a missing credentials Secret fails the run up front.
        "rbac.secretCheckNamespaces": "{" + namespace + "}",
        "storage.endpoint": s3_endpoint,
        "storage.region": "us-east-1",
        "storage.credentialsSecret": kit.S3_SECRET,
        "storage.uri": kit.STORAGE_URI,
        "tracking.uri": mlflow_uri,
        # Every pod shares this host's network: free ports, not the chart's defaults.
        "health.port": str(kit.free_port()),
        "metrics.port": str(kit.free_port()),
        "logLevel": "INFO",
        **(operator_values or {}),
    }
    s.agent.launch_hook = launch_hook
    c = RealCluster(
        s.plane,
        s.agent,
        s.kubectl,
        namespace,
        workdir,
        s3_endpoint,
        mlflow_uri,
        values,
        dict(s.timings),
    )
    if s.kubectl("get", "namespace", RELEASE_NAMESPACE, check=False).returncode != 0:
        c.create_namespace(RELEASE_NAMESPACE)
    c.create_namespace(c.namespace)
    argv = ["install", RELEASE, str(kit.CHART), "-n", RELEASE_NAMESPACE, "--skip-crds", "--wait",
            "--timeout=5m"]  # fmt: skip # argv: a flag beside its value
    for key, value in values.items():
        argv += ["--set-string" if key.endswith(("uri", "endpoint")) else "--set", f"{key}={value}"]
    started = time.monotonic()
    helm(s.plane.admin_kubeconfig, *argv)
    c.timings["helm_install_s"] = time.monotonic() - started
    try:
        yield c
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            helm(
                s.plane.admin_kubeconfig,
                "uninstall",
                RELEASE,
                "-n",
                RELEASE_NAMESPACE,
                "--wait",
                "--timeout=2m",
            )
        s.kubectl("delete", "namespace", c.namespace, "--wait=false", check=False)
        _claim_agent_errors(s, c)


def _claim_agent_errors(s: Session, c: RealCluster) -> None:
    """The node agent's errors for this test's pods fail this test's teardown, not the session's
    (which pytest reports under whichever test ran last). The namespace's last pods end after the
    test body, when the namespace goes (SIGTERM, terminal status, the final DELETE, all through
    the agent): they are waited for first, a minute at most; a pod still there reports later, at
    the session's end, under its namespace's name."""
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not c.pods(), 60, f"the pods of namespace {c.namespace} to go", 0.5)
    c.timings["pods_gone_s"] = time.monotonic() - started
    print(f"\nCLUSTER teardown: pods of {c.namespace} gone in {c.timings['pods_gone_s']:.1f}s")
    errors = s.agent.take_errors({RELEASE_NAMESPACE, *c.namespaces})
    assert not errors, "node agent errors for this test's pods:\n" + "\n".join(errors)


def _served(kubectl: Kubectl) -> bool:
    return kubectl("explain", "spinrun.spec.training", check=False).returncode == 0


def _established(kubectl: Kubectl) -> bool:
    crd = kubectl.json("get", "crd", "spinruns.selfplay.dev")
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
