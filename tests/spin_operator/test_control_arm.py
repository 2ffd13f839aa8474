"""spec.controlArm: the equal-compute SFT control's steps, plans and Jobs, and the verdict in
status, the ControlArm condition and the ControlAhead event (pure: reconciler_world)."""

from __future__ import annotations

import argparse
import importlib

import kubernetes_validate
import pytest
from pydantic import ValidationError

from spin_operator.api import types as api
from spin_operator.conditions import get_condition
from spin_operator.decision import CreateStep, DeleteJob, DeleteService, RegisterModel, StorageFacts
from spin_operator.render import render
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef, immutable_view, plan_step, spec_digest
from spin_operator.validation import problems_of
from tests.spin_operator.reconciler_world import NAME, World, spin_object

RUN = RunRef("team", "paper", "uid-7")
R = "s3://bkt/runs/team/paper"
SETTINGS = Settings(runtime_image="runtime:1", storage_uri="s3://bkt/runs")
CONTROL = {"controlArm": {"enabled": True}}


def make(**extra: object) -> api.SPINRunSpec:
    raw = {
        "model": {"uri": "s3://models/sft"},
        "dataset": {"uri": "s3://data/sft.jsonl", "maxSamples": 100, "evalSamples": 10, "seed": 3},
        **CONTROL,
    }
    raw.update(extra)  # type: ignore[arg-type]
    return resolve_spec(api.SPINRunSpec.model_validate(raw), SETTINGS)


def flag(argv: tuple[str, ...], name: str) -> str:
    return argv[argv.index(name) + 1]


def values(argv: tuple[str, ...], name: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == name]


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("t", [0, 2])
def test_control_train_is_spins_training_with_the_sft_objective_from_the_previous_control(
    t: int,
) -> None:
    spec = make(training={"learningRate": 1e-6, "epochs": 3, "mixPreviousIterations": 2})
    spin_plan = plan_step(spec, SETTINGS, RUN, t, "train")
    spin = spin_plan.argv
    ctl = plan_step(spec, SETTINGS, RUN, t, "control-train")
    assert flag(ctl.argv, "--model") == (
        "s3://models/sft" if t == 0 else f"{R}/iter-{t - 1:03d}/control/model"
    )
    assert flag(ctl.argv, "--output") == ctl.output_uri == f"{R}/iter-{t:03d}/control/model"
    assert flag(ctl.argv, "--work-dir") == f"{R}/iter-{t:03d}/control/train"
    assert flag(ctl.argv, "--objective") == "sft" and flag(spin, "--objective") == "spin"
    # the same prompts in the same order, the same optimizer steps and schedule
    assert values(ctl.argv, "--data") == values(spin, "--data")
    for name in (
        "--seed",
        "--epochs",
        "--global-batch-size",
        "--micro-batch-size",
        "--learning-rate",
        "--optimizer",
        "--lr-scheduler",
        "--warmup-ratio",
        "--max-length",
    ):
        assert flag(ctl.argv, name) == flag(spin, name), name
    assert ctl.env["PET_NPROC_PER_NODE"] == spin_plan.env["PET_NPROC_PER_NODE"]
    assert ctl.rendezvous and ctl.job_name == f"paper-i{t}-ctrain"
    assert ctl.master_addr == f"paper-i{t}-ctrain-0.paper-i{t}-ctrain"


def test_control_learning_rate_override() -> None:
    spec = make(controlArm={"enabled": True, "learningRate": 2e-5})
    assert (
        flag(plan_step(spec, SETTINGS, RUN, 1, "control-train").argv, "--learning-rate") == "2e-05"
    )


def test_control_evaluate_scores_the_control_model_without_a_second_baseline() -> None:
    spec = make()
    plan = plan_step(spec, SETTINGS, RUN, 0, "control-evaluate")
    assert flag(plan.argv, "--model") == f"{R}/iter-000/control/model"
    assert flag(plan.argv, "--output") == plan.output_uri == f"{R}/iter-000/control/eval"
    assert "--baseline-model" not in plan.argv
    spin = plan_step(spec, SETTINGS, RUN, 0, "evaluate").argv
    assert flag(spin, "--max-new-tokens") == flag(plan.argv, "--max-new-tokens")
    assert values(spin, "--dataset") == values(plan.argv, "--dataset")


