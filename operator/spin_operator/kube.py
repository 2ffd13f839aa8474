"""A minimal async Kubernetes API client for the few writes the operator makes.

kopf watches and posts events with its own client; children, status and metadata patches go
through this one. It reuses kopf's login result (`kopf.ConnectionInfo`: in-cluster service
account or kubeconfig), so there is one source of credentials, and it is small enough to make
every call visible: the chart's RBAC grants exactly these (docs/design.md).

What a client owes the API server (docs/operations.md, "API errors"): 429 and 5xx answers are
retried a bounded number of times, honouring `Retry-After`; the projected service-account
token is re-read before it expires (the kubelet rotates the file); every write names its
`fieldManager`; lists are read in pages (`limit`/`continue`); `Warning` headers are logged and
handed to `on_warning` (the controller turns those about a SPINRun's children into events).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

log = logging.getLogger(__name__)
JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "spin-operator"
FIELD_MANAGER = "spin-operator"
PAGE_SIZE = 500
# 429 and these 5xx are the API server's "not now": retried here a few times, then the caller
# backs off (apply.py). 501 (not implemented) would answer the same every time.
RETRYABLE = frozenset({429, 500, 502, 503, 504})
ATTEMPTS = 4  # tries of one call on 429/5xx
MAX_WAIT = 10.0  # cap of one Retry-After: a long one goes back to the caller's backoff
CONNECTIONS = 16  # to the API server at once; more calls wait for one (no time limit on that)
REQUEST_TIMEOUT = 30.0  # seconds for a connect, and between bytes of an answer
# Credentials are re-read this often, and early when they carry an expiry closer than REFRESH_EARLY:
# a projected token file is rotated by the kubelet at 80% of its lifetime.
REFRESH_EVERY = 60.0
REFRESH_EARLY = datetime.timedelta(minutes=5)
_WARNING = re.compile(r'^\s*(\d{3})\s+\S+\s+"((?:[^"\\]|\\.)*)"')


class ApiError(Exception):
    """A non-2xx answer: `status` (409, 404, ...), the Status `reason` and `message`;
    `retry_after`: the seconds the server asked to wait (429/503), if it said."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def permanent(self) -> bool:
        """The same request would be refused again: malformed (400), invalid (422) or forbidden
        (403) — except a 403 for an exhausted ResourceQuota, which frees up when pods end."""
        if self.status == 403:
            return "exceeded quota" not in self.message
        return self.status in (400, 422)


