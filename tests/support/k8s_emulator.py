"""The `k8s_api` fixture: an emulated Kubernetes API server with the SPINRun CRD, on 127.0.0.1.

The server (`tests.support.k8s_apiserver.ApiServerEmulator`, kmock's emulator with real API
semantics) runs on its own event loop in a thread, so synchronous tests, the kubernetes client and
an operator on the test's event loop all reach it the same way: over HTTP, via `kubeconfig_path`.
It is the fast tier's API server (tests/spin_operator, tests/charts/test_rbac.py,
benchmarks/operator_scale.py); every end-to-end scenario runs on the real control plane
(tests/cluster).

Test helpers (`create`, `get`, `list`, `patch`, `replace`, `delete` and their `a...` async twins)
act directly on the server's store through the same code path as HTTP requests (admission,
resourceVersions, watch events) but are not recorded in `requests`: the log holds only what
clients sent, e.g. the operator's calls (filter by `user_agent="kopf"`).
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import json
import pathlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import kmock
import pytest

from spin_operator.api.crd import crd as spinrun_crd
from tests.support.job_driver import JobDriver
from tests.support.k8s_apiserver import ApiServerEmulator, ResourceDef, Route
from tests.support.k8s_records import ApiRequest, RequestLog
from tests.support.k8s_semantics import ApiError

__all__ = [
    "ApiError",
    "ApiRequest",
    "ApiServerEmulator",
    "EmulatorServer",
    "JobDriver",
    "K8sApi",
    "RequestLog",
    "job_driver",
    "k8s_api",
    "running_api",
]

T = TypeVar("T")
JSON = dict[str, Any]

_PATCH_TYPES = {
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "strategic": "application/strategic-merge-patch+json",
}


class EmulatorServer:
    """An `ApiServerEmulator` served by `kmock.Server` on a private event loop in a daemon thread."""

    def __init__(self, emulator: ApiServerEmulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="k8s-emulator", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> EmulatorServer:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._failure is not None:
            raise RuntimeError("the emulated API server did not start") from self._failure
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the server's loop (the store is single-threaded) and return its result."""
        return self.submit(fn).result(timeout=30)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        assert self._loop is not None

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # surfaced by start()
            self._failure = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with (
            self.emulator,
            kmock.Server(self.emulator, host=self.host, port=self.port or None) as server,
        ):
            self.port = server.port
            self._ready.set()
            await self._stop.wait()
            self.emulator.close_watches()
            await asyncio.sleep(0.05)  # let watch streams write their end


