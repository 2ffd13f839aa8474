"""tracking/runlog/redaction against a real MLflow server (sqlite + artifacts in moto S3)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from spin_common import manifest as mf
from spin_common import storage
from spin_common.layout import RunLayout
from spin_common.redaction import REDACTED, is_secret_key, redact, redact_argv, redact_text
from spin_common.tracking import (
    BEST_ALIAS,
    LATEST_ALIAS,
    RunLogger,
    Tracker,
    TrackingPolicy,
    replay_spool,
)
from tests.support.servers import MlflowServer, s3_client_for

FAST = TrackingPolicy(attempts=2, base_delay=0.05, max_delay=0.1, cooldown=60, flush_interval=0)
FAKE_SECRET = "FAKE-S3CR3T-do-not-leak-42"
FAKE_KEY_ID = "AKIAFAKEKEYID000042"


def spec_with_secrets(bucket: str) -> dict[str, Any]:
    return {
        "model": {"uri": "hf-org/base-model"},
        "dataset": {"uri": f"{bucket}/data/sft.jsonl"},
        "storage": {
            "uri": bucket,
            "credentialsSecret": {"name": "s3-creds"},
            "accessKeyId": FAKE_KEY_ID,
            "secretAccessKey": FAKE_SECRET,
        },
        "tracking": {"uri": f"https://alice:{FAKE_SECRET}@mlflow.example/"},
        "env": [{"name": "HF_TOKEN", "value": FAKE_SECRET}, {"name": "SEED", "value": "1"}],
        "training": {"beta": 0.1, "learningRate": 5e-7, "maxNewTokens": 256},
    }


def write_iteration_artifacts(run: RunLayout, t: int, tmp: Path) -> None:
    it = run.iteration(t)
    for i in range(2):
        shard = tmp / f"gen-{t}-{i}.jsonl"
        shard.write_text(json.dumps({"id": i, "generated": f"iteration {t} answer {i}"}) + "\n")
        mf.write_file_artifact(shard, it.shard(i, 2), "generated", {"iteration": t})
    ckpt = tmp / f"model-{t}"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"iteration": t}))
    (ckpt / "model.safetensors").write_bytes(bytes([t]) * 256)
    mf.write_dir_artifact(ckpt, it.model, "model", {"iteration": t})


def test_two_iteration_run_lineage(
    mlflow_server: MlflowServer, s3_bucket: str, tmp_path: Path
) -> None:
    run = RunLayout.for_run(s3_bucket, "team-a", "spin-demo")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "2+2?", "response": "4"}\n')
    sft_uri = storage.join(s3_bucket, "data/sft.jsonl")
    sft_manifest = mf.write_file_artifact(sft, sft_uri, "dataset")
    uid, experiment, model_name = (
        str(uuid.uuid4()),
        f"spin-{uuid.uuid4().hex[:8]}",
        f"m-{uuid.uuid4().hex[:8]}",
    )
    spec = spec_with_secrets(s3_bucket)

    tracker = Tracker(mlflow_server.uri, policy=FAST)
    parent = tracker.ensure_parent_run(experiment, "team-a", "spin-demo", uid, spec)
    assert parent is not None
    assert tracker.log_dataset(parent, "sft", sft_uri, sft_manifest.digest, context="sft")
    exact_match = {0: 0.50, 1: 0.40}  # iteration 0 is the best: "best" must not just be "latest"
    versions: dict[int, str] = {}
    for t in range(2):
        write_iteration_artifacts(run, t, tmp_path)
        it = run.iteration(t)
        params = {
            "beta": 0.1,
            "learning_rate": 5e-7,
            "temperature": 1.0,
            "top_p": 1.0,
            "model_uri": run.model_for_iteration(t, "hf-org/base-model"),
            "data_uris": run.training_data_for_iteration(t, 1),
        }
        it_run = tracker.ensure_iteration_run(parent, t, params)
        assert it_run is not None
        with RunLogger(it_run, mlflow_server.uri, policy=FAST) as logger:
            for step in range(5):
                logger.log_metrics({"train/loss": 0.69 - 0.1 * step - t, "train/lr": 1e-6}, step)
            logger.log_metrics({"generate/tokens_per_s": 1234.5})
        assert logger.spooled == []
        gen_digest = mf.digest(it.generated)
        assert tracker.log_dataset(it_run, f"iter-{t:03d}/generated", it.generated, gen_digest)
        assert tracker.log_dataset(it_run, "sft", sft_uri, sft_manifest.digest, context="sft")
        assert tracker.log_metrics(it_run, {"eval/exact_match": exact_match[t]})
        version = tracker.register_iteration_model(
            model_name, it_run, t, it.model, {"exact_match": exact_match[t]}, "exact_match"
        )
        assert version is not None
        versions[t] = version
        assert tracker.finish_run(it_run)

    # An operator restart: a fresh Tracker finds everything instead of creating duplicates.
    again = Tracker(mlflow_server.uri, policy=FAST)
    assert again.ensure_parent_run(experiment, "team-a", "spin-demo", uid, spec) == parent
    it1 = again.ensure_iteration_run(parent, 1, {"beta": 0.1})
    assert it1 is not None
    assert again.register_iteration_model(model_name, it1, 1, run.iteration(1).model) == versions[1]
    assert again.log_dataset(it1, "sft", sft_uri, sft_manifest.digest, context="sft")

    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    everything = client.search_runs([exp.experiment_id])
    assert len(everything) == 3  # one parent + two iterations, no duplicates
    # The UI opens the experiment as model training (not GenAI); the parent run is comparable.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    top = client.get_run(parent)
    assert top.data.tags["mlflow.note.content"].startswith("SPINRun team-a/spin-demo: ")
    assert top.data.tags["mlflow.source.type"] == "JOB"
    assert (
        top.data.params["training.beta"] == "0.1"
        and top.data.params["model.uri"] == "hf-org/base-model"
    )
    assert float(top.data.params["training.learningRate"]) == 5e-7
    assert not any(
        FAKE_SECRET in v for v in top.data.params.values()
    )  # storage/tracking are not params
    nested = client.search_runs(
        [exp.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent}'",
        order_by=["attributes.run_name ASC"],
    )
    assert [r.info.run_name for r in nested] == ["iter-000", "iter-001"]
    assert nested[1].data.params["model_uri"] == run.iteration(0).model
    assert json.loads(nested[1].data.params["data_uris"]) == [
        run.iteration(1).generated,
        run.iteration(0).generated,
    ]
    assert nested[0].data.tags["spin.uid"] == uid and nested[0].data.tags["spin.iteration"] == "0"
    history = client.get_metric_history(nested[1].info.run_id, "train/loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [
        (s, round(0.69 - 0.1 * s - 1, 6)) for s in range(5)
    ]
    assert nested[0].data.metrics["eval/exact_match"] == 0.5
    assert nested[0].info.status == "FINISHED"

    assert nested[1].inputs is not None
    inputs = {d.dataset.name: d for d in nested[1].inputs.dataset_inputs}
    assert set(inputs) == {"iter-001/generated", "sft"}
    gen = inputs["iter-001/generated"].dataset
    assert gen.source_type == "s3" and json.loads(gen.source)["uri"] == run.iteration(1).generated
    assert gen.digest == mf.digest(run.iteration(1).generated)[:36]
    assert json.loads(str(gen.profile))["sha256"] == mf.digest(run.iteration(1).generated)
    parent_inputs = client.get_run(parent).inputs
    assert parent_inputs is not None
    assert [d.dataset.name for d in parent_inputs.dataset_inputs] == ["sft"]

    mvs = client.search_model_versions(f"name = '{model_name}'")
    assert sorted(int(v.version) for v in mvs) == [1, 2]
    assert {v.version: v.source for v in mvs} == {
        versions[0]: run.iteration(0).model,
        versions[1]: run.iteration(1).model,
    }
    registered = client.get_registered_model(model_name)
    assert registered.aliases == {
        "theta-1": versions[0],
        "theta-2": versions[1],
        LATEST_ALIAS: versions[1],
        BEST_ALIAS: versions[0],
    }
    # One numbering: version of θ2 says it was trained in iteration 1 from θ1's version.
    by_version = {v.version: v for v in mvs}
    assert by_version[versions[1]].tags["spin.model"] == "θ2"
    assert by_version[versions[1]].tags["spin.trained_from"] == "θ1"
    assert (
        by_version[versions[1]].description
        == f"θ2: trained in iteration 1 from θ1 (version {versions[0]})"
    )
    assert (
        by_version[versions[0]].description == "θ1: trained in iteration 0 from θ0 (the base model)"
    )

    # Artifacts (the spec) are in the bucket behind the MLflow artifact proxy.
    keys = [
        o["Key"]
        for o in s3_client_for(mlflow_server.s3_endpoint)
        .list_objects_v2(Bucket="mlflow-artifacts")
        .get("Contents", [])
    ]
    assert any(k.endswith(f"{parent}/artifacts/spinrun.yaml") for k in keys), keys


def test_secrets_never_reach_mlflow(
    mlflow_server: MlflowServer, s3_bucket: str, tmp_path: Path
) -> None:
    tracker = Tracker(mlflow_server.uri, policy=FAST)
    spec = spec_with_secrets(s3_bucket)
    parent = tracker.ensure_parent_run(f"sec-{uuid.uuid4().hex[:8]}", "ns", "leaky", "uid-1", spec)
    assert parent is not None
    it_run = tracker.ensure_iteration_run(
        parent,
        0,
        {
            "hf_token": FAKE_SECRET,
            "data_uri": f"https://bob:{FAKE_SECRET}@host/x",
            "max_new_tokens": 256,
        },
    )
    assert it_run is not None
    assert tracker.set_tags(it_run, {"api_key": FAKE_SECRET, "note": f"password={FAKE_SECRET}"})
    with RunLogger(it_run, mlflow_server.uri, policy=FAST) as logger:
        logger.log_params(
            {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "argv": redact_argv(["--token", FAKE_SECRET])}
        )
        logger.set_tags({"MLFLOW_TRACKING_PASSWORD": FAKE_SECRET})

    client = MlflowClient(mlflow_server.uri)
    seen: list[str] = []
    for run_id in (parent, it_run):
        data = client.get_run(run_id).data
        seen += [*data.params.keys(), *data.params.values(), *data.tags.keys(), *data.tags.values()]
    artifact = client.download_artifacts(parent, "spinrun.yaml", str(tmp_path))
    spec_text = Path(artifact).read_text()
    seen.append(spec_text)
    assert not [s for s in seen if FAKE_SECRET in s or FAKE_KEY_ID in s]
    assert REDACTED in spec_text and "s3-creds" in spec_text  # references are kept, values not
    params = client.get_run(it_run).data.params
    assert params["max_new_tokens"] == "256" and params["hf_token"] == REDACTED


def test_mlflow_outage_never_fails_the_job(mlflow_server: MlflowServer, s3_bucket: str) -> None:
    tracker = Tracker(mlflow_server.uri, policy=FAST)
    parent = tracker.ensure_parent_run(f"out-{uuid.uuid4().hex[:8]}", "ns", "outage", "uid-o", {})
    assert parent is not None
    it_run = tracker.ensure_iteration_run(parent, 0, {})
    assert it_run is not None
    spool_dir = storage.join(s3_bucket, "ns/outage/iter-000/tracking-spool")
    logger = RunLogger(it_run, mlflow_server.uri, spool_dir=spool_dir, policy=FAST)
    for step in range(3):
        logger.log_metrics({"train/loss": float(step)}, step)
    assert logger.pending == 0  # delivered while MLflow is up

    mlflow_server.stop(crash=True)
    try:
        start = time.monotonic()
        for step in range(3, 8):  # the training loop keeps going
            logger.log_metrics({"train/loss": float(step)}, step)
        assert time.monotonic() - start < 5, "logging must not stall while MLflow is down"
        assert logger.pending == 5
        spool = logger.flush()
        assert spool is not None and spool.startswith(spool_dir) and storage.exists(spool)
        assert logger.pending == 0
        for step in range(8, 10):  # still down: buffered (in cooldown, no network wait)
            logger.log_metrics({"train/loss": float(step)}, step)
        assert logger.pending == 2
        assert tracker.ensure_iteration_run(parent, 1, {}) is None  # operator side: no raise
        assert replay_spool(spool_dir, mlflow_server.uri, policy=FAST).remaining == 5
        assert time.monotonic() - start < 20
    finally:
        mlflow_server.start()

    assert logger.flush() is None  # back: the buffer goes straight to MLflow
    result = replay_spool(spool_dir, mlflow_server.uri, policy=FAST)
    assert (result.delivered, result.remaining) == (5, 0)
    assert storage.list_files(spool_dir) == []
    history = MlflowClient(mlflow_server.uri).get_metric_history(it_run, "train/loss")
    assert sorted(m.step for m in history) == list(range(10))
    assert all(m.value == float(m.step) for m in history)


def test_permanent_errors_drop_only_the_bad_call(mlflow_server: MlflowServer) -> None:
    tracker = Tracker(mlflow_server.uri, policy=FAST)
    parent = tracker.ensure_parent_run(f"perm-{uuid.uuid4().hex[:8]}", "ns", "perm", "uid-p", {})
    assert parent is not None
    logger = RunLogger(parent, mlflow_server.uri, policy=FAST)
    logger.log_params({"beta": 0.1})
    logger.log_params({"beta": 0.2})  # params are immutable in MLflow: rejected, not retried
    logger.log_metrics({"m": 1.0}, 0)
    assert logger.flush() is None
    data = MlflowClient(mlflow_server.uri).get_run(parent).data
    assert data.params["beta"] == "0.1" and data.metrics["m"] == 1.0


def test_disabled_logger_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logger = RunLogger.from_env()
    assert not logger.enabled
    logger.log_metrics({"x": 1.0}, 0)
    assert logger.pending == 0 and logger.flush() is None
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("SPIN_TRACKING_SPOOL_DIR", "/tmp/spool")
    env_logger = RunLogger.from_env()
    assert (
        env_logger.enabled and env_logger.run_id == "abc" and env_logger.spool_dir == "/tmp/spool"
    )


def test_redaction_rules() -> None:
    for key in (
        "AWS_SECRET_ACCESS_KEY",
        "apiKey",
        "sessionToken",
        "password",
        "MLFLOW_TRACKING_TOKEN",
        "credentials",
        "private_key",
        "Authorization",
        "secretAccessKey",
    ):
        assert is_secret_key(key), key
    for key in (
        "max_new_tokens",
        "tokenizer",
        "num_generated_tokens",
        "learning_rate",
        "model_uri",
        "keyword_filter",
        "monkey",
    ):
        assert not is_secret_key(key), key
    assert redact({"a": {"token": "x", "n": [1, {"password": "y"}]}, "tokens": 3}) == {
        "a": {"token": REDACTED, "n": [1, {"password": REDACTED}]},
        "tokens": 3,
    }
    assert redact({"name": "AWS_SECRET_ACCESS_KEY", "value": "v"})["value"] == REDACTED
    assert (
        redact_text("see https://u:pw@h/x and Bearer abc.def")
        == f"see https://u:{REDACTED}@h/x and Bearer {REDACTED}"
    )
    assert redact_argv(
        ["--model", "m", "--hf-token", "s", "--api-key=s", "--max-new-tokens", "5"]
    ) == [
        "--model",
        "m",
        "--hf-token",
        REDACTED,
        f"--api-key={REDACTED}",
        "--max-new-tokens",
        "5",
    ]


def test_hanging_mlflow_costs_one_timeout_per_cooldown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An MLflow that accepts connections but never answers (a hung proxy)."""
    import socket

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        logger = RunLogger("0" * 32, uri, spool_dir=str(tmp_path / "spool"), policy=FAST)
        start = time.monotonic()
        for step in range(200):
            logger.log_metrics({"loss": 1.0 / (step + 1)}, step)
        elapsed_loop = time.monotonic() - start
        spool = logger.flush()
        elapsed = time.monotonic() - start
    assert elapsed_loop < 1.9, f"200 steps took {elapsed_loop:.1f}s: more than one timeout"
    assert elapsed < 8, f"flush took {elapsed - elapsed_loop:.1f}s"
    assert spool is not None
    lines = [json.loads(x) for x in Path(spool).read_text().splitlines()]
    assert sum(len(op["items"]) for op in lines) == 200
    assert lines[0]["items"][0][:2] == ["loss", 1.0] and lines[-1]["items"][-1][3] == 199


