"""`spinctl run` end to end with the real runtime: a tiny model through SPIN iterations, artifacts
in S3 (moto), tracking in a real MLflow server, and an interruption in the middle of training.

The full test (two iterations, Ctrl-C between training epochs, resume) starts about ten Python
processes that each import torch and transformers: about 70 s on a quiet 2-core machine, several
minutes on a busy one, so it is marked slow; the default suite keeps one iteration on a local
folder with the default sqlite MLflow store (about 30 s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from spin_common import manifest, storage
from tests.spin_operator.local_support import with_default_sigint
from tests.support.servers import MlflowServer

SPINCTL = str(Path(sys.executable).with_name("spinctl"))


def spinrun(name: str, model: str, data: str, storage_uri: str, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"uri": model},
        "dataset": {"uri": data, "maxSamples": 128, "evalSamples": 16},
        "iterations": 2,
        "generation": {"backend": "transformers", "gpusPerReplica": 0, "maxNewTokens": 12},
        "training": {
            "gpusPerNode": 0,
            "beta": 1.0,
            "learningRate": 1e-4,
            "optimizer": "adamw",
            "epochs": 4,
            "globalBatchSize": 8,
            "microBatchSize": 8,
            "maxLength": 64,
            "maxPromptLength": 40,
        },
        "evaluation": {"gpus": 0, "maxNewTokens": 12},
        "storage": {"uri": storage_uri},
        "failurePolicy": {"maxRetries": 0},
    }
    for key, value in extra.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "apiVersion": "selfplay.dev/v1alpha1",
        "kind": "SPINRun",
        "metadata": {"name": name},
        "spec": spec,
    }


def start(spec_path: Path, cwd: Path, *flags: str) -> subprocess.Popen[str]:
    # one thread per process: a tiny model's small kernels stall on thread barriers when the
    # CPU is shared (measured: 10x slower generation with 2 threads on a busy 2-core machine)
    env = {**os.environ, "SPIN_CACHE_DIR": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        with_default_sigint([SPINCTL, "run", str(spec_path), *flags]),
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_one_iteration_on_a_local_folder(
    tmp_path: Path, tiny_model_dir: Path, tiny_dataset_path: Path
) -> None:
    """The default suite's variant: local storage, the sqlite MLflow default, one iteration, on a
    dataset with two unusable lines (under the default 1 %): said, kept in status and MLflow."""
    data = tmp_path / "data.jsonl"
    good = tiny_dataset_path.read_bytes()
    data.write_bytes(b"not json\n" + good + b'{"prompt": "caf\xe9", "response": "x"}\n')
    lines = good.count(b"\n") + 2
    doc = spinrun(
        "quick",
        str(tiny_model_dir),
        str(data),
        str(tmp_path / "runs"),
        iterations=1,
        training={"epochs": 1},
        dataset={"maxSamples": 32, "evalSamples": 8},
    )
    spec_path = tmp_path / "quick.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    code, out = finish(start(spec_path, tmp_path))
    assert code == 0, out
    prefix = tmp_path / "runs" / "default" / "quick"
    for artifact in ("iter-000/model", "iter-000/eval"):
        manifest.verify_artifact(str(prefix / artifact))
    results = json.loads((prefix / "iter-000/eval/results.json").read_text())
    assert set(results["baseline"]) >= {"exact_match", "real_logp_per_token"}
    assert "held-out results of θ1 (8 prompts)" in out and "Succeeded" in out
    db = tmp_path / "runs" / "mlflow.db"  # the default tracking store
    assert db.is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("default")
    assert exp is not None and exp.artifact_location == str(tmp_path / "runs" / "mlartifacts")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["iter-000", "quick"]
    skipped = f"2 of {lines} rows skipped"
    assert (
        f"dataset    {skipped}" in out
        and f"not UTF-8 ×1 (line {lines})" in out
        and "not JSON ×1 (line 1)" in out
    )
    status = json.loads((prefix / ".local-status.json").read_text())["status"]
    assert status["dataset"] == {
        "rows": lines,
        "usable": lines - 2,
        "skipped": 2,
        "skippedByReason": {"not JSON": 1, "not UTF-8": 1},
    }
    parent = next(r for r in runs if r.info.run_name == "quick")
    (sft,) = [i.dataset for i in parent.inputs.dataset_inputs if i.dataset.name == "sft"]
    profile = json.loads(sft.profile)
    assert (profile["rows"], profile["usable"], profile["skipped/not UTF-8"]) == (
        lines,
        lines - 2,
        1,
    )
    # local mode ends the runs before it exits, and its saved status records MLflow's confirmation
    assert {r.info.status for r in runs} == {"FINISHED"}
    saved = json.loads((prefix / ".local-status.json").read_text())["status"]["mlflow"]
    assert (
        sorted(saved["finished"]) == sorted(r.info.run_id for r in runs)
        and saved["spooledCalls"] == 0
    )


def _wait_for(predicate: Any, proc: subprocess.Popen[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"spinctl exited early ({proc.returncode}):\n{proc.stdout.read() if proc.stdout else ''}"
            )
        time.sleep(0.05)
    raise TimeoutError("condition not reached")


def _created(uri: str) -> str:
    found = manifest.locate(uri)
    assert found is not None, uri
    return found[0].created_at


@pytest.mark.slow
def test_two_iterations_on_s3_and_mlflow_with_an_interrupted_training(
    tmp_path: Path,
    s3_bucket: str,
    moto_server: str,
    mlflow_server: MlflowServer,
    tiny_model_dir: Path,
    tiny_dataset_path: Path,
) -> None:
    from mlflow.tracking import MlflowClient

    dataset = storage.join(s3_bucket, "data", "task.jsonl")
    storage.upload_file(tiny_dataset_path, dataset)
    name, experiment = "e2e-local", f"local-{uuid.uuid4().hex[:8]}"
    doc = spinrun(
        name,
        str(tiny_model_dir),
        dataset,
        storage.join(s3_bucket, "runs"),
        storage={"endpoint": moto_server, "region": "us-east-1"},
        tracking={
            "uri": mlflow_server.uri,
            "experiment": experiment,
            "registeredModel": experiment,
        },
    )
    spec_path = tmp_path / "spinrun.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    prefix = storage.join(s3_bucket, "runs", "default", name)
    it0 = storage.join(prefix, "iter-000")

    # 1. Ctrl-C once the first training epoch is checkpointed (three epochs still to go: the
    #    trainer cannot finish before the signal lands).
    first = start(spec_path, tmp_path)
    _wait_for(lambda: manifest.is_complete(storage.join(it0, "train", "epoch-001")), first)
    first.send_signal(signal.SIGINT)
    code, out = finish(first, timeout=120)
    assert code == 130, out
    assert "interrupted" in out
    assert not manifest.is_complete(storage.join(it0, "model"))
    generated_at = _created(storage.join(it0, "generated", "shard-00000-of-00001.jsonl"))
    logs = tmp_path / ".spin-local" / "default" / name / "logs"
    assert not [
        p
        for p in json.loads(storage.read_text(storage.join(prefix, ".local-status.json")))["groups"]
        if Path(f"/proc/{p}").exists()
    ]

    # 2. The same command resumes: generation of iteration 0 is not redone, training resumes.
    code, out = finish(start(spec_path, tmp_path))
    assert code == 0, out
    assert "restarting interrupted step(s): e2e-local-i0-train" in out
    assert _created(storage.join(it0, "generated", "shard-00000-of-00001.jsonl")) == generated_at
    assert (logs / "e2e-local-i0-gen-0.log").read_text().count("=== ") == 1
    train_log = (logs / "e2e-local-i0-train-0.log").read_text()
    assert train_log.count("=== ") == 2 and "resumed from" in train_log

    # 3. Artifacts and manifests in the bucket.
    for t in (0, 1):
        it = storage.join(prefix, f"iter-{t:03d}")
        assert manifest.shard_manifests(storage.join(it, "generated"))
        manifest.verify_artifact(storage.join(it, "model"))
        manifest.verify_artifact(storage.join(it, "eval"))
        assert manifest.is_complete(storage.join(it, "train", "epoch-004"))
    assert storage.exists(storage.join(prefix, "spinrun.yaml"))
    status = json.loads(storage.read_text(storage.join(prefix, ".local-status.json")))["status"]
    assert status["phase"] == "Succeeded" and status["progress"] == "2/2"

    # 4. MLflow: parent + 2 nested runs, datasets, metrics, model versions with aliases.
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == name)
    nested = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: r.info.run_name,
    )
    assert [r.info.run_name for r in nested] == ["iter-000", "iter-001"] and len(runs) == 3
    assert status["mlflow"]["runId"] == parent.info.run_id
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert parent.inputs is not None and [d.dataset.name for d in parent.inputs.dataset_inputs] == [
        "sft"
    ]
    inputs = [
        sorted(d.dataset.name for d in r.inputs.dataset_inputs) if r.inputs else [] for r in nested
    ]
    assert inputs == [["iter-000/generated"], ["iter-000/generated", "iter-001/generated"]]
    for r in nested:
        assert {"loss", "eval_margin", "eval/exact_match", "eval/real_logp_per_token"} <= set(
            r.data.metrics
        )
    # θ0 is the parent's heldout/* step 0 (below), not single-bar eval/baseline_* panels
    assert not [k for r in nested for k in r.data.metrics if k.startswith("eval/baseline")]
    # Iteration params as docs/mlflow.md lists them: θt's URI, the data trained on, θt+1's checkpoint.
    p1 = nested[1].data.params
    assert p1["model_uri"] == storage.join(prefix, "iter-000", "model")
    assert json.loads(p1["data_uris"]) == [
        storage.join(prefix, "iter-001", "generated"),
        storage.join(prefix, "iter-000", "generated"),
    ]
    assert p1["checkpoint_uri"] == storage.join(prefix, "iter-001", "model")
    assert (p1["input_model"], p1["output_model"]) == ("θ1", "θ2")
    assert parent.data.params["iterations"] == "2" and "mlflow.note.content" in parent.data.tags
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert any(a.path == "eval_samples.json" for a in client.list_artifacts(nested[0].info.run_id))
    history = client.get_metric_history(parent.info.run_id, "heldout/exact_match")
    assert sorted(m.step for m in history) == [0, 1, 2]
    versions = sorted(
        client.search_model_versions(f"name = '{experiment}'"), key=lambda v: int(v.version)
    )
    assert [v.source for v in versions] == [
        storage.join(prefix, "iter-000", "model"),
        storage.join(prefix, "iter-001", "model"),
    ]
    aliases = client.get_registered_model(experiment).aliases
    assert aliases["theta-1"] == "1" and aliases["theta-2"] == "2" and aliases["latest-iter"] == "2"
    assert [(v.tags["spin.model"], v.tags["spin.trained_from"]) for v in versions] == [
        ("θ1", "θ0"),
        ("θ2", "θ1"),
    ]
    assert versions[1].description == "θ2: trained in iteration 1 from θ1 (version 1)"
    assert aliases["best"] in ("1", "2")


@pytest.mark.slow
def test_control_arm_with_the_real_runtime(
    tmp_path: Path, tiny_model_dir: Path, tiny_dataset_path: Path
) -> None:
    """spec.controlArm through the real runtime: the SFT control trains (same steps as SPIN) and
    is evaluated beside SPIN; status, the CLI table and MLflow compare both arms."""
    doc = spinrun(
        "ctl",
        str(tiny_model_dir),
        str(tiny_dataset_path),
        str(tmp_path / "runs"),
        iterations=1,
        training={"epochs": 1},
        dataset={"maxSamples": 32, "evalSamples": 8},
        controlArm={"enabled": True},
    )
    spec_path = tmp_path / "ctl.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    code, out = finish(start(spec_path, tmp_path))
    assert code == 0, out
    prefix = tmp_path / "runs" / "default" / "ctl" / "iter-000"
    spin = manifest.verify_artifact(str(prefix / "model"))
    control = manifest.verify_artifact(str(prefix / "control" / "model"))
    manifest.verify_artifact(str(prefix / "control" / "eval"))
    assert control.meta["objective"] == "sft" and control.meta["steps"] == spin.meta["steps"]
    assert control.meta["base_model"] == str(tiny_model_dir)
    status = json.loads((prefix.parent / ".local-status.json").read_text())["status"]
    c = status["iterations"][0]["control"]
    assert {"spinScore", "controlScore", "spinAdvantage", "metrics"} <= set(c)
    assert c["spinAdvantage"] == pytest.approx(c["spinScore"] - c["controlScore"])
    assert any(x["type"] == "ControlArm" for x in status["conditions"])
    assert "SPIN vs equal-compute SFT control" in out and "control θ1" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("default")
    assert exp is not None
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    it = runs["iter-000"].data.metrics
    assert {"eval/exact_match", "control/eval/exact_match", "loss", "control/loss"} <= set(it)
    assert {"heldout/exact_match", "heldout/control/exact_match"} <= set(runs["ctl"].data.metrics)
