"""spec.pod (env, pull secrets, volumes, model cache, affinity, labels, revision) and the admin's
pod templates: rendered Jobs stay valid Kubernetes objects, secrets stay out of the spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spin_operator.api import types as api
from spin_operator.render import render
from spin_operator.settings import Settings, SettingsError, resolve_spec
from spin_operator.steps import RunRef, plan_step
from spin_operator.templates import TemplateError, parse_templates
from spin_operator.validation import InvalidSpec, problems_of
from tests.support.broken_spinruns import BASE
from tests.support.crd_schema import admission_errors

RUN = RunRef("team", "paper", "uid-1")
POD: dict[str, Any] = {
    "env": [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "NCCL_DEBUG", "value": "INFO"},
    ],
    "imagePullSecrets": [{"name": "registry"}],
    "volumes": [
        {"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}
    ],
    "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True}],
    "modelCache": {"claimName": "hf-cache", "subPath": "spin"},
    "affinity": {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}
                ]
            }
        }
    },
    "labels": {"team": "nlp", "cost-center.example.com/id": "42"},
    "annotations": {"example.com/owner": "alice"},
}


def _spec(
    pod: dict[str, Any] | None = None, settings: Settings | None = None, **extra: Any
) -> api.SPINRunSpec:
    raw = {
        "model": {"uri": "meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f"},
        "dataset": {"uri": "s3://data/sft.jsonl"},
        "pod": pod or {},
        **extra,
    }
    return resolve_spec(
        api.SPINRunSpec.model_validate(raw),
        settings or Settings(runtime_image="rt:1", storage_uri="s3://bkt/runs"),
    )


def _jobs(spec: api.SPINRunSpec) -> list[dict[str, Any]]:
    settings = Settings(runtime_image="rt:1", storage_uri="s3://bkt/runs")
    return [
        o
        for k in ("generate", "train", "evaluate")
        for o in render(plan_step(spec, settings, RUN, 1, k), spec, RUN)
        if o["kind"] == "Job"
    ]  # type: ignore[arg-type]


def test_pod_customization_reaches_every_job_and_validates() -> None:
    for job in _jobs(_spec(POD)):
        kubernetes_validate.validate(job, "1.35", strict=True)
        template = job["spec"]["template"]
        pod, container = template["spec"], template["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}},
        }
        assert env["NCCL_DEBUG"]["value"] == "INFO"
        assert (
            env["SPIN_HUB_MODEL"]["value"] == "meta-llama/Llama-3.1-8B-Instruct"
            and env["SPIN_HUB_REVISION"]["value"] == "0e9e39f"
        )
        assert pod["imagePullSecrets"] == [{"name": "registry"}]
        assert pod["affinity"] == POD["affinity"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["spin-cache"] == {
            "name": "spin-cache",
            "persistentVolumeClaim": {"claimName": "hf-cache"},
        }
        assert volumes["datasets"] == POD["volumes"][0]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert (
            mounts["spin-cache"]["subPath"] == "spin" and mounts["datasets"]["mountPath"] == "/data"
        )
        labels = template["metadata"]["labels"]
        assert labels["team"] == "nlp" and labels["selfplay.dev/run"] == "paper"
        assert template["metadata"]["annotations"] == POD["annotations"]


def test_without_customization_the_cache_is_an_empty_dir() -> None:
    spec = _spec()
    assert spec.pod.template is None
    for job in _jobs(spec):
        kubernetes_validate.validate(job, "1.35", strict=True)
        assert {"name": "spin-cache", "emptyDir": {"sizeLimit": "200Gi"}} in job["spec"][
            "template"
        ]["spec"]["volumes"]
        assert "imagePullSecrets" not in job["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("pod", "path", "words"),
    [
        (
            {"env": [{"name": "HF_TOKEN", "value": "hf_abc"}]},
            "spec.pod.env[0].value",
            "valueFrom.secretKeyRef",
        ),
        (
            {"env": [{"name": "WANDB_API_KEY", "value": "x"}]},
            "spec.pod.env[0].value",
            "looks like a credential",
        ),
        (
            {
                "env": [
                    {
                        "name": "A",
                        "value": "1",
                        "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}},
                    }
                ]
            },
            "spec.pod.env[0].value",
            "exactly one",
        ),
        (
            {"env": [{"name": "SPIN_CACHE_DIR", "value": "/x"}]},
            "spec.pod.env[0].name",
            "set by the operator",
        ),
        (
            {"volumeMounts": [{"name": "nope", "mountPath": "/x"}]},
            "spec.pod.volumeMounts[0].name",
            "no volume named",
        ),
        ({"volumes": [{"emptyDir": {}}]}, "spec.pod.volumes[0].name", "needs a name"),
        (
            {"volumes": [{"name": "spin-cache", "emptyDir": {}}]},
            "spec.pod.volumes",
            "operator's own volume",
        ),
        ({"modelCache": {"claimName": "Bad_Name"}}, "spec.pod.modelCache.claimName", ""),
        ({"imagePullSecrets": [{"nam": "x"}]}, "spec.pod.imagePullSecrets[0].nam", "unknown field"),
    ],
)
def test_bad_pod_fields_are_named(pod: dict[str, Any], path: str, words: str) -> None:
    obj = {**BASE, "spec": {**BASE["spec"], "pod": pod}}
    found = {p.path: p.message for p in problems_of(obj)}
    assert path in found and words in found[path], found


def test_the_crd_accepts_a_customized_spinrun() -> None:
    obj = {
        **BASE,
        "spec": {**BASE["spec"], "pod": POD, "model": {"uri": "org/model", "revision": "v1.0"}},
    }
    assert problems_of(obj) == [] and admission_errors(obj) == []


TEMPLATES = yaml.safe_load("""
gpu-a100:
  default: true
  allowOverride: [pod.env, pod.labels, scheduling.tolerations]
  pod:
    imagePullSecrets: [{name: registry}]
    modelCache: {claimName: hf-cache}
    env: [{name: NCCL_IB_DISABLE, value: "1"}, {name: NCCL_DEBUG, value: WARN}]
    labels: {platform: ml}
  scheduling:
    queueName: gpu-queue
    priorityClassName: batch
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
cpu:
  pod:
    labels: {platform: cpu}
