"""The chart's RBAC: exactly the API calls the operator makes, in both modes.

Two kinds of checks:
- static: the rendered rules, mode by mode, equal the list in docs/design.md ("The operator
  process"), with no wildcards, no peering resources and Secrets `get` only;
- against the real operator: `spinctl operator` runs against the emulated API server
  (tests/support/k8s_emulator.py records every request) through a small SPINRun lifecycle
  (create, a failed Job retried, a Job deleted behind the operator's back, suspend/resume, Jobs
  complete, a multi-node training Job with its headless Service, delete). Every request it made
  must be allowed by the rendered RBAC of that mode, evaluated like the API server's authorizer
  (namespaced grants do not allow cluster-wide calls); every granted (group, resource, verb) must
  have been used or be in ALLOW_LIST below, with the reason it is granted anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.charts.helm import NAMESPACE, NAMESPACED, RELEASE, ROOT, needs_helm, render
from tests.charts.rbac import Call, Grants

SA = f"{RELEASE}-spin-operator"
WATCHED = NAMESPACED["watchNamespaces"]  # ["team-a", "team-b"]
MODES = {"clusterwide": {}, "namespaced": NAMESPACED}

# Granted per watched namespace (Role) or in every namespace (ClusterRole). Measured: what the
# real operator does in the lifecycle below (kopf: list/watch and event posts; the operator's own
# client, spin_operator/kube.py: everything else).
NAMESPACED_RULES = (
    {("selfplay.dev", "spinruns", verb) for verb in ("list", "watch", "patch")}
    | {
        ("selfplay.dev", "spinruns/status", "patch"),
        ("selfplay.dev", "spinruns/finalizers", "update"),
    }
    | {("batch", "jobs", verb) for verb in ("get", "list", "watch", "create", "patch", "delete")}
    | {("", "services", verb) for verb in ("create", "delete")}
    | {("", "events", "create"), ("", "events", "list"), ("", "pods", "list")}
)
# Secrets: `get` only, and only through namespaced Roles (docs/security.md, threat 5): in each
# watched namespace (namespaced mode) or each of rbac.secretCheckNamespaces (cluster-wide mode).
SECRET_RULES = {("", "secrets", "get")}
# Cluster-scoped, both modes: kopf's CRD observation.
CRD_RULES = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")}
# Cluster-scoped, namespaced mode only: kopf's namespace observation (a cluster-wide kopf
# watches all namespaces at once and never lists Namespaces).
NAMESPACE_RULES = {("", "namespaces", v) for v in ("list", "watch")}

# Granted, but the lifecycle below does not exercise them: why they stay granted, and the operator
# source that makes the call (a test checks the source still does). Empty today: the lifecycle
# uses every grant. Add an entry only for a call the lifecycle cannot provoke.
ALLOW_LIST: dict[tuple[str, str, str], tuple[str, str]] = {
    ("selfplay.dev", "spinruns/finalizers", "update"): (
        "never called: OwnerReferencesPermissionEnforcement admits children with blockOwnerDeletion "
        "only for users who may update the owner's finalizers (tests/cluster shows the 403)",
        '"blockOwnerDeletion": True',
    ),
}


def _grants(values: dict[str, Any]) -> Grants:
    return Grants.from_objects(render(values), NAMESPACE, SA)


def _scoped_pairs(
    values: dict[str, Any],
) -> tuple[set[tuple[str, str, str]], dict[str, set[tuple[str, str, str]]]]:
    grants = _grants(values)
    cluster = Grants(cluster=grants.cluster).pairs()
    per_ns = {ns: Grants(namespaced={ns: rules}).pairs() for ns, rules in grants.namespaced.items()}
    return cluster, per_ns


# --------------------------------------------------------------------------- static


@needs_helm
def test_clusterwide_rules() -> None:
    cluster, per_ns = _scoped_pairs({})
    assert cluster == NAMESPACED_RULES | CRD_RULES, "no Secret access cluster-wide"
    assert per_ns == {}


@needs_helm
def test_clusterwide_secret_checks_are_namespaced_grants() -> None:
    values = {"rbac": {"secretCheckNamespaces": ["team-a"]}}
    cluster, per_ns = _scoped_pairs(values)
    assert cluster == NAMESPACED_RULES | CRD_RULES
    assert per_ns == {"team-a": SECRET_RULES}
    grants = _grants(values)
    assert grants.allows(Call("get", "", "secrets", "team-a"))
    for ns in ("team-b", "kube-system", NAMESPACE):
        assert not grants.allows(Call("get", "", "secrets", ns)), ns
    env = {
        e["name"]: e.get("value")
        for o in render(values)
        if o["kind"] == "Deployment"
        for e in o["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["SPIN_SECRET_CHECK_NAMESPACES"] == "team-a"


@needs_helm
def test_namespaced_rules() -> None:
    cluster, per_ns = _scoped_pairs(NAMESPACED)
    assert cluster == CRD_RULES | NAMESPACE_RULES, "only kopf's observation is cluster-wide"
    assert per_ns == dict.fromkeys(WATCHED, NAMESPACED_RULES | SECRET_RULES)


@needs_helm
@pytest.mark.parametrize("mode", sorted(MODES))
def test_rules_are_minimal_by_construction(mode: str) -> None:
    objects = render(MODES[mode])
    for role in (o for o in objects if o["kind"] in ("Role", "ClusterRole")):
        labels = role["metadata"].get("labels") or {}
        if any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in labels):
            continue  # for people (kubectl apply/edit), never bound to the operator: test_chart.py
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"wildcard in {role['metadata']['name']}: {rule}"
            assert "nonResourceURLs" not in rule and "resourceNames" not in rule
            forbidden = {"escalate", "bind", "impersonate", "deletecollection", "update"}
            if rule["resources"] == ["spinruns/finalizers"]:
                forbidden.discard("update")  # ownerReference admission: see ALLOW_LIST
            assert not forbidden & set(rule["verbs"])
            assert not any("peering" in r for r in rule["resources"]), (
                "the operator runs standalone"
            )
            if "secrets" in rule["resources"]:
                assert rule["verbs"] == ["get"], "Secrets: get only (existence checks)"
                assert role["kind"] == "Role", "Secrets: never a cluster-wide grant"
    assert not any(
        o["kind"] == "Role" and o["metadata"]["namespace"] == NAMESPACE for o in objects
    ), "nothing is granted in the operator's own namespace: it watches no peering objects there"


@needs_helm
def test_bindings_name_the_operator_service_account() -> None:
    objects = render(NAMESPACED)
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == SA
    bindings = [o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert len(bindings) == 1 + len(WATCHED)
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": SA, "namespace": NAMESPACE}
        ]


@needs_helm
def test_authorizer_model_denies_what_it_should() -> None:
    """The evaluator the lifecycle test relies on can say no."""
    namespaced, clusterwide = _grants(NAMESPACED), _grants({})
    assert namespaced.allows(Call("create", "batch", "jobs", "team-a"))
    assert not namespaced.allows(Call("create", "batch", "jobs", "team-c"))  # not watched
    assert not namespaced.allows(Call("list", "batch", "jobs", None))  # all-namespace list
    assert namespaced.allows(Call("list", "", "namespaces", None))
    assert not clusterwide.allows(Call("list", "", "namespaces", None))
    assert not namespaced.allows(Call("get", "", "secrets", NAMESPACE))  # its own namespace
    assert not namespaced.allows(Call("patch", "selfplay.dev", "spinruns/scale", "team-a"))
    assert clusterwide.allows(Call("watch", "selfplay.dev", "spinruns", None))
    assert not clusterwide.allows(Call("list", "", "secrets", "team-a"))
    assert not clusterwide.allows(Call("get", "", "secrets", "kube-system"))
    assert namespaced.allows(Call("get", "", "secrets", "team-a"))
    assert not clusterwide.allows(Call("get", "selfplay.dev", "spinruns", "team-a"))
    assert not clusterwide.allows(Call("update", "batch", "jobs", "team-a"))
    assert not clusterwide.allows(Call("create", "", "pods", "team-a"))
    assert not clusterwide.allows(Call("create", "coordination.k8s.io", "leases", NAMESPACE))


def test_allow_list_entries_are_granted_and_still_called() -> None:
    assert set(ALLOW_LIST) <= NAMESPACED_RULES | SECRET_RULES | CRD_RULES | NAMESPACE_RULES
    source = "\n".join(p.read_text() for p in (ROOT / "operator" / "spin_operator").glob("*.py"))
    for pair, (_why, witness) in ALLOW_LIST.items():
        assert witness in source, (
            f"{pair}: the operator no longer calls {witness!r}; drop the grant"
        )


# --------------------------------------------------------------------------- the real operator

_MISSING = [
    name
    for name in ("spin_operator.handlers", "tests.support.k8s_emulator")
    if importlib.util.find_spec(name) is None
]
SPINCTL = Path(sys.executable).with_name("spinctl")
if not SPINCTL.is_file():
    _MISSING.append(f"the spinctl console script next to {sys.executable} (make venv)")
needs_operator = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"the operator lifecycle RBAC check needs {', '.join(_MISSING)}",
)
TIMEOUT = 30.0


def _job_complete(api: Any, job: dict[str, Any], workdir: Path) -> None:
    """What the Job's pods would leave behind: its artifacts (manifests last), then the status."""
    from spin_common import manifest, storage
    from spin_common.layout import RunLayout
    from spin_operator import naming

    labels = job["metadata"]["labels"]
    ns, run = job["metadata"]["namespace"], labels[naming.RUN_LABEL]
    iteration = RunLayout.for_run(str(workdir / "artifacts"), ns, run).iteration(
        int(labels[naming.ITERATION_LABEL])
    )
    stage = labels[naming.STAGE_LABEL]
    scratch = workdir / "scratch" / job["metadata"]["name"]
    scratch.mkdir(parents=True, exist_ok=True)
    completions = job["spec"].get("completions") or 1
    if stage == "check":  # `spin_runtime check --output`: the report, ok
        report = {"ok": True, "problems": [], "dataset": {"rows": 1, "usable": 1, "skipped": 0}}
        (scratch / "report.json").write_text(json.dumps(report))
        storage.upload_file(scratch / "report.json", iteration.check_report)
    elif stage == "generate":
        for index in range(completions):
            shard = scratch / f"shard-{index}.jsonl"
            shard.write_text(
                json.dumps(
                    {"id": index, "split": "train", "prompt": "p", "real": "r", "generated": "g"}
                )
                + "\n"
            )
            manifest.write_file_artifact(
                shard, iteration.shard(index, completions), "generated", {"records": 1}
            )
    elif stage == "train":
        (scratch / "config.json").write_text("{}")
        manifest.write_dir_artifact(scratch, iteration.model, "model")
    else:
        (scratch / "results.json").write_text(
            json.dumps({"metrics": {"exact_match": 0.5}, "baseline": None})
        )
        manifest.write_dir_artifact(
            scratch, iteration.eval, "eval", {"metrics": {"exact_match": 0.5}}
        )
    _job_status(api, job, "Complete", succeeded=completions)


