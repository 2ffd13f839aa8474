"""Facts for the reconciler: Job objects -> ObservedJob, storage manifests -> StorageFacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spin_common import manifest
from spin_operator import observe
from spin_operator.api import types as api
from spin_operator.render import render_job, run_owner
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef, plan_step, spec_digest
from tests.support import job_driver as jd

RUN = RunRef("team", "obs", "uid-9")


def make(root: Path, **extra: Any) -> api.SPINRunSpec:
    raw = {
        "model": {"uri": "m/x"},
        "dataset": {"uri": "/d.jsonl"},
        "storage": {"uri": str(root)},
        "generation": {"replicas": 2},
        **extra,
    }
    return resolve_spec(api.SPINRunSpec.model_validate(raw), Settings())


def job(stage: str = "generate", attempt: int = 1, queue: str | None = None) -> dict[str, Any]:
    spec = make(Path("/tmp/x"), scheduling={"queueName": queue} if queue else {})
    obj = render_job(plan_step(spec, Settings(), RUN, 2, stage, attempt), spec, RUN, run_owner(RUN))  # type: ignore[arg-type]
    obj["metadata"]["uid"] = "job-uid"
    return obj


def with_status(obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "status": status}


def test_states_as_the_job_controller_writes_them() -> None:
    base = job()
    seen = observe.job_state(base)
    assert seen is not None and (
        seen.name,
        seen.iteration,
        seen.stage,
        seen.attempt,
        seen.state,
    ) == ("obs-i2-gen-r1", 2, "generate", 1, "Pending")
    running = with_status(base, jd.job_running_status(base))
    assert observe.job_state(running).state == "Running"  # type: ignore[union-attr]
    done = observe.job_state(with_status(base, jd.job_succeeded_status(running)))
    assert done is not None and done.state == "Succeeded" and done.completion_time
    failed = observe.job_state(with_status(base, jd.job_failed_status(running, "DeadlineExceeded")))
    assert failed is not None and (failed.state, failed.reason) == ("Failed", "DeadlineExceeded")
    assert "deadline" in failed.message


def test_failed_shards_are_named() -> None:
    """backoffLimitPerIndex: the Job fails with FailedIndexes; the message says which shards."""
    base = job()
    status = jd.job_failed_status(base, "FailedIndexes")
    status["failedIndexes"] = "1,3"
    failed = observe.job_state(with_status(base, status))
    assert failed is not None and failed.reason == "FailedIndexes"
    assert failed.message.endswith("(failed shards: 1,3)")


def test_failure_target_alone_is_not_final_yet() -> None:
    """Pods may still be terminating until `Failed` is set: no retry may overlap them."""
    base = job()
    status = jd.job_failed_status(base)
    status["conditions"] = [c for c in status["conditions"] if c["type"] == "FailureTarget"]
    seen = observe.job_state(with_status(base, status))
    assert seen is not None and (seen.state, seen.starting) == ("Running", False)


def test_a_job_between_its_pods_finishing_and_complete_stays_running() -> None:
    """The real Job controller's writes after the last pod exits: the pod counted as uncounted,
    then succeeded with SuccessCriteriaMet, then Complete. None of them is Pending (each read as
    Pending wrote the step back to Pending, a status patch, just before it succeeded)."""
    base = job()
    for status in (
        {"active": 0, "uncountedTerminatedPods": {"succeeded": ["pod-uid"]}},
        {"active": 0, "succeeded": 1},
        {
            "active": 0,
            "succeeded": 1,
            "conditions": [{"type": "SuccessCriteriaMet", "status": "True"}],
        },
    ):
        seen = observe.job_state(with_status(base, status))
        assert seen is not None and seen.state == "Running", status
    not_yet = observe.job_state(with_status(base, {"active": 0}))
    assert not_yet is not None and (not_yet.state, not_yet.starting) == ("Pending", True)


def test_suspended_and_kueue_jobs() -> None:
    queued = job(queue="team-a")
    seen = observe.job_state(queued)
    assert seen is not None and seen.state == "Suspended" and seen.queued
    plain = job()
    plain["spec"]["suspend"] = True
    assert (
        observe.job_state(with_status(plain, jd.job_suspended_status(plain))).state == "Suspended"
    )  # type: ignore[union-attr]


def test_foreign_jobs_are_ignored_and_owner_is_found() -> None:
    assert observe.job_state({"metadata": {"name": "x", "labels": {}}}) is None
    obj = job()
    assert observe.owner_uid(obj) == "uid-9"
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert observe.job_state(obj).deleting  # type: ignore[union-attr]


def _publish(tmp: Path, name: str, uri: str, kind: str, content: str = "x") -> None:
    folder = tmp / "scratch" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ("results.json" if kind == "eval" else "f.bin")).write_text(content)
    manifest.write_dir_artifact(folder, uri, kind)


def test_read_facts_counts_only_complete_manifests(tmp_path: Path) -> None:
    spec = make(tmp_path / "store")
    it = observe.layout_of(spec, RUN).iteration(0)
    assert observe.read_facts(spec, RUN, 0) == observe.StorageFacts()
    src = tmp_path / "shard.jsonl"
    src.write_text("{}\n")
    manifest.write_file_artifact(src, it.shard(0, 2), "generated")
    assert not observe.read_facts(spec, RUN, 0).generated  # one shard of two
    manifest.write_file_artifact(src, it.shard(1, 2), "generated")
    assert observe.read_facts(spec, RUN, 0).generated
    Path(it.model).mkdir(parents=True)
    (Path(it.model) / "config.json").write_text("{}")  # files without a manifest: not done
    assert not observe.read_facts(spec, RUN, 0).model
    _publish(tmp_path, "model", it.model, "model")
    _publish(
        tmp_path,
        "eval",
        it.eval,
        "eval",
        json.dumps(
            {"metrics": {"exact_match": 0.25, "n": 8, "ok": True}, "baseline": {"exact_match": 0.1}}
        ),
    )
    facts = observe.read_facts(spec, RUN, 0)
    assert facts.model and facts.evaluated
    assert facts.metrics == {
        "exact_match": 0.25,
        "baseline/exact_match": 0.1,
    }  # "n" is not a status metric


def test_custom_evaluation_results_count_without_a_manifest(tmp_path: Path) -> None:
    spec = make(tmp_path / "store", evaluation={"command": ["python", "eval.py"]})
    it = observe.layout_of(spec, RUN).iteration(1)
    Path(it.eval).mkdir(parents=True)
    Path(it.eval_results).write_text(json.dumps({"metrics": {"score": 3}}))
    assert observe.read_facts(spec, RUN, 1).metrics == {"score": 3.0}
    builtin = make(tmp_path / "store")
    assert not observe.read_facts(builtin, RUN, 1).evaluated  # the built-in one writes a manifest


def test_tenant_results_reach_the_status_bounded(tmp_path: Path) -> None:
    """A custom command's results.json with 10,000 numeric keys, NaN and a huge baseline: the
    status gets the ranking metric and the fixed STATUS_METRICS set only (issue 14, item 10)."""
    spec = make(
        tmp_path / "store", evaluation={"command": ["python", "eval.py"], "metric": "pass_at_1"}
    )
    it = observe.layout_of(spec, RUN).iteration(0)
    Path(it.eval).mkdir(parents=True)
    flood = {f"m{i}": float(i) for i in range(10_000)}
    results = {
        "metrics": {
            **flood,
            "pass_at_1": 0.5,
            "exact_match": 0.25,
            "real_logp_per_token": float("nan"),
            "score": True,
        },
        "baseline": {**flood, "pass_at_1": 0.4, "num_examples": 64},
    }
    Path(it.eval_results).write_text(json.dumps(results))
    metrics = observe.read_facts(spec, RUN, 0).metrics
    assert metrics == {
        "pass_at_1": 0.5,
        "exact_match": 0.25,
        "baseline/pass_at_1": 0.4,
        "baseline/num_examples": 64.0,
    }
    assert len(metrics) <= 2 * (len(observe.STATUS_METRICS) + 1)


def test_stored_spec_round_trip(tmp_path: Path) -> None:
    spec = make(tmp_path / "store")
    assert observe.read_stored_digest(spec, RUN) is None
    observe.write_stored_spec(spec, RUN)
    assert observe.read_stored_digest(spec, RUN) == spec_digest(spec)
    Path(observe.layout_of(spec, RUN).spec).write_text("spec: {model: 3}")
    assert observe.read_stored_digest(spec, RUN) == "unreadable"


def test_delete_artifacts(tmp_path: Path) -> None:
    spec = make(tmp_path / "store")
    observe.write_stored_spec(spec, RUN)
    prefix = observe.layout_of(spec, RUN).prefix
    assert observe.delete_artifacts(spec, prefix) == 1
    assert not Path(prefix).exists()


def _run_check(spec: api.SPINRunSpec) -> int:
    """The check Job's own argv (plan_step), run by the real runtime on this machine."""
    import subprocess
    import sys

    argv = list(plan_step(spec, Settings(), RUN, 0, "check").argv)
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], capture_output=True, timeout=120).returncode