def test_custom_evaluation_command_gets_the_control_model() -> None:
    spec = make(evaluation={"command": ["python", "eval.py"], "image": "eval:1"})
    env = plan_step(spec, SETTINGS, RUN, 1, "control-evaluate").env
    assert env["SPIN_MODEL_URI"] == f"{R}/iter-001/control/model"
    assert env["SPIN_EVAL_OUTPUT"] == f"{R}/iter-001/control/eval"


def test_control_metrics_are_prefixed_on_the_iteration_run_only_with_tracking() -> None:
    tracked = make(tracking={"uri": "http://mlflow:5000"})
    for stage in ("control-train", "control-evaluate"):
        plan = plan_step(tracked, SETTINGS, RUN, 0, stage, mlflow_run_id="r1")  # type: ignore[arg-type]
        assert plan.env["SPIN_METRIC_PREFIX"] == "control/" and plan.env["MLFLOW_RUN_ID"] == "r1"
    for stage in ("train", "evaluate"):
        assert (
            "SPIN_METRIC_PREFIX"
            not in plan_step(tracked, SETTINGS, RUN, 0, stage, mlflow_run_id="r1").env
        )  # type: ignore[arg-type]
    assert "SPIN_METRIC_PREFIX" not in plan_step(make(), SETTINGS, RUN, 0, "control-train").env


def _runtime_parser(command: str) -> argparse.ArgumentParser:
    from spin_runtime.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command])
    parser = argparse.ArgumentParser(prog="python -m spin_runtime")
    module.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("stage", ["control-train", "control-evaluate"])
def test_control_argv_parses_with_the_runtime_cli_and_renders_valid_jobs(stage: str) -> None:
    spec = make(
        training={"peft": {"targetModules": ["q_proj"]}}, tracking={"uri": "http://mlflow:5000"}
    )
    plan = plan_step(spec, SETTINGS, RUN, 3, stage, 1, mlflow_run_id="r1")  # type: ignore[arg-type]
    argv = list(plan.argv)
    start = argv.index("spin_runtime") + 1
    command = argv[start]
    args = _runtime_parser(command).parse_args(argv[start:])
    assert command == ("train" if stage == "control-train" else "evaluate")
    if stage == "control-train":
        assert args.objective == "sft" and args.peft == "lora"  # LoRA for both arms alike
    objects = render(plan, spec, RUN)
    assert sorted(o["kind"] for o in objects) == (
        ["Job", "Service"] if stage == "control-train" else ["Job"]
    )
    for obj in objects:
        kubernetes_validate.validate(obj, "1.35", strict=True)


# --------------------------------------------------------------------------- spec


def test_control_arm_needs_evaluation_and_says_which_field() -> None:
    obj = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "r", "namespace": "n"},
        "spec": {
            "model": {"uri": "m"},
            "dataset": {"uri": "s3://data/sft.jsonl"},
            **CONTROL,
            "evaluation": {"enabled": False},
        },
    }
    problems = {p.path: p.message for p in problems_of(obj)}
    assert "needs evaluation.enabled" in problems["spec.controlArm.enabled"]
    with pytest.raises(ValidationError, match="learningRate"):
        make(controlArm={"enabled": True, "learningRate": 0})


def test_off_by_default_and_the_digest_of_older_runs_is_unchanged() -> None:
    off = make(controlArm={"enabled": False})
    assert "controlArm" not in immutable_view(off)
    assert spec_digest(off) == spec_digest(make(controlArm={}))
    assert spec_digest(make()) != spec_digest(off)  # enabling changes what the run produces


# --------------------------------------------------------------------------- reconciler


def world(**spec) -> World:
    return World(spin_object(**{**CONTROL, **spec}))


