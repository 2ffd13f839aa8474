"""Threats 1, 2, 3 and 7 of docs/security.md against the real kopf operator (emulated API server):
a SPINRun naming an endpoint, an MLflow name or a ServiceAccount the admin did not allow is refused
with a condition naming the field, and a capture server on 127.0.0.1 standing for the author's
endpoints receives none of the operator's credentials. The control runs allow-list the same
capture server and show that it does see them then (so the refusal, not the setup, keeps them
away)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spin_operator.policy import Policy
from tests.spin_operator.operator_harness import (
    NS,
    Cluster,
    OperatorProcess,
    emulated_cluster,
    spinrun,
)

OPERATOR_SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "operator-user",
    "MLFLOW_TRACKING_PASSWORD": "operator-password",
    "AWS_ACCESS_KEY_ID": "AKIAOPERATOR0000KEY",
    "AWS_SECRET_ACCESS_KEY": "operator-secret-access-key",
    "AWS_SESSION_TOKEN": "operator-session-token",
}


class Capture:
    """An HTTP server that records every request's path and headers and answers 404."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                seen.append(
                    (self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                )
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "nothing here"}'
                self.send_response(404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def credentials_seen(self) -> list[str]:
        """Every operator credential (or its identifying part) that reached this server."""
        found = []
        for _verb, _path, headers in self.requests:
            text = json.dumps(headers)
            found += [name for name, value in OPERATOR_SECRETS.items() if value in text]
            if "authorization" in headers and headers["authorization"].startswith("Basic "):
                found.append("basic auth")
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    server = Capture()
    yield server
    server.close()


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    for (
        name,
        value,
    ) in OPERATOR_SECRETS.items():  # the operator's own identity, as the chart sets it
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with emulated_cluster(tmp_path, monkeypatch.setenv) as cluster:
        yield cluster


def _author_spec(capture: Capture) -> dict[str, object]:
    return {
        "storage": {"uri": "s3://corp-models/borrowed", "endpoint": capture.url},
        "tracking": {
            "uri": capture.url,
            "experiment": "team-b",
            "registeredModel": "team-b.prod-chat",
        },
        "scheduling": {"serviceAccountName": "cluster-admin-bot"},
    }


async def test_author_endpoints_get_no_operator_credential(
    cluster: Cluster, capture: Capture
) -> None:
    op = await OperatorProcess(
        cluster.settings(mlflow_uri="http://mlflow.admin.invalid:5000")
    ).start()
    try:
        await cluster.api.acreate(spinrun("borrow", **_author_spec(capture)))
        await cluster.wait_phase("borrow", "Failed")
        failed = await cluster.condition("borrow", "Failed")
    finally:
        await op.stop()
    assert failed["reason"] == "InvalidSpec"
    fields = re.findall(r"(?:^|; )(spec\.[A-Za-z.]+):", failed["message"])
    assert fields == [
        "spec.scheduling.serviceAccountName",
        "spec.storage.endpoint",
        "spec.storage.uri",
        "spec.tracking.experiment",
        "spec.tracking.registeredModel",
        "spec.tracking.uri",
    ], failed["message"]
    assert await cluster.jobs("borrow") == []
    assert capture.requests == [], "the author's endpoint was contacted at all"


async def test_allow_listed_endpoints_do_get_them(cluster: Cluster, capture: Capture) -> None:
    """Control: once the admin lists the capture server, the operator talks to it with its own
    credentials (so the test above would see them if the refusal were missing)."""
    policy = Policy.parse(
        json.dumps(
            {
                "s3Endpoints": [capture.url],
                "trackingUris": [capture.url],
                "namespaces": {
                    NS: {
                        "storagePrefixes": ["s3://corp-models"],
                        "serviceAccounts": ["cluster-admin-bot"],
                        "experiments": ["team-b"],
                        "registeredModels": ["team-b.prod-chat"],
                    }
                },
            }
        )
    )
    op = await OperatorProcess(cluster.settings(security=policy)).start()
    try:
        spec = _author_spec(capture)
        await cluster.api.acreate(spinrun("listed-s3", storage=spec["storage"]))
        # storage on the capture server cannot start a run; MLflow is first called once it started
        await cluster.api.acreate(
            spinrun("listed-mlflow", **{k: v for k, v in spec.items() if k != "storage"})
        )
        await cluster.wait("the operator's S3 and MLflow calls", lambda: _both(capture), timeout=30)
    finally:
        await op.stop()
    seen = set(capture.credentials_seen())
    assert "AWS_ACCESS_KEY_ID" in seen and "AWS_SESSION_TOKEN" in seen and "basic auth" in seen, (
        seen
    )


async def _both(capture: Capture) -> bool:
    seen = set(capture.credentials_seen())
    return {"AWS_ACCESS_KEY_ID", "basic auth"} <= seen


async def test_a_hanging_storage_endpoint_does_not_hold_up_another_run(cluster: Cluster) -> None:
    """Threat 8: storage calls go to a pool per endpoint, each call within a short budget, with a
    breaker per endpoint (endpoints.py). An (allow-listed) endpoint that accepts connections and
    never answers, and one that refuses them, delay only their own runs, which get a
    StorageUnavailable condition naming their endpoint; a run on another store starts at once."""
    import socket
    import time

    from spin_operator.endpoints import StoragePools

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # connections complete in the kernel's backlog; nothing ever answers
    url = f"http://127.0.0.1:{hole.getsockname()[1]}"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refusing = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there
    policy = Policy.parse(
        json.dumps({"storagePrefixes": ["s3://slow-bucket"], "s3Endpoints": [url, refusing]})
    )
    op = await OperatorProcess(
        cluster.settings(security=policy),
        storage=StoragePools(budget=1.0, threshold=2, cooldown=30),
    ).start()
    try:
        await cluster.api.acreate(
            spinrun("stuck", storage={"uri": "s3://slow-bucket/runs", "endpoint": url})
        )
        await cluster.api.acreate(
            spinrun("refused", storage={"uri": "s3://slow-bucket/runs", "endpoint": refusing})
        )
        await asyncio.sleep(0.5)  # the stuck run's first storage read is under way
        started = time.monotonic()
        await cluster.api.acreate(spinrun("fine"))
        await cluster.wait_job("fine", "fine-i0-gen")
        waited = time.monotonic() - started

        async def unavailable(run: str) -> dict[str, str] | None:
            found = [
                c
                for c in (await cluster.status(run)).get("conditions") or []
                if c["type"] == "StorageUnavailable" and c["status"] == "True"
            ]
            return found[0] if found else None

        # two failed budgets (plus the retry backoff) at most, not botocore's minutes
        stuck = await cluster.wait("stuck: StorageUnavailable", lambda: unavailable("stuck"), 20)
        refused = await cluster.wait(
            "refused: StorageUnavailable", lambda: unavailable("refused"), 20
        )
        assert await cluster.jobs("stuck") == [] and await cluster.jobs("refused") == []
        fine = [c["type"] for c in (await cluster.status("fine")).get("conditions") or []]
    finally:
        hole.close()  # resets the pending connections: the stuck reads end now
        await op.stop()
    assert waited < 10, f"the second run waited {waited:.1f}s behind the hanging endpoint"
    assert stuck["reason"] == "EndpointUnavailable"
    assert f"storage endpoint {url} failed 2 calls in a row" in stuck["message"], stuck
    assert "no answer within 1s" in stuck["message"], stuck
    assert f"storage endpoint {refusing} failed" in refused["message"], refused
    assert "StorageUnavailable" not in fine
