"""`spinctl run`'s loop with a fake runtime: the operator's steps in order, retries, exit codes,
Ctrl-C and resume (the real runtime runs in test_local_e2e.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spin_operator.local.preflight import load
from spin_operator.local.runner import LocalRun
from spin_operator.local.state import STATE_NAME
from tests.spin_operator.local_support import (
    calls,
    fake_python,
    pid_alive,
    steps,
    with_default_sigint,
    write_spec,
)

PREFIX = ("artifacts", "default")


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(record))
    for knob in ("FAKE_FAIL", "FAKE_HANG", "FAKE_BAD_INPUT"):
        monkeypatch.delenv(knob, raising=False)
    return fake_python(tmp_path), record


def run_local(spec: Path, python: str) -> tuple[int, str]:
    out = io.StringIO()
    loaded = load(spec, tracking_uri="")
    code = LocalRun(loaded, python=python, poll_interval=0.02, out=out).run()
    return code, out.getvalue()


def state_of(tmp_path: Path, name: str = "local-test") -> dict:
    return json.loads(tmp_path.joinpath(*PREFIX, name, STATE_NAME).read_text())


def test_runs_the_operators_steps_in_order_with_the_runtime_argv(
    tmp_path: Path, fake: tuple[str, Path]
) -> None:
    python, record = fake
    spec = write_spec(tmp_path, generation={"replicas": 2})
    code, out = run_local(spec, python)
    assert code == 0, out
    order = steps(record)
    assert sorted(order[:2]) == [("generate", 0)] * 2  # two shards
    assert order[2:] == [
        ("train", 0),
        ("evaluate", 0),
        ("generate", 1),
        ("generate", 1),
        ("train", 1),
        ("evaluate", 1),
    ]
    gens = [c for c in calls(record) if c["stage"] == "generate" and c["iteration"] == 0]
    assert sorted(c["env"]["JOB_COMPLETION_INDEX"] for c in gens) == ["0", "1"]
    assert {c["env"]["SPIN_NUM_SHARDS"] for c in gens} == {"2"}
    train1 = next(c for c in calls(record) if c["stage"] == "train" and c["iteration"] == 1)
    data = [train1["argv"][i + 1] for i, a in enumerate(train1["argv"]) if a == "--data"]
    prefix = str(tmp_path.joinpath(*PREFIX, "local-test"))
    assert data == [f"{prefix}/iter-001/generated", f"{prefix}/iter-000/generated"]  # mixed in
    evaluate0 = next(c for c in calls(record) if c["stage"] == "evaluate")
    assert "--baseline-model" in evaluate0["argv"]
    status = state_of(tmp_path)["status"]
    assert status["phase"] == "Succeeded" and status["progress"] == "2/2"
    assert status["iterations"][1]["metrics"]["exact_match"] == 0.5
    assert "θ2" in out and "0.500" in out and "Succeeded" in out  # the results table


def test_rerun_of_a_finished_run_redoes_nothing_even_without_its_status(
    tmp_path: Path, fake: tuple[str, Path]
) -> None:
    python, record = fake
    spec = write_spec(tmp_path, iterations=1)
    assert run_local(spec, python)[0] == 0
    first = steps(record)
    assert run_local(spec, python)[0] == 0
    assert steps(record) == first
    tmp_path.joinpath(*PREFIX, "local-test", STATE_NAME).unlink()
    code, out = run_local(spec, python)
    assert code == 0
    assert steps(record) == first  # found complete in storage (manifests), not redone
    assert "found complete in storage" in out


def test_failed_step_is_retried_then_fails_the_run(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    python, record = fake
    monkeypatch.setenv("FAKE_FAIL", "train:0")
    code, out = run_local(write_spec(tmp_path, iterations=1), python)
    assert code == 1
    assert steps(record) == [("generate", 0), ("train", 0), ("train", 0)]  # maxRetries 1
    assert "injected failure" in out and "Failed:" in out
    assert state_of(tmp_path)["status"]["phase"] == "Failed"


def test_bad_input_fails_at_once_and_says_the_cause_once(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 2 will not heal (docs/runtime.md): no retry although maxRetries allows one; the
    cause leads the message, is printed once, and argv/timestamps stay in the pod log."""
    python, record = fake
    monkeypatch.setenv("FAKE_BAD_INPUT", "generate:0")
    code, out = run_local(write_spec(tmp_path, iterations=1), python)
    assert code == 1
    assert steps(record) == [("generate", 0)]  # one attempt, maxRetries 1 unused
    assert out.count("not UTF-8") == 1, out
    final = next(line for line in out.splitlines() if line.startswith("Failed: "))
    assert final.startswith(
        "Failed: dataset line 23: not UTF-8 (generate of iteration 0: bad input, not retried)"
    )
    assert "argv" not in out and "2026-12-02" not in out and "retry" not in out
    status = state_of(tmp_path)["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BadInput" and failed["message"].startswith(
        "dataset line 23: not UTF-8"
    )
    assert status["iterations"][0]["generate"] == {
        **status["iterations"][0]["generate"],
        "attempts": 1,
        "phase": "Failed",
        "message": "dataset line 23: not UTF-8",
    }
    log = (
        tmp_path.joinpath(*PREFIX, "local-test", ".local-logs", "local-test-i0-gen-0.log")
    ).read_text()
    assert "argv:" in log and "=== " in log  # the details stay in the log


def test_skipped_rows_are_in_the_cli_and_the_status(tmp_path: Path, fake: tuple[str, Path]) -> None:
    from spin_operator.local.preflight import preflight

    python, _ = fake
    data = tmp_path / "d.jsonl"
    rows = [json.dumps({"prompt": f"Q{i}", "response": f"A{i}"}) for i in range(18)]
    data.write_text(
        "\n".join([*rows[:4], "not json", *rows[4:], '{"prompt": "Q", "response": ""}']) + "\n"
    )
    loaded = load(
        write_spec(tmp_path, iterations=1, dataset={"uri": str(data), "maxSkippedFraction": 0.2}),
        tracking_uri="",
    )
    out = io.StringIO()
    code = LocalRun(
        loaded, python=python, poll_interval=0.02, out=out, dataset=preflight(loaded)
    ).run()
    assert code == 0, out.getvalue()
    said = [line for line in out.getvalue().splitlines() if line.startswith("  dataset")]
    assert (
        said
        == [
            "  dataset    2 of 20 rows skipped (10.0%; 18 usable): not JSON ×1 (line 5); empty response ×1 (line 20)"
        ]
        * 2
    )  # start and end
    status = state_of(tmp_path)["status"]
    assert status["dataset"] == {
        "rows": 20,
        "usable": 18,
        "skipped": 2,
        "skippedByReason": {"not JSON": 1, "empty response": 1},
    }


def test_transient_failure_recovers_on_retry(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    python, record = fake
    monkeypatch.setenv("FAKE_FAIL", "generate:0:1")
    code, out = run_local(write_spec(tmp_path, iterations=1), python)
    assert code == 0, out
    assert steps(record)[:2] == [("generate", 0), ("generate", 0)]
    assert (
        state_of(tmp_path)["status"]["iterations"][0]["generate"]["jobName"]
        == "local-test-i0-gen-r1"
    )


RUNNER = """
import sys
from spin_operator.local.preflight import load
from spin_operator.local.runner import LocalRun
sys.exit(LocalRun(load(sys.argv[1], tracking_uri=""), python=sys.argv[2], poll_interval=0.02).run())
"""


def _start_runner(spec: Path, python: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        with_default_sigint([sys.executable, "-c", RUNNER, str(spec), python]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )


def _wait_for_hang(record: Path, runner: subprocess.Popen[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hung = [c for c in calls(record) if c["stage"] == "hang"]
        if hung:
            return hung[0]
        assert runner.poll() is None, runner.stdout.read() if runner.stdout else ""
        time.sleep(0.05)
    raise TimeoutError("the step never started")


def test_ctrl_c_stops_process_groups_keeps_work_and_a_rerun_resumes(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    python, record = fake
    spec = write_spec(tmp_path, iterations=1)
    monkeypatch.setenv("FAKE_HANG", "train:0")
    runner = _start_runner(spec, python, tmp_path)
    hung = _wait_for_hang(record, runner)
    runner.send_signal(signal.SIGINT)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 130, out
    assert "interrupted" in out and "resume" in out
    assert not pid_alive(hung["pid"]) and not pid_alive(hung["child"])  # the whole group
    step = state_of(tmp_path)["status"]["iterations"][0]["train"]
    assert step["attempts"] == 1  # saved as it was; set back when loaded
    monkeypatch.delenv("FAKE_HANG")
    code, out = run_local(spec, python)
    assert code == 0, out
    assert steps(record) == [("generate", 0), ("train", 0), ("train", 0), ("evaluate", 0)]
    status = state_of(tmp_path)["status"]["iterations"][0]
    assert status["train"]["jobName"] == "local-test-i0-train"  # same attempt, no retry used
    assert status["train"]["attempts"] == 1
    assert "restarting interrupted step(s): local-test-i0-train" in out


def test_groups_left_by_a_killed_runner_are_stopped_before_resuming(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    python, record = fake
    spec = write_spec(tmp_path, iterations=1)
    monkeypatch.setenv("FAKE_HANG", "train:0")
    runner = _start_runner(spec, python, tmp_path)
    hung = _wait_for_hang(record, runner)
    time.sleep(0.3)  # the runner saves its state (with the live group) right after starting it
    runner.kill()
    runner.wait(timeout=30)
    assert pid_alive(hung["pid"])  # its own session: it outlives the runner
    monkeypatch.delenv("FAKE_HANG")
    code, out = run_local(spec, python)
    assert code == 0, out
    assert not pid_alive(hung["pid"]) and not pid_alive(hung["child"])
    assert f"stopping process group {hung['pid']}" in out


def test_changing_an_immutable_field_mid_run_is_refused_and_the_run_goes_on(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    python, record = fake
    monkeypatch.setenv("FAKE_HANG", "train:0")
    runner = _start_runner(
        write_spec(tmp_path, iterations=1, training={"beta": 1.5}), python, tmp_path
    )
    _wait_for_hang(record, runner)
    runner.send_signal(signal.SIGINT)
    runner.communicate(timeout=60)
    monkeypatch.delenv("FAKE_HANG")
    code, out = run_local(write_spec(tmp_path, iterations=1, training={"beta": 3.0}), python)
    assert code == 0, out
    assert "spec.training.beta: cannot change after the run started" in out
    trains = [c["argv"] for c in calls(record) if c["stage"] == "train"]
    assert [a[a.index("--beta") + 1] for a in trains] == ["1.5", "1.5"]


def test_a_failed_run_stays_failed_on_rerun(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    python, record = fake
    monkeypatch.setenv("FAKE_FAIL", "train:0")
    spec = write_spec(tmp_path, iterations=1, failurePolicy={"maxRetries": 0})
    assert run_local(spec, python)[0] == 1
    monkeypatch.delenv("FAKE_FAIL")
    code, out = run_local(spec, python)
    assert code == 1 and "Failed:" in out
    assert steps(record) == [("generate", 0), ("train", 0)]


def test_without_evaluation_the_trainers_held_out_metrics_are_shown(
    tmp_path: Path, fake: tuple[str, Path]
) -> None:
    python, record = fake
    code, out = run_local(write_spec(tmp_path, iterations=1, evaluation={"enabled": False}), python)
    assert code == 0, out
    assert steps(record) == [("generate", 0), ("train", 0)]
    assert "SPIN margin (held-out)       0.500  accuracy 0.750" in out


def test_suspended_spec_runs_nothing(tmp_path: Path, fake: tuple[str, Path]) -> None:
    python, record = fake
    code, out = run_local(write_spec(tmp_path, suspend=True), python)
    assert code == 0 and "suspend" in out
    assert steps(record) == []


def test_spinctl_run_exit_codes(tmp_path: Path) -> None:
    """Through the console script: bad input is 2 with the field named, before any work."""
    spinctl = Path(sys.executable).with_name("spinctl")
    bad = write_spec(tmp_path, training={"beta": -1})
    proc = subprocess.run(
        [str(spinctl), "run", str(bad)], capture_output=True, text=True, env=os.environ
    )
    assert proc.returncode == 2
    assert "spec.training.beta" in proc.stderr
    assert not tmp_path.joinpath("artifacts").exists()


def test_spinctl_status_shows_a_local_run(
    tmp_path: Path, fake: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from spin_operator.cli import main

    python, _ = fake
    spec = write_spec(tmp_path)
    assert main(["status", str(spec)]) == 1
    assert "default/local-test: not started" in capsys.readouterr().out
    code, out = run_local(spec, python)
    assert code == 0, out
    assert main(["status", str(spec)]) == 0
    text = capsys.readouterr().out
    assert "phase: Succeeded" in text and "done 2/2" in text and "Complete (Succeeded)" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("0 ", "1 "))]
    assert [r[:6] for r in rows] == [
        ["0", "θ0→θ1", "Done", "Succeeded", "Succeeded", "Succeeded"],
        ["1", "θ1→θ2", "Done", "Succeeded", "Succeeded", "Succeeded"],
    ]
    assert rows[1][7] == "0.5"  # exact_match of θ2 (the fake evaluation writes 0.25 × (t + 1))
    assert main(["status", str(spec), "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (
        doc["status"]["phase"] == "Succeeded"
        and doc["status"]["bestModel"] == f"θ{doc['status']['bestIteration'] + 1}"
    )


def test_mlflow_run_ends_not_confirmed_are_delivered_by_the_rerun(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run succeeds but MLflow does not confirm the run ends (down at that moment, or the
    command killed right then): the saved status says so, and rerunning the command ends them."""
    from mlflow.tracking import MlflowClient

    from spin_operator.local.tracking import LocalTracking

    python, _ = fake
    spec = write_spec(tmp_path, iterations=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    real_settle = LocalTracking.settle

    async def not_confirmed(self: LocalTracking, status: object, actions: object) -> bool:
        return False

    monkeypatch.setattr(LocalTracking, "settle", not_confirmed)
    out = io.StringIO()
    assert (
        LocalRun(load(spec, tracking_uri=uri), python=python, poll_interval=0.02, out=out).run()
        == 0
    )
    assert "has not confirmed" in out.getvalue()
    status = state_of(tmp_path)["status"]
    parent, iteration_run = status["mlflow"]["runId"], status["iterations"][0]["mlflowRunId"]
    client = MlflowClient(uri)
    assert status["phase"] == "Succeeded" and not status["mlflow"].get("finished")
    assert client.get_run(parent).info.status == "RUNNING"

    monkeypatch.setattr(LocalTracking, "settle", real_settle)
    out = io.StringIO()
    assert (
        LocalRun(load(spec, tracking_uri=uri), python=python, poll_interval=0.02, out=out).run()
        == 0
    )
    assert "has not confirmed" not in out.getvalue()
    assert sorted(state_of(tmp_path)["status"]["mlflow"]["finished"]) == sorted(
        [parent, iteration_run]
    )
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(iteration_run).info.status == "FINISHED"


def test_control_arm_runs_beside_spin_and_the_table_compares_both(
    tmp_path: Path, fake: tuple[str, Path]
) -> None:
    python, record = fake
    spec = write_spec(tmp_path, controlArm={"enabled": True})
    code, out = run_local(spec, python)
    assert code == 0, out
    order = steps(record)
    for t in (0, 1):  # each control step starts with (beside) its SPIN step, never before it
        assert order.index(("train", t)) < order.index(("evaluate", t))
        assert order.index(("control-train", t)) < order.index(("control-evaluate", t))
        assert order.index(("generate", t)) < order.index(("control-train", t))
    ctrain1 = next(
        c for c in calls(record) if c["stage"] == "control-train" and c["iteration"] == 1
    )
    prefix = str(tmp_path.joinpath(*PREFIX, "local-test"))
    argv = ctrain1["argv"]
    assert argv[argv.index("--model") + 1] == f"{prefix}/iter-000/control/model"
    assert argv[argv.index("--objective") + 1] == "sft"
    status = state_of(tmp_path)["status"]
    assert status["phase"] == "Succeeded"
    first, second = (it["control"] for it in status["iterations"])
    assert (first["spinScore"], first["controlScore"], first["spinAdvantage"]) == (
        0.25,
        0.375,
        -0.125,
    )
    assert second["spinAdvantage"] == 0.125
    control = next(c for c in status["conditions"] if c["type"] == "ControlArm")
    assert (control["status"], control["reason"]) == ("True", "SPINAhead")
    assert "warning: iteration 0: the SFT control is ahead by 0.125" in out
    assert "control -> SFT control ahead (-0.125)" not in out  # said with the scores:
    assert "θ1 0.250, control 0.375 -> SFT control ahead (-0.125)" in out
    assert "control θ1" in out and "control θ2" in out  # rows of the summary table


def test_spec_pod_env_reaches_local_steps_and_cluster_only_fields_are_named(
    tmp_path: Path, fake: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.pod on one machine: literal env is set, a Secret-backed var comes from the shell (or
    is named when the shell lacks it), and what only a cluster pod can use is said once."""
    python, record = fake
    monkeypatch.setenv("FAKE_RECORD_ENV", "NCCL_DEBUG,HF_TOKEN,WANDB_API_KEY")
    monkeypatch.setenv("HF_TOKEN", "from-the-shell")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    secret = lambda key: {"secretKeyRef": {"name": "tokens", "key": key}}  # noqa: E731
    spec = write_spec(
        tmp_path,
        iterations=1,
        pod={
            "env": [
                {"name": "NCCL_DEBUG", "value": "INFO"},
                {"name": "HF_TOKEN", "valueFrom": secret("hf")},
                {"name": "WANDB_API_KEY", "valueFrom": secret("wandb")},
            ],
            "labels": {"team": "nlp"},
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        },
    )
    code, out = run_local(spec, python)
    assert code == 0, out
    envs = [c["env"] for c in calls(record) if c["stage"] in ("generate", "train")]
    assert envs and all(e["NCCL_DEBUG"] == "INFO" for e in envs)
    assert all(e["HF_TOKEN"] == "from-the-shell" for e in envs)
    assert all(e["WANDB_API_KEY"] is None for e in envs)
    assert "WANDB_API_KEY (from Secret tokens, key wandb on a cluster)" in out
    assert "HF_TOKEN (from" not in out  # it was given
    assert "spec.pod.volumes, spec.pod.labels: apply to cluster pods only" in out
    assert out.count("apply to cluster pods only") == 1
