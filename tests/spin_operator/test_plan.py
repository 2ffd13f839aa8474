"""`spinctl plan`, `spinctl render` and `spinctl --version`: what a SPINRun will create, before it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spin_operator.cli import main
from spin_operator.plan import PLACEHOLDER_UID, load, render_iteration
from spin_operator.render import render
from spin_operator.steps import RunRef, plan_step


def _spec_file(tmp_path: Path, rows: int = 120, **spec: Any) -> Path:
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Q{i}", "response": f"A{i}"}) + "\n" for i in range(rows))
    )
    body: dict[str, Any] = {
        "model": {"uri": "org/model"},
        "dataset": {"uri": str(data), "evalSamples": 20},
        "iterations": 3,
    }
    body |= spec
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "selfplay.dev/v1alpha1",
                "kind": "SPINRun",
                "metadata": {"name": "plan-me", "namespace": "team"},
                "spec": body,
            }
        )
    )
    return path


def test_render_prints_the_operators_own_manifests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec_file(tmp_path, training={"nodes": 2, "gpusPerNode": 4, "globalBatchSize": 64})
    assert main(["render", str(path), "--iteration", "2", "--storage-uri", "s3://bkt/runs"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("Job", "plan-me-i2-gen"),
        ("Service", "plan-me-i2-train"),
        ("Job", "plan-me-i2-train"),
        ("Job", "plan-me-i2-eval"),
    ]
    for obj in objects:
        kubernetes_validate.validate(obj, "1.35", strict=True)
    # The same objects the controller renders (same functions, same resolved spec).
    run, spec, settings = load(str(path), "s3://bkt/runs", None)
    assert run == RunRef("team", "plan-me", PLACEHOLDER_UID)
    train = plan_step(spec, settings, run, 2, "train")
    assert objects[1:3] == render(train, spec, run)
    assert "--data" in objects[2]["spec"]["template"]["spec"]["containers"][0]["command"]


def test_render_refuses_what_the_operator_would_not_create(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec_file(tmp_path)
    assert main(["render", str(path), "--iteration", "3", "--storage-uri", "s3://bkt/runs"]) == 2
    assert "--iteration 3: the run has iterations 0..2" in capsys.readouterr().err
    assert main(["render", str(path)]) == 2  # no storage anywhere
    assert "spec.storage.uri" in capsys.readouterr().err
    run, spec, settings = load(str(path), "s3://bkt/runs", None)
    with pytest.raises(ValueError, match="maxRetries"):
        render_iteration(spec, settings, run, 0, attempt=9)


def test_plan_counts_pods_gpus_steps_tokens_and_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec_file(
        tmp_path,
        rows=120,
        generation={"replicas": 4, "gpusPerReplica": 1, "maxNewTokens": 100},
        training={
            "gpusPerNode": 2,
            "globalBatchSize": 16,
            "epochs": 2,
            "maxLength": 300,
            "maxPromptLength": 100,
        },
        evaluation={"maxNewTokens": 50},
    )
    argv = ["plan", str(path), "--gpu-hour-price", "3", "--gen-tokens-per-gpu-second", "1000",
            "--train-tokens-per-gpu-second", "500", "--eval-tokens-per-gpu-second", "100"]  # fmt: skip # argv: a flag beside its value
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[1]: line.split()
        for line in out.splitlines()
        if line.startswith(("0 ", "1 ", "2 "))
    }
    assert list(rows) == ["plan-me-i0-check"] + [
        f"plan-me-i{t}-{k}" for t in range(3) for k in ("gen", "train", "eval")
    ]
    # the check before any GPU Job: one CPU pod, nothing generated, no GPU-hours
    assert rows["plan-me-i0-check"][2:] == ["1", "0", "-", "0", "0.00"]
    prompts = 120 - 20  # held-out prompts never train
    assert "100 training prompts (dataset)" in out
    # generate: 4 pods × 1 GPU, 100 prompts × 100 tokens at 1000 tok/GPU-s
    assert rows["plan-me-i0-gen"][2:] == ["4", "4", "-", "10,000", f"{10_000 / 1000 / 3600:.2f}"]
    # train: iteration 0 has 100 pairs, later ones mix the previous iteration's answers: 200
    assert rows["plan-me-i0-train"][4] == str(-(-prompts // 16) * 2)  # 7 steps × 2 epochs
    assert rows["plan-me-i1-train"][4] == str(-(-2 * prompts // 16) * 2)
    assert rows["plan-me-i1-train"][5] == f"{2 * 200 * 300 * 2:,}"
    # evaluate: θ0 and θ1 at iteration 0, one model after
    assert (rows["plan-me-i0-eval"][5], rows["plan-me-i1-eval"][5]) == (
        f"{2 * 20 * 50:,}",
        f"{20 * 50:,}",
    )
    total = sum(float(r[6]) for r in rows.values())
    stated = float(out.split("GPU-hours: ")[1].split()[0])
    assert stated == pytest.approx(total, abs=0.05)
    cost = float(out.split("cost: ")[1].split()[0].replace(",", ""))
    assert cost == pytest.approx(3 * stated, abs=0.02) and cost > 0


def test_plan_of_a_cpu_run_costs_no_gpu_hours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spec_file(
        tmp_path,
        generation={"gpusPerReplica": 0, "backend": "transformers"},
        training={"gpusPerNode": 0},
        evaluation={"gpus": 0},
    )
    assert main(["plan", str(path), "--gpu-hour-price", "2"]) == 0
    assert "cost: 0.00 at 2 per GPU-hour" in capsys.readouterr().out


def test_plan_needs_a_prompt_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _spec_file(tmp_path, dataset={"uri": str(tmp_path / "missing.jsonl")})
    assert main(["plan", str(path)]) == 2
    assert "set dataset.maxSamples or pass --prompts" in capsys.readouterr().err
    assert main(["plan", str(path), "--prompts", "64"]) == 0
    assert "64 training prompts (--prompts)" in capsys.readouterr().out


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spin_operator.cli", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "spinctl 0.1.0"


def test_plan_and_render_list_the_control_arm_beside_spin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """controlArm: every iteration also has the control's training (same optimizer steps) and
    evaluation (one model: θ0's baseline is SPIN's evaluation's)."""
    path = _spec_file(
        tmp_path,
        rows=120,
        training={"gpusPerNode": 2, "globalBatchSize": 16},
        controlArm={"enabled": True},
    )
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[1]: line.split() for line in out.splitlines() if line[:2] in ("0 ", "1 ", "2 ")
    }
    run, spec, settings = load(str(path), "s3://bkt/runs", None)
    for t in range(spec.iterations):
        spin = plan_step(spec, settings, run, t, "train").job_name
        control = plan_step(spec, settings, run, t, "control-train").job_name
        evaluation = plan_step(spec, settings, run, t, "control-evaluate").job_name
        assert rows[control][4] == rows[spin][4] != "-"  # equal compute
        assert evaluation in rows
    assert main(["render", str(path), "--iteration", "0", "--storage-uri", "s3://bkt/runs"]) == 0
    names = [
        o["metadata"]["name"]
        for o in yaml.safe_load_all(capsys.readouterr().out)
        if o["kind"] == "Job"
    ]
    assert names[0] == plan_step(spec, settings, run, 0, "check").job_name  # before any GPU Job
    assert plan_step(spec, settings, run, 0, "control-train").job_name in names
