"""spinctl demo: the spec it writes is valid and runnable here; the build is reused or replaced."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from spin_operator.local import demo
from spin_operator.local.preflight import load, preflight
from spin_operator.validation import problems_of

# demo-build's flags for a task and model small enough for a unit test.
SMALL = (
    "--rows",
    "120",
    "--max-samples",
    "60",
    "--eval-samples",
    "20",
    "--size",
    "unit",
    "--sft-steps",
    "3",
    "--sft-batch-size",
    "8",
)
DEFAULTS = {"seed": 3, "max_samples": 2000, "eval_samples": 400}


def small_build(
    workdir: Path, seed: int, env: Mapping[str, str] | None = None
) -> dict[str, object]:
    return real_build(workdir, seed, SMALL, env)


real_build = demo.build


def test_the_demo_spinrun_is_valid_and_points_into_the_workdir(tmp_path: Path) -> None:
    doc = demo.spinrun(tmp_path, DEFAULTS, iterations=2)
    assert problems_of(doc) == []
    spec = doc["spec"]
    assert spec["model"]["uri"] == str(tmp_path / "sft-model")
    assert spec["dataset"] == {
        "uri": str(tmp_path / "task.jsonl"),
        "maxSamples": 2000,
        "evalSamples": 400,
        "seed": 3,
    }
    assert spec["storage"]["uri"] == str(tmp_path / "artifacts")
    assert spec["tracking"]["uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert spec["generation"]["temperature"] == 1.0  # sampled opponents (greedy ones collapse)


def test_build_then_reuse_then_rebuild_on_a_new_config(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = demo.build(tmp_path, 0, SMALL)  # in a subprocess: torch never loads in spinctl
    assert cfg["rows"] == 120 and cfg["seed"] == 0 and cfg["size"] == "unit"
    model = tmp_path / "sft-model"
    assert (model / "config.json").is_file() and (model / "chat_template.jinja").is_file()
    rows = (tmp_path / "task.jsonl").read_text().splitlines()
    assert len(rows) == 120 and {json.loads(r)["task"] for r in rows} == {"reverse", "sort"}
    stamp = (tmp_path / "demo.json").read_text()
    spec_path = tmp_path / "spinrun.yaml"
    spec_path.write_text(yaml.safe_dump(demo.spinrun(tmp_path, cfg, 1)))
    preflight(load(spec_path))  # the model, data, storage and sqlite store all check out

    capfd.readouterr()
    demo.build(tmp_path, 0, SMALL)
    assert capfd.readouterr().out.strip() == f"reusing the task and SFT model in {tmp_path}"

    (tmp_path / "artifacts" / "old").mkdir(parents=True)
    (tmp_path / "mlflow.db").write_text("old")
    demo.build(tmp_path, 1, SMALL)
    assert "removing the results of an earlier demo build" in capfd.readouterr().out
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "mlflow.db").exists()
    assert (tmp_path / "demo.json").read_text() != stamp


def test_no_run_writes_the_spec_and_says_how_to_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "build", small_build)
    args = argparse.Namespace(workdir=str(tmp_path / "w"), seed=0, iterations=2, no_run=True)
    assert demo.run(args) == 0
    out = capsys.readouterr().out
    assert f"spinctl run {tmp_path / 'w' / 'spinrun.yaml'}" in out
    doc = yaml.safe_load((tmp_path / "w" / "spinrun.yaml").read_text())
    assert doc["spec"]["iterations"] == 2 and not (tmp_path / "w" / "artifacts").exists()


def test_control_arm_flag_enables_the_sft_control(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "controlArm" not in demo.spinrun(tmp_path, DEFAULTS, 2)["spec"]  # off by default
    doc = demo.spinrun(tmp_path, DEFAULTS, 2, control_arm=True)
    assert problems_of(doc) == [] and doc["spec"]["controlArm"] == {"enabled": True}
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert (
        parser.parse_args(["--control-arm"]).control_arm and not parser.parse_args([]).control_arm
    )
    monkeypatch.setattr(demo, "build", small_build)
    args = argparse.Namespace(
        workdir=str(tmp_path / "w"), seed=0, iterations=1, no_run=True, control_arm=True
    )
    assert demo.run(args) == 0
    written = yaml.safe_load((tmp_path / "w" / "spinrun.yaml").read_text())
    assert written["spec"]["controlArm"] == {"enabled": True}
