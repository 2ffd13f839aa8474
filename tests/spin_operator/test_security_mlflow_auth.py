"""MLflow with authentication (docs/security.md, threats 1 and 3): a real `mlflow server
--app-name basic-auth` on 127.0.0.1. The operator logs with its own credentials (the chart's
Secret, in its environment); the run's Jobs log with the run's `spec.tracking.credentialsSecret`,
resolved by the kubelet stand-in from the namespace's Secret. Refused operator credentials give a
condition naming the Secret they come from, and no credential value reaches the status, the
events, the operator's log or MLflow's params and tags."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.kubelet import Api, Kubelet, PodContext
from tests.spin_operator.operator_harness import (
    NS,
    Cluster,
    OperatorProcess,
    emulated_cluster,
    spinrun,
)
from tests.support.servers import MlflowAuthServer

OPERATOR_SECRET = "spin-mlflow"  # the chart's tracking.credentialsSecret (its name only)
TEAM_SECRET = "team-mlflow"


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with emulated_cluster(tmp_path, monkeypatch.setenv) as cluster:
        yield cluster


def _secret(name: str, user: str, password: str) -> dict[str, object]:
    data = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _operator(
    monkeypatch: pytest.MonkeyPatch, cluster: Cluster, auth: MlflowAuthServer, password: str
) -> OperatorProcess:
    """The operator as the chart starts it: its own MLflow user in its environment."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "spin-operator")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    from spin_operator.track import Tracking

    return OperatorProcess(
        cluster.settings(mlflow_uri=auth.uri, mlflow_secret=OPERATOR_SECRET),
        # generous: each authenticated request takes ~1 s on a loaded 2-core machine and the
        # parent run is a handful of them; a timeout here would leave the first Job untracked
        tracking=Tracking(timeout=120, cooldown=0.5),
    )


@pytest.fixture(scope="module")
def operator_user(mlflow_auth_server: MlflowAuthServer) -> str:
    return mlflow_auth_server.add_user("spin-operator")[1]


async def _wait_job(cluster: Cluster, run: str) -> dict[str, object]:
    """The run's first Job (created once the operator's MLflow calls answered or gave up: each
    authenticated request of this server takes ~1 s on a loaded machine)."""

    async def probe() -> dict[str, object] | None:
        return next(iter(await cluster.jobs(run)), None)

    return await cluster.wait(f"{run}'s first Job", probe, timeout=240)


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