def _job_status(api: Any, job: dict[str, Any], condition: str, **counts: int) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    first = "SuccessCriteriaMet" if condition == "Complete" else "FailureTarget"
    status = {
        "startTime": now,
        "active": 0,
        **counts,
        "conditions": [
            {
                "type": t,
                "status": "True",
                "reason": "Test",
                "message": "",
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
            for t in (first, condition)
        ],
    }
    if condition == "Complete":
        status["completionTime"] = now
    meta = job["metadata"]
    api.patch(
        "jobs", meta["name"], {"status": status}, namespace=meta["namespace"], subresource="status"
    )


def _spinrun(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "s3://models/tiny"},
        "dataset": {"uri": "s3://data/sft.jsonl", "maxSamples": 64, "evalSamples": 8},
        "iterations": 1,
        "generation": {"replicas": 2},
        "training": {"nodes": 2},
        "storage": {"credentialsSecret": {"name": "s3-creds"}},
        "failurePolicy": {"maxRetries": 3},
    }
    body.update(spec)
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": name, "namespace": "team-a"},
        "spec": body,
    }


@contextlib.contextmanager
def _operator(api: Any, workdir: Path, namespaces: list[str]) -> Iterator[Callable[[], str]]:
    """`spinctl operator` as the Deployment runs it: settings from the environment."""
    log = workdir / "operator.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(api.kubeconfig_path),
        "SPIN_NAMESPACES": ",".join(namespaces),
        "SPIN_STORAGE_URI": str(workdir / "artifacts"),
        "SPIN_RUNTIME_IMAGE": "registry.example.com/spin-runtime:test",
        "SPIN_LOG_LEVEL": "DEBUG",
        "SPIN_POD_CHECK_SECONDS": "1",  # look at a waiting Job's pods soon: the lifecycle waits for it
        "SPIN_HEALTH_PORT": "0",
        "SPIN_METRICS_PORT": "0",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(SPINCTL), "operator"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield lambda: log.read_text()[-6000:]
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _wait(api: Any, what: str, probe: Callable[[], Any], logs: Callable[[], str]) -> Any:
    try:
        return api.wait_for(probe, timeout=TIMEOUT, interval=0.05)
    except TimeoutError:
        runs = {
            r["metadata"]["name"]: {
                "finalizers": r["metadata"].get("finalizers"),
                "deleting": bool(r["metadata"].get("deletionTimestamp")),
                **{k: (r.get("status") or {}).get(k) for k in ("phase", "stage", "message")},
            }
            for r in api.list("spinruns.selfplay.dev", namespace="team-a")
        }
        jobs = {
            j["metadata"]["name"]: [
                c["type"] for c in (j.get("status") or {}).get("conditions") or []
            ]
            for j in api.list("jobs", namespace="team-a")
        }
        raise LifecycleTimeout(
            f"timed out after {TIMEOUT:.0f}s waiting for {what}\nruns: {runs}\njobs: {jobs}\n"
            f"operator log tail:\n{logs()}"
        ) from None