def test_the_check_jobs_report_gives_the_cause_or_the_profile(tmp_path: Path) -> None:
    """Operator argv -> real `spin_runtime check` -> its report in the run's storage -> the facts
    and the cause the operator reads back (the model is a hub id: not checked)."""
    data = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p", "response": "r"})
    data.write_bytes(f"{good}\n".encode() + b'{"prompt": "\xff"}\n' + f"{good}\n".encode())
    ds = {"uri": str(data), "evalSamples": 0}
    off = {"enabled": False}
    strict = make(tmp_path / "store", model={"uri": "org/model"}, dataset=ds, evaluation=off)
    assert _run_check(strict) == 2
    assert not observe.read_facts(strict, RUN, 0).checked
    cause = observe.read_bad_input(strict, RUN, 0, "check")
    assert cause.startswith(f"dataset {data}: not UTF-8 ×1 (line 2)"), cause
    assert "above dataset.maxSkippedFraction 0.01" in cause
    lenient = make(
        tmp_path / "store",
        model={"uri": "org/model"},
        dataset={**ds, "maxSkippedFraction": 0.5},
        evaluation=off,
    )
    assert _run_check(lenient) == 0
    facts = observe.read_facts(lenient, RUN, 0)
    assert facts.checked and not facts.generated
    assert observe.read_bad_input(lenient, RUN, 0, "check") == ""
    from spin_operator.conditions import dataset_status

    assert dataset_status(facts.check_profile) == api.DatasetStatus(
        rows=3, usable=2, skipped=1, skipped_by_reason={"not UTF-8": 1}
    )
    assert not observe.read_facts(lenient, RUN, 1).checked  # iteration 0 only