class K8sApi:
    """What `k8s_api` yields: the server's address, its emulator, the request log and helpers."""

    def __init__(self, server: EmulatorServer, kubeconfig_path: pathlib.Path) -> None:
        self.server = server
        self.kubeconfig_path = kubeconfig_path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def emulator(self) -> ApiServerEmulator:
        return self.server.emulator

    @property
    def requests(self) -> RequestLog:
        return self.server.emulator.requests_log

    def reset_requests(self) -> None:
        self.requests.clear()

    # ------------------------------------------------------------------ helpers (sync)

    def resource(self, name: str) -> ResourceDef:
        return self.emulator.find_resource(name)

    def create(self, obj: JSON, namespace: str | None = None) -> JSON:
        """Create like a client would (201 path: admission, defaults, uid); raises ApiError."""
        return self.server.call(lambda: self._create(obj, namespace))

    def get(self, resource: str, name: str, namespace: str | None = "default") -> JSON | None:
        """The stored object, or None when absent."""
        return self.server.call(lambda: self._get(resource, name, namespace))

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[JSON]:
        return self.server.call(
            lambda: self._list(resource, namespace, label_selector, field_selector)
        )

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        namespace: str | None = "default",
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> JSON:
        """Patch (patch_type: merge, json, strategic); `subresource="status"` for status."""
        return self.server.call(
            lambda: self._write(
                "patch", resource, name, patch, namespace, subresource, _PATCH_TYPES[patch_type]
            )
        )

    def replace(self, obj: JSON, subresource: str | None = None) -> JSON:
        """PUT the whole object (carry metadata.resourceVersion for optimistic concurrency)."""
        rdef = self.emulator.resource_for(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        return self.server.call(
            lambda: self._write(
                "update",
                rdef.plural + "." + rdef.group if rdef.group else rdef.plural,
                meta["name"],
                obj,
                meta.get("namespace"),
                subresource,
                "application/json",
            )
        )

    def delete(
        self,
        resource: str,
        name: str,
        namespace: str | None = "default",
        propagation_policy: str | None = None,
    ) -> JSON | None:
        """Delete (None when absent); returns the object's last state."""
        return self.server.call(lambda: self._delete(resource, name, namespace, propagation_policy))

    def wait_for(
        self, condition: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02
    ) -> T:
        """Poll until `condition()` is truthy (from a synchronous test); returns its value."""
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)
        return value

    # ------------------------------------------------------------------ helpers (async)

    def _async(self, fn: Callable[[], T]) -> Awaitable[T]:
        return asyncio.wrap_future(self.server.submit(fn))

    async def acreate(self, obj: JSON, namespace: str | None = None) -> JSON:
        return await self._async(lambda: self._create(obj, namespace))

    async def aget(
        self, resource: str, name: str, namespace: str | None = "default"
    ) -> JSON | None:
        return await self._async(lambda: self._get(resource, name, namespace))

    async def alist(
        self,
        resource: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> builtins.list[JSON]:
        return await self._async(
            lambda: self._list(resource, namespace, label_selector, field_selector)
        )

    async def apatch(
        self,
        resource: str,
        name: str,
        patch: Any,
        namespace: str | None = "default",
        subresource: str | None = None,
        patch_type: str = "merge",
    ) -> JSON:
        return await self._async(
            lambda: self._write(
                "patch", resource, name, patch, namespace, subresource, _PATCH_TYPES[patch_type]
            )
        )

    async def adelete(
        self,
        resource: str,
        name: str,
        namespace: str | None = "default",
        propagation_policy: str | None = None,
    ) -> JSON | None:
        return await self._async(
            lambda: self._delete(resource, name, namespace, propagation_policy)
        )

    async def await_for(
        self,
        condition: Callable[[], Awaitable[T | None]],
        timeout: float = 10.0,
        interval: float = 0.02,
    ) -> T:
        """Await until `await condition()` is truthy (from an async test); returns its value."""
        async with asyncio.timeout(timeout):
            while not (value := await condition()):
                await asyncio.sleep(interval)
        return value

    # ------------------------------------------------------------------ on the server loop

    def _route(
        self,
        rdef: ResourceDef,
        namespace: str | None,
        name: str | None = None,
        subresource: str | None = None,
    ) -> Route:
        return Route(
            rdef,
            rdef.group,
            rdef.version,
            rdef.plural,
            namespace if rdef.namespaced else None,
            name,
            subresource,
        )

    def _create(self, obj: JSON, namespace: str | None) -> JSON:
        rdef = self.emulator.resource_for(obj["apiVersion"], obj["kind"])
        ns = namespace or obj.get("metadata", {}).get("namespace") or "default"
        body = json.dumps(obj).encode()
        result = self.emulator.handle("create", self._route(rdef, ns), {}, body)
        return result.body  # type: ignore[no-any-return]

    def _get(self, resource: str, name: str, namespace: str | None) -> JSON | None:
        rdef = self.resource(resource)
        return self.emulator.stored(rdef, namespace, name)

    def _list(
        self, resource: str, namespace: str | None, labels: str | None, fields: str | None
    ) -> builtins.list[JSON]:
        rdef = self.resource(resource)
        params = {k: v for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v}
        return self.emulator.list_objects(rdef, namespace if rdef.namespaced else None, params)[
            "items"
        ]  # type: ignore[no-any-return]

    def _write(
        self,
        verb: str,
        resource: str,
        name: str,
        body: Any,
        namespace: str | None,
        subresource: str | None,
        content_type: str,
    ) -> JSON:
        rdef = self.resource(resource)
        route = self._route(rdef, namespace, name, subresource)
        return self.emulator.handle(verb, route, {}, json.dumps(body).encode(), content_type).body  # type: ignore[no-any-return]

    def _delete(
        self, resource: str, name: str, namespace: str | None, policy: str | None
    ) -> JSON | None:
        rdef = self.resource(resource)
        if self.emulator.stored(rdef, namespace, name) is None:
            return None
        params = {"propagationPolicy": policy} if policy else {}
        return self.emulator.handle("delete", self._route(rdef, namespace, name), params, b"").body  # type: ignore[no-any-return]


def write_kubeconfig(path: pathlib.Path, url: str, namespace: str = "default") -> pathlib.Path:
    """A kubeconfig (JSON is YAML) for kubectl, the kubernetes client and kopf."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "emulator", "user": {}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
            }
        ],
    }
    path.write_text(json.dumps(config, indent=2))
    return path


def new_emulator(**kwargs: Any) -> ApiServerEmulator:
    """Built-in resources (kmock's bundled discovery) plus the SPINRun CRD."""
    emulator = ApiServerEmulator(**kwargs)
    emulator.resources.load_bundled()
    emulator.register_crd(spinrun_crd())
    return emulator


@contextlib.contextmanager
def running_api(workdir: pathlib.Path, port: int = 0, **kwargs: Any) -> Iterator[K8sApi]:
    """Start an emulated API server (with `default` and `kube-system` namespaces) for the block."""
    server = EmulatorServer(new_emulator(**kwargs), port=port).start()
    try:
        api = K8sApi(server, write_kubeconfig(workdir / "kubeconfig", server.url))
        for ns in ("default", "kube-system"):
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        yield api
    finally:
        server.stop()


@pytest.fixture
def k8s_api(tmp_path: pathlib.Path) -> Iterator[K8sApi]:
    """A fresh emulated API server per test; fails the test if the emulator itself crashed."""
    with running_api(tmp_path) as api:
        yield api
        errors = list(api.emulator.internal_errors)
    assert not errors, "the emulated API server failed internally:\n" + "\n".join(errors)


@pytest.fixture
def job_driver(k8s_api: K8sApi) -> JobDriver:
    """A Job controller stand-in on `k8s_api` for Jobs labelled managed-by=spin-operator."""
    return JobDriver(k8s_api.url)
