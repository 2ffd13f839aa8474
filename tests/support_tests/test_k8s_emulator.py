"""The emulated API server answers as a real one does, for each semantic the operator relies on."""

from __future__ import annotations

import copy
import json
import pathlib
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from tests.support import broken_spinruns, crd_schema
from tests.support.k8s_admission import spinrun_errors
from tests.support.k8s_emulator import K8sApi, running_api
from tests.support.k8s_semantics import ApiError

SPINRUNS = "/apis/selfplay.dev/v1alpha1/namespaces/default/spinruns"
JOBS = "/apis/batch/v1/namespaces/default/jobs"
MERGE = "application/merge-patch+json"


def http(
    api: K8sApi,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
    params: dict[str, str] | None = None,
    agent: str = "emulator-test",
) -> tuple[int, Any, dict[str, str]]:
    """One request; returns (status, decoded JSON, headers) for errors too."""
    url = api.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": content_type, "User-Agent": agent}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read() or b"null"), dict(rsp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def spinrun(name: str = "run", **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(broken_spinruns.BASE)
    obj["metadata"] = {"name": name}
    obj["spec"].update(spec)
    return obj


def job(
    name: str = "job",
    labels: dict[str, str] | None = None,
    owner: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "controller": True,
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "template": {
                "spec": {
                    "containers": [{"name": "main", "image": "busybox"}],
                    "restartPolicy": "Never",
                }
            },
            **spec,
        },
    }


def watch_lines(api: K8sApi, path: str, params: dict[str, str], count: int) -> list[dict[str, Any]]:
    """Read `count` events from a watch (with a server-side timeout as a safety net)."""
    query = urllib.parse.urlencode({"watch": "true", "timeoutSeconds": "3", **params})
    events = []
    with urllib.request.urlopen(f"{api.url}{path}?{query}", timeout=10) as rsp:
        for line in rsp:
            events.append(json.loads(line))
            if len(events) == count:
                break
    return events


# ---------------------------------------------------------------------------- identity and create


def test_create_answers_201_with_identity_and_crd_defaults(k8s_api: K8sApi) -> None:
    code, obj, _ = http(k8s_api, "POST", SPINRUNS, spinrun("a"))
    assert code == 201
    meta = obj["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0 and meta["namespace"] == "default"
    assert obj["spec"]["generation"]["backend"] == "vllm"  # structural default filled by the server
    assert obj["spec"]["dataset"]["seed"] == 0
    code, again, _ = http(k8s_api, "GET", f"{SPINRUNS}/a")
    assert code == 200 and again == obj


def test_duplicate_is_409_already_exists_and_missing_is_404(k8s_api: K8sApi) -> None:
    assert http(k8s_api, "POST", SPINRUNS, spinrun("a"))[0] == 201
    code, status, _ = http(k8s_api, "POST", SPINRUNS, spinrun("a"))
    assert (code, status["reason"], status["kind"]) == (409, "AlreadyExists", "Status")
    for method, body in (("GET", None), ("PATCH", {"spec": {}}), ("DELETE", None)):
        code, status, _ = http(k8s_api, method, f"{SPINRUNS}/nope", body, MERGE)
        assert (code, status["reason"]) == (404, "NotFound"), method
        assert status["message"] == 'spinruns.selfplay.dev "nope" not found'


def test_generate_name_gives_distinct_names(k8s_api: K8sApi) -> None:
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "kopf-event-"},
        "involvedObject": {"kind": "SPINRun", "name": "a", "namespace": "default"},
        "reason": "Logging",
    }
    names = {
        http(k8s_api, "POST", "/api/v1/namespaces/default/events", event)[1]["metadata"]["name"]
        for _ in range(5)
    }
    assert len(names) == 5 and all(n.startswith("kopf-event-") and len(n) == 16 for n in names)


def test_resource_versions_increase_and_lists_carry_kind_and_version(k8s_api: K8sApi) -> None:
    first = k8s_api.create(spinrun("a"))
    second = k8s_api.patch("spinruns", "a", {"metadata": {"labels": {"x": "1"}}})
    third = k8s_api.create(spinrun("b"))
    rvs = [int(o["metadata"]["resourceVersion"]) for o in (first, second, third)]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3
    _, lst, _ = http(k8s_api, "GET", SPINRUNS)
    assert (lst["kind"], lst["apiVersion"]) == ("SPINRunList", "selfplay.dev/v1alpha1")
    assert lst["metadata"]["resourceVersion"] == str(rvs[-1])
    assert [i["metadata"]["name"] for i in lst["items"]] == ["a", "b"]