def _jobs(api: Any, run: str, stage: str | None = None) -> list[dict[str, Any]]:
    from spin_operator import naming

    selector = f"{naming.RUN_LABEL}={run}" + (f",{naming.STAGE_LABEL}={stage}" if stage else "")
    return [
        j
        for j in api.list("jobs", namespace="team-a", label_selector=selector)
        if not j["metadata"].get("deletionTimestamp")
    ]


def _finished(job: dict[str, Any]) -> bool:
    return any(
        c["type"] in ("Complete", "Failed") and c["status"] == "True"
        for c in (job.get("status") or {}).get("conditions") or []
    )


def _phase(api: Any, name: str) -> str | None:
    obj = api.get("spinruns.selfplay.dev", name, namespace="team-a")
    return ((obj or {}).get("status") or {}).get("phase")


def _lifecycle(api: Any, workdir: Path, logs: Callable[[], str]) -> None:
    """create -> a failed generation Job retried -> the retry deleted behind the operator's back
    and replaced -> suspend/resume -> generation and training complete (multi-node training: Job
    + headless Service) -> Succeeded; a second run (retention Delete: the operator's finalizer)
    deleted while training."""
    wait = lambda what, probe: _wait(api, what, probe, logs)  # noqa: E731
    api.create(_spinrun("lifecycle"))
    _job_complete(api, wait("the check Job", lambda: _jobs(api, "lifecycle", "check"))[0], workdir)
    first = wait("the generation Job", lambda: _jobs(api, "lifecycle", "generate"))[0]
    # A Job whose pods do not come: the operator lists its pods, then the Job's events (why?)
    wait(
        "the operator to look at the waiting Job's pods and events",
        lambda: (
            {("pods", "list"), ("events", "list")}
            <= {(r.rbac_resource, r.verb) for r in list(api.requests)}
        ),
    )
    _job_status(api, first, "Failed", failed=1)
    retry = wait(
        "a retried generation Job",
        lambda: [
            j
            for j in _jobs(api, "lifecycle", "generate")
            if j["metadata"]["name"] != first["metadata"]["name"]
        ],
    )[0]
    # A Job deleted behind the operator's back: it confirms the Job is gone (GET) and replaces it.
    api.delete("jobs", retry["metadata"]["name"], namespace="team-a")
    retry = wait(
        "a replacement of the deleted Job",
        lambda: [
            j
            for j in _jobs(api, "lifecycle", "generate")
            if j["metadata"]["name"] not in (first["metadata"]["name"], retry["metadata"]["name"])
        ],
    )[0]

    api.patch("spinruns.selfplay.dev", "lifecycle", {"spec": {"suspend": True}}, namespace="team-a")
    wait(
        "the Job suspended",
        lambda: (
            (api.get("jobs", retry["metadata"]["name"], "team-a") or {})
            .get("spec", {})
            .get("suspend")
            is True
        ),
    )
    wait("phase Suspended", lambda: _phase(api, "lifecycle") == "Suspended")
    api.patch(
        "spinruns.selfplay.dev", "lifecycle", {"spec": {"suspend": False}}, namespace="team-a"
    )
    wait(
        "the Job resumed",
        lambda: (
            (api.get("jobs", retry["metadata"]["name"], "team-a") or {})
            .get("spec", {})
            .get("suspend")
            is False
        ),
    )

    def complete_active() -> bool:
        for job in _jobs(api, "lifecycle"):
            if not _finished(job) and not job["spec"].get("suspend"):
                _job_complete(api, job, workdir)
        return _phase(api, "lifecycle") == "Succeeded"

    wait("run Succeeded", complete_active)

    api.create(_spinrun("doomed", retention={"onDelete": "Delete"}))  # the operator's finalizer
    _job_complete(
        api, wait("the doomed run's check Job", lambda: _jobs(api, "doomed", "check"))[0], workdir
    )
    wait("the doomed run's generation Job", lambda: _jobs(api, "doomed", "generate"))
    for job in _jobs(api, "doomed", "generate"):
        _job_complete(api, job, workdir)
    wait("the doomed run's training Job", lambda: _jobs(api, "doomed", "train"))
    api.delete("spinruns.selfplay.dev", "doomed", namespace="team-a")
    wait(
        "the doomed run gone (finalizer released)",
        lambda: api.get("spinruns.selfplay.dev", "doomed", namespace="team-a") is None,
    )


