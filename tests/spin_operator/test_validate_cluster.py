"""`spinctl validate --cluster` (issue 14 item 5): what the operator would refuse, before apply."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.spin_operator.reconciler_world import spin_object


def validate(tmp_path: Path, *flags: str, **spec: object) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spin_object(**spec)))
    return subprocess.run(
        [sys.executable, "-m", "spin_operator.cli", "validate", *flags, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_local_tracking_store_fails_only_with_cluster(tmp_path: Path) -> None:
    local = validate(tmp_path, tracking={"uri": "sqlite:///mlflow.db"})
    assert local.returncode == 0, local.stdout + local.stderr  # fine for `spinctl run`
    cluster = validate(tmp_path, "--cluster", tracking={"uri": "sqlite:///mlflow.db"})
    assert cluster.returncode == 1
    assert "spec.tracking.uri: 'sqlite:///mlflow.db' is a local MLflow store" in cluster.stdout
    remote = validate(tmp_path, "--cluster", tracking={"uri": "http://mlflow.mlflow:5000"})
    assert remote.returncode == 0 and "valid" in remote.stdout
