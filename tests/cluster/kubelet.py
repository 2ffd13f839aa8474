"""What the kubelet does to start one container, on this machine instead of a node.

The node agent (tests/cluster/node_agent.py) starts every pod bound to its Nodes with it: the
operator's Deployment (the chart's, installed by helm) and the Job pods alike, so all get the same
env resolution, mounts and name resolution.

What a container gets:

- **argv**: its ``command`` + ``args`` with Kubernetes ``$(VAR)`` expansion (``$$`` escapes);
  the image is ignored (``python``/``torchrun`` resolve to the repository's virtualenv).
- **env**: a small base (``PATH``, ``HOME``, offline switches, ``OMP_NUM_THREADS=1``: each pod
  behaves like a 1-CPU container), then the container's ``envFrom``/``env`` in order: ``value``,
  ``secretKeyRef``/``configMapKeyRef`` read from the API (a missing object or key raises
  :class:`ConfigError`, the kubelet's ``CreateContainerConfigError``), ``fieldRef`` (name,
  namespace, labels, annotations, ``status.podIP``). Nothing of the test process's environment
  leaks in.
- **volumes**: ``/dev/shm`` mounts are ignored; every other ``mountPath`` is a local directory
  (per pod for ``emptyDir``, per claim for PVCs, files written for ``secret``/``configMap``
  volumes), and the mount path is rewritten to that directory where it starts an argv element or
  env value or follows ``=``, and in ``workingDir``. The pod's directory is its cwd and ``HOME``.
- **names**: every ``<host>.<service>[.<ns>[.svc[.cluster.local]]]`` token of a Service in the
  pod's namespace, and the bare Service name when it is a whole argv element/env value or is
  followed by ``:<port>``, is rewritten to ``127.0.0.1`` before exec — so a training Job's
  ``<job>-0.<headless svc>`` master resolves locally. Ports attached to rewritten hosts (and
  ``--master-port``/``--master_port``/``MASTER_PORT``/``PET_MASTER_PORT`` of such a container) are mapped to a free
  local port per (namespace, Service, port), so concurrent multi-node Jobs do not collide.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = (
    REPO / ".venv" / "bin"
    if (REPO / ".venv" / "bin" / "python").exists()
    else Path(sys.executable).parent
)
PORT_FLAGS = ("--master-port", "--master_port")
PORT_ENV = ("MASTER_PORT", "PET_MASTER_PORT")
log = logging.getLogger("kubelet")
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
USER_AGENT = "node-agent"  # how the audit log tells our calls from the operator's


# --------------------------------------------------------------------------- API client


class ApiError(Exception):
    """A non-2xx answer from the API server."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Api:
    """A minimal JSON client for a Kubernetes API server (no auth: the emulator on 127.0.0.1).

    One ``requests.Session`` per thread (sessions are not thread-safe); ``trust_env`` off so no
    proxy setting of the machine can route 127.0.0.1 elsewhere.
    """

    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")
        self._local = threading.local()
        self.open_watch: requests.Response | None = None

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False
            self._local.session = session
        return session

    def request(self, method: str, path: str, body: Any = None, *, merge: bool = False) -> Any:
        headers = {
            "Content-Type": "application/merge-patch+json" if merge else "application/json",
            "User-Agent": USER_AGENT,
        }
        data = None if body is None else json.dumps(body)
        resp = self.session.request(
            method, self.server + path, data=data, headers=headers, timeout=30
        )
        if resp.status_code >= 300:
            raise ApiError(resp.status_code, resp.text)
        return resp.json() if resp.content else None

    def get(self, path: str) -> Any:
        """The object at ``path``, or None when it does not exist."""
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def abort_watch(self) -> None:
        """Unblock a watch read from another thread: shut its socket down (closing the response
        from another thread would wait on the reader's lock)."""
        resp = self.open_watch
        sock = (
            getattr(getattr(resp.raw, "connection", None), "sock", None)
            if resp is not None
            else None
        )
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def watch(
        self, path: str, resource_version: str | None, stop: threading.Event
    ) -> Iterator[dict]:
        """Watch events of ``path`` from ``resource_version`` until the stream ends or ``stop``."""
        params = {"watch": "true", "allowWatchBookmarks": "false"}
        if resource_version and resource_version.isdigit():
            params["resourceVersion"] = resource_version
        with self.session.get(
            self.server + path,
            params=params,
            stream=True,
            timeout=(10, None),
            headers={"User-Agent": USER_AGENT},
        ) as resp:
            if resp.status_code >= 300:
                raise ApiError(resp.status_code, resp.text)
            self.open_watch = resp
            for line in resp.iter_lines():
                if stop.is_set():
                    return
                if line.strip():
                    yield json.loads(line)


