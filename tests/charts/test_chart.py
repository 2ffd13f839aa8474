"""The Helm chart: lint, render, validate every object, schema, CRD copy, README, pod security.

Every rendered object is validated against the Kubernetes 1.35 OpenAPI schemas in strict mode
(unknown fields fail) and against 1.29, the chart's minimum kubeVersion.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.charts.helm import (
    CHART,
    FULL,
    HELM,
    NAMESPACE,
    NAMESPACED,
    RELEASE,
    ROOT,
    SCENARIOS,
    find,
    helm,
    needs_helm,
    one,
    render,
    render_error,
)

KUBE_VERSIONS = ("1.35", "1.29")
FULLNAME = f"{RELEASE}-spin-operator"


# --------------------------------------------------------------------------- lint and render


@needs_helm
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_strict(scenario: str) -> None:
    proc = helm("lint", "--strict", str(CHART), values=SCENARIOS[scenario])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def _check_service_monitor(obj: dict[str, Any]) -> None:
    """kubernetes-validate has no schema for monitoring.coreos.com: check what the CRD requires."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    spec = obj["spec"]
    assert spec["selector"]["matchLabels"], "a ServiceMonitor without a selector scrapes nothing"
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert spec["endpoints"], "endpoints are required"
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] == "metrics"
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint["interval"])
        assert re.fullmatch(r"([0-9]+(ms|s|m|h))+", endpoint["scrapeTimeout"])


@needs_helm
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_is_valid(scenario: str) -> None:
    objects = render(SCENARIOS[scenario], include_crds=True)
    kinds = {obj["kind"] for obj in objects}
    assert {"CustomResourceDefinition", "ServiceAccount", "Deployment", "ClusterRole"} <= kinds
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            _check_service_monitor(obj)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} invalid for {version}: {exc.message}"
                )