# ---------------------------------------------------------------------------- updates


def test_stale_resource_version_is_409_conflict(k8s_api: K8sApi) -> None:
    obj = k8s_api.create(spinrun("a"))
    stale = obj["metadata"]["resourceVersion"]
    k8s_api.patch("spinruns", "a", {"spec": {"iterations": 3}})
    code, status, _ = http(
        k8s_api,
        "PATCH",
        f"{SPINRUNS}/a",
        {"metadata": {"resourceVersion": stale}, "spec": {"iterations": 4}},
        MERGE,
    )
    assert (code, status["reason"]) == (409, "Conflict")
    assert "the object has been modified" in status["message"]
    current = k8s_api.get("spinruns", "a")
    assert current is not None and current["spec"]["iterations"] == 3
    put = {**current, "spec": {**current["spec"], "iterations": 5}}
    assert http(k8s_api, "PUT", f"{SPINRUNS}/a", put)[0] == 200
    assert http(k8s_api, "PUT", f"{SPINRUNS}/a", put)[0] == 409  # the same rv again is now stale


def test_generation_counts_spec_changes_only(k8s_api: K8sApi) -> None:
    k8s_api.create(spinrun("a"))
    k8s_api.patch("spinruns", "a", {"metadata": {"labels": {"x": "1"}, "annotations": {"y": "2"}}})
    k8s_api.patch("spinruns", "a", {"status": {"phase": "Running"}}, subresource="status")
    assert k8s_api.get("spinruns", "a")["metadata"]["generation"] == 1  # type: ignore[index]
    k8s_api.patch("spinruns", "a", {"spec": {"iterations": 3}})
    assert k8s_api.get("spinruns", "a")["metadata"]["generation"] == 2  # type: ignore[index]


def test_noop_patch_keeps_resource_version(k8s_api: K8sApi) -> None:
    obj = k8s_api.create(spinrun("a"))
    same = k8s_api.patch("spinruns", "a", {"spec": {"iterations": obj["spec"]["iterations"]}})
    assert same["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_status_subresource_isolation(k8s_api: K8sApi) -> None:
    body = {**spinrun("a"), "status": {"phase": "Succeeded"}}
    created = http(k8s_api, "POST", SPINRUNS, body)[1]
    assert "status" not in created  # create cannot set status
    code, obj, _ = http(
        k8s_api,
        "PATCH",
        f"{SPINRUNS}/a/status",
        {
            "spec": {"iterations": 7},
            "metadata": {"labels": {"l": "v"}},
            "status": {"phase": "Running"},
        },
        MERGE,
    )
    assert code == 200 and obj["status"]["phase"] == "Running"
    assert obj["spec"]["iterations"] == 2 and "labels" not in obj["metadata"]
    code, obj, _ = http(
        k8s_api,
        "PATCH",
        f"{SPINRUNS}/a",
        {"spec": {"iterations": 3}, "status": {"phase": "Failed"}},
        MERGE,
    )
    assert obj["spec"]["iterations"] == 3 and obj["status"]["phase"] == "Running"


def test_json_patch_test_failure_is_422_as_kopf_expects(k8s_api: K8sApi) -> None:
    obj = k8s_api.create(spinrun("a"))
    ops: list[dict[str, Any]] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
        {"op": "add", "path": "/metadata/finalizers", "value": ["x"]},
    ]
    assert http(k8s_api, "PATCH", f"{SPINRUNS}/a", ops, "application/json-patch+json")[0] == 422
    ops[0]["value"] = obj["metadata"]["resourceVersion"]
    code, patched, _ = http(k8s_api, "PATCH", f"{SPINRUNS}/a", ops, "application/json-patch+json")
    assert code == 200 and patched["metadata"]["finalizers"] == ["x"]


