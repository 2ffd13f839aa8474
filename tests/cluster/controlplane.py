"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, all from the multi-call binary ``tests/cluster/build.sh`` builds from the Go
module proxy.

Production settings, not test shortcuts: TLS everywhere the API server listens, client
certificates, ``Node,RBAC`` authorization, ServiceAccount token signing with an issuer, the
default admission chain (PodSecurity, ServiceAccount, ...) plus
``OwnerReferencesPermissionEnforcement`` and ``NodeRestriction``, and controllers running with
their own ServiceAccount credentials (``--use-service-account-credentials``), so each controller is
subject to RBAC as in a cluster. Every port is free-picked; no component listens elsewhere
(``--secure-port=0`` on the controller manager and scheduler: nothing scrapes them here).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.cluster import pki as pki_
from tests.cluster.kubelet import Api
from tests.support.servers import free_port

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build.sh"
SERVICE_CIDR = "10.96.0.0/16"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# Metadata-level events for every request of a ServiceAccount in the operator's release namespace
# (spin-system), for Kueue's writes to Jobs (tests/cluster/test_kueue.py counts its suspend
# flips) and for the Job controller's writes of Job status (when a Job completed, to the
# microsecond: the scale benchmark's latency starts there); nothing else: small enough to read
# after every test.
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts:spin-system"]
  - level: Metadata
    users: ["kueue"]
    verbs: ["create", "update", "patch", "delete"]
    resources: [{group: "batch", resources: ["jobs"]}]
  - level: Metadata
    users: ["system:serviceaccount:kube-system:job-controller"]
    verbs: ["update", "patch"]
    resources: [{group: "batch", resources: ["jobs/status"]}]
  - level: None
