"""Rendered Jobs and Services are valid Kubernetes 1.35 objects with the settings a GPU job needs."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from spin_operator.api import types as api
from spin_operator.render import owner_reference, render, render_job, run_owner
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef, plan_step

RUN = RunRef("team", "paper", "3f1c-uid")
SETTINGS = Settings(runtime_image="runtime:1", storage_uri="s3://bkt/runs")

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cpu-only": {
        "generation": {"gpusPerReplica": 0, "backend": "transformers"},
        "training": {"gpusPerNode": 0, "processesPerNode": 2, "globalBatchSize": 64},
        "evaluation": {"gpus": 0},
    },
    "multi-node": {
        "training": {"nodes": 4, "gpusPerNode": 8, "globalBatchSize": 64},
        "generation": {"replicas": 8},
    },
    "kueue": {"scheduling": {"queueName": "team-a", "priorityClassName": "batch-low"}},
    "tolerations": {
        "scheduling": {
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"key": "spot", "value": "true", "effect": "NoExecute", "tolerationSeconds": 60},
            ],
            "nodeSelector": {"gpu": "h100"},
            "serviceAccountName": "spin-jobs",
            "gpuResourceName": "amd.com/gpu",
        }
    },
    "custom-eval": {"evaluation": {"command": ["python", "eval.py"], "image": "eval:1", "gpus": 0}},
    "credentials": {
        "storage": {
            "uri": "s3://bkt/runs",
            "endpoint": "http://minio:9000",
            "credentialsSecret": {"name": "s3"},
        },
        "tracking": {"uri": "http://mlflow:5000", "credentialsSecret": {"name": "ml"}},
        "failurePolicy": {"backoffLimit": 2, "activeDeadlineSeconds": 86400},
        "training": {
            "resources": {
                "requests": {"cpu": "8", "memory": "64Gi"},
                "limits": {"memory": "128Gi"},
            },
            "shmSize": "32Gi",
        },
    },
}


def make(extra: dict[str, Any]) -> api.SPINRunSpec:
    raw = {"model": {"uri": "s3://models/sft"}, "dataset": {"uri": "s3://data/sft.jsonl"}, **extra}
    return resolve_spec(api.SPINRunSpec.model_validate(raw), SETTINGS)


def objects(spec: api.SPINRunSpec, stage: str, attempt: int = 0) -> list[dict[str, Any]]:
    plan = plan_step(spec, SETTINGS, RUN, 3, stage, attempt, mlflow_run_id="r1")  # type: ignore[arg-type]
    return render(plan, spec, RUN)


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_manifests_validate_against_kubernetes_1_35(variant: str, stage: str) -> None:
    for obj in objects(make(VARIANTS[variant]), stage, attempt=1):
        kubernetes_validate.validate(obj, "1.35", strict=True)


def test_validation_is_strict() -> None:
    """The check above can fail: an unknown field is refused."""
    job = objects(make({}), "generate")[0]
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.35", strict=True)


def test_generation_is_an_indexed_job_with_gpu_limits() -> None:
    [job] = objects(make({"generation": {"replicas": 8, "gpusPerReplica": 2}}), "generate")
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (8, 8, "Indexed")
    assert container(job)["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert container(job)["command"][:4] == ["python", "-m", "spin_runtime", "generate"]
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["SPIN_NUM_SHARDS"]["value"] == "8"


def test_training_job_and_headless_service() -> None:
    service, job = objects(
        make({"training": {"nodes": 2, "gpusPerNode": 4, "globalBatchSize": 64}}),
        "train",
        attempt=1,
    )
    name = "paper-i3-train-r1"
    assert service["metadata"]["name"] == name and job["metadata"]["name"] == name
    assert (
        service["spec"]["clusterIP"] == "None"
        and service["spec"]["publishNotReadyAddresses"] is True
    )
    pod = job["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["subdomain"] == name
    cmd = container(job)["command"]
    assert cmd[:4] == ["torchrun", "-m", "spin_runtime", "train"] and "--node-rank" not in cmd
    env = {e["name"]: e for e in container(job)["env"]}  # torchrun's own topology variables
    assert env["PET_MASTER_ADDR"]["value"] == f"{name}-0.{name}"
    assert (env["PET_NNODES"]["value"], env["PET_MASTER_PORT"]["value"]) == ("2", "29500")
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert env["PET_NODE_RANK"]["valueFrom"] == {"fieldRef": {"fieldPath": index}}
    assert (job["spec"]["completions"], job["spec"]["completionMode"]) == (2, "Indexed")
    shm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container(job)["volumeMounts"]


def test_failure_settings_of_a_long_gpu_job() -> None:
    [job] = objects(
        make({"failurePolicy": {"backoffLimit": 3, "activeDeadlineSeconds": 3600}}), "evaluate"
    )
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["podReplacementPolicy"]) == (
        3,
        3600,
        "Failed",
    )
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert "ttlSecondsAfterFinished" not in spec
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "FailJob" and 2 in rules[0]["onExitCodes"]["values"]
    assert rules[1] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }


DISRUPTION_IGNORED = {
    "action": "Ignore",
    "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
}


def test_generation_retries_a_failed_shard_alone() -> None:
    """backoffLimitPerIndex: a failed shard is retried by itself while the others go on (the
    per-Job backoffLimit, which would fail the Job for every shard, is left at its default)."""
    [job] = objects(
        make({"failurePolicy": {"backoffLimit": 2}, "generation": {"replicas": 8}}), "generate"
    )
    spec = job["spec"]
    assert (spec["completionMode"], spec["backoffLimitPerIndex"]) == ("Indexed", 2)
    assert "backoffLimit" not in spec and "maxFailedIndexes" not in spec
    fail_job, ignore = spec["podFailurePolicy"]["rules"]
    # bad input fails the whole Job at once: every shard reads the same dataset and model
    assert fail_job["action"] == "FailJob" and fail_job["onExitCodes"]["values"] == [2, 126, 127]
    assert ignore == DISRUPTION_IGNORED


@pytest.mark.parametrize("backoff", [0, 3])
def test_multi_node_training_restarts_as_a_group(backoff: int) -> None:
    """A replaced rank cannot rejoin torchrun's static rendezvous: any rank's failure or eviction
    fails the Job (backoffLimit 0, disruptions not ignored), whatever failurePolicy.backoffLimit
    says; the operator's next Job restarts every rank from the last epoch checkpoint."""
    spec_ = make(
        {
            "failurePolicy": {"backoffLimit": backoff},
            "training": {"nodes": 4, "gpusPerNode": 8, "globalBatchSize": 64},
        }
    )
    for stage in ("train", "control-train"):
        job = objects(spec_, stage)[-1]
        spec = job["spec"]
        assert spec["backoffLimit"] == 0 and "backoffLimitPerIndex" not in spec
        assert spec["podFailurePolicy"]["rules"] == [
            {
                "action": "FailJob",
                "onExitCodes": {"containerName": stage, "operator": "In", "values": [2, 126, 127]},
            }
        ]