def test_strategic_merge_patch_merges_keyed_lists_and_custom_resources_refuse_it(
    k8s_api: K8sApi,
) -> None:
    k8s_api.create(job("j"))
    smp = "application/strategic-merge-patch+json"
    for cond in (
        {"type": "Suspended", "status": "True"},
        {"type": "Complete", "status": "True"},
        {"type": "Suspended", "status": "False"},
    ):
        http(k8s_api, "PATCH", f"{JOBS}/j/status", {"status": {"conditions": [cond]}}, smp)
    conditions = k8s_api.get("jobs", "j")["status"]["conditions"]  # type: ignore[index]
    assert conditions == [
        {"type": "Suspended", "status": "False"},
        {"type": "Complete", "status": "True"},
    ]
    http(k8s_api, "PATCH", f"{JOBS}/j", {"metadata": {"finalizers": ["a"]}}, smp)
    http(k8s_api, "PATCH", f"{JOBS}/j", {"metadata": {"finalizers": ["b"]}}, smp)
    assert k8s_api.get("jobs", "j")["metadata"]["finalizers"] == ["a", "b"]  # type: ignore[index]
    http(k8s_api, "PATCH", f"{JOBS}/j", {"spec": {"suspend": True}}, smp)
    assert k8s_api.get("jobs", "j")["spec"]["suspend"] is True  # type: ignore[index]
    k8s_api.create(spinrun("a"))
    assert http(k8s_api, "PATCH", f"{SPINRUNS}/a", {"spec": {}}, smp)[0] == 415


def test_job_defaults_names_and_immutable_template(k8s_api: K8sApi) -> None:
    stored = k8s_api.create(job("j", completionMode="Indexed", completions=4, parallelism=4))
    spec = stored["spec"]
    assert (spec["backoffLimit"], spec["suspend"]) == (6, False)
    assert stored["spec"]["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "j"
    with pytest.raises(ApiError) as err:
        k8s_api.patch(
            "jobs",
            "j",
            {"spec": {"template": {"spec": {"containers": [{"name": "main", "image": "x"}]}}}},
        )
    assert err.value.code == 422 and "spec.template" in err.value.message
    with pytest.raises(ApiError) as err:
        k8s_api.create(job("j" * 64))
    assert err.value.code == 422 and "must be no more than 63 characters" in err.value.message
    with pytest.raises(ApiError) as err:
        k8s_api.create(job("ok", labels={"run": "x" * 64}))
    assert err.value.code == 422 and "metadata.labels" in err.value.message


# ---------------------------------------------------------------------------- selectors and watches


def test_label_and_field_selectors_on_list(k8s_api: K8sApi) -> None:
    for name, labels in (
        ("a", {"app": "spin", "stage": "generate"}),
        ("b", {"app": "spin", "stage": "train"}),
        ("c", {"app": "other"}),
    ):
        k8s_api.create(job(name, labels))

    def names(**params: str) -> list[str]:
        code, lst, _ = http(k8s_api, "GET", JOBS, params=params)
        assert code == 200, lst
        return [i["metadata"]["name"] for i in lst["items"]]

    assert names(labelSelector="app=spin") == ["a", "b"]
    assert names(labelSelector="app==spin,stage=train") == ["b"]
    assert names(labelSelector="stage!=train") == ["a", "c"]  # != matches objects without the label
    assert names(labelSelector="stage in (generate,train)") == ["a", "b"]
    assert names(labelSelector="stage notin (generate),app") == ["b", "c"]
    assert names(labelSelector="stage") == ["a", "b"]
    assert names(labelSelector="!stage") == ["c"]
    assert names(fieldSelector="metadata.name=b") == ["b"]
    assert names(fieldSelector="metadata.namespace=default,metadata.name!=a") == ["b", "c"]
    assert http(k8s_api, "GET", JOBS, params={"labelSelector": "a in b"})[0] == 400
    assert http(k8s_api, "GET", JOBS, params={"fieldSelector": "spec.suspend=true"})[0] == 400


def test_watch_replays_after_resource_version_with_selectors(k8s_api: K8sApi) -> None:
    k8s_api.create(job("before", {"app": "spin"}))
    since = str(k8s_api.emulator.resource_version)
    k8s_api.create(job("ignored", {"app": "other"}))
    k8s_api.create(job("after", {"app": "spin"}))
    k8s_api.patch("jobs", "after", {"metadata": {"labels": {"app": "moved"}}})
    events = watch_lines(k8s_api, JOBS, {"resourceVersion": since, "labelSelector": "app=spin"}, 2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "after"),
        ("DELETED", "after"),
    ]
    initial = watch_lines(k8s_api, JOBS, {"labelSelector": "app=spin"}, 1)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in initial] == [("ADDED", "before")]
    named = watch_lines(
        k8s_api, JOBS, {"resourceVersion": since, "fieldSelector": "metadata.name=ignored"}, 1
    )
    assert named[0]["object"]["metadata"]["name"] == "ignored"