class LifecycleTimeout(Exception):
    """A lifecycle step did not happen in time (the operator did not do its part)."""


@dataclasses.dataclass
class Recorded:
    calls: list[Any]
    failure: str | None  # why the lifecycle stopped early; its calls are still checked


@pytest.fixture(scope="module")
def operator_calls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Recorded]:
    """Mode -> the requests the operator made during the lifecycle (all clients but the test's
    own helpers, which the emulator does not record)."""
    from tests.support.k8s_emulator import running_api

    recorded: dict[str, Recorded] = {}
    for mode, namespaces in (("namespaced", WATCHED), ("clusterwide", [])):
        workdir = tmp_path_factory.mktemp(mode)
        with running_api(workdir) as api:
            for ns in ("team-a", "team-b", NAMESPACE):
                api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            api.create(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "s3-creds", "namespace": "team-a"},
                    "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"},
                }
            )
            failure = None
            with _operator(api, workdir, namespaces) as logs:
                try:
                    _lifecycle(api, workdir, logs)
                except LifecycleTimeout as exc:
                    failure = str(exc)
            assert not api.emulator.internal_errors, api.emulator.internal_errors
            recorded[mode] = Recorded(list(api.requests), failure)
    return recorded


@needs_operator
@pytest.mark.parametrize("mode", sorted(MODES))
def test_operator_completes_the_lifecycle(mode: str, operator_calls: dict[str, Recorded]) -> None:
    """Not an RBAC property, but the RBAC checks are only as good as the calls they saw."""
    assert operator_calls[mode].failure is None, operator_calls[mode].failure


