"""Malformed SPINRuns are refused, each with its field named, while the operator keeps serving.

The corpus of tests/support/broken_spinruns.py (unknown fields, wrong types, impossible values,
oversize names) plus references to Secrets that do not exist. What the schema and its CEL rules
can tell is refused at apply time by the API server's CRD admission (422, or 400 for unknown
fields under strict field validation); what only the operator can tell (a missing Secret) ends
as phase Failed with a condition naming the field. Valid runs applied before and after the
broken ones must complete: one bad object never stalls the operator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import harness
from tests.e2e.harness import Cluster, condition
from tests.support.broken_spinruns import CASES, Broken

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

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


def submit(c: Cluster, obj: dict[str, Any], path: Path, strict: bool) -> tuple[int, str]:
    """``kubectl apply --validate=false`` (the schema's and CEL rules' 422s), or for unknown
    fields the create ``kubectl apply`` sends on a real cluster, with ``fieldValidation=Strict``
    (kubectl cannot negotiate strict validation with the emulator: it has no /openapi/v2)."""
    path.write_text(json.dumps(obj))
    ns = obj["metadata"]["namespace"]
    if strict:
        url = f"/apis/selfplay.dev/v1alpha1/namespaces/{ns}/spinruns?fieldValidation=Strict"
        proc = c.kubectl("create", "--raw", url, "-f", str(path), check=False)
    else:
        proc = c.kubectl("apply", "--validate=false", "-f", str(path), check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_malformed_spinruns_are_refused_with_their_field(
    e2e_quick: Cluster, tmp_path: Path
) -> None:
    c = e2e_quick
    c.apply(harness.spinrun_file(tmp_path, "valid-a"))
    refused: dict[str, str] = {}
    for number, case in enumerate(CASES):
        obj = broken_object(case, c.namespace, number)
        code, output = submit(
            c, obj, tmp_path / f"{case.id}.json", strict=case.id.startswith("unknown")
        )
        assert case.schema_rejects, (
            f"{case.id}: the corpus now has operator-side cases; add them here"
        )
        assert code != 0, f"{case.id}: accepted by the API server:\n{output}"
        assert case.field in output, f"{case.id}: the refusal does not name {case.field}:\n{output}"
        assert c.run(obj["metadata"]["name"]) == {}, f"{case.id}: stored although refused"
        refused[case.id] = output.strip().splitlines()[-1]
    assert len(refused) == len(CASES) >= 30

    for name, patch, _field, _reason in OPERATOR_CASES:
        obj = yaml.safe_load(harness.spinrun_file(tmp_path, name).read_text())
        obj["metadata"]["namespace"] = c.namespace
        for dotted, value in patch.items():
            _, section, leaf = dotted.split(".")
            obj["spec"].setdefault(section, {})[leaf] = value
        code, output = submit(c, obj, tmp_path / f"{name}.json", strict=False)
        assert code == 0, output
    c.apply(harness.spinrun_file(tmp_path, "valid-b"))

    for name, _, field, reason in OPERATOR_CASES:
        run = c.wait_run(name, 120)
        failed = condition(run, "Failed")
        assert run["status"]["phase"] == "Failed" and failed, run["status"]
        assert failed["reason"] == reason and field in failed["message"], failed
        assert not [j for j in c.jobs() if j["metadata"]["name"].startswith(f"{name}-")]
    for name in ("valid-a", "valid-b"):
        assert c.wait_run(name, 300)["status"]["phase"] == "Succeeded", c.diagnostics(name)
    assert c.operator.running and c.operator.starts == 1
    print("\nE2E refusals:\n" + "\n".join(f"  {k}: {v[:150]}" for k, v in refused.items()))