def test_watch_streams_live_events(k8s_api: K8sApi) -> None:
    since = str(k8s_api.emulator.resource_version)
    result: list[dict[str, Any]] = []
    reader = threading.Thread(
        target=lambda: result.extend(watch_lines(k8s_api, JOBS, {"resourceVersion": since}, 3))
    )
    reader.start()
    k8s_api.create(job("live"))
    k8s_api.patch("jobs", "live", {"status": {"active": 1}}, subresource="status")
    k8s_api.delete("jobs", "live", propagation_policy="Background")
    reader.join(timeout=10)
    assert [e["type"] for e in result] == ["ADDED", "MODIFIED", "DELETED"]
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in result]
    assert rvs == sorted(rvs)


def test_watch_from_a_compacted_resource_version_is_410(tmp_path: pathlib.Path) -> None:
    with running_api(tmp_path, event_history=3) as api:
        for i in range(5):
            api.create(job(f"j{i}"))
        events = watch_lines(api, JOBS, {"resourceVersion": "1"}, 1)
    assert events[0]["type"] == "ERROR" and events[0]["object"]["code"] == 410


# ---------------------------------------------------------------------------- deletion


def test_finalizers_hold_deletion_until_removed(k8s_api: K8sApi) -> None:
    k8s_api.create({**spinrun("a"), "metadata": {"name": "a", "finalizers": ["spin/cleanup"]}})
    code, obj, _ = http(k8s_api, "DELETE", f"{SPINRUNS}/a")
    assert code == 200 and obj["metadata"]["deletionTimestamp"]
    assert k8s_api.get("spinruns", "a") is not None
    code, status, _ = http(
        k8s_api,
        "PATCH",
        f"{SPINRUNS}/a",
        {"metadata": {"finalizers": ["spin/cleanup", "new"]}},
        MERGE,
    )
    assert code == 422 and "no new finalizers" in status["message"]
    assert (
        http(k8s_api, "PATCH", f"{SPINRUNS}/a", {"metadata": {"finalizers": None}}, MERGE)[0] == 200
    )
    assert k8s_api.get("spinruns", "a") is None


def test_owner_deletion_collects_dependents(k8s_api: K8sApi) -> None:
    owner = k8s_api.create(spinrun("a"))
    k8s_api.create(job("a-gen", owner=owner))
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "a-train",
                "ownerReferences": [
                    {
                        "apiVersion": owner["apiVersion"],
                        "kind": "SPINRun",
                        "name": "a",
                        "uid": owner["metadata"]["uid"],
                    }
                ],
            },
            "spec": {"clusterIP": "None", "selector": {"x": "y"}},
        }
    )
    gen = k8s_api.get("jobs", "a-gen")
    assert gen is not None
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "a-gen-0",
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": "a-gen",
                        "uid": gen["metadata"]["uid"],
                    }
                ],
            },
            "spec": {"containers": [{"name": "c", "image": "x"}]},
        }
    )
    k8s_api.create(job("unrelated"))
    k8s_api.delete("spinruns", "a")
    assert [j["metadata"]["name"] for j in k8s_api.list("jobs")] == ["unrelated"]
    assert k8s_api.list("services") == [] and k8s_api.list("pods") == []  # cascades through the Job


def test_full_sweep_collects_dependents_of_owners_that_never_existed(k8s_api: K8sApi) -> None:
    k8s_api.create(
        job(
            "dangling",
            owner={
                "apiVersion": "selfplay.dev/v1alpha1",
                "kind": "SPINRun",
                "metadata": {"name": "ghost", "uid": "no-such-uid"},
            },
        )
    )
    assert k8s_api.get("jobs", "dangling") is not None  # like the real collector: not at once
    k8s_api.server.call(k8s_api.emulator.collect_garbage)
    assert k8s_api.get("jobs", "dangling") is None