"""
JOB_CONTROLLER = "system:serviceaccount:kube-system:job-controller"


def build_binary(timeout: float = 5400) -> Path:
    """The control plane binary (built on the first call, cached by version afterwards)."""
    proc = subprocess.run(
        ["bash", str(BUILD)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tests/cluster/build.sh failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


class AuthApi(Api):
    """tests/cluster/kubelet.py's JSON client, with TLS and a client certificate."""

    def __init__(self, server: str, ca: Path, cert: pki_.Pair) -> None:
        super().__init__(server)
        self.ca, self.cert = ca, cert

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            session.verify = str(self.ca)
            session.cert = (str(self.cert.cert), str(self.cert.key))
            self._local.session = session
        return session


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None  # added to this process's environment
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n===== start: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
            )

    def stop(self, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "<no log>"


@dataclass
class ControlPlane:
    """The four components, started in order and stopped in reverse."""

    binary: Path
    workdir: Path
    pki: pki_.Pki = field(init=False)
    components: dict[str, Component] = field(default_factory=dict)
    api_port: int = 0
    etcd_port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def _audit_policy(self) -> Path:
        path = self.workdir / "audit-policy.yaml"
        path.write_text(AUDIT_POLICY)
        return path

    def audit(self, group: str = "system:serviceaccounts:spin-system") -> list[dict[str, Any]]:
        """The audit events (ResponseComplete) of requests by users of ``group``."""
        events = []
        try:
            lines = self.audit_log.read_text().splitlines()
        except OSError:
            return []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if group in (event.get("user", {}).get("groups") or []):
                    events.append(event)
        return events

    def api(self) -> AuthApi:
        """An administrator's JSON client."""
        return AuthApi(self.url, self.pki.ca.cert, self.pki.admin)

    def start(self, timeout: float = 180.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = pki_.make_pki(self.workdir / "pki")
        self.api_port, self.etcd_port, peer = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        b = str(self.binary)
        p = self.pki
        pki_.kubeconfig(self.admin_kubeconfig, self.url, p.ca.cert, p.admin)
        kcm_config = pki_.kubeconfig(
            self.workdir / "kcm.kubeconfig", self.url, p.ca.cert, p.controller_manager
        )
        sched_config = pki_.kubeconfig(
            self.workdir / "scheduler.kubeconfig", self.url, p.ca.cert, p.scheduler
        )
        # etcd listens on loopback only; --unsafe-no-fsync because the machine's disk is shared
        # by several test runs (a test cluster's data need not survive a power cut; it does
        # survive an etcd process restart, which is what the restart scenario needs).
        self.components["etcd"] = Component(
            "etcd",
            [
                b,
                "etcd",
                "--name=default",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            logs / "etcd.log",
        )
        self.components["kube-apiserver"] = Component(
            "kube-apiserver",
            [
                b,
                "kube-apiserver",
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={p.serving.cert}",
                f"--tls-private-key-file={p.serving.key}",
                f"--client-ca-file={p.ca.cert}",
                "--authorization-mode=Node,RBAC",
                # PodSecurity, ServiceAccount, ... are in the default set; these two are not.
                "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
                f"--service-account-key-file={p.sa_public}",
                f"--service-account-signing-key-file={p.sa_private}",
                f"--service-account-issuer={ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=false",
                "--profiling=false",
                "--anonymous-auth=false",
                # 127.0.0.1 is not a valid Endpoints address: keep the kubernetes Service without one
                # rather than logging a rejected update every 10 s.
                "--endpoint-reconciler-type=none",
                # The operator's requests (and only those) in an audit log: what tests count
                # (Job creations exactly once) and the benchmark's requests per iteration.
                f"--audit-policy-file={self._audit_policy()}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
                "--audit-log-maxsize=0",
            ],
            logs / "kube-apiserver.log",
        )
        self.components["kube-controller-manager"] = Component(
            "kube-controller-manager",
            [
                b,
                "kube-controller-manager",
                f"--kubeconfig={kcm_config}",
                f"--authentication-kubeconfig={kcm_config}",
                f"--authorization-kubeconfig={kcm_config}",
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={p.sa_private}",
                f"--root-ca-file={p.ca.cert}",
                f"--cluster-signing-cert-file={p.ca.cert}",
                f"--cluster-signing-key-file={p.ca.key}",
            ],
            logs / "kube-controller-manager.log",
        )
        self.components["kube-scheduler"] = Component(
            "kube-scheduler",
            [
                b,
                "kube-scheduler",
                f"--kubeconfig={sched_config}",
                f"--authentication-kubeconfig={sched_config}",
                f"--authorization-kubeconfig={sched_config}",
                "--secure-port=0",
                "--leader-elect=false",
            ],
            logs / "kube-scheduler.log",
        )
        self.start_component("etcd", timeout)
        self.start_component("kube-apiserver", timeout)
        self.start_component("kube-controller-manager", timeout)
        self.start_component("kube-scheduler", timeout)

    def start_component(self, name: str, timeout: float = 180.0) -> None:
        component = self.components[name]
        component.start()
        if name == "etcd":
            self._wait(name, lambda: _http_ok(f"http://127.0.0.1:{self.etcd_port}/health"), timeout)
        elif name == "kube-apiserver":
            self._wait(name, self._api_ready, timeout)
        elif name == "kube-controller-manager":
            # Ready once it has created the namespace's root CA ConfigMap pods' tokens need.
            self._wait(
                name,
                lambda: self._exists("/api/v1/namespaces/default/configmaps/kube-root-ca.crt"),
                timeout,
            )
        else:
            time.sleep(0.5)
            if not component.running:
                raise RuntimeError(f"{name} exited:\n{component.tail()}")

    def _wait(self, name: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        component = self.components[name]
        while time.monotonic() < deadline:
            if not component.running:
                raise RuntimeError(f"{name} exited:\n{component.tail()}")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready after {timeout:.0f}s:\n{component.tail()}")

    def _ssl(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return context

    def _api_ready(self) -> bool:
        return _http_ok(self.url + "/readyz", self._ssl())

    def _exists(self, path: str) -> bool:
        return _http_ok(self.url + path, self._ssl())

    def stop(self) -> None:
        for name in reversed(list(self.components)):
            self.components[name].stop()

    def restart(self, name: str, sig: int = signal.SIGTERM) -> None:
        self.components[name].stop(sig)
        self.start_component(name)


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
