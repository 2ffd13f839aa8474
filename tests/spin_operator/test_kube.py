"""The operator's small API client against the emulated API server (kubeconfig login)."""

from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace

import pytest

from spin_operator.handlers import login
from spin_operator.kube import (
    ApiError,
    Kube,
    _decoded,
    _ssl_context,
    job_path,
    secret_path,
    spinrun_path,
)
from tests.support.k8s_emulator import K8sApi

JOB = {
    "apiVersion": "batch/v1",
    "kind": "Job",
    "metadata": {"name": "j1", "namespace": "default", "labels": {"a": "b"}},
    "spec": {
        "template": {
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}
        }
    },
}


async def test_calls_and_errors(k8s_api: K8sApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(k8s_api.kubeconfig_path))
    kube = Kube(login)
    try:
        created = await kube.create(job_path("default"), JOB)
        assert created["metadata"]["uid"]
        with pytest.raises(ApiError) as err:
            await kube.create(job_path("default"), JOB)
        assert err.value.status == 409
        assert await kube.get(secret_path("default", "missing")) is None
        patched = await kube.patch(job_path("default", "j1"), {"spec": {"suspend": True}})
        assert patched["spec"]["suspend"] is True
        listing = await kube.request("GET", job_path("default"), params={"labelSelector": "a=b"})
        assert [i["metadata"]["name"] for i in listing["items"]] == ["j1"]
        assert await kube.delete(job_path("default", "j1")) is True
        assert await kube.delete(job_path("default", "j1")) is False
        with pytest.raises(ApiError) as err:
            await kube.patch(spinrun_path("default", "nope", status=True), {"status": {}})
        assert err.value.status == 404
    finally:
        await kube.close()
    agents = {e.user_agent for e in k8s_api.requests.entries()}
    assert agents == {"spin-operator"}


def test_tls_settings(tmp_path: Path) -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"
    assert _decoded(base64.b64encode(pem).decode()) == pem
    assert _decoded(pem.decode()) == pem
    info = SimpleNamespace(server="http://127.0.0.1:1", insecure=None)
    assert _ssl_context(info) is False
    info = SimpleNamespace(server="https://k8s:443", insecure=True)
    assert _ssl_context(info) is False
