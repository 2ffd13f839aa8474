"""Kueue on the real-control-plane tier: its controller manager, built from the Go module proxy
(tests/cluster/build-kueue.sh, cached like the control plane), run as a local process.

- its CRDs (config/components/crd/bases of the module) go in with ``kubectl apply --server-side``
  (the Workload CRD is too big for client-side apply's annotation);
- the manager runs against the test API server as its own user ``kueue`` (a client certificate
  from tests/cluster/pki.py, in ``system:masters``: Kueue's own RBAC is not under test here),
  so the audit log (controlplane.AUDIT_POLICY) tells Kueue's writes to Jobs from the operator's;
- Configuration: the ``batch/job`` integration only, ``manageJobsWithoutQueueName: false``,
  leader election off, internalCertManagement off (its rotator injects CA bundles into in-cluster
  webhook Services and CRD conversion webhooks this tier has not got). Kueue's admission webhooks
  are not registered: its webhook server listens on 127.0.0.1 with the control plane's serving
  certificate, and nothing calls it. Kueue's Job webhook would only set ``suspend: true`` on a
  queued Job, which the operator already does; quota, admission and eviction are the manager's
  reconcilers, which do run;
- the visibility API server is off (``VisibilityOnDemand=false``): it would listen on every
  interface, and nothing here reads it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import pki as pki_
from tests.cluster.controlplane import Component, ControlPlane
from tests.cluster.kit import Kubectl, wait_for
from tests.support.servers import free_port

BUILD = Path(__file__).with_name("build-kueue.sh")
API = "kueue.x-k8s.io/v1beta2"
FLAVOR = "spin-default"
USER = "kueue"


def build_kueue(timeout: float = 5400) -> Path:
    """Kueue's manager binary (built on the first call, cached by version afterwards); its CRDs
    are in the ``crd`` folder beside it."""
    proc = subprocess.run(
        ["bash", str(BUILD)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"tests/cluster/build-kueue.sh failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def version_of(binary: Path) -> str:
    """The Kueue release the binary was built from (its cache folder: kueue-<version>-<key>)."""
    return binary.parent.name.split("-")[1]


@dataclass
class Kueue:
    """Kueue's controller manager as a local process against ``plane``."""

    binary: Path
    plane: ControlPlane
    workdir: Path
    health_port: int = 0
    component: Component | None = field(default=None, init=False)

    def start(self, timeout: float = 180.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        kubectl = Kubectl(self.plane.admin_kubeconfig)
        kubectl("apply", "--server-side", "-f", str(self.binary.parent / "crd"))
        for crd in ("workloads", "clusterqueues", "localqueues", "resourceflavors"):
            # polled, not `kubectl wait`: a CRD just created has no conditions yet (harness.py)
            name = f"{crd}.kueue.x-k8s.io"
            wait_for(partial(_established, kubectl, name), 60, f"{name} to be Established", 0.2)
        if kubectl("get", "namespace", "kueue-system", check=False).returncode != 0:
            kubectl("create", "namespace", "kueue-system")  # Kueue's own namespace (its config)
        certs = self.workdir / "certs"
        certs.mkdir(exist_ok=True)
        # The control plane's serving certificate (127.0.0.1) for Kueue's webhook and metrics
        # servers, which both insist on one.
        shutil.copy(self.plane.pki.serving.cert, certs / "tls.crt")
        shutil.copy(self.plane.pki.serving.key, certs / "tls.key")
        kubeconfig = pki_.kubeconfig(
            self.workdir / "kueue.kubeconfig",
            self.plane.url,
            self.plane.pki.ca.cert,
            self.plane.pki.kueue,
        )
        self.health_port = free_port()
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": "kueue-system",
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(certs)},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
        }
        config_path = self.workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self.component = Component(
            "kueue",
            [
                str(self.binary),
                f"--config={config_path}",
                f"--kubeconfig={kubeconfig}",
                "--feature-gates=VisibilityOnDemand=false",
                "--zap-log-level=2",
            ],
            self.workdir / "kueue.log",
            env={"KUEUE_METRICS_CERT_DIR": str(certs)},
        )
        self.component.start()
        deadline = time.monotonic() + timeout
        while not self._ready():
            if not self.component.running:
                raise RuntimeError(f"kueue exited:\n{self.component.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"kueue not ready after {timeout:.0f}s:\n{self.component.tail()}"
                )
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            with urllib.request.urlopen(url, timeout=3) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()

    def tail(self, chars: int = 4000) -> str:
        return self.component.tail(chars) if self.component is not None else ""

    def job_writes(self, namespace: str) -> list[dict[str, Any]]:
        """Kueue's writes (update, patch) to Jobs of ``namespace``, from the audit log."""
        return [
            e
            for e in self.plane.audit("system:masters")
            if (e.get("user") or {}).get("username") == USER
            and (ref := e.get("objectRef") or {}).get("resource") == "jobs"
            and ref.get("namespace") == namespace
            and not ref.get("subresource")
            and e.get("verb") in ("update", "patch")
        ]


def _established(kubectl: Kubectl, crd: str) -> bool:
    conditions = (kubectl.json("get", "crd", crd).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def queue_objects(namespace: str, queue: str, quota: dict[str, str]) -> str:
    """A ResourceFlavor, a ClusterQueue with ``quota`` (resource -> nominal quota) for
    ``namespace`` alone, and the LocalQueue ``queue`` in it, as YAML for ``kubectl apply``."""
    cluster_queue = f"spin-{namespace}"
    objects = [
        {"apiVersion": API, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
        {
            "apiVersion": API,
            "kind": "ClusterQueue",
            "metadata": {"name": cluster_queue},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "resourceGroups": [
                    {
                        "coveredResources": list(quota),
                        "flavors": [
                            {
                                "name": FLAVOR,
                                "resources": [
                                    {"name": name, "nominalQuota": value}
                                    for name, value in quota.items()
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": API,
            "kind": "LocalQueue",
            "metadata": {"name": queue, "namespace": namespace},
            "spec": {"clusterQueue": cluster_queue},
        },
    ]
    return yaml.safe_dump_all(objects)


def cluster_queue_ready(kubectl: Kubectl, namespace: str) -> bool:
    cq = kubectl.json("get", "clusterqueue", f"spin-{namespace}")
    conditions = (cq.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Active" and c["status"] == "True" for c in conditions)


def wait_queue(kubectl: Kubectl, namespace: str) -> None:
    wait_for(
        lambda: cluster_queue_ready(kubectl, namespace), 60, "the ClusterQueue to be Active", 0.2
    )
