"""generate reports its throughput to the iteration's MLflow run when MLFLOW_RUN_ID is set."""

from __future__ import annotations

import pytest

from spin_common import manifest
from spin_runtime import cli


def test_shard_metrics_reach_mlflow(
    mlflow_server, tiny_model_dir, tiny_dataset_path, tmp_path, monkeypatch
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    experiment = client.create_experiment(f"gen-{tmp_path.name}")
    run_id = client.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setenv("SPIN_TRACKING_SPOOL_DIR", str(tmp_path / "spool"))
    out = tmp_path / "generated"
    args = ["generate", "--model", str(tiny_model_dir), "--dataset", str(tiny_dataset_path),
            "--output", str(out), "--eval-samples", "2", "--max-samples", "6",
            "--max-new-tokens", "4", "--num-shards", "2"]  # fmt: skip # argv: a flag beside its value
    assert cli.main([*args, "--shard-index", "1"]) == 0

    stats = manifest.read_manifest(str(out / "shard-00001-of-00002.jsonl")).meta["stats"]  # type: ignore[union-attr]
    history = client.get_metric_history(run_id, "generate/tokens_per_s")
    assert [(m.step, m.value) for m in history] == [(1, pytest.approx(stats["tokens_per_s"]))]
    for key in ("prompts_per_s", "mean_response_tokens", "truncation_rate"):
        assert client.get_metric_history(run_id, f"generate/{key}")[0].value == pytest.approx(
            stats[key]
        )
