"""What every test of the real-control-plane tier shares: where things are, the example run,
kubectl, polling, and the facts read back from S3 and MLflow.

Each test gets its own namespace, so its run prefix ``s3://spin-e2e/runs/<namespace>/<name>`` and
its MLflow experiment (named after the namespace) never meet another test's.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import yaml

from tests.cluster.kubelet import VENV_BIN
from tests.support.servers import free_port

__all__ = ["VENV_BIN", "free_port"]  # re-exported: the tests' launch hooks and chart values

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
    for found in ((obj or {}).get("status") or {}).get("conditions") or []:
        if found.get("type") == kind and found.get("status") == "True":
            return dict(found)
    return None


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


@dataclass
class Kubectl:
    """The real kubectl binary with an administrator's kubeconfig (what a user types)."""

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


def new_namespace() -> str:
    return f"e2e-{secrets.token_hex(3)}"


# --------------------------------------------------------------------------- S3 and MLflow facts


def upload_inputs(model_dir: Path, dataset: Path) -> None:
    """The tiny model (with its manifest, as the runtime expects of s3:// models) and the task."""
    from spin_common import manifest, storage

    if not manifest.is_complete(MODEL_URI):
        manifest.write_dir_artifact(
            model_dir, MODEL_URI, "model", {"source": "tests/support/tiny.py"}
        )
    if not storage.exists(DATASET_URI):
        storage.upload_file(dataset, DATASET_URI)


def artifact_stamps(prefix: str) -> dict[str, str]:
    """Every manifest under ``prefix`` -> its ``createdAt``: a step redone would change one."""
    from spin_common import storage

    stamps = {}
    for name in storage.list_files(prefix):
        if name.endswith(("_MANIFEST.json", ".manifest.json")):
            uri = storage.join(prefix, name)
            stamps[name] = json.loads(storage.read_text(uri)).get("createdAt", "")
    return stamps


class RunView(Protocol):
    """What ``check_mlflow`` reads of a test's cluster."""

    mlflow_uri: str
    namespace: str

    def run(self, name: str, namespace: str | None = None) -> dict[str, Any]: ...


def check_mlflow(c: RunView, name: str, run: dict[str, Any]) -> None:
    """The finished run's MLflow side: parent and iteration runs FINISHED, metrics, datasets,
    a model version per iteration, nothing left in the spool."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=c.mlflow_uri)
    status = run["status"]
    parent_id = status["mlflow"]["runId"]
    iteration_ids = {it["mlflowRunId"] for it in status["iterations"]}
    # run ends follow the Succeeded status (MLflow never holds the phase up): wait for the status
    # to record MLflow's confirmation, with a deadline, instead of reading MLflow at once
    wait_for(
        lambda: (
            set((c.run(name).get("status", {}).get("mlflow") or {}).get("finished") or [])
            >= iteration_ids | {parent_id}
        ),
        60,
        "status.mlflow.finished to hold the parent and iteration runs",
    )
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert c.run(name)["status"]["mlflow"]["spooledCalls"] == 0
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == c.namespace
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    child_ids = {child.info.run_id for child in children}
    assert iteration_ids <= child_ids and len(iteration_ids) == len(status["iterations"]), (
        iteration_ids,
        child_ids,
    )
    iteration_runs = [child for child in children if child.info.run_id in iteration_ids]
    for child in iteration_runs:
        assert child.data.metrics, f"iteration run {child.info.run_id} has no metrics"
    # registration runs in the background after the evaluation's status: polled, not asserted
    wait_for(
        lambda: (
            {v.run_id for v in client.search_model_versions(f"name = '{c.namespace}.{name}'")}
            >= iteration_ids
        ),
        60,
        "a model version for each iteration run",
    )
    for child in iteration_runs:
        assert child.info.status == "FINISHED"
    logged = {
        child.info.run_id: [
            d.dataset.name for d in (child.inputs.dataset_inputs if child.inputs else [])
        ]
        for child in iteration_runs
    }
    assert all(logged.values()), f"iteration runs without MLflow dataset inputs: {logged}"