def test_single_node_training_keeps_pod_retries() -> None:
    """One node holds every rank: a new pod restarts the whole group, so backoffLimit applies."""
    job = objects(
        make({"failurePolicy": {"backoffLimit": 2}, "training": {"nodes": 1, "gpusPerNode": 8}}),
        "train",
    )[-1]
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["podFailurePolicy"]["rules"][1] == DISRUPTION_IGNORED


def test_owner_reference_and_labels() -> None:
    [job] = objects(make({}), "evaluate", attempt=2)
    assert job["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "selfplay.dev/v1alpha1",
            "kind": "SPINRun",
            "name": "paper",
            "uid": "3f1c-uid",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    labels = job["metadata"]["labels"]
    assert labels["selfplay.dev/attempt"] == "2" and labels["selfplay.dev/iteration"] == "3"
    assert labels["app.kubernetes.io/managed-by"] == "spin-operator"
    assert run_owner(RUN) == owner_reference(
        "selfplay.dev/v1alpha1", "SPINRun", "paper", "3f1c-uid"
    )


def test_kueue_jobs_are_created_suspended_with_the_queue_label() -> None:
    [job] = objects(make(VARIANTS["kueue"]), "generate")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "batch-low"
    [plain] = objects(make({}), "generate")
    assert "suspend" not in plain["spec"]


def test_scheduling_fields() -> None:
    [job] = objects(make(VARIANTS["tolerations"]), "generate")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["serviceAccountName"] == "spin-jobs"
    assert pod["tolerations"][0] == {
        "key": "nvidia.com/gpu",
        "operator": "Exists",
        "effect": "NoSchedule",
    }
    assert container(job)["resources"]["limits"] == {"amd.com/gpu": "1"}


def test_credentials_only_as_secret_refs() -> None:
    _service, job = objects(make(VARIANTS["credentials"]), "train")
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}
    }
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "ml", "key": "MLFLOW_TRACKING_PASSWORD", "optional": True}
    }
    assert env["AWS_ENDPOINT_URL_S3"] == {
        "name": "AWS_ENDPOINT_URL_S3",
        "value": "http://minio:9000",
    }
    assert env["MLFLOW_RUN_ID"]["value"] == "r1"
    secret_vars = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
    )
    assert all("value" not in env[k] and "secretKeyRef" in env[k]["valueFrom"] for k in secret_vars)
    assert container(job)["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "ephemeral-storage": "10Gi"},
        "limits": {"memory": "128Gi", "nvidia.com/gpu": "1"},
    }


