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

import pytest

from tests.cluster.harness import RealCluster
from tests.e2e import harness as e2e
from tests.e2e.test_admission import OPERATOR_CASES, broken_object
from tests.support.broken_spinruns import CASES

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]


def test_malformed_spinruns_are_refused_by_the_api_server(
    cluster_quick: RealCluster, tmp_path: Path
) -> None:
    c = cluster_quick
    started = time.monotonic()
    c.apply(e2e.spinrun_file(tmp_path, "valid-a"))
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

    import yaml

    for name, patch, _field, _reason in OPERATOR_CASES:
        obj = yaml.safe_load(e2e.spinrun_file(tmp_path, name).read_text())
        for dotted, value in patch.items():
            _, section, leaf = dotted.split(".")
            obj["spec"].setdefault(section, {})[leaf] = value
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(obj))
        c.apply(path)
    c.apply(e2e.spinrun_file(tmp_path, "valid-b"))
    for name, _, field, reason in OPERATOR_CASES:
        run = c.wait_run(name, 180)
        failed = e2e.condition(run, "Failed")
        assert run["status"]["phase"] == "Failed" and failed, run["status"]
        assert failed["reason"] == reason and field in failed["message"], failed
    for name in ("valid-a", "valid-b"):
        assert c.wait_run(name, 300)["status"]["phase"] == "Succeeded", c.diagnostics(name)
    print(
        f"\nCLUSTER {len(refused)} refusals + operator-side cases: {time.monotonic() - started:.1f}s"
    )
    print("\n".join(f"  {k}: {v[:160]}" for k, v in refused.items()))
