"""`spinctl run` with `training.peft` (LoRA): the iteration's model is published merged with the
adapter beside it, generation and evaluation of the next steps load it unchanged, and the
iteration's MLflow run points at the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spin_common import manifest
from tests.spin_operator.test_local_e2e import finish, spinrun, start


@pytest.mark.slow  # ~30 s quiet, minutes on a busy 2-core machine (as the e2e default test)
def test_one_lora_iteration_on_a_local_folder(
    tmp_path: Path, tiny_model_dir: Path, tiny_dataset_path: Path
) -> None:
    doc = spinrun(
        "lora",
        str(tiny_model_dir),
        str(tiny_dataset_path),
        str(tmp_path / "runs"),
        iterations=1,
        dataset={"maxSamples": 32, "evalSamples": 8},
        training={
            "epochs": 1,
            "peft": {"rank": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        },
    )
    spec_path = tmp_path / "lora.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    code, out = finish(start(spec_path, tmp_path))
    assert code == 0, out
    prefix = tmp_path / "runs" / "default" / "lora"
    model = prefix / "iter-000" / "model"
    manifest.verify_artifact(str(model))
    assert manifest.require_complete(str(model)).meta["adapter"]["rank"] == 4
    config = json.loads((model / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    results = json.loads((prefix / "iter-000/eval/results.json").read_text())
    assert "exact_match" in results["baseline"]  # θ1 (merged) was evaluated like any model

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("default")
    assert exp is not None
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "iter-000"]
    assert run.data.tags["spin.adapter_uri"].endswith("iter-000/model/adapter")
    assert run.data.params["peft.rank"] == "4"
