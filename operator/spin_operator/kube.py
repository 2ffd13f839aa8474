"""A minimal async Kubernetes API client for the few writes the operator makes.

kopf watches and posts events with its own client; children, status and metadata patches go
through this one. It reuses kopf's login result (`kopf.ConnectionInfo`: in-cluster service
account or kubeconfig), so there is one source of credentials, and it is small enough to make
every call visible: the chart's RBAC grants exactly these (docs/design.md).
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import aiohttp

log = logging.getLogger(__name__)
JSON = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "spin-operator"


class ApiError(Exception):
    """A non-2xx answer: `status` (409, 404, ...), the Status `reason` and `message`."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


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

    def __init__(self, login: Callable[[], Any]):
        self._login = login
        self._info: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._retired: list[aiohttp.ClientSession] = []

    def use(self, info: Any) -> None:
        """Adopt fresh credentials (kopf's login handler calls this)."""
        self._info = info
        if self._session is not None:  # in-flight calls finish on it; closed in close()
            self._retired.append(self._session)
            self._session = None

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
        if self._info is None:
            self._info = self._login()
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=_ssl_context(self._info), limit=16)
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/") + "/",
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def request(
        self, method: str, path: str, *, body: Any = None, params: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        """One call; raises ApiError for non-2xx answers (after one re-login on 401)."""
        for attempt in (0, 1):
            session = self._ensure()
            headers = self._headers()
            if body is not None:
                headers["Content-Type"] = content_type
            async with session.request(
                method, path.lstrip("/"), json=body, params=params, headers=headers
            ) as resp:
                text = await resp.text()
                if resp.status == 401 and attempt == 0:
                    self.use(self._login())
                    continue
                data: Any = None
                if text:
                    try:
                        data = json.loads(text)
                    except ValueError:
                        data = None
                if resp.status >= 400:
                    data = data if isinstance(data, dict) else {}
                    raise ApiError(resp.status, str(data.get("reason") or resp.reason), str(data.get("message") or text[:300]))
                return data if isinstance(data, dict) else {}
        raise AssertionError("unreachable")

    async def get(self, path: str) -> JSON | None:
        try:
            return await self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body=body)

    async def patch(self, path: str, body: JSON) -> JSON:
        return await self.request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def delete(self, path: str, propagation: str = "Background") -> bool:
        """True when deleted now, False when it was already gone."""
        try:
            await self.request("DELETE", path, body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation})
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
