"""Run the real kopf operator in-process against the emulated API server, and play the Jobs.

`Cluster` wraps the emulator (`tests.support.k8s_emulator`) and the Job controller stand-in
(`tests.support.job_driver`); completing a Job first writes what the runtime would have written
(artifacts, manifests last: `tests.support.step_artifacts`) under a local storage prefix.
`OperatorProcess` starts `kopf.operator(...)` with the registry of spin_operator.handlers as a
task on the test's loop; `kill()` cancels it abruptly (no cleanup), `stop()` stops it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import kopf

from spin_operator import naming
from spin_operator.controller import Controller
from spin_operator.handlers import build_registry, make_controller, operator_kwargs
from spin_operator.metrics import Metrics
from spin_operator.settings import Settings
from spin_operator.track import Tracking
from tests.support import step_artifacts
from tests.support.job_driver import JobDriver
from tests.support.k8s_emulator import K8sApi, running_api

NS = "team-a"
T = TypeVar("T")
JSON = dict[str, Any]
SPINRUNS = "spinruns.selfplay.dev"


def spinrun(name: str, **spec: Any) -> JSON:
    body: JSON = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/sft.jsonl", "maxSamples": 64, "evalSamples": 8},
        "iterations": 1,
        "generation": {"replicas": 2, "gpusPerReplica": 0},
        "training": {"nodes": 2, "gpusPerNode": 0},
    }
    body.update(spec)
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": name, "namespace": NS},
        "spec": body,
    }


def finished(job: JSON) -> bool:
    return any(
        c["type"] in ("Complete", "Failed") and c["status"] == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


@contextlib.contextmanager
def emulated_cluster(
    root: Path, setenv: Callable[[str, str], None], namespaces: tuple[str, ...] = (NS,)
) -> Iterator[Cluster]:
    """An emulated API server with `namespaces` created, KUBECONFIG pointed at it (through the
    caller's `monkeypatch.setenv`), wrapped in a `Cluster`: the tests' `cluster` fixture."""
    with running_api(root) as api:
        for ns in namespaces:
            api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        setenv("KUBECONFIG", str(api.kubeconfig_path))
        yield Cluster(api, root)


class Cluster:
    def __init__(self, api: K8sApi, root: Path) -> None:
        self.api = api
        self.root = root
        self.storage = root / "artifacts"
        self.driver = JobDriver(api.url)

    def settings(self, **changes: Any) -> Settings:
        values: dict[str, Any] = {
            "namespaces": (NS,),
            "storage_uri": str(self.storage),
            "health_port": 0,
            "metrics_port": 0,
        }
        values.update(changes)
        return Settings(**values)

    # ------------------------------------------------------------------ reading

    async def run(self, name: str) -> JSON:
        obj = await self.api.aget(SPINRUNS, name, NS)
        assert obj is not None, f"SPINRun {name} is gone"
        return obj

    async def status(self, name: str) -> JSON:
        return (await self.run(name)).get("status") or {}

    async def phase(self, name: str) -> str | None:
        obj = await self.api.aget(SPINRUNS, name, NS)
        return ((obj or {}).get("status") or {}).get("phase")

    async def condition(self, name: str, type_: str) -> JSON:
        found = [c for c in (await self.status(name)).get("conditions") or [] if c["type"] == type_]
        assert found, f"no {type_} condition on {name}"
        return found[0]

    async def jobs(self, run: str, stage: str | None = None) -> list[JSON]:
        selector = f"{naming.RUN_LABEL}={run}" + (f",{naming.STAGE_LABEL}={stage}" if stage else "")
        items = await self.api.alist("jobs", namespace=NS, label_selector=selector)
        return sorted(
            (j for j in items if not j["metadata"].get("deletionTimestamp")),
            key=lambda j: j["metadata"]["creationTimestamp"],
        )

    async def active(self, run: str) -> list[JSON]:
        return [j for j in await self.jobs(run) if not finished(j)]

    async def wait(
        self, what: str, probe: Callable[[], Awaitable[T | None]], timeout: float = 15.0
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = await probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def wait_phase(self, name: str, phase: str, timeout: float = 15.0) -> JSON:
        async def probe() -> JSON | None:
            status = (await self.api.aget(SPINRUNS, name, NS) or {}).get("status") or {}
            return status if status.get("phase") == phase else None

        try:
            return await self.wait(f"{name} {phase}", probe, timeout)
        except AssertionError:
            raise AssertionError(
                f"{name} never became {phase}: {json.dumps(await self.status(name))[:2000]}"
            ) from None

    async def wait_job(self, run: str, name: str, timeout: float | None = None) -> JSON:
        """Wait for Job `name`. Waiting for iteration 0's first generation passes the check Job
        before it on the way (its report says ok, as the runtime's does on good input); tests of
        the check itself wait for `<run>-i0-check` and decide its outcome."""

        async def probe() -> JSON | None:
            jobs = await self.jobs(run)
            found = next((j for j in jobs if j["metadata"]["name"] == name), None)
            if found is None and name == f"{run}-i0-gen":
                check = next((j for j in jobs if j["metadata"]["name"] == f"{run}-i0-check"), None)
                if check is not None and not finished(check) and not check["spec"].get("suspend"):
                    await self.complete(check)
            return found

        if timeout is None:
            return await self.wait(f"Job {name}", probe)
        return await self.wait(f"Job {name}", probe, timeout=timeout)

    async def events(self, name: str) -> list[tuple[str, str]]:
        items = await self.api.alist("events", namespace=NS)
        return [
            (e.get("reason", ""), e.get("message", ""))
            for e in items
            if (e.get("involvedObject") or {}).get("name") == name
        ]

    # ------------------------------------------------------------------ acting as Jobs

    def write_artifacts(self, job: JSON, metrics: dict[str, float] | None = None) -> None:
        """What a Job's pods leave behind on success: files first, manifests last."""
        step_artifacts.write_job(str(self.storage), self.root / "scratch", job, metrics)

    async def complete(
        self, job: JSON, metrics: dict[str, float] | None = None, write: bool = True
    ) -> None:
        meta = job["metadata"]
        if write:
            await asyncio.to_thread(self.write_artifacts, job, metrics)
        await asyncio.to_thread(self.driver.succeed, meta["name"], meta["namespace"])

    async def fail(self, job: JSON, reason: str = "BackoffLimitExceeded") -> None:
        meta = job["metadata"]
        await asyncio.to_thread(self.driver.fail, meta["name"], meta["namespace"], reason)

    async def start(self, job: JSON) -> None:
        meta = job["metadata"]
        await asyncio.to_thread(self.driver.start, meta["name"], meta["namespace"])

    async def run_to_end(
        self, name: str, metrics: list[float] | None = None, timeout: float = 30.0
    ) -> JSON:
        """Complete every Job of `name` as it appears until the run is finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            phase = await self.phase(name)
            if phase in ("Succeeded", "Failed"):
                return await self.status(name)
            for job in await self.active(name):
                if job["spec"].get("suspend"):
                    continue
                t = int(job["metadata"]["labels"][naming.ITERATION_LABEL])
                await self.complete(job, None if metrics is None else {"exact_match": metrics[t]})
            await asyncio.sleep(0.02)
        raise AssertionError(f"{name} did not finish: {json.dumps(await self.status(name))[:2000]}")

    def creates(self, resource: str = "jobs") -> list[int]:
        """Response codes of the operator's create requests for `resource`."""
        return [
            e.code
            for e in self.api.requests.entries(user_agent="spin-operator")
            if e.verb == "create" and e.resource == resource
        ]


class OperatorProcess:
    """The operator (kopf + spin_operator.handlers) on its own event loop in a thread.

    A thread keeps kopf's task bookkeeping (it cancels tasks it did not start at exit) away from
    the test's loop, as a separate process would; `kill()` cancels everything mid-flight.
    """

    def __init__(self, settings: Settings, **controller_kwargs: Any) -> None:
        self.settings = settings
        self.controller_kwargs = {
            "metrics": Metrics(),
            "tracking": Tracking(timeout=5, cooldown=30),
            "retry_base": 0.2,
            "retry_max": 2.0,
        }
        self.controller_kwargs.update(controller_kwargs)
        self.controller: Controller | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._killed = False
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None

    def _main(self) -> None:
        async def main() -> None:
            self.controller = make_controller(self.settings, **self.controller_kwargs)
            ready = asyncio.Event()
            asyncio.get_running_loop().call_soon(self._ready.set)
            await kopf.operator(
                registry=build_registry(self.controller),
                stop_flag=self._stop,
                ready_flag=ready,
                **operator_kwargs(self.settings),
            )

        self._loop = loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(main())
        except RuntimeError as exc:  # killed: the loop was stopped under the operator's feet
            if not self._killed:
                self.error = exc
        except BaseException as exc:
            self.error = exc
        finally:
            if not self._killed:
                loop.close()

    async def start(self) -> OperatorProcess:
        self._thread = threading.Thread(target=self._main, name="spin-operator", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait, 10)
        return self

    async def stop(self) -> None:
        """Clean stop (SIGTERM): kopf runs its cleanup handlers."""
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 15)
        assert not self._thread.is_alive(), "the operator did not stop"
        self._thread = None

    async def kill(self) -> None:
        """Abrupt end (SIGKILL-like): the loop stops wherever the operator is; nothing cleans up."""
        if self._thread is None or self._loop is None:
            return
        self._killed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 15)
        assert not self._thread.is_alive(), "the operator did not die"
        self._thread = None
        # kopf waits for a threading.Event stop flag in an executor thread; with its loop gone that
        # thread would wait forever and hold up the interpreter's exit. Release it (nothing runs).
        self._stop.set()
