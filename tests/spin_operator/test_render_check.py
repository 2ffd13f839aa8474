"""The check Job before iteration 0's generation: one small CPU pod, restricted like every step,
with the run's storage credentials, Secrets and ServiceAccount, never retried by Kubernetes."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from spin_operator.api import types as api
from spin_operator.naming import parse_job_name
from spin_operator.render import render
from spin_operator.steps import CHECK_RESOURCES, plan_step
from tests.spin_operator.test_render import RUN, SETTINGS, VARIANTS, container, make


def check_job(spec: api.SPINRunSpec, attempt: int = 0) -> dict[str, Any]:
    [job] = render(
        plan_step(spec, SETTINGS, RUN, 0, "check", attempt, mlflow_run_id="r1"), spec, RUN
    )
    return job


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_check_job_is_valid_restricted_and_has_no_gpu(variant: str) -> None:
    from tests.charts.test_chart import assert_restricted

    spec = make(VARIANTS[variant])
    job = check_job(spec, attempt=1)
    kubernetes_validate.validate(job, "1.35", strict=True)
    pod = job["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert pod["automountServiceAccountToken"] is False
    c = container(job)
    assert "gpu" not in str(c["resources"])  # nvidia.com/gpu, amd.com/gpu: none requested
    env = {e["name"]: e for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    assert job["spec"]["backoffLimit"] == 0 and "backoffLimitPerIndex" not in job["spec"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob"
    assert rules[0]["onExitCodes"] == {
        "containerName": "check",
        "operator": "In",
        "values": [2, 126, 127],
    }
    sched = spec.scheduling
    assert pod.get("serviceAccountName") == sched.service_account_name
    assert pod.get("nodeSelector", {}) == dict(sched.node_selector)
    assert job["spec"].get("suspend", False) == bool(sched.queue_name)  # Kueue admits it too


def test_the_check_runs_the_runtime_check_with_generations_dataset_and_model_flags() -> None:
    spec = make(
        {
            "model": {
                "uri": "s3://models/sft",
                "tokenizer": "s3://tok-bkt/x",
                "chatTemplate": "s3://tpl-bkt/c.jinja",
            },
            "dataset": {
                "uri": "s3://data/sft.jsonl",
                "evalSamples": 16,
                "maxSkippedFraction": 0.05,
            },
        }
    )
    job = check_job(spec)
    assert job["metadata"]["name"] == "paper-i0-check"
    parsed = parse_job_name("paper-i0-check")
    assert parsed is not None and (parsed.iteration, parsed.stage, parsed.attempt) == (
        0,
        "check",
        0,
    )
    argv = container(job)["command"]
    assert argv[:4] == ["python", "-m", "spin_runtime", "check"]
    gen = plan_step(spec, SETTINGS, RUN, 0, "generate").argv

    def flags(args: Any, names: tuple[str, ...]) -> dict[str, str]:
        return {a: args[i + 1] for i, a in enumerate(args) if a in names}

    shared = (
        "--model",
        "--tokenizer",
        "--chat-template",
        "--dataset",
        "--eval-samples",
        "--seed",
        "--max-skipped-fraction",
    )
    assert flags(argv, shared) == flags(list(gen), shared)
    assert flags(argv, ("--output",)) == {
        "--output": "s3://bkt/runs/team/paper/iter-000/check/report.json"
    }
    assert container(job)["image"] == "runtime:1"


def test_the_check_gets_storage_credentials_but_not_mlflows() -> None:
    job = check_job(make(VARIANTS["credentials"]))
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000"
    assert not [n for n in env if n.startswith(("MLFLOW_", "SPIN_TRACKING_"))]


def test_check_resources_default_modest_and_come_from_the_spec() -> None:
    job = check_job(make({}))
    assert container(job)["resources"] == {
        "requests": {**CHECK_RESOURCES.requests, "ephemeral-storage": "1Gi"},
        "limits": dict(CHECK_RESOURCES.limits),
    }
    assert CHECK_RESOURCES.requests == {"cpu": "500m", "memory": "1Gi"}
    mine = make(
        {
            "dataset": {
                "uri": "s3://data/sft.jsonl",
                "checkResources": {"requests": {"memory": "16Gi"}, "limits": {"memory": "32Gi"}},
            }
        }
    )
    assert container(check_job(mine))["resources"] == {
        "requests": {"memory": "16Gi", "ephemeral-storage": "1Gi"},
        "limits": {"memory": "32Gi"},
    }


def test_the_check_uses_the_generation_image_when_one_is_set() -> None:
    job = check_job(make({"generation": {"image": "vllm-runtime:2"}}))
    assert container(job)["image"] == "vllm-runtime:2"


def test_there_is_no_check_after_iteration_0() -> None:
    with pytest.raises(ValueError, match="iteration 0 only"):
        plan_step(make({}), SETTINGS, RUN, 1, "check")
