"""Real servers for tests: moto (S3) and an MLflow tracking server, on 127.0.0.1 only.

Session-scoped because starting them costs seconds (MLflow ~6 s); each test isolates itself with
a fresh bucket (``s3_bucket``) or its own experiment/run names. The MLflow server can be stopped
and restarted on the same port and database so outage tests can take it down mid-run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "MlflowAuthServer",
    "MlflowServer",
    "S3Faults",
    "free_port",
    "mlflow_auth_server",
    "mlflow_server",
    "moto_server",
    "s3_bucket",
    "s3_client_for",
]

MLFLOW_ARTIFACT_BUCKET = "mlflow-artifacts"


def free_port() -> int:
    """A port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Poll ``url`` until it answers; fail early (with the log tail) if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout}s:\n{_tail(log)}")


def _tail(log: Path, n: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a server started with ``start_new_session``: its workers live in the same group."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
    try:
        proc.wait(timeout=grace or 5.0)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace)
    # Children that outlived the parent (same group) get the same treatment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def moto_process(log: Path) -> Iterator[str]:
    """A moto S3 server on a free port of 127.0.0.1 (output in `log`); yields its endpoint URL."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_http(f"{endpoint}/moto-api/", proc, 30, log)
        yield endpoint
    finally:
        _stop_group(proc)


def moto_environment(endpoint: str, scratch: Path) -> dict[str, str | None]:
    """The AWS variables that point this process's S3 clients at `endpoint` (None: unset)."""
    missing = str(scratch / "no-aws-config")
    return {
        "AWS_PROFILE": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_ENDPOINT_URL": None,
        "AWS_CONFIG_FILE": missing,
        "AWS_SHARED_CREDENTIALS_FILE": missing,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server; yields its endpoint URL and points the AWS env vars at it."""
    scratch = tmp_path_factory.mktemp("moto")
    with moto_process(scratch / "moto.log") as endpoint, pytest.MonkeyPatch.context() as mp:
        for name, value in moto_environment(endpoint, scratch).items():
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        yield endpoint


def _start_mlflow(
    argv: list[str],
    env: dict[str, str],
    workdir: Path,
    log: Path,
    uri: str,
    timeout: float,
) -> subprocess.Popen[bytes]:
    """Start an `mlflow server` in its own process group, logging to `log`, and wait for its
    /health; one that does not come up is stopped (its whole group) and the error raised."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    try:
        _wait_http(f"{uri}/health", proc, timeout, log)
    except Exception:
        _stop_group(proc)
        raise
    return proc


def s3_client_for(endpoint: str) -> Any:
    """A plain boto3 S3 client for ``endpoint`` (test setup and inspection, no retries)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(moto_server: str) -> str:
    """A fresh, empty bucket for one test; yields ``s3://<name>``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client_for(moto_server).create_bucket(Bucket=name)
    return f"s3://{name}"


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: object) -> Iterator[bytes]:
        yield self._data


