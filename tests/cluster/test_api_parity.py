"""The models refuse what the real API server refuses (issue 14 item 1), checked against it.

For each case a SPINRun spec with the bad value is refused by the models at its field path, and
the same value put where the operator renders it, in a real Job of that spec, is refused by the
real API server (``kubectl create --dry-run=server``): the models are not stricter by guess, and
a run with such a spec would otherwise have failed only at the first create. The Job without the
bad value is accepted, so each refusal is the value's.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from spin_operator.render import render
from spin_operator.settings import Settings
from spin_operator.steps import RunRef, plan_step
from spin_operator.validation import parse, problems_of
from tests.cluster.harness import Session
from tests.spin_operator.reconciler_world import spin_object

pytestmark = [pytest.mark.cluster]

JSON = dict[str, Any]
Mutate = Callable[[JSON], None]


def pod(job: JSON) -> JSON:
    return job["spec"]["template"]["spec"]


def container(job: JSON) -> JSON:
    return pod(job)["containers"][0]


def tolerate(t: JSON) -> Mutate:
    return lambda job: pod(job).setdefault("tolerations", []).append(t)


def node_selector(key: str, value: str) -> Mutate:
    return lambda job: pod(job).setdefault("nodeSelector", {}).update({key: value})


def resources(kind: str, name: str, value: str) -> Mutate:
    return lambda job: (
        container(job).setdefault("resources", {}).setdefault(kind, {}).update({name: value})
    )


def secret_env(key: str) -> Mutate:
    return lambda job: (
        container(job)
        .setdefault("env", [])
        .append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": key}}})
    )


def cpu_over_limit(job: JSON) -> None:
    container(job)["resources"] = {"requests": {"cpu": "9"}, "limits": {"cpu": "8"}}


CASES: list[tuple[str, JSON, str, Mutate]] = [
    ("toleration value without key", {"scheduling": {"tolerations": [{"value": "x", "effect": "NoSchedule"}]}},
     "spec.scheduling.tolerations[0].operator", tolerate({"value": "x", "effect": "NoSchedule"})),
    ("Exists with a value", {"scheduling": {"tolerations": [{"key": "k", "operator": "Exists", "value": "x"}]}},
     "spec.scheduling.tolerations[0].value", tolerate({"key": "k", "operator": "Exists", "value": "x"})),
    ("tolerationSeconds without NoExecute",
     {"scheduling": {"tolerations": [{"key": "k", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 5}]}},
     "spec.scheduling.tolerations[0].tolerationSeconds",
     tolerate({"key": "k", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 5})),
    ("node selector key", {"scheduling": {"nodeSelector": {"bad key": "v"}}},
     "spec.scheduling.nodeSelector.bad key", node_selector("bad key", "v")),
    ("node selector value", {"scheduling": {"nodeSelector": {"pool": "a b"}}},
     "spec.scheduling.nodeSelector.pool", node_selector("pool", "a b")),
    ("quantity 1.2.3", {"training": {"resources": {"requests": {"cpu": "1.2.3"}}}},
     "spec.training.resources.requests.cpu", resources("requests", "cpu", "1.2.3")),
    ("quantity -4", {"training": {"resources": {"requests": {"memory": "-4"}}}},
     "spec.training.resources.requests.memory", resources("requests", "memory", "-4")),
    ("Secret key with a space",
     {"pod": {"env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "my key"}}}]}},
     "spec.pod.env[0].valueFrom.secretKeyRef.key", secret_env("my key")),
    ("request above limit", {"training": {"resources": {"requests": {"cpu": "9"}, "limits": {"cpu": "8"}}}},
     "spec.training.resources.requests.cpu", cpu_over_limit),
]  # fmt: skip # a table: one case per line


def training_job() -> JSON:
    spec = parse(spin_object())
    run = RunRef("default", "parity", "0a0a0a0a-0000-4000-8000-000000000000")
    plan = plan_step(spec, Settings(), run, 0, "train", 0, None)
    return next(o for o in render(plan, spec, run) if o["kind"] == "Job")


def server_dry_run(session: Session, job: JSON) -> tuple[int, str]:
    proc = session.kubectl(
        "create", "--dry-run=server", "-f", "-", check=False, stdin=json.dumps(job)
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def valid_job(real_cluster: Session) -> JSON:
    job = training_job()
    code, out = server_dry_run(real_cluster, job)
    assert code == 0, out  # the Job as rendered is accepted: each refusal below is the value's
    return job


@pytest.mark.parametrize(("case", "spec", "field", "mutate"), CASES, ids=[c[0] for c in CASES])
def test_models_and_api_server_refuse_the_same(
    real_cluster: Session, valid_job: JSON, case: str, spec: JSON, field: str, mutate: Mutate
) -> None:
    problems = {p.path: p.message for p in problems_of(spin_object(**spec))}
    assert field in problems, problems
    job = copy.deepcopy(valid_job)
    mutate(job)
    code, out = server_dry_run(real_cluster, job)
    assert code != 0, f"{case}: the API server accepted it"
    assert "invalid" in out.lower() or "error" in out.lower(), out
    print(f"\nAPI server on {case}: {out.strip().splitlines()[-1][:300]}")
