"""Malformed SPINRuns against the real API server: ``kubectl apply`` with validation on.

The corpus of tests/support/broken_spinruns.py goes through plain ``kubectl apply -f`` (client-side
schema validation from the server's OpenAPI, then server-side strict field validation, the CRD's
structural schema and its CEL rules): each must be refused naming its field, and nothing stored.
Valid runs applied before and after must complete (stand-in pods): one bad object never stalls
the operator. No ``--validate=false``, no raw ``fieldValidation`` URL: the real server serves
/openapi/v3, so kubectl negotiates exactly what a user gets.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import kit
from tests.cluster.harness import RealCluster
from tests.support.broken_spinruns import CASES, Broken

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]

# Accepted by the API server, refused by the operator: (id, patch, field, reason).
OPERATOR_CASES = [
    ("missing-s3-secret", {"spec.storage.credentialsSecret": {"name": "no-such-s3"}},
     "spec.storage.credentialsSecret.name", "SecretNotFound"),
    ("missing-mlflow-secret", {"spec.tracking.credentialsSecret": {"name": "no-such-mlflow"}},
     "spec.tracking.credentialsSecret.name", "SecretNotFound"),
]  # fmt: skip # a table: one case per line


def broken_object(case: Broken, namespace: str, number: int) -> dict[str, Any]:
    obj = case.build()
    obj["metadata"]["namespace"] = namespace
    if "metadata.name" not in case.patch:
        obj["metadata"]["name"] = f"bad-{number:02d}"
    return obj


def test_malformed_spinruns_are_refused_by_the_api_server(
    cluster_quick: RealCluster, tmp_path: Path
) -> None:
    c = cluster_quick
    started = time.monotonic()
    c.apply(kit.spinrun_file(tmp_path, "valid-a"))
    refused: dict[str, str] = {}
    for number, case in enumerate(CASES):
        obj = broken_object(case, c.namespace, number)
        path = tmp_path / f"{case.id}.json"
        path.write_text(json.dumps(obj))
        proc = c.kubectl("apply", "-f", str(path), check=False)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{case.id}: accepted by the API server:\n{output}"
        assert case.field in output, f"{case.id}: the refusal does not name {case.field}:\n{output}"
        assert c.run(obj["metadata"]["name"]) == {}, f"{case.id}: stored although refused"
        refused[case.id] = output.strip().splitlines()[-1]
    assert len(refused) == len(CASES) >= 30

    for name, patch, _field, _reason in OPERATOR_CASES:
        obj = yaml.safe_load(kit.spinrun_file(tmp_path, name).read_text())
        for dotted, value in patch.items():
            _, section, leaf = dotted.split(".")
            obj["spec"].setdefault(section, {})[leaf] = value
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(obj))
        c.apply(path)
    c.apply(kit.spinrun_file(tmp_path, "valid-b"))
    for name, _, field, reason in OPERATOR_CASES:
        run = c.wait_run(name, 180)
        failed = kit.condition(run, "Failed")
        assert run["status"]["phase"] == "Failed" and failed, run["status"]
        assert failed["reason"] == reason and field in failed["message"], failed
    for name in ("valid-a", "valid-b"):
        assert c.wait_run(name, 300)["status"]["phase"] == "Succeeded", c.diagnostics(name)
    print(
        f"\nCLUSTER {len(refused)} refusals + operator-side cases: {time.monotonic() - started:.1f}s"
    )
    print("\n".join(f"  {k}: {v[:160]}" for k, v in refused.items()))