""")


def _settings(templates: Any = TEMPLATES) -> Settings:
    return Settings(
        runtime_image="rt:1", storage_uri="s3://bkt/runs", pod_templates=parse_templates(templates)
    )


def test_the_default_template_applies_and_allowed_fields_merge() -> None:
    spec = _spec(
        {"env": [{"name": "NCCL_DEBUG", "value": "INFO"}], "labels": {"team": "nlp"}},
        _settings(),
        scheduling={"tolerations": [{"key": "spot", "operator": "Exists"}]},
    )
    assert spec.pod.template == "gpu-a100"
    assert [(e.name, e.value) for e in spec.pod.env] == [
        ("NCCL_IB_DISABLE", "1"),
        ("NCCL_DEBUG", "INFO"),
    ]
    assert spec.pod.labels == {"platform": "ml", "team": "nlp"}
    assert [t.key for t in spec.scheduling.tolerations] == ["nvidia.com/gpu", "spot"]
    assert (
        spec.scheduling.queue_name == "gpu-queue"
        and spec.pod.model_cache
        and spec.pod.model_cache.claim_name == "hf-cache"
    )
    for job in _jobs(spec):
        kubernetes_validate.validate(job, "1.35", strict=True)
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry"}]


def test_a_field_the_template_owns_is_refused_by_name() -> None:
    with pytest.raises(InvalidSpec) as info:
        _spec(
            {"imagePullSecrets": [{"name": "mine"}]}, _settings(), scheduling={"queueName": "other"}
        )
    paths = {p.path: p.message for p in info.value.problems}
    assert set(paths) == {"spec.pod.imagePullSecrets", "spec.scheduling.queueName"}
    assert (
        "set by pod template 'gpu-a100', which does not allow overriding it"
        in paths["spec.pod.imagePullSecrets"]
    )


def test_named_and_unknown_templates() -> None:
    spec = _spec({"template": "cpu"}, _settings())
    assert (
        spec.pod.labels == {"platform": "cpu"} and spec.scheduling.queue_name is None
    )  # not the default's
    with pytest.raises(InvalidSpec, match=r"spec\.pod\.labels: set by pod template 'cpu'"):
        _spec({"template": "cpu", "labels": {"team": "x"}}, _settings())
    with pytest.raises(
        InvalidSpec, match="no pod template 'gpu-h100' \\(the operator has: cpu, gpu-a100\\)"
    ):
        _spec({"template": "gpu-h100"}, _settings())
    with pytest.raises(InvalidSpec, match="the operator has: none"):
        _spec({"template": "gpu"}, _settings({}))
    # Local mode and `spinctl plan` do not know the cluster's templates: the spec runs as written.
    assert _spec({"template": "gpu"}).pod.template == "gpu"


def test_the_operator_reads_templates_from_its_environment(tmp_path: Path) -> None:
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump(TEMPLATES))
    settings = Settings.from_env({"SPIN_POD_TEMPLATES": str(path)})
    assert settings.pod_templates is not None and sorted(settings.pod_templates) == [
        "cpu",
        "gpu-a100",
    ]
    assert Settings.from_env({}).pod_templates == {}
    path.write_text(yaml.safe_dump({"bad": {"allowOverride": ["pod.image"]}}))
    with pytest.raises(SettingsError, match=r"podTemplates.bad.allowOverride"):
        Settings.from_env({"SPIN_POD_TEMPLATES": str(path)})
    with pytest.raises(TemplateError, match="more than one default"):
        parse_templates({"a": {"default": True}, "b": {"default": True}})
    with pytest.raises(TemplateError, match=r"podTemplates.a: env"):
        parse_templates({"a": {"pod": {"env": [{"name": "HF_TOKEN", "value": "secret"}]}}})
