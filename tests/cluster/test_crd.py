"""The generated CRD on a real API server: created with ``kubectl apply`` (validation on),
Established, and served with its schema (a real server compiles every CEL rule and checks them
against the schema's defaults - it refused the CRD before the has() guards in api/crd.py)."""

from __future__ import annotations

import pytest

from tests.cluster import harness

pytestmark = [pytest.mark.cluster]


def test_crd_is_established_with_its_cel_rules(real_cluster: harness.Session) -> None:
    crd = real_cluster.kubectl.json("get", "crd", "spinruns.selfplay.dev")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True", crd["status"]
    assert conditions.get("NamesAccepted") == "True", crd["status"]
    served = crd["spec"]["versions"][0]
    training = served["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    assert training["x-kubernetes-validations"], "the CEL rules were pruned"
    explained = real_cluster.kubectl("explain", "spinrun.spec.training.globalBatchSize").stdout
    assert "globalBatchSize" in explained
