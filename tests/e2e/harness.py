"""The end-to-end harness: an emulated cluster with the real operator, kubectl, S3 and MLflow.

What runs, and how it is wired (docs/benchmarks.md "End to end" has the timings):

- the API server: ``tests/support/k8s_emulator.py`` (``k8s_api``), with the SPINRun CRD;
- the kubelet and Job controller: ``tests/support/executor.py``: Job pods are local process
  groups running the repository's virtualenv (``python -m spin_runtime ...``, ``torchrun``);
- the operator: the chart's Deployment rendered by ``helm template`` with the suite's values, its
  container started like a pod by the executor (same env resolution: the chart's
  ``secretKeyRef``s are read from Secrets in the emulator), plus ``KUBECONFIG`` because there is
  no service-account token outside a cluster;
- S3: moto (``moto_server``); MLflow: a real ``mlflow server`` (``mlflow_server``), both from
  ``tests/support/servers.py``;
- the user: ``.tools/bin/kubectl --kubeconfig K`` (``apply --validate=false``, ``get``).

Each test gets its own namespace, so its run prefix ``s3://spin-e2e/runs/<namespace>/<name>`` and
its MLflow experiment (named after the namespace) never meet another test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from tests.support import job_driver as driver
from tests.support.executor import Executor, PodLaunch
from tests.support.k8s_emulator import K8sApi
from tests.support.kubelet import VENV_BIN, PodContext
from tests.support.servers import free_port

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
KUBECTL = REPO / ".tools" / "bin" / "kubectl"
HELM = REPO / ".tools" / "bin" / "helm"
CHART = REPO / "charts" / "spin-operator"
EXAMPLE = REPO / "examples" / "04-e2e.yaml"
STANDIN = Path(__file__).with_name("standin.py")
RELEASE_NAMESPACE = "spin-system"
BUCKET = "spin-e2e"
MODEL_URI = f"s3://{BUCKET}/models/tiny"
DATASET_URI = f"s3://{BUCKET}/data/task.jsonl"
STORAGE_URI = f"s3://{BUCKET}/runs"
S3_SECRET = "spin-e2e-s3"
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
OPERATOR_AGENTS = ("kopf", "spin-operator")
TERMINAL = ("Succeeded", "Failed")


def wait_for(
    probe: Callable[[], T | Literal[False] | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll ``probe`` until it returns something truthy; its value is returned.

    Polling (not sleeping for a guessed duration): the test ends as soon as the state is reached,
    and a timeout names what never happened, with the last value seen.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """The condition ``kind`` of an object's status when it is True, else None."""
    found = driver.condition(obj or {}, kind)
    return dict(found) if found and found.get("status") == "True" else None


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------- kubectl


