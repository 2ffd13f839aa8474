"""Helpers of the chart tests: run the pinned helm binary, render the chart with given values.

Rendering is cached per (values, namespace): each `helm template` costs ~50 ms and most tests
look at the same few renderings. Helm itself comes from `make tools` (.tools/bin/helm); tests
that need it are skipped with that hint when it is absent.
"""

from __future__ import annotations

import functools
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "spin-operator"
HELM = ROOT / ".tools" / "bin" / "helm"
RELEASE = "spin"
NAMESPACE = "spin-system"

needs_helm = pytest.mark.skipif(
    not HELM.is_file(),
    reason=f"helm is not installed at {HELM.relative_to(ROOT)} (run `make tools`)",
)

# Values scenarios rendered by several tests.
DEFAULT: dict[str, Any] = {}
NAMESPACED: dict[str, Any] = {"watchNamespaces": ["team-a", "team-b"]}
FULL: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "image": {
        "repository": "registry.example.com/mirror/spin-operator",
        "digest": "sha256:" + "a" * 64,
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "runtime": {
        "image": {"repository": "registry.example.com/mirror/spin-runtime", "tag": "0.1.0-cu130"}
    },
    "storage": {
        "uri": "s3://ml-artifacts/spin",
        "endpoint": "https://minio.storage.svc:9000",
        "region": "eu-west-1",
        "credentialsSecret": "spin-s3",
    },
    "tracking": {"uri": "https://mlflow.example.com", "credentialsSecret": "spin-mlflow"},
    "security": {
        "serviceAccounts": ["spin-jobs"],
        "namespaces": {"team-a": {"storagePrefixes": ["s3://team-a-models/spin"]}},
    },
    "logLevel": "DEBUG",
    "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"}],
    "health": {"port": 8081},
    "metrics": {
        "port": 9100,
        "service": {"annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}, "interval": "15s"},
    },
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/spin"}},
    "resources": {
        "requests": {"cpu": "200m", "memory": "300Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    },
    "nodeSelector": {"node-role.kubernetes.io/control-plane-services": "true"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "platform", "effect": "NoSchedule"}
    ],
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {"key": "nvidia.com/gpu.present", "operator": "DoesNotExist"}
                        ]
                    }
                ]
            }
        }
    },
    "priorityClassName": "platform-critical",
    "podAnnotations": {"example.com/team": "ml-platform"},
    "podLabels": {"example.com/cost-center": "ml"},
}
SCENARIOS = {"default": DEFAULT, "namespaced": NAMESPACED, "full": FULL}


def helm(*args: str, values: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm with `values` written to a temporary values file (never --set: no string coercion)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as handle:
        yaml.safe_dump(values or {}, handle)
        handle.flush()
        return subprocess.run(
            [str(HELM), *args, "-f", handle.name],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@functools.lru_cache(maxsize=32)
def _template(values_json: str, namespace: str, include_crds: bool) -> tuple[int, str, str]:
    extra = ["--include-crds"] if include_crds else []
    proc = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        namespace,
        *extra,
        values=json.loads(values_json),
    )
    return proc.returncode, proc.stdout, proc.stderr


def render(
    values: dict[str, Any] | None = None, *, namespace: str = NAMESPACE, include_crds: bool = False
) -> list[dict[str, Any]]:
    """The objects `helm template` renders; fails the test with helm's message if it fails."""
    code, out, err = _template(json.dumps(values or {}, sort_keys=True), namespace, include_crds)
    if code != 0:
        pytest.fail(f"helm template failed:\n{err}")
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(values: dict[str, Any]) -> str:
    """helm's error message for values that must be rejected; fails the test if they render."""
    code, _out, err = _template(json.dumps(values, sort_keys=True), NAMESPACE, False)
    if code == 0:
        pytest.fail(f"helm template accepted values it should reject: {values!r}")
    return err


def find(
    objects: list[dict[str, Any]], kind: str, name: str | None = None, namespace: str | None = None
) -> list[dict[str, Any]]:
    return [
        obj
        for obj in objects
        if obj["kind"] == kind
        and (name is None or obj["metadata"]["name"] == name)
        and (namespace is None or obj["metadata"].get("namespace") == namespace)
    ]


def one(objects: list[dict[str, Any]], kind: str, namespace: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, namespace=namespace)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]
