"""Progress parsed from the runtime's own log lines; results shown per iteration."""

from __future__ import annotations

import io
import json
from pathlib import Path

from spin_operator.api import types as api
from spin_operator.local.backend import LocalJob, Pod
from spin_operator.local.display import Display, Tail, bar
from spin_operator.steps import StepPlan

SPEC = api.SPINRunSpec.model_validate(
    {
        "model": {"uri": "/m"},
        "dataset": {"uri": "/d.jsonl"},
        "iterations": 2,
        "training": {"globalBatchSize": 64, "microBatchSize": 16, "epochs": 2},
    }
)


def job(tmp_path: Path, stage: str = "train", pods: int = 1) -> LocalJob:
    plan = StepPlan(stage, 1, 0, f"r-i1-{stage}", pods, 1, (), {}, {}, 0, "img")  # type: ignore[arg-type]
    return LocalJob(
        plan, [Pod(i, [], tmp_path / f"{stage}-{i}.log") for i in range(pods)], {}, pods
    )


def test_bar() -> None:
    assert bar(0, 10, 10) == "[----------]"
    assert bar(5, 10, 10) == "[#####-----]"
    assert bar(12, 10, 10) == "[##########]" and bar(1, 0, 4) == "[----]"


def test_tail_returns_only_complete_new_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("a\nb")
    tail = Tail(log)
    assert tail.lines() == ["a"]
    with log.open("a") as f:
        f.write("c\nd\n")
    assert tail.lines() == ["bc", "d"]
    assert tail.lines() == []


def test_training_progress_from_metric_lines(tmp_path: Path) -> None:
    out = io.StringIO()
    display = Display(SPEC, out=out, tty=False)
    training = job(tmp_path)
    display.step_started(training)
    lines = [
        "2026 INFO spin_runtime.train.loop: iteration 1: ...",
        json.dumps({"event": "data", "step": 0, "train_pairs": 300}),  # ceil(300/64) * 2 = 10
        *(
            json.dumps(
                {"event": "train", "step": s, "loss": 0.6, "margin": 0.25 * s, "accuracy": 0.5}
            )
            for s in range(1, 6)
        ),
        "not json {",
    ]
    training.pods[0].log_path.write_text("\n".join(lines) + "\n")
    display.tick()
    progress = display.progress[training.name]
    assert (progress.step, progress.total_steps) == (5, 10)
    text = out.getvalue()
    assert "iteration 1 of 2 (θ1 -> θ2): train" in text
    assert "step 5/10" in text and "margin 1.250" in text and "[############------------]" in text


def test_generation_progress_counts_finished_shards(tmp_path: Path) -> None:
    out = io.StringIO()
    display = Display(SPEC, out=out, tty=True)
    gen = job(tmp_path, "generate", pods=4)
    display.step_started(gen)
    gen.pods[0].returncode = 0
    gen.pods[1].returncode = 0
    display.tick()
    assert "shards 2/4" in out.getvalue() and out.getvalue().count("\r\x1b[2K") == 1


def test_generation_progress_by_batch(tmp_path: Path) -> None:
    """Each shard logs {"event": "generate", ...} after every batch: progress counts prompts."""
    out = io.StringIO()
    display = Display(SPEC, out=out, tty=True)
    gen = job(tmp_path, "generate", pods=2)
    display.step_started(gen)
    gen.pods[0].log_path.write_text(
        json.dumps({"event": "generate", "shard": 0, "done": 0, "total": 100}) + "\n"
    )
    display.tick()
    assert (
        "shards 0/2" in out.getvalue() and "prompts" not in out.getvalue()
    )  # shard 1 not heard from yet
    with gen.pods[0].log_path.open("a") as f:
        f.write(json.dumps({"event": "generate", "shard": 0, "done": 64, "total": 100}) + "\n")
    gen.pods[1].log_path.write_text(
        json.dumps({"event": "generate", "shard": 1, "done": 36, "total": 100}) + "\n"
    )
    display.tick()
    assert "prompts 100/200, shards 0/2" in out.getvalue()


def test_iteration_results_and_summary(tmp_path: Path) -> None:
    out = io.StringIO()
    display = Display(SPEC, out=out, tty=False)
    results = {
        "metrics": {"exact_match": 0.5, "real_logp_per_token": -0.9, "num_examples": 200},
        "baseline": {"exact_match": 0.4, "real_logp_per_token": -1.1},
    }
    display.iteration_results(
        0, results, {"eval_margin": 3.2, "eval_accuracy": 0.9, "eval_loss": 0.2}
    )
    display.summary(
        [("θ0 (SFT)", {"exact_match": 0.4}), ("θ1", {"exact_match": 0.5, "eval_margin": 3.2})]
    )
    text = out.getvalue()
    assert "held-out results of θ1 (200 prompts)" in text
    assert "exact match                  0.500  (θ0: 0.400)" in text
    assert "SPIN margin (held-out)       3.200  accuracy 0.900" in text
    assert "θ0 (SFT)          0.400" in text
