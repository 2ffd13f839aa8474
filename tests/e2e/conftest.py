"""Fixtures of the end-to-end suite: the emulated API server (``k8s_api``, from
tests/support/k8s_emulator.py) with the executor playing kubelet and Job controller on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.executor import Executor
from tests.support.k8s_emulator import K8sApi


@pytest.fixture
def executor(k8s_api: K8sApi, tmp_path: Path) -> Iterator[Executor]:
    """The kubelet/Job-controller stand-in, watching every namespace of ``k8s_api``."""
    with Executor(k8s_api.url, tmp_path / "pods", backoff_s=0.1, grace_s=1.0) as ex:
        yield ex
    assert not ex.errors, "executor errors:\n" + "\n".join(ex.errors)