class S3Faults:
    """Make the next ``failures`` S3 requests of a boto3 client fail, then let requests through.

    Hooks botocore's ``before-send`` event, so the failure happens where a real one would (inside
    botocore's retry loop and the transfer manager's threads). ``kind``: ``"503"`` (a
    ServiceUnavailable response), ``"connection"`` (EndpointConnectionError) or ``"403"``
    (AccessDenied, not transient). ``operations`` limits injection to those operation names.
    Use as a context manager; ``injected`` counts failures actually served, ``calls`` every request.
    """

    def __init__(
        self,
        client: object,
        failures: int,
        kind: str = "503",
        operations: tuple[str, ...] | None = None,
    ) -> None:
        self.client, self.remaining, self.kind, self.operations = client, failures, kind, operations
        self.injected = 0
        self.calls: list[str] = []

    def __enter__(self) -> S3Faults:
        self.client.meta.events.register("before-send.s3", self._hook)  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.meta.events.unregister("before-send.s3", self._hook)  # type: ignore[attr-defined]

    def _hook(self, request: object, event_name: str = "", **_: object) -> object:
        from botocore.awsrequest import AWSResponse
        from botocore.exceptions import EndpointConnectionError

        op = event_name.rsplit(".", 1)[-1]
        self.calls.append(op)
        if self.remaining <= 0 or (self.operations and op not in self.operations):
            return None
        self.remaining -= 1
        self.injected += 1
        url = getattr(request, "url", "")
        if self.kind == "connection":
            raise EndpointConnectionError(endpoint_url=url)
        status, code = (403, "AccessDenied") if self.kind == "403" else (503, "ServiceUnavailable")
        body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        return AWSResponse(url, status, {"Content-Type": "application/xml"}, _Body(body))


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, artifacts proxied to S3 on moto).

    ``stop()`` kills its whole process group; ``start()`` brings it back on the same port and
    database, so tests can simulate an outage in the middle of a run.
    """

    def __init__(self, workdir: Path, s3_endpoint: str, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "mlflow.db"
        self.log = workdir / "mlflow-server.log"
        self.s3_endpoint = s3_endpoint
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 90.0) -> None:
        if self.running:
            return
        env = dict(os.environ)
        env.update(
            MLFLOW_S3_ENDPOINT_URL=self.s3_endpoint,
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            PYTHONUNBUFFERED="1",
        )
        argv = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.db}",
            "--artifacts-destination", f"s3://{MLFLOW_ARTIFACT_BUCKET}/mlflow",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip # argv: a flag beside its value
        self._proc = _start_mlflow(argv, env, self.workdir, self.log, self.uri, timeout)

    def stop(self, crash: bool = False) -> None:
        """Stop the server; ``crash=True`` SIGKILLs it (an outage, and faster than shutdown)."""
        if self._proc is not None:
            _stop_group(self._proc, grace=0.0 if crash else 5.0)
            self._proc = None


@pytest.fixture(scope="session")
def mlflow_server(
    moto_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """One MLflow server for the session; tests that stop it must start it again."""
    with contextlib.suppress(Exception):
        s3_client_for(moto_server).create_bucket(Bucket=MLFLOW_ARTIFACT_BUCKET)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), moto_server)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class MlflowAuthServer:
    """A real ``mlflow server --app-name basic-auth`` (sqlite backend and user store, local
    artifacts): every request needs HTTP basic auth; users other than the admin read everything
    (``default_permission = READ``) and write only what they created or were granted."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "mlflow-auth-server.log"
        self.admin = ("admin", f"admin-{uuid.uuid4().hex}")
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        ini = self.workdir / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.workdir / 'auth.db'}\n"
            f"admin_username = {self.admin[0]}\n"
            f"admin_password = {self.admin[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # a password check is a PBKDF2 hash (~1 s on a loaded 2-core machine): checked once
            # per user and minute, as a busy production server would configure it
            "auth_cache_ttl_seconds = 60\n"
        )
        env = dict(os.environ)
        for var in (
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
        ):
            env.pop(var, None)  # the server's own client settings are not the test's
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_FLASK_SERVER_SECRET_KEY=uuid.uuid4().hex,  # CSRF of the auth app's forms
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            PYTHONUNBUFFERED="1",
        )
        argv = [
            sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination", str(self.workdir / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip # argv: a flag beside its value
        self._proc = _start_mlflow(argv, env, self.workdir, self.log, self.uri, timeout)

    def stop(self) -> None:
        if self._proc is not None:
            _stop_group(self._proc, grace=0.0)
            self._proc = None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """An admin call to the REST API (user and permission management, inspection)."""
        import base64
        import json

        token = base64.b64encode(":".join(self.admin).encode()).decode()
        req = urllib.request.Request(
            f"{self.uri}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read()
        return json.loads(text) if text.strip() else {}

    def add_user(self, name: str) -> tuple[str, str]:
        """A new user with a random password; returns (username, password)."""
        password = f"pw-{uuid.uuid4().hex}"
        self.request(
            "POST", "/api/2.0/mlflow/users/create", {"username": name, "password": password}
        )
        return name, password

    def grant(self, experiment_id: str, user: str, permission: str = "EDIT") -> None:
        self.request(
            "POST",
            "/api/3.0/mlflow/users/permissions/grant",
            {
                "username": user,
                "resource_type": "experiment",
                "resource_id": experiment_id,
                "permission": permission,
            },
        )


@pytest.fixture(scope="session")
def mlflow_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowAuthServer]:
    """One MLflow server with basic auth for the session; tests add their own users."""
    server = MlflowAuthServer(tmp_path_factory.mktemp("mlflow-auth"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