# --------------------------------------------------------------------------- pod launch helpers


class ConfigError(Exception):
    """A pod's configuration cannot be resolved yet (CreateContainerConfigError)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: defined vars substituted, others kept, ``$$`` -> ``$``."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


@dataclass
class HostRewriter:
    """Rewrites Service hostnames of one namespace to 127.0.0.1 (see the module docstring)."""

    namespace: str
    services: list[str]
    port_for: Callable[[str, int], int]
    touched: set[str] = field(default_factory=set)

    def _pattern(self, service: str) -> re.Pattern[str]:
        ns = re.escape(self.namespace)
        return re.compile(
            r"(?<![A-Za-z0-9.\-])(?P<pod>[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\.)?"
            + re.escape(service)
            + rf"(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?::(?P<port>\d+))?(?![A-Za-z0-9.\-])"
        )

    def rewrite(self, text: str) -> str:
        for service in self.services:
            whole = text == service

            def sub(match: re.Match[str], service: str = service, whole: bool = whole) -> str:
                port = match.group("port")
                if not (match.group("pod") or port or whole):
                    return match.group(0)  # a bare name inside a longer value: not an address
                self.touched.add(service)
                return "127.0.0.1" + (f":{self.port_for(service, int(port))}" if port else "")

            text = self._pattern(service).sub(sub, text)
        return text

    def map_port(self, value: str) -> str:
        """Map a bare port value (``--master-port``) when exactly one Service was rewritten."""
        if len(self.touched) == 1 and value.isdigit():
            return str(self.port_for(next(iter(self.touched)), int(value)))
        return value


@dataclass(frozen=True)
class PodContext:
    """Who a container runs as: what the downward API and the kubelet's naming give it."""

    namespace: str
    name: str
    hostname: str
    directory: Path
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def field_ref(self, path: str) -> str:
        """A downward-API ``fieldRef`` value."""
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
            "spec.nodeName": "executor",
        }
        if path in simple:
            return simple[path]
        match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if match:
            return (self.labels if match.group(1) == "labels" else self.annotations).get(
                match.group(2), ""
            )
        return ""


