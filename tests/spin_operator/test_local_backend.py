"""The local Job backend: argv translation, shards, process groups, failure and termination."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from spin_operator.api import types as api
from spin_operator.local.backend import LocalBackend, local_command
from spin_operator.settings import Settings
from spin_operator.steps import RunRef, StepPlan, plan_step
from tests.spin_operator.local_support import pid_alive


def plan(
    argv: list[str], pods: int = 1, stage: str = "generate", name: str = "r-i0-gen"
) -> StepPlan:
    return StepPlan(
        stage=stage,
        iteration=0,
        attempt=0,
        job_name=name,
        pods=pods,
        processes_per_pod=1,  # type: ignore[arg-type]
        argv=tuple(argv),
        env={"SPIN_TEST": "yes"},
        secret_env={},
        gpus_per_pod=0,
        image="x",
    )


def wait(backend: LocalBackend, name: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        backend.poll()
        job = backend.jobs[name]
        if job.completion_time is not None:
            return job.state
        time.sleep(0.02)
    raise TimeoutError(name)


def test_training_argv_runs_torchrun_of_this_python_on_localhost() -> None:
    spec = api.SPINRunSpec.model_validate(
        {
            "model": {"uri": "/m"},
            "dataset": {"uri": "/d.jsonl"},
            "storage": {"uri": "/tmp/a"},
            "training": {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 2, "globalBatchSize": 4},
        }
    )
    train = plan_step(spec, Settings(), RunRef("ns", "run"), 0, "train")
    argv = local_command(train, python="/venv/bin/python")
    assert argv[:5] == ["/venv/bin/python", "-m", "torch.distributed.run", "-m", "spin_runtime"]
    assert "--node-rank" not in argv and "--master-addr" not in argv  # topology: PET_* env
    env = {**train.env, **train.local_env(1, 4321)}
    assert (env["PET_NODE_RANK"], env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"]) == (
        "1",
        "127.0.0.1",
        "4321",
    )
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("2", "2")
    evaluate = plan_step(spec, Settings(), RunRef("ns", "run"), 0, "evaluate")
    assert local_command(evaluate, "/py")[:4] == ["/py", "-m", "spin_runtime", "evaluate"]
    assert evaluate.local_env(0, 4321) == {} and not any(k.startswith("PET_") for k in evaluate.env)


CODE = "import os, time; open(os.environ['OUT'] + os.environ['JOB_COMPLETION_INDEX'], 'w').write(f'{time.time()} '); time.sleep(0.8); open(os.environ['OUT'] + os.environ['JOB_COMPLETION_INDEX'], 'a').write(f'{time.time()} ' + os.environ['SPIN_TEST'])"


@pytest.mark.parametrize("parallel", [1, 3])
def test_shards_get_their_index_and_run_at_most_parallel(tmp_path: Path, parallel: int) -> None:
    backend = LocalBackend(
        tmp_path / "logs", env={"OUT": str(tmp_path / "out-")}, max_parallel=parallel
    )
    backend.start(plan(["python", "-c", CODE], pods=3))
    assert wait(backend, "r-i0-gen") == "Succeeded"
    spans = []
    for i in range(3):
        start, end, marker = (tmp_path / f"out-{i}").read_text().split()
        assert marker == "yes"  # the plan's env
        spans.append((float(start), float(end)))
    overlaps = sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(spans) for b in spans[i + 1 :])
    assert (overlaps == 0) if parallel == 1 else (overlaps > 0)
    assert [p.log_path.name for p in backend.jobs["r-i0-gen"].pods] == [
        f"r-i0-gen-{i}.log" for i in range(3)
    ]


def test_a_failing_pod_fails_the_job_and_stops_its_siblings(tmp_path: Path) -> None:
    code = "import os, sys, time\nif os.environ['JOB_COMPLETION_INDEX'] == '0':\n    print('error: no such dataset'); sys.exit(2)\ntime.sleep(600)"
    backend = LocalBackend(tmp_path, env={}, max_parallel=2)
    job = backend.start(plan(["python", "-c", code], pods=2))
    started = time.monotonic()
    assert wait(backend, job.name) == "Failed"
    assert time.monotonic() - started < 30
    observed = backend.observed()[0]
    assert (
        observed.reason == "BadInput" and observed.message == "no such dataset"
    )  # the cause alone
    assert "no such dataset" in observed.message
    assert not pid_alive(job.pods[1].proc.pid)  # type: ignore[union-attr]
    assert [j.name for j in backend.finished()] == [job.name]


def test_terminate_stops_the_whole_process_group(tmp_path: Path) -> None:
    code = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print(p.pid, flush=True); time.sleep(600)"
    backend = LocalBackend(tmp_path, env={})
    job = backend.start(plan(["python", "-c", code]))
    log = job.pods[0].log_path
    deadline = time.monotonic() + 60
    while len(log.read_text().splitlines()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(log.read_text().splitlines()[1])
    assert pid_alive(grandchild) and backend.running_groups() == [job.pods[0].proc.pid]  # type: ignore[union-attr]
    assert backend.terminate_all(grace=5) == [job.name]
    assert not pid_alive(grandchild)
    assert job.state == "Failed" and job.stopped
    assert backend.finished() == []  # interrupted, not finished: a rerun starts it again
    assert backend.active() == [] and backend.running_groups() == []


def test_missing_executable_fails_like_a_job_that_cannot_start(tmp_path: Path) -> None:
    backend = LocalBackend(tmp_path, env={})
    job = backend.start(plan(["/nonexistent/evaluator", "--x"], stage="evaluate", name="r-i0-eval"))
    assert job.state == "Failed" and job.reason == "CannotExecute"


def test_remembered_jobs_are_observed_until_restarted(tmp_path: Path) -> None:
    from spin_operator.decision import ObservedJob

    old = ObservedJob("r-i0-gen", 0, "generate", 0, "Succeeded")
    backend = LocalBackend(tmp_path, env={}, remembered=[old])
    assert backend.observed() == (old,)
    backend.start(plan([sys.executable, "-c", "pass"]))
    assert wait(backend, "r-i0-gen") == "Succeeded"
    assert [j.state for j in backend.observed()] == ["Succeeded"]
    assert backend.observed()[0].start_time is not None