@dataclass
class Kubectl:
    """The real kubectl binary against the emulator (what a user types)."""

    kubeconfig: Path

    def __call__(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json").stdout)


# --------------------------------------------------------------------------- the operator


def render_operator(values: dict[str, str]) -> dict[str, Any]:
    """The chart's operator Deployment for ``values`` (``helm template``, offline)."""
    argv = [str(HELM), "template", "spin", str(CHART), "--namespace", RELEASE_NAMESPACE]
    for key, value in values.items():
        argv += ["--set-string" if key.endswith(("uri", "endpoint")) else "--set", f"{key}={value}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    for doc in yaml.safe_load_all(out):
        if doc and doc.get("kind") == "Deployment":
            return dict(doc)
    raise AssertionError("the chart rendered no Deployment")


class OperatorProcess:
    """``spinctl operator`` started as the chart's Deployment starts it; killable and restartable.

    The process runs in its own process group; ``kill()`` is SIGKILL (a node loss or OOM: no
    cleanup), ``stop()`` is SIGTERM then SIGKILL, as Kubernetes stops a pod.
    """

    def __init__(
        self, executor: Executor, api: K8sApi, values: dict[str, str], workdir: Path
    ) -> None:
        self.executor, self.api, self.values = executor, api, values
        self.workdir = workdir
        self.log = workdir / "operator.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 90.0) -> None:
        """Start and wait until it watches SPINRuns and Jobs (so an apply right after is seen)."""
        deployment = render_operator(self.values)
        pod_spec = deployment["spec"]["template"]["spec"]
        container = pod_spec["containers"][0]
        self.starts += 1
        name = f"{deployment['metadata']['name']}-{secrets.token_hex(4)}"
        context = PodContext(
            RELEASE_NAMESPACE,
            name,
            name,
            self.workdir / f"operator-{self.starts}",
            dict(deployment["spec"]["template"]["metadata"].get("labels") or {}),
        )
        argv, env, cwd = self.executor.kubelet.resolve_container(context, pod_spec, container)
        env["KUBECONFIG"] = str(self.api.kubeconfig_path)
        watches_before = self._watches()
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts}: {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = self.proc
        wait_for(
            lambda: proc.poll() is not None or self._watches() >= watches_before + 2,
            timeout,
            "the operator to watch SPINRuns and Jobs",
        )
        if proc.poll() is not None:
            raise AssertionError(f"the operator exited ({proc.returncode}):\n{tail(self.log)}")

    def _watches(self) -> int:
        return sum(
            self.api.requests.count(user_agent=agent, verb="watch", resource=resource)
            for agent in OPERATOR_AGENTS
            for resource in ("spinruns", "jobs")
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the operator's process group (no graceful shutdown)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


# --------------------------------------------------------------------------- the cluster


@dataclass
class Cluster:
    """One test's cluster: API server, executor, operator, kubectl, its namespace."""

    api: K8sApi
    executor: Executor
    operator: OperatorProcess
    kubectl: Kubectl
    namespace: str
    workdir: Path
    s3_endpoint: str
    mlflow_uri: str
    timings: dict[str, float] = field(default_factory=dict)

    def create_namespace(self, name: str, *, secret: bool = True) -> None:
        """A namespace with the S3 credentials Secret the example references."""
        self.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if secret:
            self.create_s3_secret(name)

    def create_s3_secret(self, namespace: str) -> None:
        """``kubectl create secret generic`` rendered client-side, then applied: imperative
        ``create`` sends protobuf for core types, which the emulator cannot decode."""
        literals = [f"--from-literal={k}={v}" for k, v in S3_CREDENTIALS.items()]
        rendered = self.kubectl(
            "create",
            "secret",
            "generic",
            S3_SECRET,
            "-n",
            namespace,
            *literals,
            "--dry-run=client",
            "-o",
            "json",
        ).stdout
        self.kubectl("apply", "--validate=false", "-f", "-", stdin=rendered)

    def apply(
        self, path: Path = EXAMPLE, namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply --validate=false -f path`` (the emulator serves no /openapi)."""
        return self.kubectl(
            "apply", "--validate=false", "-n", namespace or self.namespace, "-f", str(path)
        )

    def run(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        return self.api.get("spinruns", name, namespace or self.namespace) or {}

    def wait_run(
        self,
        name: str,
        timeout: float,
        phases: tuple[str, ...] = TERMINAL,
        namespace: str | None = None,
        what: str = "",
    ) -> dict[str, Any]:
        """Poll the SPINRun until its phase is one of ``phases``; on timeout, fail with the whole
        picture (status, Jobs, pods and their logs, the operator's log)."""
        try:
            return wait_for(
                lambda: (
                    (r := self.run(name, namespace)).get("status", {}).get("phase") in phases and r
                ),
                timeout,
                what or f"{name} to reach {'/'.join(phases)}",
                interval=0.25,
            )
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics(name, namespace)}") from None

    def wait_stage(self, name: str, iteration: int, stage: str, timeout: float) -> dict[str, Any]:
        """Until the run is at ``iteration``/``stage`` (``Generating``, ``Training``, ...)."""

        def at() -> dict[str, Any] | None:
            status = self.run(name).get("status") or {}
            return (
                status
                if (status.get("iteration"), status.get("stage")) == (iteration, stage)
                else None
            )

        try:
            return wait_for(at, timeout, f"{name} at iteration {iteration} {stage}", interval=0.1)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics(name)}") from None

    def jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.api.list("jobs", namespace or self.namespace)

    def job_creations(self, namespace: str | None = None) -> list[str]:
        """Names of Jobs the operator successfully created (request log), in order."""
        ns = namespace or self.namespace
        return [
            e.name or ""
            for e in self.api.requests.entries()
            if e.verb == "create"
            and e.resource == "jobs"
            and e.code == 201
            and e.namespace == ns
            and e.user_agent.startswith(OPERATOR_AGENTS)
        ]

    def diagnostics(self, name: str | None = None, namespace: str | None = None) -> str:
        ns = namespace or self.namespace
        lines = []
        if name:
            lines.append("status: " + json.dumps(self.run(name, ns).get("status"), indent=1)[:4000])
        for job in self.jobs(ns):
            lines.append(f"job {job['metadata']['name']}: {json.dumps(job.get('status'))[:600]}")
        for pod in self.executor.pods(namespace=ns):
            lines.append(f"pod {pod.name} {pod.phase} exit={pod.exit_code} {pod.reason}")
            if pod.phase == "Failed" or pod.exit_code not in (0, None):
                lines.append("  log: " + pod.log()[-1500:].replace("\n", "\n  "))
        lines.append("operator log:\n" + tail(self.operator.log, 6000))
        return "\n".join(lines)


def spinrun_file(directory: Path, name: str = "e2e", **changes: Any) -> Path:
    """examples/04-e2e.yaml with ``changes`` (dotted paths, e.g. ``spec.iterations=1``, given as
    ``spec__iterations=1``) written to ``directory/<name>.yaml`` for ``kubectl apply``."""
    obj = yaml.safe_load(EXAMPLE.read_text())
    obj["metadata"]["name"] = name
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = obj
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def quick_pods(launch: PodLaunch) -> None:
    """Executor launch hook: run tests/e2e/standin.py (writes the step's artifacts, manifests
    last, in seconds) instead of the real step; the original argv follows it."""
    launch.argv = [str(VENV_BIN / "python"), str(STANDIN), *launch.argv]


def new_namespace() -> str:
    return f"e2e-{secrets.token_hex(3)}"


@contextlib.contextmanager
def cluster(
    api: K8sApi,
    workdir: Path,
    s3_endpoint: str,
    mlflow_uri: str,
    executor_options: dict[str, Any] | None = None,
    operator_values: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """Executor + operator (from the chart) + kubectl on ``api``, with a fresh namespace."""
    values = {
        "storage.endpoint": s3_endpoint,
        "storage.region": "us-east-1",
        "storage.credentialsSecret": S3_SECRET,
        "storage.uri": STORAGE_URI,
        "tracking.uri": mlflow_uri,
        "health.port": str(free_port()),
        "metrics.port": str(free_port()),
        "logLevel": "INFO",
        **(operator_values or {}),
    }
    namespace = new_namespace()
    # cluster-wide mode reads Secrets only where granted per namespace (docs/security.md)
    values.setdefault("rbac.secretCheckNamespaces[0]", namespace)
    options = {"backoff_s": 0.5, "grace_s": 2.0, **(executor_options or {})}
    with Executor(api.url, workdir / "pods", **options) as executor:
        kubectl = Kubectl(api.kubeconfig_path)
        operator = OperatorProcess(executor, api, values, workdir)
        c = Cluster(api, executor, operator, kubectl, namespace, workdir, s3_endpoint, mlflow_uri)
        c.create_namespace(RELEASE_NAMESPACE)  # the operator's own S3 credentials (chart env)
        c.create_namespace(c.namespace)
        started = time.monotonic()
        operator.start()
        c.timings["operator_start_s"] = time.monotonic() - started
        try:
            yield c
        finally:
            operator.stop()
    assert not executor.errors, "executor errors:\n" + "\n".join(executor.errors)


# --------------------------------------------------------------------------- S3 and MLflow facts


def upload_inputs(model_dir: Path, dataset: Path) -> None:
    """The tiny model (with its manifest, as the runtime expects of s3:// models) and the task."""
    from spin_runtime import manifest, storage

    if not manifest.is_complete(MODEL_URI):
        manifest.write_dir_artifact(
            model_dir, MODEL_URI, "model", {"source": "tests/support/tiny.py"}
        )
    if not storage.exists(DATASET_URI):
        storage.upload_file(dataset, DATASET_URI)


def artifact_stamps(prefix: str) -> dict[str, str]:
    """Every manifest under ``prefix`` -> its ``createdAt``: a step redone would change one."""
    from spin_runtime import storage

    stamps = {}
    for name in storage.list_files(prefix):
        if name.endswith(("_MANIFEST.json", ".manifest.json")):
            uri = storage.join(prefix, name)
            stamps[name] = json.loads(storage.read_text(uri)).get("createdAt", "")
    return stamps