class Kubelet:
    """Resolves containers against the API server ``api`` into (argv, env, cwd) on this host."""

    def __init__(self, api: Api, workdir: Path, base_env: dict[str, str] | None = None) -> None:
        self.api = api
        self.workdir = Path(workdir)
        self.base_env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "NO_PROXY": "127.0.0.1,localhost",
            "OMP_NUM_THREADS": "1",
            **(base_env or {}),
        }
        self._lock = threading.Lock()
        self._ports: dict[tuple[str, str, int], int] = {}

    def resolve_container(
        self,
        pod: PodContext,
        pod_spec: dict[str, Any],
        container: dict[str, Any],
        env: dict[str, str] | None = None,
    ) -> tuple[list[str], dict[str, str], Path]:
        """argv, env and cwd of ``container`` as the kubelet would start it, on this machine
        (``env``: variables the platform sets first, e.g. ``JOB_COMPLETION_INDEX``).
        Raises ConfigError when a referenced Secret/ConfigMap (or key) is missing."""
        mounts = self._mounts(pod_spec, container, pod)
        env = dict(env or {})
        for source in container.get("envFrom", []):
            prefix = source.get("prefix", "")
            for kind in ("secretRef", "configMapRef"):
                if kind in source:
                    ref = source[kind]
                    data = self._data(
                        pod.namespace, kind[:-3], ref["name"], ref.get("optional", False)
                    )
                    env.update({prefix + k: v for k, v in data.items()})
        env["HOSTNAME"] = pod.hostname
        for var in container.get("env", []):
            env[var["name"]] = self._env_value(var, env, pod)
        rewriter = HostRewriter(
            pod.namespace,
            self._services(pod.namespace),
            lambda svc, port: self._port_for(pod.namespace, svc, port),
        )
        argv = [
            expand(a, env) for a in (container.get("command") or []) + (container.get("args") or [])
        ]

        def local(value: str) -> str:
            return rewriter.rewrite(_rewrite_mounts(value, mounts))

        argv = [local(a) for a in argv]
        env = {k: local(v) for k, v in env.items()}
        for i, arg in enumerate(argv):
            if arg in PORT_FLAGS and i + 1 < len(argv):
                argv[i + 1] = rewriter.map_port(argv[i + 1])
            elif arg.startswith(tuple(f + "=" for f in PORT_FLAGS)):
                flag, value = arg.split("=", 1)
                argv[i] = f"{flag}={rewriter.map_port(value)}"
        for name in PORT_ENV:  # torchrun's master port, as flag or as its PET_ variable
            if name in env:
                env[name] = rewriter.map_port(env[name])
        full_env = {**self.base_env, "HOME": str(pod.directory), **env}
        cwd = (
            Path(_rewrite_mounts(container["workingDir"], mounts))
            if container.get("workingDir")
            else pod.directory
        )
        cwd.mkdir(parents=True, exist_ok=True)
        return argv, full_env, cwd

    def _env_value(self, var: dict[str, Any], env: dict[str, str], pod: PodContext) -> str:
        if "value" in var:
            return expand(str(var["value"]), env)
        source = var.get("valueFrom") or {}
        for kind in ("secretKeyRef", "configMapKeyRef"):
            if kind in source:
                ref = source[kind]
                optional = bool(ref.get("optional", False))
                data = self._data(pod.namespace, kind[: -len("KeyRef")], ref["name"], optional)
                if ref["key"] not in data:
                    if optional:
                        return ""
                    what = "Secret" if kind == "secretKeyRef" else "ConfigMap"
                    raise ConfigError(
                        f"couldn't find key {ref['key']} in {what} {pod.namespace}/{ref['name']}"
                    )
                return data[ref["key"]]
        if "fieldRef" in source:
            return pod.field_ref(source["fieldRef"]["fieldPath"])
        return ""

    def _data(self, namespace: str, kind: str, name: str, optional: bool) -> dict[str, str]:
        """String data of a Secret (base64-decoded) or ConfigMap; ConfigError when missing."""
        plural = "secrets" if kind == "secret" else "configmaps"
        obj = self.api.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        if obj is None:
            if optional:
                return {}
            raise ConfigError(f'{kind} "{name}" not found')
        data = (
            {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            if kind == "secret"
            else dict(obj.get("data") or {})
        )
        data.update(obj.get("stringData") or {})  # in case the server did not fold it into data
        return data

    def _services(self, namespace: str) -> list[str]:
        listing = self.api.get(f"/api/v1/namespaces/{namespace}/services") or {}
        names = [s["metadata"]["name"] for s in listing.get("items", [])]
        return sorted(names, key=len, reverse=True)  # longest first: no prefix shadowing

    def _port_for(self, namespace: str, service: str, port: int) -> int:
        with self._lock:
            return self._ports.setdefault((namespace, service, port), free_port())

    def _mounts(
        self, pod_spec: dict[str, Any], container: dict[str, Any], pod: PodContext
    ) -> dict[str, Path]:
        """mountPath -> local directory, with secret/configMap volume files written."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            path = mount["mountPath"].rstrip("/") or "/"
            if path == "/dev/shm":
                continue
            volume = volumes.get(mount["name"], {})
            if "persistentVolumeClaim" in volume:
                local = (
                    self.workdir
                    / pod.namespace
                    / "_pvc"
                    / volume["persistentVolumeClaim"]["claimName"]
                )
            else:
                local = pod.directory / "volumes" / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            for kind, key in (("secret", "secretName"), ("configMap", "name")):
                if kind in volume:
                    ref = volume[kind]
                    for item, value in self._data(
                        pod.namespace, kind, ref[key], ref.get("optional", False)
                    ).items():
                        (local / item).write_text(value)
            mounts[path] = local / mount["subPath"] if mount.get("subPath") else local
        return mounts


def _rewrite_mounts(value: str, mounts: dict[str, Path]) -> str:
    """Replace a mount path by its local directory where it starts the value or follows ``=``
    (``/cache/x``, ``--cache-dir=/cache``); longest mount path first."""
    for path in sorted(mounts, key=len, reverse=True):
        pattern = r"(?:^|(?<==))" + re.escape(path) + r"(?=/|$)"
        local = str(mounts[path]).replace("\\", "\\\\")  # a replacement string, not a function
        value = re.sub(pattern, local, value)
    return value