def test_cpu_only_has_no_gpu_resources() -> None:
    spec = make(VARIANTS["cpu-only"])
    for stage in ("generate", "train", "evaluate"):
        job = objects(spec, stage)[-1]
        assert "nvidia.com/gpu" not in str(container(job)["resources"])


def test_pod_security_context() -> None:
    job = render_job(
        plan_step(make({}), SETTINGS, RUN, 0, "generate"), make({}), RUN, run_owner(RUN)
    )
    assert job["spec"]["template"]["spec"]["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container(job)["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.parametrize("stage", ["generate", "train", "evaluate"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_is_podsecurity_restricted_without_a_token(variant: str, stage: str) -> None:
    from tests.charts.test_chart import assert_restricted

    job = objects(make(VARIANTS[variant]), stage)[-1]
    pod = job["spec"]["template"]["spec"]
    assert_restricted(pod)
    assert (
        isinstance(pod["securityContext"]["runAsUser"], int)
        and pod["securityContext"]["runAsUser"] > 0
    )
    assert pod["automountServiceAccountToken"] is False


def test_no_gpu_pods_see_no_gpus_and_gpu_pods_keep_theirs() -> None:
    cpu, gpu = make(VARIANTS["cpu-only"]), make({})
    for stage in ("generate", "train", "evaluate"):
        env = {e["name"]: e.get("value") for e in container(objects(cpu, stage)[-1])["env"]}
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
        assert "NVIDIA_VISIBLE_DEVICES" not in {
            e["name"] for e in container(objects(gpu, stage)[-1])["env"]
        }
    mine = make(
        {
            **VARIANTS["cpu-only"],
            "pod": {"env": [{"name": "NVIDIA_VISIBLE_DEVICES", "value": "none"}]},
        }
    )
    names = [e["name"] for e in container(objects(mine, "generate")[-1])["env"]]
    assert names.count("NVIDIA_VISIBLE_DEVICES") == 1  # the user's own value, not two


def test_ephemeral_storage_request_and_cache_size_limit() -> None:
    job = objects(make({}), "generate")[-1]
    assert container(job)["resources"]["requests"] == {"ephemeral-storage": "10Gi"}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["spin-cache"] == {"name": "spin-cache", "emptyDir": {"sizeLimit": "200Gi"}}
    spec = make(
        {
            "pod": {"cacheSizeLimit": "1Ti"},
            "generation": {"resources": {"limits": {"ephemeral-storage": "50Gi"}}},
        }
    )
    job = objects(spec, "generate")[-1]
    assert "ephemeral-storage" not in container(job)["resources"].get(
        "requests", {}
    )  # defaults to the limit
    assert {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["spin-cache"][
        "emptyDir"
    ] == {"sizeLimit": "1Ti"}
    pvc = make({"pod": {"modelCache": {"claimName": "hf"}}})
    volumes = {
        v["name"]: v for v in objects(pvc, "train")[-1]["spec"]["template"]["spec"]["volumes"]
    }
    assert volumes["spin-cache"] == {
        "name": "spin-cache",
        "persistentVolumeClaim": {"claimName": "hf"},
    }


@pytest.mark.parametrize("bad", ["1.2.3", "-4", "10 Gi", "", "lots"])
def test_cache_size_limit_must_be_a_size(bad: str) -> None:
    with pytest.raises(ValueError, match=r"cacheSizeLimit|cache_size_limit"):
        make({"pod": {"cacheSizeLimit": bad}})


def test_evaluation_resources_come_from_the_spec() -> None:
    spec = make(
        {
            "evaluation": {
                "gpus": 1,
                "resources": {
                    "requests": {"cpu": "4", "memory": "32Gi"},
                    "limits": {"memory": "48Gi"},
                },
            }
        }
    )
    res = container(objects(spec, "evaluate")[-1])["resources"]
    assert res == {
        "requests": {"cpu": "4", "memory": "32Gi", "ephemeral-storage": "10Gi"},
        "limits": {"memory": "48Gi", "nvidia.com/gpu": "1"},
    }
    control = make(
        {"controlArm": {"enabled": True}, "evaluation": {"resources": {"requests": {"cpu": "2"}}}}
    )
    assert (
        container(objects(control, "control-evaluate")[-1])["resources"]["requests"]["cpu"] == "2"
    )
