"""Fixtures of the end-to-end suite: the API server, the executor (kubelet stand-in), kubectl."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import kmock
import pytest

from tests.support.executor import Executor


class _PlainKmock:
    """TEMPORARY: kmock's emulator in a thread until tests/support/k8s_emulator.py lands."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.url = ""

    def start(self) -> _PlainKmock:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        self.ready.wait(10)
        return self

    async def _main(self) -> None:
        self.stop_event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            emulator.resources.load_bundled()
            self.url = str(server.url).rstrip("/")
            self.ready.set()
            await self.stop_event.wait()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(5)


@pytest.fixture
def api_url() -> Iterator[str]:
    server = _PlainKmock().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def executor(api_url: str, tmp_path: Path) -> Iterator[Executor]:
    """The kubelet/Job-controller stand-in, watching every namespace of ``api_url``."""
    with Executor(api_url, tmp_path / "pods", backoff_s=0.1, grace_s=1.0) as ex:
        yield ex