def retry_after(value: str | None) -> float | None:
    """Seconds of a `Retry-After` header (delta-seconds; an HTTP date counts from now)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def warnings_of(values: list[str]) -> list[str]:
    """The texts of RFC 7234 `Warning` headers (`299 - "text"`), as the API server sends them."""
    out = []
    for value in values:
        m = _WARNING.match(value)
        out.append(m.group(2).replace('\\"', '"') if m else value.strip())
    return out


def _decoded(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return raw  # already PEM


def _ssl_context(info: Any) -> ssl.SSLContext | bool:
    if not info.server.startswith("https"):
        return False
    if info.insecure:
        return False
    ctx = ssl.create_default_context(
        cafile=str(info.ca_path) if info.ca_path else None,
        cadata=_decoded(info.ca_data).decode() if info.ca_data else None,
    )
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data or info.private_key_data:
        files: list[str | None] = []
        for data in (info.certificate_data, info.private_key_data):
            if data:
                f = tempfile.NamedTemporaryFile(prefix="spin-kube-", delete=False)  # noqa: SIM115
                f.write(_decoded(data))
                f.close()
                files.append(f.name)
            else:
                files.append(None)
        cert, key = files[0] or cert, files[1] or key
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


class Kube:
    """HTTP calls against the API server with credentials from `login()` (refreshed on 401)."""

    def __init__(
        self,
        login: Callable[[], Any],
        *,
        refresh_every: float = REFRESH_EVERY,
        backoff: float = 0.5,
        on_warning: Callable[[str, str, str], None] | None = None,
    ):
        self._login = login
        self._info: Any = None
        self._login_at = 0.0
        self._refresh_every = refresh_every
        self._backoff = backoff
        # (method, path, warning text) for each Warning header of an answer
        self.on_warning = on_warning
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []

    def use(self, info: Any) -> None:
        """Adopt fresh credentials (kopf's login handler calls this)."""
        old = self._info
        self._info = info
        self._login_at = time.monotonic()
        tls = (
            "server",
            "ca_path",
            "ca_data",
            "certificate_path",
            "certificate_data",
            "private_key_path",
            "private_key_data",
            "insecure",
        )
        if old is not None and all(getattr(old, a, None) == getattr(info, a, None) for a in tls):
            return  # only the token changed: it goes in each request's header, keep the pool
        if self._session is not None:  # in-flight calls finish on it; closed in close()
            self._retired.append(self._session)
            self._session = None

    def _refresh(self) -> None:
        """Re-read credentials when due: every `refresh_every` seconds, or when the token's
        expiry is near. The in-cluster login reads the token file again, so a rotated
        projected token is picked up before the old one expires."""
        info = self._info
        if info is None:
            self.use(self._login())
            return
        expiry = getattr(info, "expiration", None)
        soon = False
        if isinstance(expiry, datetime.datetime):
            aware = (
                expiry if expiry.tzinfo else expiry.replace(tzinfo=datetime.UTC)
            )  # kubeconfig times are UTC
            soon = aware - datetime.datetime.now(datetime.UTC) < REFRESH_EARLY
        if soon or time.monotonic() - self._login_at >= self._refresh_every:
            try:
                self.use(self._login())
            except Exception as exc:  # keep the current credentials; a 401 re-logs in anyway
                log.warning("re-reading API credentials failed: %s", exc)
                self._login_at = time.monotonic()

    def _headers(self) -> dict[str, str]:
        info = self._info
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        elif info.username and info.password:
            token = base64.b64encode(f"{info.username}:{info.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        return headers

    def _ensure(self) -> aiohttp.ClientSession:
        self._refresh()
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self._info), limit=CONNECTIONS)
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/") + "/",
                connector=connector,
                # Each connect and each read has REQUEST_TIMEOUT, not the whole call: a total
                # also counted the wait for one of the CONNECTIONS, and with hundreds of runs
                # passing at once that wait alone ran out, failing passes by the hundred (they
                # retried with backoff: tens of seconds between a Job's end and the next Job).
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=REQUEST_TIMEOUT, sock_read=REQUEST_TIMEOUT
                ),
            )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        """One call; raises ApiError for non-2xx answers (after one re-login on 401 and up to
        ATTEMPTS tries on 429/5xx, waiting as `Retry-After` says, at most MAX_WAIT each)."""
        relogged = False
        attempt = 0
        if method in ("POST", "PUT", "PATCH"):
            params = {"fieldManager": FIELD_MANAGER, **(params or {})}
        while True:
            attempt += 1
            session = self._ensure()
            headers = self._headers()
            if body is not None:
                headers["Content-Type"] = content_type
            async with session.request(
                method, path.lstrip("/"), json=body, params=params, headers=headers
            ) as resp:
                text = await resp.text()
                self._warn(method, path, resp.headers.getall("Warning", []))
                if resp.status == 401 and not relogged:
                    relogged = True
                    self.use(self._login())
                    continue
                data: Any = None
                if text:
                    try:
                        data = json.loads(text)
                    except ValueError:
                        data = None
                if resp.status < 400:
                    return data if isinstance(data, dict) else {}
                data = data if isinstance(data, dict) else {}
                wait = retry_after(resp.headers.get("Retry-After"))
                error = ApiError(
                    resp.status,
                    str(data.get("reason") or resp.reason),
                    str(data.get("message") or text[:300]),
                    wait,
                )
            if (
                error.status not in RETRYABLE
                or attempt >= ATTEMPTS
                or (wait is not None and wait > MAX_WAIT)
            ):
                raise error
            delay = wait if wait is not None else self._backoff * 2 ** (attempt - 1)
            log.info(
                "%s %s: %s; try %d/%d in %.1fs", method, path, error, attempt + 1, ATTEMPTS, delay
            )
            await asyncio.sleep(delay)

    def _warn(self, method: str, path: str, values: list[str]) -> None:
        for text in warnings_of(values):
            log.warning("API server warning on %s %s: %s", method, path, text)
            if self.on_warning is not None:
                try:
                    self.on_warning(method, path, text)
                except Exception as exc:  # a warning must never fail the call it came with
                    log.debug("warning handler failed: %s", exc)

    async def pages(
        self, path: str, *, selector: str | None = None, chunk: int = PAGE_SIZE
    ) -> AsyncIterator[JSON]:
        """Every item of a LIST, fetched `chunk` at a time with `continue` tokens (one consistent
        snapshot: a continue token that expired raises ApiError 410 and nothing partial is used)."""
        params = {"limit": str(chunk)}
        if selector:
            params["labelSelector"] = selector
        while True:
            page = await self.request("GET", path, params=params)
            for item in page.get("items") or []:
                yield item
            token = (page.get("metadata") or {}).get("continue") or ""
            if not token:
                return
            params["continue"] = token

    async def get(self, path: str) -> JSON | None:
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: JSON, *, dry_run: bool = False) -> JSON:
        """POST; with `dry_run` the API server validates and admits it without storing it."""
        return await self.request(
            "POST", path, body=body, params={"dryRun": "All"} if dry_run else None
        )

    async def patch(self, path: str, body: JSON) -> JSON:
        return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        """True when deleted now, False when it was already gone."""
        try:
            await self.request(
                "DELETE",
                path,
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                },
            )
            return True
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise

    async def close(self) -> None:
        for session in [*self._retired, *([self._session] if self._session else [])]:
            await session.close()
        self._session, self._retired = None, []


def job_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    return f"{base}/{name}" if name else base


def service_path(namespace: str, name: str | None = None) -> str:
    base = f"/api/v1/namespaces/{namespace}/services"
    return f"{base}/{name}" if name else base


def secret_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{name}"


def spinrun_path(namespace: str, name: str, status: bool = False) -> str:
    base = f"/apis/selfplay.dev/v1alpha1/namespaces/{namespace}/spinruns/{name}"
    return f"{base}/status" if status else base