def _discovery_only(path: str) -> bool:
    """Non-resource URLs every authenticated user may read (system:discovery, system:public-info-viewer)."""
    return (
        path in ("/api", "/apis", "/version", "/healthz", "/livez", "/readyz")
        or (path.startswith(("/api/", "/apis/")) and path.count("/") <= 3)
        or path.startswith("/openapi/")
    )


@needs_helm
@needs_operator
@pytest.mark.parametrize("mode", sorted(MODES))
def test_rbac_allows_every_call_of_the_real_operator(
    mode: str, operator_calls: dict[str, Recorded]
) -> None:
    grants = _grants(MODES[mode])
    denied = set()
    for request in operator_calls[mode].calls:
        if request.resource is None:
            assert _discovery_only(request.path), (
                f"non-resource request outside discovery: {request.path}"
            )
            continue
        call = Call(request.verb, request.group or "", request.rbac_resource, request.namespace)
        if not grants.allows(call):
            denied.add(call)
    assert not denied, f"{mode}: the chart's RBAC would forbid: {sorted(denied, key=repr)}"


@needs_helm
@needs_operator
@pytest.mark.parametrize("mode", sorted(MODES))
def test_rbac_grants_nothing_unused(mode: str, operator_calls: dict[str, Recorded]) -> None:
    recorded = operator_calls[mode]
    used = {
        (r.group or "", r.rbac_resource, r.verb) for r in recorded.calls if r.resource is not None
    }
    unused = _grants(MODES[mode]).pairs() - used
    unjustified = unused - set(ALLOW_LIST)
    stopped = (
        f" (the lifecycle stopped early: {recorded.failure.splitlines()[0]})"
        if recorded.failure
        else ""
    )
    assert not unjustified, (
        f"{mode}: granted but never used and not justified in ALLOW_LIST: {sorted(unjustified)}{stopped}"
    )