def test_control_runs_beside_spin_and_status_says_who_won() -> None:
    w = world(tracking={"uri": "http://mlflow:5000"})
    w.run_to_end()
    assert w.created == [f"{NAME}-i0-check"] + [
        f"{NAME}-i{t}-{k}" for t in range(3) for k in ("gen", "train", "ctrain", "eval", "ceval")
    ]
    # each pair was created in one decision: the control starts at once, beside SPIN's step
    for d in w.decisions:
        names = [c.name for c in d.of_type(CreateStep)]
        assert ("train" in " ".join(names)) == ("ctrain" in " ".join(names))
    for it in w.status.iterations:
        c = it.control
        assert c is not None and c.metric == "exact_match"
        assert c.spin_score == pytest.approx(0.1 * (it.iteration + 1))
        assert c.control_score == pytest.approx(0.1 * (it.iteration + 1) - 0.05)
        assert c.spin_advantage == pytest.approx(0.05)
        assert c.model_uri == (
            "s3://models/base"
            if it.iteration == 0
            else f"s3://bucket/runs/ns/run/iter-{it.iteration - 1:03d}/control/model"
        )
        assert (
            c.output_model_uri == f"s3://bucket/runs/ns/run/iter-{it.iteration:03d}/control/model"
        )
        assert it.control_train and it.control_evaluate
        assert it.control_train.phase == it.control_evaluate.phase == "Succeeded"
    cond = get_condition(w.status.conditions, "ControlArm")
    assert cond is not None and (cond.status, cond.reason) == ("True", "SPINAhead")
    assert "iteration 2: SPIN ahead by 0.05" in cond.message
    assert "ControlAhead" not in [r for r, _ in w.events]
    registered = [a for d in w.decisions for a in d.of_type(RegisterModel)]
    assert [
        r.model_uri.endswith("/model") and "/control/" not in r.model_uri for r in registered
    ] == [True] * 3
    services = [a.name for d in w.decisions for a in d.of_type(DeleteService)]
    assert f"{NAME}-i0-ctrain" in services and f"{NAME}-i0-train" in services


def _finish(w: World, spin: float, control: float) -> None:
    """Succeed every step of the current iteration; evaluations score `spin` and `control`."""
    t = w.status.iteration
    for _ in range(20):
        for job in w.active():
            metrics = (
                {"exact_match": spin}
                if job.stage == "evaluate"
                else {"exact_match": control}
                if job.stage == "control-evaluate"
                else None
            )
            w.succeed(job.name, metrics)
        w.reconcile()
        done = [it for it in w.status.iterations if it.iteration == t and it.stage == "Done"]
        if done:
            return
    raise AssertionError("iteration did not finish")


def test_control_ahead_warns_each_time_and_best_stays_on_spin() -> None:
    w = world(iterations=3)
    w.reconcile()
    _finish(w, spin=0.30, control=0.40)
    cond = get_condition(w.status.conditions, "ControlArm")
    assert cond is not None and (cond.status, cond.reason) == ("False", "ControlAhead")
    assert (
        "SFT control is ahead by 0.1" in cond.message
        and "θ1 exact_match=0.3 vs SFT control 0.4" in cond.message
    )
    assert w.status.iterations[0].control.spin_advantage == pytest.approx(-0.1)  # type: ignore[union-attr]
    warnings = [m for r, m in w.events if r == "ControlAhead"]
    assert len(warnings) == 1
    _finish(w, spin=0.50, control=0.45)
    cond = get_condition(w.status.conditions, "ControlArm")
    assert cond is not None and (cond.status, cond.reason) == ("True", "SPINAhead")
    assert len([r for r, _ in w.events if r == "ControlAhead"]) == 1
    _finish(w, spin=0.20, control=0.60)
    assert len([r for r, _ in w.events if r == "ControlAhead"]) == 2
    assert w.status.best_iteration == 1 and w.status.best_model == "θ2"  # SPIN's scores only
    assert w.status.phase == "Succeeded"


def test_lower_is_better_flips_the_sign() -> None:
    w = world(evaluation={"metric": "loss", "mode": "min"}, iterations=1)
    w.reconcile()
    for _ in range(20):
        for job in w.active():
            metrics = (
                {"loss": 1.0}
                if job.stage == "evaluate"
                else {"loss": 1.5}
                if job.stage == "control-evaluate"
                else None
            )
            w.succeed(job.name, metrics)
        w.reconcile()
        if w.status.phase == "Succeeded":
            break
    c = w.status.iterations[0].control
    assert c is not None and c.spin_advantage == pytest.approx(0.5)
    cond = get_condition(w.status.conditions, "ControlArm")
    assert cond is not None and cond.reason == "SPINAhead"


def test_missing_metric_on_the_control_is_said_not_guessed() -> None:
    w = world(iterations=1)
    w.reconcile()
    for _ in range(20):
        for job in w.active():
            w.succeed(job.name, {"other": 1.0} if job.stage == "control-evaluate" else None)
        w.reconcile()
        if w.status.phase == "Succeeded":
            break
    cond = get_condition(w.status.conditions, "ControlArm")
    assert cond is not None and (cond.status, cond.reason) == ("False", "NotCompared")
    assert w.status.iterations[0].control.spin_advantage is None  # type: ignore[union-attr]


