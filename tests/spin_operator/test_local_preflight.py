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
        (
            {"model": {"chatTemplate": "/no/template.jinja"}},
            "spec.model.chatTemplate",
            "no such file",
        ),
        ({"dataset": {"uri": "/no/data.jsonl"}}, "spec.dataset.uri", "no such file"),
        (
            {"evaluation": {"command": ["no-such-evaluator-xyz"]}},
            "spec.evaluation.command[0]",
            "not an executable",
        ),
    ],
)
def test_paths_that_do_not_exist(
    tmp_path: Path, override: dict, field: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    found = problems(write_spec(tmp_path, **override), tracking_uri="")
    assert any(p.startswith(f"{field}: ") and why in p for p in found), found


def test_storage_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    found = problems(
        write_spec(tmp_path, storage={"uri": str(tmp_path / "file" / "sub")}), tracking_uri=""
    )
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
    assert any(p.startswith("spec.tracking.uri: cannot reach http://127.0.0.1:") for p in found), (
        found
    )
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


# --------------------------------------------------------------------------- data and model checks


def _dataset(path: Path, good: int, bad_lines: dict[int, bytes] | None = None) -> Path:
    """`good` valid rows with `bad_lines` (1-based line number -> raw bytes) put in place."""
    import json

    lines = [json.dumps({"prompt": f"Q{i}", "response": f"A{i}"}).encode() for i in range(good)]
    for number, raw in sorted((bad_lines or {}).items()):
        lines.insert(number - 1, raw)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _spinctl_run(spec: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import argparse

    from spin_operator.local import runner

    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    code = runner.run(parser.parse_args([str(spec), "--no-tracking"]))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_one_bad_byte_fails_before_any_job_with_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's first finding: one byte that is not UTF-8 used to fail the whole run inside
    generation, without a line number, three times."""
    data = _dataset(tmp_path / "d.jsonl", 23, {23: b'{"prompt": "caf\xe9", "response": "A"}'})
    spec = write_spec(tmp_path, dataset={"uri": str(data)})
    code, out = _spinctl_run(spec, capsys)
    assert code == 2
    (line,) = [x for x in out.splitlines() if "not UTF-8" in x]
    assert line.startswith(
        f"error: dataset {data}: not UTF-8 ×1 (line 23) — 1 of 24 rows skipped (4.2%)"
    )
    assert "dataset.maxSkippedFraction 0.01" in line
    run = tmp_path / "artifacts" / "default" / "local-test"
    assert not run.exists()  # no Job started, nothing written for the run


def test_skipped_rows_under_the_limit_are_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "d.jsonl", 22, {3: b"not json", 9: b'{"messages": []}'})
    spec = write_spec(tmp_path, dataset={"uri": str(data), "maxSkippedFraction": 0.1})
    report = preflight(load(spec, tracking_uri=""))
    assert report is not None and (report["rows"], report["usable"], report["skipped"]) == (
        24,
        22,
        2,
    )
    assert report["skippedByReason"] == {
        "not JSON": {"count": 1, "first": ["line 3"]},
        "empty messages": {"count": 1, "first": ["line 9"]},
    }


@pytest.mark.parametrize(
    ("make", "field", "cause"),
    [
        (lambda d: _dataset(d / "empty.jsonl", 0), "dataset", "is empty: no rows"),
        (
            lambda d: (d / "model" / "tokenizer.json").unlink(),
            "spec.model.uri",
            "no tokenizer files",
        ),
        (
            lambda d: (d / "model" / "chat_template.jinja").unlink(),
            "spec.model.uri",
            "the tokenizer has no chat template",
        ),
        (
            lambda d: (d / "model" / "config.json").write_text('{"model_type": "llama"}'),
            "spec.model.uri",
            "no `architectures`",
        ),
        (
            lambda d: (d / "model" / "model.safetensors").write_bytes(
                b"\x10\x00\x00\x00\x00\x00\x00\x00{}"
            ),
            "spec.model.uri",
            "truncated or not safetensors",
        ),
    ],
)
def test_bad_data_and_models_are_named_before_any_job(
    tmp_path: Path, make, field: str, cause: str
) -> None:
    spec = write_spec(tmp_path)
    made = make(tmp_path)
    if isinstance(made, Path):
        spec = write_spec(tmp_path, dataset={"uri": str(made)})
    found = problems(spec, tracking_uri="")
    assert any(p.startswith(field) and cause in p for p in found), found


def test_dataset_shards_by_directory_glob_or_prefix(tmp_path: Path) -> None:
    shards = tmp_path / "data"
    shards.mkdir()
    for k in range(2):
        (shards / f"train_sft-{k:05d}-of-00002.jsonl").write_text(
            '{"prompt": "Q", "response": "A"}\n'
        )
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
        found = [
            p
            for p in problems(write_spec(tmp_path, dataset={"uri": uri}), tracking_uri="")
            if p.startswith("spec.dataset.uri")
        ]
        assert len(found) == 1 and problem in found[0], (uri, found)