def test_orphan_and_foreground_propagation(k8s_api: K8sApi) -> None:
    owner = k8s_api.create(spinrun("a"))
    k8s_api.create(
        {
            **job("a-gen", owner=owner),
            "metadata": {**job("a-gen", owner=owner)["metadata"], "finalizers": ["hold"]},
        }
    )
    k8s_api.delete("spinruns", "a", propagation_policy="Foreground")
    assert k8s_api.get("spinruns", "a")["metadata"]["finalizers"] == ["foregroundDeletion"]  # type: ignore[index]
    assert k8s_api.get("jobs", "a-gen")["metadata"]["deletionTimestamp"]  # type: ignore[index]
    k8s_api.patch("jobs", "a-gen", {"metadata": {"finalizers": None}})
    assert k8s_api.get("jobs", "a-gen") is None and k8s_api.get("spinruns", "a") is None
    owner = k8s_api.create(spinrun("b"))
    k8s_api.create(job("b-gen", owner=owner))
    k8s_api.delete("spinruns", "b", propagation_policy="Orphan")
    assert k8s_api.get("jobs", "b-gen")["metadata"]["ownerReferences"] == []  # type: ignore[index]


def test_job_delete_defaults_to_orphan_with_a_warning(k8s_api: K8sApi) -> None:
    owner = k8s_api.create(job("j"))
    k8s_api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "j-0",
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": "j",
                        "uid": owner["metadata"]["uid"],
                    }
                ],
            },
            "spec": {"containers": [{"name": "c", "image": "x"}]},
        }
    )
    code, _, headers = http(k8s_api, "DELETE", f"{JOBS}/j")
    assert code == 200 and "child pods are preserved" in headers.get("Warning", "")
    assert k8s_api.get("pods", "j-0") is not None


# ---------------------------------------------------------------------------- CRD admission


@pytest.mark.parametrize(
    "case",
    [c for c in broken_spinruns.CASES if c.schema_rejects and "unknown" not in c.id][:12],
    ids=lambda c: c.id,
)
def test_invalid_spinruns_are_422_naming_the_field(
    k8s_api: K8sApi, case: broken_spinruns.Broken
) -> None:
    code, status, _ = http(k8s_api, "POST", SPINRUNS, case.build())
    assert (code, status["reason"]) == (422, "Invalid"), status
    assert status["message"].startswith('SPINRun.selfplay.dev "ok-run" is invalid: ')
    fields = [c["field"] for c in status["details"]["causes"]]
    assert any(f.startswith(case.field) or case.field.startswith(f) for f in fields if f), (
        fields,
        case.field,
    )
    assert k8s_api.get("spinruns", "ok-run") is None


def test_unknown_fields_are_refused_when_strict_and_pruned_otherwise(k8s_api: K8sApi) -> None:
    body = broken_spinruns.CASES[0].build()  # spec.iteratons
    code, status, _ = http(k8s_api, "POST", SPINRUNS, body, params={"fieldValidation": "Strict"})
    assert (code, status["reason"]) == (
        400,
        "BadRequest",
    ) and 'unknown field "spec.iteratons"' in status["message"]
    code, obj, headers = http(k8s_api, "POST", SPINRUNS, body)
    assert code == 201 and "iteratons" not in obj["spec"] and "spec.iteratons" in headers["Warning"]


def test_status_is_validated_against_the_schema(k8s_api: K8sApi) -> None:
    k8s_api.create(spinrun("a"))
    code, status, _ = http(
        k8s_api, "PATCH", f"{SPINRUNS}/a/status", {"status": {"phase": 3}}, MERGE
    )
    assert code == 422 and status["details"]["causes"][0]["field"] == "status.phase"


def test_cached_admission_agrees_with_crd_schema() -> None:
    samples = [c.build() for c in broken_spinruns.CASES if "unknown" not in c.id] + [
        {**broken_spinruns.BASE, "status": {"phase": "Running"}},
        {**broken_spinruns.BASE, "status": {"phase": 1}},
    ]
    for obj in samples:
        assert sorted(
            spinrun_errors(crd_schema.apply_defaults(crd_schema.root_schema(), obj))
        ) == sorted(crd_schema.admission_errors(obj)), obj


