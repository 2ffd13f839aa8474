"""The operator's API client against a scripted HTTP server (issue 14 item 13): 429/5xx retried
with Retry-After (bounded), a rotated token re-read, fieldManager on writes, lists in pages,
Warning headers passed on."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp.web
import pytest

from spin_operator import kube as kube_module
from spin_operator.kube import FIELD_MANAGER, ApiError, Kube, retry_after, warnings_of

Handler = Callable[[aiohttp.web.Request], Awaitable[aiohttp.web.StreamResponse]]


class Server:
    def __init__(self) -> None:
        self.seen: list[
            tuple[str, str, dict[str, str], str, float]
        ] = []  # method, path, query, auth, time
        self.script: list[tuple[int, dict[str, str], Any]] = []  # answers in order, then 200 {}
        self.pages: list[dict[str, Any]] | None = None
        self.url = ""
        self.delay = 0.0  # seconds each answer takes

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        self.seen.append(
            (
                request.method,
                request.path,
                dict(request.query),
                request.headers.get("Authorization", ""),
                time.monotonic(),
            )
        )
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.pages is not None:
            token = request.query.get("continue", "")
            page = self.pages[int(token or 0)]
            return aiohttp.web.json_response(page)
        status, headers, body = self.script.pop(0) if self.script else (200, {}, {"ok": True})
        response = aiohttp.web.json_response(body, status=status)
        for k, v in headers.items():
            response.headers.add(k, v)
        return response


@pytest.fixture
async def server() -> Iterator[Server]:  # type: ignore[misc]
    srv = Server()
    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", srv.handle)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    srv.url = f"http://127.0.0.1:{port}"
    yield srv
    await runner.cleanup()


def info(
    url: str, token: str = "t0", expiration: datetime.datetime | None = None
) -> SimpleNamespace:
    return SimpleNamespace(
        server=url,
        insecure=None,
        ca_path=None,
        ca_data=None,
        certificate_path=None,
        certificate_data=None,
        private_key_path=None,
        private_key_data=None,
        token=token,
        scheme="Bearer",
        username=None,
        password=None,
        expiration=expiration,
    )


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


async def test_429_waits_as_retry_after_says_then_succeeds(server: Server) -> None:
    server.script = [(429, {"Retry-After": "1"}, status(429, "TooManyRequests", "slow down"))]
    kube = Kube(lambda: info(server.url), backoff=0.05)
    try:
        assert await kube.create("/api/v1/namespaces/a/services", {"metadata": {"name": "s"}}) == {
            "ok": True
        }
    finally:
        await kube.close()
    assert len(server.seen) == 2
    assert server.seen[1][4] - server.seen[0][4] >= 0.95  # Retry-After: 1 honoured


async def test_5xx_retried_a_bounded_number_of_times(server: Server) -> None:
    server.script = [(503, {}, status(503, "ServiceUnavailable", "etcd leader changed"))] * 10
    kube = Kube(lambda: info(server.url), backoff=0.01)
    try:
        with pytest.raises(ApiError) as err:
            await kube.get("/api/v1/namespaces/a/secrets/x")
    finally:
        await kube.close()
    assert err.value.status == 503 and not err.value.permanent
    assert len(server.seen) == 4  # ATTEMPTS, then the caller's backoff takes over


async def test_long_retry_after_goes_back_to_the_caller(server: Server) -> None:
    server.script = [(429, {"Retry-After": "120"}, status(429, "TooManyRequests", "slow down"))]
    kube = Kube(lambda: info(server.url), backoff=0.01)
    try:
        with pytest.raises(ApiError) as err:
            await kube.get("/api/v1/namespaces/a/secrets/x")
    finally:
        await kube.close()
    assert err.value.retry_after == 120.0 and len(server.seen) == 1


@pytest.mark.parametrize(
    ("code", "message", "permanent"),
    [
        (422, "invalid", True),
        (400, "bad", True),
        (403, "jobs.batch is forbidden: User cannot create", True),
        (403, 'jobs.batch "x" is forbidden: exceeded quota: q, requested: pods=1', False),
        (409, "exists", False),
        (404, "not found", False),
        (500, "boom", False),
    ],
)
async def test_permanent_errors_are_not_retried(
    server: Server, code: int, message: str, permanent: bool
) -> None:
    server.script = [(code, {}, status(code, "X", message))] * 10
    kube = Kube(lambda: info(server.url), backoff=0.01)
    try:
        with pytest.raises(ApiError) as err:
            await kube.create("/apis/batch/v1/namespaces/a/jobs", {"metadata": {"name": "j"}})
    finally:
        await kube.close()
    assert err.value.permanent is permanent and err.value.message == message
    assert len(server.seen) == (4 if code == 500 else 1)


async def test_writes_name_their_field_manager_and_dry_run(server: Server) -> None:
    kube = Kube(lambda: info(server.url))
    try:
        await kube.create(
            "/apis/batch/v1/namespaces/a/jobs", {"metadata": {"name": "j"}}, dry_run=True
        )
        await kube.patch("/apis/batch/v1/namespaces/a/jobs/j", {"spec": {"suspend": True}})
        await kube.get("/apis/batch/v1/namespaces/a/jobs/j")
    finally:
        await kube.close()
    (m1, _, q1, _, _), (m2, _, q2, _, _), (m3, _, q3, _, _) = server.seen
    assert (m1, q1) == ("POST", {"fieldManager": FIELD_MANAGER, "dryRun": "All"})
    assert (m2, q2) == ("PATCH", {"fieldManager": FIELD_MANAGER})
    assert (m3, q3) == ("GET", {})


async def test_lists_are_read_in_pages(server: Server) -> None:
    server.pages = [
        {"items": [{"n": 0}, {"n": 1}], "metadata": {"continue": "1"}},
        {"items": [{"n": 2}], "metadata": {"continue": "2"}},
        {"items": [], "metadata": {}},
    ]
    kube = Kube(lambda: info(server.url))
    try:
        items = [i async for i in kube.pages("/apis/batch/v1/jobs", selector="a=b", chunk=2)]
    finally:
        await kube.close()
    assert [i["n"] for i in items] == [0, 1, 2]
    assert [q for _, _, q, _, _ in server.seen] == [
        {"labelSelector": "a=b", "limit": "2"},
        {"labelSelector": "a=b", "limit": "2", "continue": "1"},
        {"labelSelector": "a=b", "limit": "2", "continue": "2"},
    ]


async def test_rotated_token_is_read_again(server: Server, tmp_path: Path) -> None:
    """The kubelet rewrites a projected token file; the client reads it again before using it
    once `refresh_every` passed, without waiting for a 401."""
    token = tmp_path / "token"
    token.write_text("first")
    kube = Kube(lambda: info(server.url, token.read_text()), refresh_every=0.3)
    try:
        await kube.get("/x")
        token.write_text("second")
        await kube.get("/x")  # within refresh_every: the token in hand
        time.sleep(0.35)
        await kube.get("/x")
    finally:
        await kube.close()
    assert [auth for _, _, _, auth, _ in server.seen] == [
        "Bearer first",
        "Bearer first",
        "Bearer second",
    ]


async def test_token_near_its_expiry_is_read_again(server: Server) -> None:
    logins = iter(
        [
            info(
                server.url,
                "old",
                datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=2),
            ),
            info(
                server.url, "new", datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
            ),
        ]
    )
    kube = Kube(lambda: next(logins), refresh_every=3600)
    try:
        await kube.get("/x")
        await kube.get("/x")
    finally:
        await kube.close()
    assert [auth for _, _, _, auth, _ in server.seen] == ["Bearer old", "Bearer new"]


async def test_warning_headers_are_passed_on(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    text = 'spec.template.spec.nodeSelector[beta.kubernetes.io/arch]: deprecated since v1.14; use "kubernetes.io/arch" instead'
    escaped = text.replace('"', '\\"')
    server.script = [(201, {"Warning": f'299 - "{escaped}"'}, {"metadata": {"name": "j"}})]
    got: list[tuple[str, str, str]] = []
    kube = Kube(lambda: info(server.url), on_warning=lambda m, p, t: got.append((m, p, t)))
    try:
        await kube.create("/apis/batch/v1/namespaces/a/jobs", {"metadata": {"name": "j"}})
    finally:
        await kube.close()
    assert got == [("POST", "/apis/batch/v1/namespaces/a/jobs", text)]
    assert text in caplog.text


async def test_waiting_for_a_connection_is_not_a_timeout(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More calls than connections wait their turn: the time limit is each call's own (at 250
    runs the wait for one of the 16 connections alone outlasted a 30 s total, failing passes)."""
    monkeypatch.setattr(kube_module, "CONNECTIONS", 2)
    monkeypatch.setattr(kube_module, "REQUEST_TIMEOUT", 0.6)
    server.delay = 0.25  # 8 calls on 2 connections: the last ones wait 0.75 s for theirs
    kube = Kube(lambda: info(server.url), backoff=0.05)
    try:
        answers = await asyncio.gather(
            *(kube.request("GET", f"/api/v1/namespaces/a/pods/p{i}") for i in range(8))
        )
    finally:
        await kube.close()
    assert answers == [{"ok": True}] * 8
    server.delay = 1.0  # one answer slower than REQUEST_TIMEOUT still times out
    kube = Kube(lambda: info(server.url), backoff=0.05)
    try:
        with pytest.raises(TimeoutError):
            await kube.request("GET", "/api/v1/namespaces/a/pods/slow")
    finally:
        await kube.close()


def test_header_parsing() -> None:
    assert retry_after("3") == 3.0 and retry_after(None) is None and retry_after("soon") is None
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=30)).strftime(
        "%a, %d %b %Y %H:%M:%S GMT"
    )
    assert 25 <= (retry_after(later) or 0) <= 31
    assert warnings_of(['299 - "a \\"b\\" c"', "plain"]) == ['a "b" c', "plain"]