def test_control_arm_logs_beside_spin_on_one_run_under_control_prefix(
    mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spec.controlArm's Jobs share the iteration run (SPIN_METRIC_PREFIX=control/): the same
    metric names side by side, one chart, one row per iteration in the compare table."""
    from spin_runtime import evaluate

    tracker = Tracker(mlflow_server.uri, policy=FAST)
    run = tracker.ensure_parent_run(f"ctl-{uuid.uuid4().hex[:8]}", "ns", "ctl", "uid-c", {})
    assert run is not None
    monkeypatch.setenv("MLFLOW_RUN_ID", run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    answers = [{"id": "1", "prompt": "p", "reference": "r", "answer": "a", "exact": 1}]
    monkeypatch.delenv("SPIN_METRIC_PREFIX", raising=False)
    with RunLogger.from_env(policy=FAST) as spin:
        spin.log_metrics({"eval/score": 0.5, "loss": 0.6}, 1)
        spin.log_params({"peft.rank": 8})
    evaluate._log_samples(answers)
    monkeypatch.setenv("SPIN_METRIC_PREFIX", "control/")
    with RunLogger.from_env(policy=FAST) as control:
        control.log_metrics({"eval/score": 0.625, "loss": 2.5}, 1)
        control.log_params({"peft.rank": 8})
    evaluate._log_samples([{**answers[0], "answer": "b"}])
    client = MlflowClient(mlflow_server.uri)
    data = client.get_run(run).data
    assert data.metrics["eval/score"] == 0.5 and data.metrics["control/eval/score"] == 0.625
    assert data.metrics["loss"] == 0.6 and data.metrics["control/loss"] == 2.5
    assert data.params["peft.rank"] == data.params["control/peft.rank"] == "8"
    tables = {a.path for a in client.list_artifacts(run)} | {
        a.path for a in client.list_artifacts(run, "control")
    }
    assert {"eval_samples.json", "control/eval_samples.json"} <= tables


def test_replay_touches_only_the_given_runs(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """Threat 3 (docs/security.md): a spool written by a run's pods names another namespace's MLflow
    run; the operator's replay (run_ids: the runs in the SPINRun's status) drops that call."""
    tracker = Tracker(mlflow_server.uri, policy=FAST)
    own = tracker.ensure_parent_run(f"own-{uuid.uuid4().hex[:8]}", "team-a", "mine", "uid-a", {})
    theirs = tracker.ensure_parent_run(
        f"their-{uuid.uuid4().hex[:8]}", "team-b", "prod", "uid-b", {}
    )
    assert own and theirs
    spool = tmp_path / "spool"
    spool.mkdir()
    ops = [
        {"op": "metrics", "run": rid, "items": [["eval/exact_match", 0.99, 1, 0]]}
        for rid in (own, theirs, own)
    ]
    (spool / "x.jsonl").write_text("".join(json.dumps(op) + "\n" for op in ops))
    result = replay_spool(str(spool), mlflow_server.uri, policy=FAST, run_ids={own})
    assert (result.delivered, result.remaining) == (2, 0) and list(spool.iterdir()) == []
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(own).data.metrics == {"eval/exact_match": 0.99}
    assert client.get_run(theirs).data.metrics == {}, "another run was written from a spool"


def test_best_alias_loads_with_mlflow_transformers(
    mlflow_server: MlflowServer,
    s3_bucket: str,
    tiny_model_dir: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/mlflow.md's promise: models:/<name>@best is a transformers model MLflow can load
    (the version's source is the published S3 folder, weights and all, not a copy)."""
    import shutil

    import mlflow.transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spin_runtime.train.mlmodel import write_transformers_flavor

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "theta1"))
    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
    )
    write_transformers_flavor(folder, model, tokenizer, torch.float32)
    it = RunLayout.for_run(s3_bucket, "team-a", "loadable").iteration(0)
    mf.write_dir_artifact(folder, it.model, "model", {"iteration": 0})

    tracker = Tracker(mlflow_server.uri, policy=FAST)
    parent = tracker.ensure_parent_run(f"e-{uuid.uuid4().hex[:8]}", "team-a", "loadable", "u1", {})
    assert parent is not None
    it_run = tracker.ensure_iteration_run(parent, 0, {})
    assert it_run is not None
    name = f"m-{uuid.uuid4().hex[:8]}"
    assert tracker.register_iteration_model(name, it_run, 0, it.model, {"score": 1.0}, "score")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    (tmp_path / "dl").mkdir()
    pipe = mlflow.transformers.load_model(
        f"models:/{name}@{BEST_ALIAS}", dst_path=str(tmp_path / "dl")
    )
    prompt = "reverse: abc"
    ids = tokenizer(prompt, return_tensors="pt")
    want = tokenizer.decode(model.generate(**ids, max_new_tokens=6, do_sample=False)[0])
    assert pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"] == want


def test_heldout_series_is_logged_once_per_model(mlflow_server: MlflowServer) -> None:
    """θ0 (iteration 0's baseline) at step 0, θt+1 at step t+1; a repeat adds no point."""
    tracker = Tracker(mlflow_server.uri, policy=FAST)
    parent = tracker.ensure_parent_run(f"e-{uuid.uuid4().hex[:8]}", "team-a", "heldout", "u2", {})
    assert parent is not None
    first = {"score": 0.5, "exact_match": 0.5, "num_examples": 8.0, "baseline/score": 0.25}
    for _ in range(2):  # an operator restart replays the decision
        assert tracker.log_heldout(parent, 0, first)
        assert tracker.log_heldout(parent, 1, {"score": 0.75, "baseline/score": 0.9})
    client = MlflowClient(mlflow_server.uri)
    score = sorted((m.step, m.value) for m in client.get_metric_history(parent, "heldout/score"))
    assert score == [(0, 0.25), (1, 0.5), (2, 0.75)]  # a later iteration's baseline is not θ0
    assert [m.step for m in client.get_metric_history(parent, "heldout/exact_match")] == [1]
    assert "heldout/num_examples" not in client.get_run(parent).data.metrics