def test_the_stage_waits_for_the_slower_arm() -> None:
    w = world()
    w.past_the_check()
    w.reconcile()
    w.succeed(f"{NAME}-i0-gen")
    w.reconcile()
    assert {j.name for j in w.active()} == {f"{NAME}-i0-train", f"{NAME}-i0-ctrain"}
    w.succeed(f"{NAME}-i0-train")
    for _ in range(3):
        w.reconcile()
    assert w.status.iterations[0].stage == "Training" and [j.name for j in w.active()] == [
        f"{NAME}-i0-ctrain"
    ]
    assert w.status.iterations[0].train.phase == "Succeeded"
    w.succeed(f"{NAME}-i0-ctrain")
    d = w.reconcile()
    assert sorted(c.name for c in d.of_type(CreateStep)) == [f"{NAME}-i0-ceval", f"{NAME}-i0-eval"]
    assert w.status.iterations[0].stage == "Evaluating"


def test_a_failed_control_job_is_retried_alone() -> None:
    w = world()
    w.past_the_check()
    w.reconcile()
    w.succeed(f"{NAME}-i0-gen")
    w.reconcile()
    w.set_state(f"{NAME}-i0-ctrain", "Failed", "BackoffLimitExceeded", "OOM")
    d = w.reconcile()
    assert [c.name for c in d.of_type(CreateStep)] == [f"{NAME}-i0-ctrain-r1"]
    assert w.status.iterations[0].control_train.attempts == 2  # type: ignore[union-attr]
    assert w.status.iterations[0].train.attempts == 1 and f"{NAME}-i0-train" in {
        j.name for j in w.active()
    }


def test_bad_input_in_the_control_fails_the_run_and_stops_spins_job() -> None:
    w = world()
    w.past_the_check()
    w.reconcile()
    w.succeed(f"{NAME}-i0-gen")
    w.reconcile()
    w.set_state(f"{NAME}-i0-ctrain", "Failed", "BadInput", "--objective: bad")
    d = w.reconcile()
    assert w.status.phase == "Failed" and "control-train of iteration 0" in (w.status.message or "")
    assert DeleteJob(f"{NAME}-i0-train") in d.actions and not d.of_type(CreateStep)


def test_a_control_found_complete_in_storage_is_not_redone() -> None:
    w = world()
    w.storage[0] = StorageFacts(generated=True, control_model=True)
    w.reconcile()
    assert w.created == [f"{NAME}-i0-train"]
    assert w.status.iterations[0].control_train.phase == "Succeeded"  # type: ignore[union-attr]


def test_disabled_makes_no_control_steps_or_condition() -> None:
    w = World(spin_object(iterations=1))
    w.run_to_end()
    assert w.created == [f"{NAME}-i0-{k}" for k in ("check", "gen", "train", "eval")]
    it = w.status.iterations[0]
    assert it.control is None and it.control_train is None and "controlTrain" not in it.to_wire()
    assert get_condition(w.status.conditions, "ControlArm") is None


def test_facts_are_final_only_when_both_arms_are_complete() -> None:
    """Callers cache final facts: caching SPIN's complete evaluation before the control's
    finished made the control's finished Job look like one that wrote nothing."""
    from spin_operator.observe import facts_final

    spin_done = StorageFacts(generated=True, model=True, evaluated=True)
    assert facts_final(make(controlArm={"enabled": False}), spin_done)
    assert not facts_final(make(), spin_done)
    assert not facts_final(
        make(), StorageFacts(generated=True, model=True, evaluated=True, control_model=True)
    )
    assert facts_final(
        make(),
        StorageFacts(
            generated=True, model=True, evaluated=True, control_model=True, control_evaluated=True
        ),
    )


def test_spinctl_status_lists_both_arms() -> None:
    from spin_operator.local.status_cmd import describe

    w = world(iterations=2)
    w.reconcile()
    _finish(w, spin=0.30, control=0.40)
    _finish(w, spin=0.50, control=0.45)
    text = "\n".join(describe(w.status, 2))
    assert "SPIN vs equal-compute SFT control (exact_match):" in text
    assert "θ1 0.3  control 0.4  SPIN behind (-0.1)" in text
    assert "θ2 0.5  control 0.45  SPIN ahead (+0.05)" in text


def test_a_tie_is_not_a_win_for_spin() -> None:
    w = world(iterations=1)
    w.reconcile()
    _finish(w, spin=0.30, control=0.30)
    cond = get_condition(w.status.conditions, "ControlArm")
    assert cond is not None and (cond.status, cond.reason) == ("False", "ControlAhead")
    assert "the SFT control is level" in cond.message
    assert [r for r, _ in w.events].count("ControlAhead") == 1
