"""A kubelet stand-in for the real control plane: Nodes whose pods are local process groups.

What it does, as a kubelet does it (and what it does not):

- **registers Nodes** (``POST /api/v1/nodes`` with capacity, allocatable and a Ready condition;
  some with ``nvidia.com/gpu``) and renews each Node's Lease in ``kube-node-lease`` every few
  seconds, so the node lifecycle controller keeps them Ready. The real scheduler binds pods to
  them; this agent never chooses a node.
- **runs bound pods**: one watch on all pods; a pod bound to one of its Nodes gets its first
  container started as a process group through ``tests/cluster/kubelet.py``'s
  ``Kubelet.resolve_container`` (the same env/Secret/ConfigMap/downward-API resolution, mount
  rewriting and ``<hostname>.<subdomain>`` -> 127.0.0.1 rewriting the emulator tier uses).
  Indexed Job pods get ``JOB_COMPLETION_INDEX`` from their annotation, as the kubelet's env does.
- **projected ServiceAccount tokens**: a ``projected`` volume's ``serviceAccountToken`` is a real
  TokenRequest bound to the pod (``serviceaccounts/<sa>/token``), written with ``ca.crt`` and
  ``namespace`` into the mount's local directory. In-cluster clients read a fixed path
  (``/var/run/secrets/...``) this machine cannot give every pod, so a pod with a token also gets
  ``KUBECONFIG`` pointing at a kubeconfig holding that same token and CA: the container
  authenticates as its ServiceAccount, with exactly its RBAC.
- **reports status** through ``pods/<name>/status`` (phase, container state with exit code,
  reason, restart count, conditions; ``DisruptionTarget`` when it evicts).
- **honours deletion**: SIGTERM to the group, ``deletionGracePeriodSeconds``, SIGKILL, terminal
  status, then the final ``DELETE`` with grace 0 (UID precondition), as the kubelet does. A pod
  deleted before its container started goes straight to terminated (``ContainerStatusUnknown``,
  137, as the kubelet reports a container it never ran) and never starts.
- **status only moves forward**: once a pod is reported terminated nothing else is written for
  it (the API server refuses a terminated container going back to waiting or running: 422).
  Each pod's transitions happen under its own lock, so a deletion either comes before a start
  (nothing starts) or after it (it finds the process to kill).
- ``restartPolicy: Always``/``OnFailure`` containers are restarted in place (restart count + 1,
  short back-off) - the operator's Deployment pod after a SIGKILL, for example.

Credentials: it acts with the administrator's client certificate (one agent plays several
Nodes; a real kubelet would be ``system:node:<name>`` under the Node authorizer).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.cluster.controlplane import AuthApi
from tests.cluster.kubelet import ApiError, ConfigError, Kubelet, PodContext
from tests.cluster.pki import kubeconfig

log = logging.getLogger("node-agent")
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
RESTART_BACKOFF_S = 1.0
TERMINAL = ("Succeeded", "Failed")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: int = 0
    cpu: str = "64"
    memory: str = "256Gi"


@dataclass
class LocalPod:
    """One pod bound to one of our Nodes and (at most) one live process group."""

    namespace: str
    name: str
    uid: str
    directory: Path
    container: str
    image: str
    restart_policy: str
    proc: subprocess.Popen[bytes] | None = None
    phase: str = "Pending"
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    started: str | None = None
    finished: str | None = None
    restarts: int = 0
    disruption: bool = False
    deleting: bool = False
    # Set by kill_container(hold=...): the restart waits for this event, as a container in
    # CrashLoopBackOff waits out its back-off (a test decides how long the pod stays down).
    restart_hold: threading.Event | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # as resolved for the process
    # Held while the pod's state changes and is written (start, restart, termination, deletion's
    # mark): the pod thread and a deletion thread race otherwise (see the module doc).
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def log_path(self) -> Path:
        return self.directory / "log.txt"


# What a test may do to a pod's argv/env before it starts (e.g. swap a step for a stand-in).
LaunchHook = Callable[[dict[str, Any], list[str], dict[str, str]], list[str]]


class NodeAgent:
    def __init__(
        self,
        api: AuthApi,
        server: str,
        workdir: Path,
        nodes: list[NodeSpec],
        launch_hook: LaunchHook | None = None,
    ) -> None:
        self.api, self.server, self.workdir = api, server, workdir
        self.nodes = {n.name: n for n in nodes}
        self.kubelet = Kubelet(api, workdir)
        self.launch_hook = launch_hook
        self.pods: dict[str, LocalPod] = {}  # uid -> pod
        # What went wrong, per pod namespace, until a test claims its own (take_errors): a pod
        # that ends after its test must not fail whichever test runs when the session ends.
        self._errors: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> NodeAgent:
        for node in self.nodes.values():
            self._register(node)
        for target, name in ((self._heartbeat, "leases"), (self._watch, "pod-watch")):
            thread = threading.Thread(target=target, name=f"node-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.api.abort_watch()
        with self._lock:
            pods = list(self.pods.values())
        for pod in pods:
            self._mark_deleting(pod)
            self._kill(pod, grace=2.0)
        for thread in self._threads:
            thread.join(timeout=10)

    @property
    def errors(self) -> list[str]:
        """Every error not claimed yet, each naming its pod."""
        with self._lock:
            return [text for _, text in self._errors]

    def take_errors(self, namespaces: Collection[str]) -> list[str]:
        """The errors of pods in `namespaces`, claimed: they no longer count in ``errors``."""
        with self._lock:
            taken = [text for ns, text in self._errors if ns in namespaces]
            self._errors = [(ns, text) for ns, text in self._errors if ns not in namespaces]
        return taken

    def _error(self, pod: LocalPod, text: str) -> None:
        with self._lock:
            self._errors.append((pod.namespace, text))

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ Nodes and leases

    def _register(self, node: NodeSpec) -> None:
        capacity = {
            "cpu": node.cpu,
            "memory": node.memory,
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }
        labels = {
            "kubernetes.io/hostname": node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }
        if node.gpus:
            capacity["nvidia.com/gpu"] = str(node.gpus)
            labels["nvidia.com/gpu.present"] = "true"
        stamp = now()
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": labels},
            "spec": {},
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "local process node",
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": stamp,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": node.name},
                ],
                "nodeInfo": {
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                    "kernelVersion": "",
                    "osImage": "local",
                    "containerRuntimeVersion": "local://1",
                    "kubeletVersion": "v1.37.2",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            },
        }
        with contextlib.suppress(ApiError):
            self.api.request("POST", "/api/v1/nodes", body)
        # A create ignores status on some paths: write it through the subresource too.
        self.api.request(
            "PATCH", f"/api/v1/nodes/{node.name}/status", {"status": body["status"]}, merge=True
        )

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            for name in self.nodes:
                try:
                    self._renew(name)
                except Exception as exc:  # an API server restart: renew on the next beat
                    log.debug("lease %s not renewed: %s", name, exc)
            self._stop.wait(5.0)

    def _renew(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            self.api.request("PATCH", path, {"spec": spec}, merge=True)
        except ApiError as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"},
                "spec": spec,
            }
            self.api.request("POST", path.rsplit("/", 1)[0], body)

    # ------------------------------------------------------------------ the pod watch

    def _watch(self) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listing = self.api.request("GET", "/api/v1/pods")
                    version = listing["metadata"]["resourceVersion"]
                    for pod in listing.get("items", []):
                        self._observe("ADDED", pod)
                for event in self.api.watch("/api/v1/pods", version, self._stop):
                    if event.get("type") == "ERROR":
                        version = None  # 410 Gone and friends: re-list
                        break
                    obj = event["object"]
                    version = obj["metadata"].get("resourceVersion", version)
                    self._observe(event["type"], obj)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.debug("pod watch broken (%s); re-listing", exc)
                version = None
                self._stop.wait(0.5)

    def _observe(self, kind: str, obj: dict[str, Any]) -> None:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        if spec.get("nodeName") not in self.nodes:
            return
        uid = meta["uid"]
        if kind == "DELETED":
            with self._lock:
                gone = self.pods.get(uid)
            if gone is not None:  # outside self._lock: a pod's lock is never taken inside it
                self._mark_deleting(gone)
                self._kill(gone, grace=0)
            return
        with self._lock:
            pod = self.pods.get(uid)
            if pod is None:
                if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    return  # finished before we (re)started: nothing to run
                pod = self._admit(obj)
                threading.Thread(
                    target=self._run, args=(pod, obj), name=f"pod-{pod.name}", daemon=True
                ).start()
        if meta.get("deletionTimestamp") and not pod.deleting:
            pod.deleting = True
            grace = float(meta.get("deletionGracePeriodSeconds") or 0)
            threading.Thread(target=self._delete, args=(pod, grace), daemon=True).start()

    def _admit(self, obj: dict[str, Any]) -> LocalPod:
        meta, spec = obj["metadata"], obj["spec"]
        container = spec["containers"][0]
        pod = LocalPod(
            meta["namespace"],
            meta["name"],
            meta["uid"],
            self.workdir / meta["namespace"] / meta["name"],
            container["name"],
            container.get("image", ""),
            spec.get("restartPolicy", "Always"),
        )
        pod.directory.mkdir(parents=True, exist_ok=True)
        self.pods[pod.uid] = pod
        return pod

    # ------------------------------------------------------------------ running a pod

    def _run(self, pod: LocalPod, obj: dict[str, Any]) -> None:
        try:
            argv, env, cwd = self._resolve(pod, obj)
        except ConfigError as exc:
            # CreateContainerConfigError: the pod stays Pending; retried when the watch sees it
            # again (a real kubelet retries on its sync loop).
            with pod.lock:
                if pod.deleting or pod.phase in TERMINAL:
                    # Deleted while resolving: the deletion reports it terminated (maybe already
                    # has); a Pending written now would take the status back (HTTP 422).
                    return
                pod.reason, pod.message = "CreateContainerConfigError", str(exc)
                self._publish(pod)
            with self._lock:
                self.pods.pop(pod.uid, None)
            return
        except Exception as exc:
            self._error(pod, f"{pod.namespace}/{pod.name}: {exc!r}")
            self._finish(pod, 128, "StartError", str(exc))
            return
        if self.launch_hook is not None:
            argv = self.launch_hook(obj, argv, env)
        pod.argv, pod.env = argv, env
        while True:
            proc = self._start(pod, argv, env, cwd)
            if proc is None:
                return
            code = proc.wait()
            code = 128 - code if code < 0 else code  # killed by signal N: the runtime's 128+N
            restart = pod.restart_policy == "Always" or (
                pod.restart_policy == "OnFailure" and code != 0
            )
            with pod.lock:
                # Decided under the lock: a deletion that came first has reported the pod
                # terminated, and a waiting state written after that would go backwards.
                restart = restart and not pod.deleting and not self._stop.is_set()
                if restart:
                    pod.exit_code, pod.finished = code, now()
                    pod.reason = "Completed" if code == 0 else "Error"
                    pod.restarts += 1
                    self._publish(pod, waiting="CrashLoopBackOff")
            if restart:
                self._stop.wait(RESTART_BACKOFF_S)
                hold, pod.restart_hold = pod.restart_hold, None
                while hold is not None and not hold.wait(0.2):
                    if pod.deleting or self._stop.is_set():
                        break
                continue
            if not pod.deleting:  # a deletion reports the end itself (_delete)
                self._finish(pod, code)
            return

    def _start(
        self, pod: LocalPod, argv: list[str], env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes] | None:
        """Start the container and report it Running, unless the pod is being deleted or has
        terminated. Checked and started under the pod's lock: a deletion marked before finds
        nothing started and reports the pod terminated; one marked after finds the process."""
        with pod.lock:
            if pod.deleting or pod.phase in TERMINAL or self._stop.is_set():
                return None
            with pod.log_path.open("ab") as out:
                pod.proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            pod.phase, pod.started, pod.reason, pod.exit_code = "Running", now(), "", None
            self._publish(pod)
            return pod.proc

    def _finish(self, pod: LocalPod, code: int, reason: str = "", message: str = "") -> bool:
        """Report the pod terminated with `code`, once: a terminated pod's status is final, so a
        later call (the pod thread and a deletion both ending it) changes and writes nothing."""
        with pod.lock:
            if pod.phase in TERMINAL:
                return False
            pod.exit_code, pod.finished = code, now()
            pod.phase = "Succeeded" if code == 0 else "Failed"
            pod.reason = reason or ("Completed" if code == 0 else "Error")
            pod.message = message or pod.message
            self._publish(pod)
            return True

    def _mark_deleting(self, pod: LocalPod) -> None:
        """From here on no container of the pod starts (``_start`` checks under the same lock);
        a start already under way finishes first, so its process is there to be killed."""
        with pod.lock:
            pod.deleting = True

    def _resolve(
        self, pod: LocalPod, obj: dict[str, Any]
    ) -> tuple[list[str], dict[str, str], Path]:
        meta, spec = obj["metadata"], obj["spec"]
        annotations = dict(meta.get("annotations") or {})
        env: dict[str, str] = {}
        if INDEX_ANNOTATION in annotations:
            env["JOB_COMPLETION_INDEX"] = annotations[INDEX_ANNOTATION]
        token_config = self._projected(pod, obj)
        context = PodContext(
            pod.namespace,
            pod.name,
            spec.get("hostname") or pod.name,
            pod.directory,
            dict(meta.get("labels") or {}),
            annotations,
        )
        argv, full_env, cwd = self.kubelet.resolve_container(
            context, spec, spec["containers"][0], env
        )
        if token_config is not None:
            full_env["KUBECONFIG"] = str(token_config)
        return argv, full_env, cwd

    def _projected(self, pod: LocalPod, obj: dict[str, Any]) -> Path | None:
        """Write projected volumes (SA token, CA, namespace); the kubeconfig for the token."""
        spec = obj["spec"]
        token_config = None
        for volume in spec.get("volumes") or []:
            if "projected" not in volume:
                continue
            local = pod.directory / "volumes" / volume["name"]  # where Kubelet._mounts puts it
            local.mkdir(parents=True, exist_ok=True)
            for source in volume["projected"].get("sources") or []:
                if "serviceAccountToken" in source:
                    request = source["serviceAccountToken"]
                    token = self._token(
                        pod,
                        spec.get("serviceAccountName") or "default",
                        request.get("expirationSeconds", 3607),
                        request.get("audience"),
                    )
                    (local / request.get("path", "token")).write_text(token)
                    token_config = kubeconfig(
                        pod.directory / "in-cluster.kubeconfig",
                        self.server,
                        self.api.ca,
                        token=token,
                    )
                elif "configMap" in source:
                    ref = source["configMap"]
                    data = self.kubelet._data(
                        pod.namespace, "configMap", ref["name"], bool(ref.get("optional"))
                    )
                    for item in ref.get("items") or [{"key": k, "path": k} for k in data]:
                        (local / item["path"]).write_text(data.get(item["key"], ""))
                elif "downwardAPI" in source:
                    for item in source["downwardAPI"].get("items") or []:
                        if item.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
                            (local / item["path"]).write_text(pod.namespace)
        return token_config

    def _token(self, pod: LocalPod, account: str, seconds: int, audience: str | None) -> str:
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": seconds,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.name,
                    "uid": pod.uid,
                },
            },
        }
        if audience:
            body["spec"]["audiences"] = [audience]
        path = f"/api/v1/namespaces/{pod.namespace}/serviceaccounts/{account}/token"
        return str(self.api.request("POST", path, body)["status"]["token"])

    # ------------------------------------------------------------------ termination

    def _kill(self, pod: LocalPod, grace: float) -> None:
        proc = pod.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(timeout=grace if grace > 0 else 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def _delete(self, pod: LocalPod, grace: float) -> None:
        """Graceful deletion: stop the container, report a terminal phase, remove the object."""
        self._mark_deleting(pod)
        self._kill(pod, grace)
        proc = pod.proc
        if proc is None:
            # Never started: terminated at once, as the kubelet reports a container it never ran.
            self._finish(
                pod,
                137,
                "ContainerStatusUnknown",
                "The container could not be located when the pod was terminated",
            )
        else:
            code = proc.wait()  # _kill waited it out; this reads the code
            self._finish(pod, 128 - code if code < 0 else code)
        with contextlib.suppress(ApiError):
            self.api.request(
                "DELETE",
                f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}",
                {
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": pod.uid},
                },
            )

    def kill_container(self, pod: LocalPod, hold: threading.Event | None = None) -> None:
        """SIGKILL the container's process group (no grace); restart policy decides what next.
        With ``hold``, a restart waits until the event is set (the pod stays down meanwhile)."""
        pod.restart_hold = hold
        proc = pod.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)

    def evict(self, namespace: str, name: str) -> LocalPod:
        """Kill a pod as the kubelet does under node pressure: DisruptionTarget, phase Failed."""
        pod = self.find(namespace, name)
        with pod.lock:
            self._mark_deleting(pod)
            pod.disruption = pod.phase not in TERMINAL  # a finished pod is not disrupted
        self._kill(pod, grace=0)
        self._finish(pod, 137, "Evicted", "The node was low on resource: memory.")
        return pod

    def find(self, namespace: str, name: str) -> LocalPod:
        with self._lock:
            for pod in self.pods.values():
                if (pod.namespace, pod.name) == (namespace, name):
                    return pod
        raise KeyError(f"{namespace}/{name} is not on this agent's nodes")

    # ------------------------------------------------------------------ status

    def _publish(self, pod: LocalPod, waiting: str | None = None) -> None:
        state: dict[str, Any]
        if waiting or pod.phase == "Pending":
            state = {
                "waiting": {
                    "reason": waiting or pod.reason or "ContainerCreating",
                    "message": pod.message,
                }
            }
        elif pod.phase == "Running":
            state = {"running": {"startedAt": pod.started}}
        else:
            state = {
                "terminated": {
                    "exitCode": pod.exit_code,
                    "reason": pod.reason,
                    "message": pod.message,
                    "startedAt": pod.started or now(),
                    "finishedAt": pod.finished or now(),
                }
            }
        ready = "True" if pod.phase == "Running" and not waiting else "False"
        stamp = now()
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": stamp},
            {"type": "Initialized", "status": "True", "lastTransitionTime": stamp},
            {"type": "ContainersReady", "status": ready, "lastTransitionTime": stamp},
            {"type": "Ready", "status": ready, "lastTransitionTime": stamp},
        ]
        if pod.disruption:
            conditions.append(
                {
                    "type": "DisruptionTarget",
                    "status": "True",
                    "reason": "TerminationByKubelet",
                    "lastTransitionTime": stamp,
                    "message": pod.message or "The node had condition: [MemoryPressure].",
                }
            )
        status: dict[str, Any] = {
            "phase": pod.phase,
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": pod.started or stamp,
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": pod.container,
                    "ready": ready == "True",
                    "restartCount": pod.restarts,
                    "image": pod.image or "local",
                    "imageID": "",
                    "started": pod.phase == "Running",
                    "state": state,
                }
            ],
        }
        if pod.disruption:
            status["reason"], status["message"] = pod.reason, pod.message
        try:
            self.api.request(
                "PATCH",
                f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status",
                {"status": status},
                merge=True,
            )
        except ApiError as exc:
            if exc.status != 404:
                self._error(pod, f"status of {pod.namespace}/{pod.name}: {exc}")
        except Exception as exc:  # the API server is restarting: the next change writes it again
            log.debug("status of %s not written: %s", pod.name, exc)
