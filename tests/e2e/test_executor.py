"""The executor (tests/support/executor.py) plays the kubelet and the Job controller faithfully.

The operator's behaviour in the scenario tests is only as meaningful as the Job status it sees,
so each Job feature the operator relies on is checked here with trivial pods (``python -c``).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import condition, wait_for
from tests.support.executor import Executor
from tests.support.kubelet import Api, HostRewriter, expand

pytestmark = pytest.mark.e2e

NS = "default"


def job(
    name: str,
    code: str,
    *,
    args: list[str] | None = None,
    env: list[dict[str, Any]] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A Job whose single container runs ``python -c code``."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "backoffLimit": 0,
            **spec,
            "template": {
                "metadata": {"labels": {"app": "t"}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "main",
                            "image": "ignored:latest",
                            "command": ["python", "-c", code],
                            "args": args or [],
                            "env": env or [],
                        }
                    ],
                },
            },
        },
    }


def create(api: Api, body: dict[str, Any]) -> None:
    kind = body["kind"]
    path = {
        "Job": f"/apis/batch/v1/namespaces/{NS}/jobs",
        "Secret": f"/api/v1/namespaces/{NS}/secrets",
        "Service": f"/api/v1/namespaces/{NS}/services",
    }[kind]
    api.request("POST", path, body)


def get_job(api: Api, name: str) -> dict[str, Any]:
    return api.get(f"/apis/batch/v1/namespaces/{NS}/jobs/{name}") or {}


def wait_condition(api: Api, name: str, kind: str, timeout: float = 30) -> dict[str, Any]:
    wait_for(lambda: condition(get_job(api, name), kind), timeout, f"{name} {kind}")
    return get_job(api, name)


def secret(name: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


# --------------------------------------------------------------------------- pure helpers


def test_expand_follows_kubernetes_rules() -> None:
    env = {"A": "1", "B": "x"}
    assert expand("$(A)-$(B)", env) == "1-x"
    assert expand("$(MISSING)", env) == "$(MISSING)"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("cost $5 $(", env) == "cost $5 $("


def test_host_rewriter_maps_pod_and_service_names_only() -> None:
    ports: dict[tuple[str, int], int] = {}
    rw = HostRewriter("ns1", ["run-i0-train"], lambda s, p: ports.setdefault((s, p), 40000 + p))
    assert rw.rewrite("run-i0-train-0.run-i0-train:29500") == "127.0.0.1:69500"
    assert rw.rewrite(
        "--rdzv-endpoint=run-i0-train-0.run-i0-train.ns1.svc.cluster.local:29500"
    ) == ("--rdzv-endpoint=127.0.0.1:69500")
    assert rw.rewrite("run-i0-train") == "127.0.0.1"  # a whole value: an address
    # a bare name inside a longer value is not an address (job names, paths, ids)
    assert rw.rewrite("s3://b/logs/run-i0-train/x") == "s3://b/logs/run-i0-train/x"
    assert rw.rewrite("--rdzv-id=run-i0-train") == "--rdzv-id=run-i0-train"
    assert rw.map_port("29500") == "69500"


# --------------------------------------------------------------------------- Job semantics


def test_indexed_job_runs_each_index_with_env_secrets_and_expansion(
    executor: Executor, tmp_path: Path
) -> None:
    """completions/parallelism/Indexed, JOB_COMPLETION_INDEX, secretKeyRef, $(VAR) in args."""
    out = tmp_path / "out"
    out.mkdir()
    create(executor.api, secret("creds", token="s3cr3t"))
    code = (
        "import os,sys,pathlib; "
        "pathlib.Path(sys.argv[1], os.environ['JOB_COMPLETION_INDEX']).write_text("
        "os.environ['TOKEN'] + ' ' + sys.argv[2])"
    )
    env: list[dict[str, Any]] = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "SHARD", "value": "shard-$(JOB_COMPLETION_INDEX)"},
    ]
    create(
        executor.api,
        job(
            "gen",
            code,
            args=[str(out), "$(SHARD)"],
            env=env,
            completions=3,
            parallelism=2,
            completionMode="Indexed",
        ),
    )
    done = wait_condition(executor.api, "gen", "Complete")
    status = done["status"]
    assert status["succeeded"] == 3 and status["completedIndexes"] == "0-2"
    assert status["active"] == 0 and status["failed"] == 0
    assert status["startTime"] and status["completionTime"]
    assert condition(done, "SuccessCriteriaMet")
    assert {p.name: p.read_text() for p in out.iterdir()} == {
        str(i): f"s3cr3t shard-{i}" for i in range(3)
    }
    pods = executor.pods("gen")
    assert sorted(p.index or 0 for p in pods) == [0, 1, 2]
    assert all(p.phase == "Succeeded" and p.exit_code == 0 for p in pods)
    objects = executor.api.get(f"/api/v1/namespaces/{NS}/pods")["items"]
    assert {o["metadata"]["name"] for o in objects} == {p.name for p in pods}
    assert {o["status"]["phase"] for o in objects} == {"Succeeded"}


def test_missing_secret_leaves_pod_pending_until_it_appears(executor: Executor) -> None:
    env = [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "late", "key": "k"}}}]
    create(executor.api, job("wait-secret", "import os; assert os.environ['K'] == 'v'", env=env))
    pod = executor.wait_for_pod(
        lambda p: p.job == "wait-secret" and p.reason == "CreateContainerConfigError"
    )
    assert pod.phase == "Pending"
    status = wait_for(lambda: get_job(executor.api, "wait-secret").get("status"), 10, "job status")
    assert status["active"] == 1 and status["ready"] == 0 and not status.get("conditions")
    pod_obj = executor.api.get(f"/api/v1/namespaces/{NS}/pods/{pod.name}")
    waiting = pod_obj["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting == {"reason": "CreateContainerConfigError", "message": 'secret "late" not found'}
    create(executor.api, secret("late", k="v"))
    wait_condition(executor.api, "wait-secret", "Complete")
    assert len(executor.pods("wait-secret")) == 1  # the same pod started, none replaced


def test_backoff_limit_counts_failed_pods(executor: Executor) -> None:
    create(executor.api, job("flaky", "raise SystemExit(1)", backoffLimit=1))
    failed = wait_condition(executor.api, "flaky", "Failed")
    cond = condition(failed, "Failed")
    assert cond and cond["reason"] == "BackoffLimitExceeded"
    assert failed["status"]["failed"] == 2 and failed["status"]["active"] == 0
    assert condition(failed, "FailureTarget")
    assert [p.exit_code for p in executor.pods("flaky")] == [1, 1]


def test_pod_failure_policy_fail_job_and_ignore_disruptions(executor: Executor) -> None:
    policy = {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }
    create(
        executor.api,
        job("bad-input", "raise SystemExit(2)", backoffLimit=5, podFailurePolicy=policy),
    )
    cond = condition(wait_condition(executor.api, "bad-input", "Failed"), "Failed")
    assert cond and cond["reason"] == "PodFailurePolicy"
    assert "exit code 2 matching FailJob rule at index 0" in cond["message"]
    assert len(executor.pods("bad-input")) == 1  # no retry of bad input

    # a disrupted pod (node drain) is replaced without counting; a crash then fails the Job
    create(executor.api, job("evicted", "import time; time.sleep(60)", podFailurePolicy=policy))
    executor.wait_for_pod(lambda p: p.job == "evicted" and p.phase == "Running")
    executor.kill_pod("evicted", index=None, disruption=True)
    replacement = executor.wait_for_pod(
        lambda p: (
            p.job == "evicted"
            and p.phase == "Running"
            and p.name != executor.pods("evicted")[0].name
        )
    )
    status = get_job(executor.api, "evicted")["status"]
    assert status.get("failed", 0) == 0 and not condition(
        get_job(executor.api, "evicted"), "Failed"
    )
    executor.kill_pod("evicted", index=None)
    cond = condition(wait_condition(executor.api, "evicted", "Failed"), "Failed")
    assert cond and cond["reason"] == "BackoffLimitExceeded"
    assert [p.exit_code for p in executor.pods("evicted")] == [137, 137]
    assert replacement.name == executor.pods("evicted")[1].name


def test_kill_pod_fails_a_job_without_retries(executor: Executor) -> None:
    create(
        executor.api,
        job(
            "victim",
            "import time; time.sleep(60)",
            completions=2,
            parallelism=2,
            completionMode="Indexed",
        ),
    )
    executor.wait_for_pod(lambda p: p.job == "victim" and p.index == 1 and p.phase == "Running")
    executor.kill_pod("victim", 1)
    failed = wait_condition(executor.api, "victim", "Failed")
    assert failed["status"]["failed"] == 1
    by_index = {p.index: p for p in executor.pods("victim")}
    assert by_index[1].exit_code == 137
    assert by_index[0].phase == "Failed"  # terminated by the controller (SIGTERM) ...
    assert failed["status"]["active"] == 0  # ... and not counted as a failure


def test_suspend_and_resume(executor: Executor) -> None:
    create(executor.api, job("later", "pass", suspend=True))
    suspended = wait_condition(executor.api, "later", "Suspended")
    assert suspended["status"]["active"] == 0 and executor.pods("later") == []
    executor.api.request(
        "PATCH",
        f"/apis/batch/v1/namespaces/{NS}/jobs/later",
        {"spec": {"suspend": False}},
        merge=True,
    )
    done = wait_condition(executor.api, "later", "Complete")
    resumed = [c for c in done["status"]["conditions"] if c["type"] == "Suspended"]
    assert resumed[0]["status"] == "False" and resumed[0]["reason"] == "JobResumed"

    create(executor.api, job("paused", "import time; time.sleep(60)", backoffLimit=0))
    executor.wait_for_pod(lambda p: p.job == "paused" and p.phase == "Running")
    executor.api.request(
        "PATCH",
        f"/apis/batch/v1/namespaces/{NS}/jobs/paused",
        {"spec": {"suspend": True}},
        merge=True,
    )
    paused = wait_condition(executor.api, "paused", "Suspended")
    executor.wait_for_pod(lambda p: p.job == "paused" and p.phase == "Failed")
    paused = wait_for(
        lambda: (j := get_job(executor.api, "paused"))["status"].get("terminating") == 0 and j,
        10,
        "terminated pods",
    )
    assert paused["status"]["failed"] == 0 and not condition(paused, "Failed")


def test_deleting_a_job_kills_its_process_group(executor: Executor, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess,sys,time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(120)"
    )
    create(executor.api, job("doomed", code))
    executor.wait_for_pod(lambda p: p.job == "doomed" and p.phase == "Running")
    child = int(
        wait_for(lambda: pidfile.read_text() if pidfile.exists() else None, 10, "child pid")
    )
    executor.api.request("DELETE", f"/apis/batch/v1/namespaces/{NS}/jobs/doomed")
    executor.wait_for_pod(lambda p: p.job == "doomed" and p.phase == "Failed")
    wait_for(lambda: not _alive(child), 10, "grandchild gone")


def test_garbage_collection_through_owner_references_kills_pods(executor: Executor) -> None:
    """Deleting a Job's owner (a SPINRun, here a ConfigMap) lets the GC delete the Job: its
    pods must die with it."""
    owner = executor.api.request(
        "POST",
        f"/api/v1/namespaces/{NS}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner", "namespace": NS}},
    )
    body = job("owned", "import time; time.sleep(120)")
    body["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "name": "owner",
            "uid": owner["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    create(executor.api, body)
    executor.wait_for_pod(lambda p: p.job == "owned" and p.phase == "Running")
    executor.api.request("DELETE", f"/api/v1/namespaces/{NS}/configmaps/owner")
    executor.wait_for_pod(lambda p: p.job == "owned" and p.phase == "Failed")
    assert get_job(executor.api, "owned") == {}


def test_active_deadline(executor: Executor) -> None:
    create(executor.api, job("slow", "import time; time.sleep(60)", activeDeadlineSeconds=1))
    cond = condition(wait_condition(executor.api, "slow", "Failed"), "Failed")
    assert cond and cond["reason"] == "DeadlineExceeded"


def test_rendezvous_hostnames_resolve_to_localhost(executor: Executor) -> None:
    """Index 1 reaches index 0 at ``<job>-0.<svc>:<port>``, as torchrun workers reach the master."""
    create(
        executor.api,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "rdzv", "namespace": NS},
            "spec": {"clusterIP": "None", "selector": {"job-name": "rdzv"}},
        },
    )
    code = (
        "import os,socket,sys,time\n"
        "host, port = sys.argv[1].rsplit(':', 1)\n"
        "if os.environ['JOB_COMPLETION_INDEX'] == '0':\n"
        "    s = socket.create_server((host, int(port))); c, _ = s.accept(); c.sendall(b'hi')\n"
        "else:\n"
        "    for _ in range(200):\n"
        "        try:\n"
        "            c = socket.create_connection((host, int(port))); break\n"
        "        except OSError: time.sleep(0.05)\n"
        "    assert c.recv(2) == b'hi'\n"
    )
    create(
        executor.api,
        job(
            "rdzv",
            code,
            args=["rdzv-0.rdzv:29500"],
            completions=2,
            parallelism=2,
            completionMode="Indexed",
        ),
    )
    wait_condition(executor.api, "rdzv", "Complete")
    argv = {p.argv[-1] for p in executor.pods("rdzv")}
    assert len(argv) == 1 and argv.pop().startswith("127.0.0.1:")


def test_no_command_is_a_start_error(executor: Executor) -> None:
    body = job("entrypoint", "pass")
    body["spec"]["template"]["spec"]["containers"][0].pop("command")
    create(executor.api, body)
    wait_condition(executor.api, "entrypoint", "Failed")
    assert executor.pods("entrypoint")[0].reason == "StartError"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