@needs_helm
def test_default_objects() -> None:
    objects = render()
    names = sorted(
        (o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objects
    )
    cluster = f"{NAMESPACE}-{FULLNAME}"
    assert names == [
        ("ClusterRole", cluster, None),
        ("ClusterRole", f"{cluster}-edit", None),
        ("ClusterRole", f"{cluster}-view", None),
        ("ClusterRoleBinding", cluster, None),
        ("Deployment", FULLNAME, NAMESPACE),
        ("Service", f"{FULLNAME}-metrics", NAMESPACE),
        ("ServiceAccount", FULLNAME, NAMESPACE),
    ]


@needs_helm
def test_namespaced_mode_objects() -> None:
    objects = render(NAMESPACED)
    assert sorted(o["metadata"]["namespace"] for o in find(objects, "Role")) == ["team-a", "team-b"]
    assert sorted(o["metadata"]["namespace"] for o in find(objects, "RoleBinding")) == [
        "team-a",
        "team-b",
    ]
    operator_roles = [
        o
        for o in find(objects, "ClusterRole")
        if not o["metadata"]["name"].endswith(("-edit", "-view"))
    ]
    assert len(operator_roles) == 1 and len(find(objects, "ClusterRoleBinding")) == 1


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


@needs_helm
@pytest.mark.parametrize("values", [{}, NAMESPACED])
def test_aggregated_user_roles(values: dict[str, Any]) -> None:
    """`edit` (and `admin`) users may do everything with SPINRuns but write their status; `view`
    users read them (issue 14, item 4). Nothing binds these roles to the operator."""
    from tests.charts.rbac import rule_allows

    objects = render(values)
    roles = {
        o["metadata"]["name"].rsplit("-", 1)[-1]: o
        for o in find(objects, "ClusterRole")
        if any(k.startswith(AGGREGATE) for k in o["metadata"].get("labels", {}))
    }
    assert set(roles) == {"edit", "view"}
    labels = {
        name: {
            k
            for k, v in role["metadata"]["labels"].items()
            if k.startswith(AGGREGATE) and v == "true"
        }
        for name, role in roles.items()
    }
    assert labels == {
        "edit": {AGGREGATE + "edit", AGGREGATE + "admin"},
        "view": {AGGREGATE + "view"},
    }

    def allows(role: str, verb: str, resource: str) -> bool:
        return any(rule_allows(r, verb, "selfplay.dev", resource) for r in roles[role]["rules"])

    for verb in ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"):
        assert allows("edit", verb, "spinruns")
        assert allows("view", verb, "spinruns") == (verb in ("get", "list", "watch"))
    for role in roles:
        assert allows(role, "get", "spinruns/status") and not allows(
            role, "patch", "spinruns/status"
        )
        assert not allows(role, "update", "spinruns/finalizers")
    bound = {
        b["roleRef"]["name"]
        for b in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding")
    }
    assert not bound & {r["metadata"]["name"] for r in roles.values()}
    off = render({**values, "rbac": {"create": True, "aggregateToDefaultRoles": False}})
    assert not [
        o for o in find(off, "ClusterRole") if o["metadata"]["name"].endswith(("-edit", "-view"))
    ]


@needs_helm
def test_optional_objects_toggle() -> None:
    off = render(
        {
            "rbac": {"create": False},
            "serviceAccount": {"create": False, "name": "custom"},
            "metrics": {"service": {"enabled": False}},
        }
    )
    assert sorted(o["kind"] for o in off) == ["Deployment"]
    assert one(off, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "custom"
    assert "serviceAccount.name is required" in render_error({"serviceAccount": {"create": False}})
    assert "needs metrics.service.enabled" in render_error(
        {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
    )


@needs_helm
def test_two_releases_in_different_namespaces_do_not_collide() -> None:
    a = {
        o["metadata"]["name"]
        for o in render(namespace="team-a")
        if "namespace" not in o["metadata"]
    }
    b = {
        o["metadata"]["name"]
        for o in render(namespace="team-b")
        if "namespace" not in o["metadata"]
    }
    assert a and b and not a & b


# --------------------------------------------------------------------------- values schema

BAD_VALUES = [
    ({"unknownKey": 1}, "additional properties 'unknownKey'"),
    ({"image": {"tag": "v1", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"image": {"registry": "x"}}, "additional properties 'registry'"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
    ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
    ({"storage": {"uri": "http://bucket/x"}}, "/storage/uri"),
    ({"storage": {"uri": "/mnt/shared/spin"}}, "/storage/uri"),
    ({"storage": {"endpoint": "minio:9000"}}, "/storage/endpoint"),
    ({"storage": {"credentialsSecret": {"name": "x"}}}, "/storage/credentialsSecret"),
    ({"storage": {"accessKey": "AKIA..."}}, "additional properties 'accessKey'"),
    ({"tracking": {"uri": "mlflow.example.com"}}, "/tracking/uri"),
    ({"logLevel": "VERBOSE"}, "/logLevel"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"health": {"port": "8080"}}, "/health/port"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"metrics": {"service": {"type": "ExternalName"}}}, "/metrics/service/type"),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ({"podSecurityContext": {"privileged": True}}, "additional properties 'privileged'"),
    ({"imagePullSecrets": ["regcred"]}, "/imagePullSecrets/0"),
    ({"tolerations": [{"key": "a", "operator": "Maybe"}]}, "/tolerations/0/operator"),
    ({"affinity": {"nodeAfinity": {}}}, "additional properties 'nodeAfinity'"),
    ({"nodeSelector": {"gpu": True}}, "/nodeSelector/gpu"),
    ({"extraEnv": [{"value": "x"}]}, "/extraEnv/0"),
    ({"resources": {"request": {"cpu": "1"}}}, "additional properties 'request'"),
    ({"rbac": {"create": "yes"}}, "/rbac/create"),
]


@needs_helm
@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[repr(v) for v, _ in BAD_VALUES])
def test_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)


@needs_helm
def test_schema_accepts_platform_assigned_ids() -> None:
    """OpenShift's restricted-v2 assigns UIDs: null removes them, runAsNonRoot stays."""
    objects = render(
        {"podSecurityContext": {"runAsUser": None, "runAsGroup": None, "fsGroup": None}}
    )
    pod_sc = one(objects, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


# --------------------------------------------------------------------------- copies kept in sync


def test_chart_crd_is_the_generated_crd() -> None:
    generated = ROOT / "crds" / "selfplay.dev_spinruns.yaml"
    copied = CHART / "crds" / "selfplay.dev_spinruns.yaml"
    assert copied.read_bytes() == generated.read_bytes(), (
        "the chart's CRD differs from crds/ (regenerated by `make generate`): "
        "cp crds/selfplay.dev_spinruns.yaml charts/spin-operator/crds/"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["selfplay.dev_spinruns.yaml"]


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"]
    settings = pytest.importorskip("spin_operator.settings")
    assert project["version"] == settings.VERSION


def _chart_readme(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "chart_readme.py"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_readme_values_table_is_in_sync() -> None:
    proc = _chart_readme("--check")
    assert proc.returncode == 0, proc.stderr


def test_readme_check_detects_drift_and_undocumented_values(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "README.md").write_text((CHART / "README.md").read_text())
    values = (CHART / "values.yaml").read_text()
    (chart / "values.yaml").write_text(values.replace("logLevel: INFO", "logLevel: DEBUG"))
    drift = _chart_readme("--check", "--chart", str(chart))
    assert drift.returncode == 1 and "out of date" in drift.stderr
    assert _chart_readme("--chart", str(chart)).returncode == 0  # rewrites the table
    assert '| `logLevel` | string | `"DEBUG"` |' in (chart / "README.md").read_text()
    (chart / "values.yaml").write_text(values + "newSetting: 1\n")
    undocumented = _chart_readme("--check", "--chart", str(chart))
    assert undocumented.returncode == 1 and "newSetting" in undocumented.stderr


def test_every_value_has_a_schema_entry() -> None:
    """values.yaml and values.schema.json describe the same keys (the schema is strict)."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if "$ref" in node:
            node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
        if not isinstance(value, dict) or "properties" not in node:
            return
        assert set(value) <= set(node["properties"]), (
            f"{path}: {set(value) - set(node['properties'])}"
        )
        for key, sub in value.items():
            target = node["properties"][key]
            walk(sub, target if isinstance(target, dict) else {}, f"{path}.{key}")

    walk(values, schema, "values")
    assert set(schema["properties"]) - {"global"} == set(values)


# --------------------------------------------------------------------------- the Deployment


def _deployment(values: dict[str, Any]) -> dict[str, Any]:
    return one(render(values), "Deployment")


def _env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = container["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), f"duplicate env: {names}"
    return {e["name"]: e for e in env}


# Volume types allowed by the Pod Security Standards "restricted" profile.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def assert_restricted(pod: dict[str, Any]) -> None:
    """The checks of the Pod Security Standards, "restricted" level (v1.35), on a pod spec."""
    for field in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        assert pod.get(field) in (None, False) or (field == "hostUsers" and pod[field] is False)
    pod_sc = pod.get("securityContext") or {}
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container.get("securityContext") or {}
        run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        assert run_as_non_root is True, container["name"]
        assert sc.get("runAsUser", pod_sc.get("runAsUser")) != 0
        assert sc.get("privileged") in (None, False)
        assert sc.get("allowPrivilegeEscalation") is False
        assert sc.get("capabilities", {}).get("drop") == ["ALL"]
        assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost")
        assert all("hostPort" not in port for port in container.get("ports", []))
        assert sc.get("procMount") in (None, "Default")


@needs_helm
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_deployment_is_restricted(scenario: str) -> None:
    deployment = _deployment(SCENARIOS[scenario])
    pod = deployment["spec"]["template"]["spec"]
    assert_restricted(pod)
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a read-only root needs a writable /tmp"
    assert _env(deployment)["HOME"]["value"] == "/tmp"
    assert pod["securityContext"]["runAsUser"] == 65532  # the images' non-root user
    # The operator needs its API token; the ServiceAccount does not hand it to other pods.
    assert pod["automountServiceAccountToken"] is True
    if SCENARIOS[scenario].get("serviceAccount", {}).get("create", True):
        assert (
            one(render(SCENARIOS[scenario]), "ServiceAccount")["automountServiceAccountToken"]
            is False
        )


def test_restricted_checker_catches_violations() -> None:
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    }
    assert_restricted(good)
    for breakage in (
        lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
        lambda p: p["containers"][0]["securityContext"].update(
            capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}
        ),
        lambda p: p["securityContext"].pop("seccompProfile"),
        lambda p: p["securityContext"].update(runAsNonRoot=False),
        lambda p: p.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]),
        lambda p: p.update(hostNetwork=True),
    ):
        bad = yaml.safe_load(yaml.safe_dump(good))
        breakage(bad)
        with pytest.raises(AssertionError):
            assert_restricted(bad)


@needs_helm
def test_deployment_runs_one_operator() -> None:
    deployment = _deployment({})
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # no leader election in kopf
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["spinctl", "operator"]
    assert container["image"] == "ghcr.io/spin-operator/operator:0.1.0"
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = _env(deployment)
    assert ports == {
        "health": int(env["SPIN_HEALTH_PORT"]["value"]),
        "metrics": int(env["SPIN_METRICS_PORT"]["value"]),
    }
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def _security_json(given: dict[str, Any]) -> str:
    """SPIN_SECURITY as the chart renders it: the `security` value (defaults: empty lists), JSON."""
    keys = (
        "storagePrefixes",
        "s3Endpoints",
        "trackingUris",
        "serviceAccounts",
        "experiments",
        "registeredModels",
    )
    return json.dumps(
        {**{key: [] for key in keys}, "namespaces": {}, **given},
        sort_keys=True,
        separators=(",", ":"),
    )


@needs_helm
def test_default_env_is_the_operator_defaults() -> None:
    env = _env(_deployment({}))
    assert {name: e["value"] for name, e in env.items()} == {
        "SPIN_NAMESPACES": "",
        "SPIN_RUNTIME_IMAGE": "ghcr.io/spin-operator/runtime:0.1.0",
        "SPIN_LOG_LEVEL": "INFO",
        "SPIN_HEALTH_PORT": "8080",
        "SPIN_METRICS_PORT": "9090",
        "SPIN_SECURITY": _security_json({}),
        "HOME": "/tmp",
    }
    settings = pytest.importorskip("spin_operator.settings")
    parsed = settings.Settings.from_env({name: e["value"] for name, e in env.items()})
    # the chart's defaults are the operator's defaults (an operator knows its templates: none)
    assert parsed == settings.Settings(pod_templates={})


@needs_helm
def test_full_env_maps_every_setting() -> None:
    deployment = _deployment(FULL)
    env = _env(deployment)
    plain = {name: e["value"] for name, e in env.items() if "value" in e}
    assert plain == {
        "SPIN_NAMESPACES": "team-a,team-b",
        "SPIN_RUNTIME_IMAGE": "registry.example.com/mirror/spin-runtime:0.1.0-cu130",
        "SPIN_LOG_LEVEL": "DEBUG",
        "SPIN_HEALTH_PORT": "8081",
        "SPIN_METRICS_PORT": "9100",
        "SPIN_STORAGE_URI": "s3://ml-artifacts/spin",
        "SPIN_S3_ENDPOINT": "https://minio.storage.svc:9000",
        "AWS_ENDPOINT_URL_S3": "https://minio.storage.svc:9000",
        "SPIN_S3_REGION": "eu-west-1",
        "AWS_REGION": "eu-west-1",
        "SPIN_S3_SECRET": "spin-s3",
        "SPIN_MLFLOW_URI": "https://mlflow.example.com",
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com",
        "SPIN_MLFLOW_SECRET": "spin-mlflow",
        "SPIN_SECURITY": _security_json(FULL["security"]),
        "HOME": "/tmp",
        "HTTPS_PROXY": "http://proxy.example.com:3128",
    }
    policy = pytest.importorskip("spin_operator.policy").Policy.parse(plain["SPIN_SECURITY"])
    assert policy.of("team-a").storage_prefixes == ("s3://team-a-models/spin",) and policy.of(
        "team-b"
    ).service_accounts == ("spin-jobs",)
    refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "spin-s3", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "spin-s3", "key": "AWS_SECRET_ACCESS_KEY"},
        "MLFLOW_TRACKING_USERNAME": {
            "name": "spin-mlflow",
            "key": "MLFLOW_TRACKING_USERNAME",
            "optional": True,
        },
        "MLFLOW_TRACKING_PASSWORD": {
            "name": "spin-mlflow",
            "key": "MLFLOW_TRACKING_PASSWORD",
            "optional": True,
        },
        "MLFLOW_TRACKING_TOKEN": {
            "name": "spin-mlflow",
            "key": "MLFLOW_TRACKING_TOKEN",
            "optional": True,
        },
    }
    settings = pytest.importorskip("spin_operator.settings")
    parsed = settings.Settings.from_env(plain)
    assert parsed.namespaces == ("team-a", "team-b") and not parsed.clusterwide
    assert (parsed.storage_uri, parsed.s3_endpoint, parsed.s3_region, parsed.s3_secret) == (
        "s3://ml-artifacts/spin",
        "https://minio.storage.svc:9000",
        "eu-west-1",
        "spin-s3",
    )
    assert (parsed.mlflow_uri, parsed.mlflow_secret) == (
        "https://mlflow.example.com",
        "spin-mlflow",
    )
    assert (parsed.log_level, parsed.health_port, parsed.metrics_port) == ("DEBUG", 8081, 9100)


@needs_helm
def test_full_scheduling_and_images() -> None:
    objects = render(FULL)
    pod = one(objects, "Deployment")["spec"]["template"]
    spec = pod["spec"]
    assert (
        spec["containers"][0]["image"]
        == "registry.example.com/mirror/spin-operator@sha256:" + "a" * 64
    )
    assert spec["containers"][0]["imagePullPolicy"] == "Always"
    assert spec["imagePullSecrets"] == FULL["imagePullSecrets"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        assert spec[key] == FULL[key]
    assert pod["metadata"]["annotations"] == FULL["podAnnotations"]
    assert pod["metadata"]["labels"]["example.com/cost-center"] == "ml"
    assert spec["containers"][0]["resources"] == FULL["resources"]
    sa = one(objects, "ServiceAccount")
    assert sa["metadata"]["annotations"] == FULL["serviceAccount"]["annotations"]


# --------------------------------------------------------------------------- labels and metrics


@needs_helm
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_standard_labels_and_selectors(scenario: str) -> None:
    objects = render(SCENARIOS[scenario])
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "spin-operator"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "spin-operator"
        assert labels["helm.sh/chart"] == "spin-operator-0.1.0"
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {
        "app.kubernetes.io/name": "spin-operator",
        "app.kubernetes.io/instance": RELEASE,
    }
    assert selector.items() <= pod_labels.items()
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    for monitor in find(objects, "ServiceMonitor"):
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
        assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
        assert monitor["metadata"]["labels"]["release"] == "prometheus"


@needs_helm
def test_service_monitor_namespace_override() -> None:
    objects = render({"metrics": {"serviceMonitor": {"enabled": True, "namespace": "monitoring"}}})
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]


def test_helm_binary_is_the_pinned_one() -> None:
    if not HELM.is_file():
        pytest.skip("helm is not installed at .tools/bin/helm (run `make tools`)")
    out = subprocess.run(
        [str(HELM), "version", "--short"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert out.startswith("v4."), out


@needs_helm
def test_pod_templates_reach_the_operator() -> None:
    from spin_operator.templates import parse_templates

    templates = {
        "gpu": {
            "default": True,
            "allowOverride": ["pod.env"],
            "pod": {
                "imagePullSecrets": [{"name": "registry"}],
                "modelCache": {"claimName": "hf-cache"},
            },
            "scheduling": {"queueName": "gpu-queue"},
        }
    }
    objects = render({"podTemplates": templates})
    config = one(objects, "ConfigMap")
    assert config["metadata"]["name"] == f"{FULLNAME}-pod-templates"
    parsed = parse_templates(yaml.safe_load(config["data"]["templates.yaml"]))
    assert parsed["gpu"].default and parsed["gpu"].scheduling == {"queueName": "gpu-queue"}
    pod = one(objects, "Deployment")["spec"]["template"]
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["SPIN_POD_TEMPLATES"] == "/etc/spin/pod-templates/templates.yaml"
    assert "checksum/pod-templates" in pod["metadata"]["annotations"]
    for obj in objects:
        kubernetes_validate.validate(obj, "1.35", strict=True)
    assert "podTemplates" in render_error({"podTemplates": {"gpu": {"allowOverride": ["image"]}}})
    assert not find(render(), "ConfigMap")


@needs_helm
def test_leader_election_renders_a_lease_role_and_rolling_updates() -> None:
    values = {"replicas": 2, "leaderElection": {"enabled": True, "leaseSeconds": 20}}
    objects = render(values)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    env = _env(deployment)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    settings = pytest.importorskip("spin_operator.settings")
    parsed = settings.Settings.from_env(
        {n: e["value"] for n, e in env.items() if "value" in e}
        | {"POD_NAMESPACE": NAMESPACE, "POD_NAME": "p-1"}
    )
    assert (
        parsed.leader_election,
        parsed.lease_seconds,
        parsed.lease_namespace,
        parsed.lease_identity,
    ) == (True, 20.0, NAMESPACE, "p-1")
    assert parsed.lease_name == deployment["metadata"]["name"]
    role = next(
        o for o in find(objects, "Role") if o["metadata"]["name"].endswith("-leader-election")
    )
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "patch"],
        }
    ]
    binding = next(
        o for o in find(objects, "RoleBinding") if o["metadata"]["name"] == role["metadata"]["name"]
    )
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


@needs_helm
def test_two_replicas_without_leader_election_are_refused() -> None:
    assert "needs leaderElection.enabled" in render_error({"replicas": 2})
    assert not [
        o for o in find(render({}), "Role") if o["metadata"]["name"].endswith("-leader-election")
    ]