async def test_operator_and_jobs_log_with_their_own_credentials(
    cluster: Cluster,
    mlflow_auth_server: MlflowAuthServer,
    operator_user: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    auth = mlflow_auth_server
    team_user, team_password = auth.add_user(f"team-a-{uuid.uuid4().hex[:6]}")
    await cluster.api.acreate(_secret(TEAM_SECRET, team_user, team_password))
    caplog.set_level(logging.DEBUG, logger="spin_operator")
    caplog.set_level(logging.DEBUG, logger="spin_runtime")
    op = await _operator(monkeypatch, cluster, auth, operator_user).start()
    name = f"authed-{uuid.uuid4().hex[:6]}"
    try:
        await cluster.api.acreate(
            spinrun(name, tracking={"credentialsSecret": {"name": TEAM_SECRET}})
        )
        # the generation Job (the check Job before it logs nothing to MLflow: no credentials)
        job = await cluster.wait_job(name, f"{name}-i0-gen", timeout=240)
        status = await cluster.status(name)
        events = await cluster.events(name)
    finally:
        await op.stop()
    parent = status["mlflow"]["runId"]
    iteration = status["iterations"][0]["mlflowRunId"]
    got = auth.request("GET", f"/api/2.0/mlflow/runs/get?run_id={parent}")["run"]
    experiment = auth.request(
        "GET", f"/api/2.0/mlflow/experiments/get?experiment_id={got['info']['experiment_id']}"
    )["experiment"]
    assert experiment["name"] == NS  # created by the operator's user, confined to the namespace

    # The Job's pod gets the run's credentials from the namespace's Secret, never the operator's:
    pod_spec = job["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if e["name"].startswith("MLFLOW_TRACKING_") and "valueFrom" in e
    }
    assert refs == dict.fromkeys(
        ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"),
        TEAM_SECRET,
    )
    pod = PodContext(NS, f"{name}-pod", f"{name}-pod", tmp_path / "pod")
    pod.directory.mkdir()
    _argv, env, cwd = Kubelet(Api(cluster.api.url), tmp_path / "kubelet").resolve_container(
        pod, pod_spec, container
    )
    assert env["MLFLOW_TRACKING_USERNAME"] == team_user and env["MLFLOW_RUN_ID"] == iteration
    # The team may write its namespace's experiment: the admin grants it, as MLflow's auth wants.
    auth.grant(got["info"]["experiment_id"], team_user)
    logged = _log_as_pod(env, cwd, {"probe": 1.5})
    assert logged.returncode == 0, logged.stderr
    metrics = auth.request("GET", f"/api/2.0/mlflow/runs/get?run_id={iteration}")["run"]["data"]
    assert {m["key"]: m["value"] for m in metrics.get("metrics", [])}.get("probe") == 1.5, (
        logged.stderr
    )

    # No credential value anywhere the operator writes, nor in MLflow's params and tags.
    secrets = [operator_user, team_password]
    mlflow_data = [
        auth.request("GET", f"/api/2.0/mlflow/runs/get?run_id={r}")["run"]["data"]
        for r in (parent, iteration)
    ]
    for what, text in {
        "status": json.dumps(status),
        "events": json.dumps(events),
        "operator log": caplog.text,
        "MLflow params/tags": json.dumps(
            [d.get(k) for d in mlflow_data for k in ("params", "tags")]
        ),
    }.items():
        assert not _leaks(text, secrets), f"a credential value is in the {what}"


def _log_as_pod(
    env: dict[str, str], cwd: Path, metrics: dict[str, float]
) -> subprocess.CompletedProcess[str]:
    """What a runtime process of the Job does with its environment: log through MLflow."""
    code = (
        "import json, sys\n"
        "from spin_common.tracking import from_env_logger\n"
        "log = from_env_logger()\n"
        "log.log_metrics(json.loads(sys.argv[1]))\n"
        "print(log.close() or '')\n"
    )
    env = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "SPIN_TRACKING_SPOOL_DIR": str(cwd)}
    return subprocess.run(
        [sys.executable, "-c", code, json.dumps(metrics)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_refused_operator_credentials_give_a_condition_naming_their_secret(
    cluster: Cluster,
    mlflow_auth_server: MlflowAuthServer,
    operator_user: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    # the chart's Secret also exists in each namespace with runs (the Jobs' default credentials)
    await cluster.api.acreate(_secret(OPERATOR_SECRET, "spin-operator", wrong))
    caplog.set_level(logging.DEBUG, logger="spin_operator")
    caplog.set_level(logging.DEBUG, logger="spin_runtime")
    op = await _operator(monkeypatch, cluster, mlflow_auth_server, wrong).start()
    name = f"refused-{uuid.uuid4().hex[:6]}"
    try:
        await cluster.api.acreate(spinrun(name))
        job = await _wait_job(cluster, name)  # MLflow never holds the run up

        async def refused() -> dict[str, str] | None:
            found = [
                c
                for c in (await cluster.status(name)).get("conditions") or []
                if c["type"] == "TrackingUnavailable" and c["status"] == "True"
            ]
            return found[0] if found else None

        condition = await cluster.wait("TrackingUnavailable", refused, timeout=60)
        status, events = await cluster.status(name), await cluster.events(name)
        # The admin fixes the chart's Secret (here: the operator's environment); the next step's
        # start creates the MLflow runs and clears the condition.
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", operator_user)
        tracking = op.controller.tracking if op.controller else None
        assert tracking is not None

        async def cooled_down() -> bool:  # calls to a refusing MLflow pause for the cool-down
            return tracking.down_for(mlflow_auth_server.uri) == 0

        await cluster.wait("the MLflow cool-down", cooled_down)
        await cluster.complete(job)

        async def cleared() -> bool:
            st = await cluster.status(name)
            conds = {c["type"]: c for c in st.get("conditions") or []}
            return conds["TrackingUnavailable"]["status"] == "False" and bool(
                (st.get("mlflow") or {}).get("runId")
            )

        await cluster.wait("the condition to clear", cleared, timeout=60)
    finally:
        await op.stop()
    assert condition["reason"] == "CredentialsRefused"
    message = condition["message"]
    assert "HTTP 401" in message and f"Secret {OPERATOR_SECRET!r}" in message, message
    assert "tracking.credentialsSecret" in message, message
    assert status.get("mlflow") is None  # nothing half-recorded
    for what, text in {
        "status": json.dumps(status),
        "events": json.dumps(events),
        "operator log": caplog.text,
    }.items():
        assert wrong not in text and operator_user not in text, f"a password is in the {what}"
    assert "Traceback" not in caplog.text


def test_a_pod_with_refused_credentials_spools_its_calls_and_names_no_secret(
    mlflow_auth_server: MlflowAuthServer, tmp_path: Path
) -> None:
    """The run's own credentials refused (a wrong Secret in the namespace): the step does not fail,
    its calls are kept in the spool for the operator's replay instead of being dropped as
    rejected, and what it prints names the refusal but not the password."""
    auth = mlflow_auth_server
    user, password = auth.add_user(f"team-b-{uuid.uuid4().hex[:6]}")
    exp = auth.request("POST", "/api/2.0/mlflow/experiments/create", {"name": f"x-{user}"})
    run = auth.request(
        "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": exp["experiment_id"]}
    )["run"]["info"]["run_id"]
    wrong = f"not-{password}"
    env = {
        "PATH": "/usr/bin:/bin",
        "MLFLOW_TRACKING_URI": auth.uri,
        "MLFLOW_RUN_ID": run,
        "MLFLOW_TRACKING_USERNAME": user,
        "MLFLOW_TRACKING_PASSWORD": wrong,
    }
    done = _log_as_pod(env, tmp_path, {"probe": 2.0})
    assert done.returncode == 0, done.stderr
    spooled = done.stdout.strip()
    assert spooled and Path(spooled).exists(), done.stderr
    assert "probe" in Path(spooled).read_text()
    assert "401" in done.stderr, done.stderr
    assert wrong not in done.stderr + done.stdout + Path(spooled).read_text()