# ---------------------------------------------------------------------------- request log, clients


def test_request_log_records_verbs_resources_and_agents(k8s_api: K8sApi) -> None:
    http(k8s_api, "POST", SPINRUNS, spinrun("a"), agent="kopf/1.45")
    http(
        k8s_api,
        "PATCH",
        f"{SPINRUNS}/a/status",
        {"status": {"phase": "Running"}},
        MERGE,
        agent="kopf/1.45",
    )
    http(k8s_api, "GET", JOBS, params={"labelSelector": "x"}, agent="kopf/1.45")
    http(k8s_api, "GET", "/apis", agent="kopf/1.45")
    http(k8s_api, "GET", f"{SPINRUNS}/a", agent="someone-else")
    log = k8s_api.requests
    assert log.by_verb_resource(user_agent="kopf") == {
        "create spinruns": 1,
        "patch spinruns/status": 1,
        "list jobs": 1,
    }
    assert log.rbac_rules(user_agent="kopf") == {
        ("selfplay.dev", "spinruns", "create"),
        ("selfplay.dev", "spinruns/status", "patch"),
        ("batch", "jobs", "list"),
    }
    assert log.count(verb="get", resource="spinruns") == 1
    assert (
        log.count(verb="create", resource="spinruns", name="a") == 1
    )  # creates log the created name
    assert len(log.entries(resources_only=False, user_agent="kopf")) == 4
    k8s_api.reset_requests()
    assert len(log) == 0


def test_fault_injection_answers_the_given_error(k8s_api: K8sApi) -> None:
    k8s_api.emulator.faults.append(
        lambda r: (
            ApiError(500, "InternalError", "boom")
            if r.verb == "create" and r.resource == "jobs"
            else None
        )
    )
    assert http(k8s_api, "POST", JOBS, job("j"))[0] == 500
    assert k8s_api.requests.count(verb="create", resource="jobs", code=500) == 1


async def test_kopf_operator_runs_against_the_emulator(
    k8s_api: K8sApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kopf discovers the CRD, watches, patches status, posts events (generateName) and sees updates."""
    import asyncio

    import kopf

    monkeypatch.setenv("KUBECONFIG", str(k8s_api.kubeconfig_path))
    registry = kopf.OperatorRegistry()
    seen: list[int] = []

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.level = 20
        settings.watching.server_timeout = 30

    @kopf.on.create("selfplay.dev", "v1alpha1", "spinruns", registry=registry)
    @kopf.on.update("selfplay.dev", "v1alpha1", "spinruns", registry=registry, field="spec")
    def reconcile(body: Any, patch: Any, **_: Any) -> None:
        seen.append(body["spec"]["iterations"])
        patch.status["phase"] = "Running"
        patch.status["observedGeneration"] = body["metadata"]["generation"]
        kopf.info(body, reason="Reconciled", message="status written")

    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(registry=registry, clusterwide=True, standalone=True, stop_flag=stop)
    )
    try:
        await k8s_api.acreate(spinrun("a"))

        async def status(gen: int) -> bool:
            obj = await k8s_api.aget("spinruns", "a")
            return bool(obj and obj.get("status", {}).get("observedGeneration") == gen)

        await k8s_api.await_for(lambda: status(1), timeout=20)
        await k8s_api.apatch("spinruns", "a", {"spec": {"iterations": 3}})
        await k8s_api.await_for(lambda: status(2), timeout=20)
        events = await k8s_api.await_for(lambda: k8s_api.alist("events", "default"), timeout=10)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=20)
    assert seen == [2, 3]
    assert any(e["reason"] == "Reconciled" and e["involvedObject"]["name"] == "a" for e in events)
    failed = [
        (e.verb, e.path, e.code)
        for e in k8s_api.requests.entries(user_agent="kopf")
        if e.code >= 400
    ]
    assert not failed
    assert ("selfplay.dev", "spinruns/status", "patch") in k8s_api.requests.rbac_rules(
        user_agent="kopf"
    )
