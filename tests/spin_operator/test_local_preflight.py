"""Bad input is caught before any work starts, and every message names its field."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from spin_operator.local.preflight import BadInput, load, local_defaults, preflight
from tests.spin_operator.local_support import write_spec


def problems(path: Path, **kw: str) -> list[str]:
    with pytest.raises(BadInput) as info:
        preflight(load(path, **kw))
    return info.value.problems


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_valid_spec_passes_and_creates_its_storage_folder(tmp_path: Path) -> None:
    loaded = load(write_spec(tmp_path), tracking_uri="")
    preflight(loaded)
    assert (tmp_path / "artifacts").is_dir()
    assert loaded.run.namespace == "default" and loaded.run.name == "local-test"
    assert loaded.spec.tracking.uri is None


def test_file_problems(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file"):
        load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(BadInput, match="not valid YAML"):
        load(tmp_path / "bad.yaml")
    (tmp_path / "two.yaml").write_text("a: 1\n---\nb: 2\n")
    with pytest.raises(BadInput, match="expected one SPINRun document, found 2"):
        load(tmp_path / "two.yaml")


def test_invalid_fields_are_all_reported_by_path(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, training={"beta": -1, "learningRat": 1e-4})
    with pytest.raises(BadInput) as info:
        load(spec)
    text = "\n".join(info.value.problems)
    assert "spec.training.beta" in text
    assert "spec.training.learningRat: unknown field (did you mean 'learningRate'?)" in text


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ({"model": {"uri": "/does/not/exist"}}, "spec.model.uri", "no such directory"),
        ({"model": {"uri": "./"}}, "spec.model.uri", "no config.json"),
        ({"model": {"tokenizer": "/no/tokenizer"}}, "spec.model.tokenizer", "no such directory"),
        ({"model": {"chatTemplate": "/no/template.jinja"}}, "spec.model.chatTemplate", "no such file"),
        ({"dataset": {"uri": "/no/data.jsonl"}}, "spec.dataset.uri", "no such file"),
        ({"evaluation": {"command": ["no-such-evaluator-xyz"]}}, "spec.evaluation.command[0]", "not an executable"),
    ],
)
def test_paths_that_do_not_exist(tmp_path: Path, override: dict, field: str, why: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    found = problems(write_spec(tmp_path, **override), tracking_uri="")
    assert any(p.startswith(f"{field}: ") and why in p for p in found), found


def test_storage_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    found = problems(write_spec(tmp_path, storage={"uri": str(tmp_path / "file" / "sub")}), tracking_uri="")
    assert any(p.startswith("spec.storage.uri: cannot create") for p in found), found


def test_unreachable_s3_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    spec = write_spec(tmp_path, storage={"uri": "s3://bucket/runs", "endpoint": endpoint})
    found = problems(spec, tracking_uri="")
    assert any(p.startswith("spec.storage.uri: cannot reach bucket 'bucket'") for p in found), found


def test_unreachable_or_unwritable_tracking(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, tracking={"uri": f"http://127.0.0.1:{closed_port()}"})
    found = problems(spec)
    assert any(p.startswith("spec.tracking.uri: cannot reach http://127.0.0.1:") for p in found), found
    (tmp_path / "file").write_text("in the way")
    spec = write_spec(tmp_path, tracking={"uri": f"sqlite:///{tmp_path}/file/mlflow.db"})
    assert any(p.startswith("spec.tracking.uri: cannot create") for p in problems(spec))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_vllm_backend_without_vllm(tmp_path: Path) -> None:
    found = problems(write_spec(tmp_path, generation={"backend": "vllm"}), tracking_uri="")
    assert any(p.startswith("spec.generation.backend: vllm is not installed") for p in found)


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, model={"uri": "/no/model"}, dataset={"uri": "/no/data.jsonl"})
    assert len(problems(spec, tracking_uri="")) == 2


def test_local_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = local_defaults(None, None)
    assert settings.storage_uri == str(tmp_path / "spin-runs")
    assert settings.mlflow_uri == f"sqlite:///{tmp_path}/spin-runs/mlflow.db"
    assert local_defaults(None, "").mlflow_uri is None
    assert local_defaults("s3://b/p", None).mlflow_uri is None
    assert local_defaults(None, None, "/data/runs").mlflow_uri == "sqlite:////data/runs/mlflow.db"


def test_dataset_shards_by_directory_glob_or_prefix(tmp_path: Path) -> None:
    shards = tmp_path / "data"
    shards.mkdir()
    for k in range(2):
        (shards / f"train_sft-{k:05d}-of-00002.jsonl").write_text('{"prompt": "Q", "response": "A"}\n')
    for uri, problem in (
        (f"{shards}/train_sft-*", None),
        (f"{shards}/train_sft-", None),
        (f"{shards}/", None),
        (f"{shards}/test_sft-*", "no .jsonl/.json/.parquet files match"),
        (f"{shards}/test_sft-", "no such file, directory or prefix"),
    ):
        loaded = load(write_spec(tmp_path, dataset={"uri": uri}), tracking_uri="")
        if problem is None:
            preflight(loaded)
            continue
        found = [p for p in problems(write_spec(tmp_path, dataset={"uri": uri}), tracking_uri="") if p.startswith("spec.dataset.uri")]
        assert len(found) == 1 and problem in found[0], (uri, found)
