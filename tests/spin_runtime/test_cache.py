"""cache: s3:// artifacts land in a digest-keyed folder, complete or not at all."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_common import manifest as mf
from spin_common import storage
from spin_runtime.cache import materialize
from tests.support.servers import S3Faults


@pytest.fixture(autouse=True)
def fast_retries() -> Iterator[None]:
    previous = storage.configure(base_delay=0.01, max_delay=0.05, botocore_attempts=1, attempts=4)
    yield
    storage.configure(**previous.__dict__)


def checkpoint(path: Path, salt: str = "") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "salt": salt}))
    (path / "model.safetensors").write_bytes(b"\x07" * 4096 + salt.encode())
    return path


def test_local_paths_and_hub_ids(tmp_path: Path) -> None:
    model = checkpoint(tmp_path / "m")
    assert materialize(str(model)) == model
    assert materialize(f"file://{model}") == model
    assert materialize("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert materialize("gpt2") == "gpt2"
    with pytest.raises(FileNotFoundError, match="not an existing local path"):
        materialize(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="gs"):
        materialize("gs://bucket/model")


def test_s3_model_is_downloaded_once(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "run/iter-000/model")
    written = mf.write_dir_artifact(checkpoint(tmp_path / "m"), uri, "model")
    cache = tmp_path / "cache"
    local = materialize(uri, cache)
    assert isinstance(local, Path) and local == cache / "artifacts" / written.digest
    assert (local / "model.safetensors").read_bytes() == (
        tmp_path / "m/model.safetensors"
    ).read_bytes()
    mf.verify_local(local, written)
    with S3Faults(storage.s3_client(), failures=0) as seen:
        assert materialize(uri, cache) == local
    assert "GetObject" in seen.calls and len(seen.calls) == 1  # only the manifest was read

    # A rewritten checkpoint is a new artifact: new digest, new folder; the old stays valid.
    written2 = mf.write_dir_artifact(checkpoint(tmp_path / "m2", salt="v2"), uri, "model")
    local2 = materialize(uri, cache)
    assert local2 != local and Path(local2).name == written2.digest


def test_env_cache_dir_and_file_artifacts(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPIN_CACHE_DIR", str(tmp_path / "envcache"))
    src = tmp_path / "s.jsonl"
    src.write_text('{"id": 1}\n')
    uri = storage.join(s3_bucket, "gen/shard-00000-of-00001.jsonl")
    mf.write_file_artifact(src, uri, "generated")
    local = Path(materialize(uri))
    assert local.parent.parent == tmp_path / "envcache" / "artifacts"
    assert local.name == "shard-00000-of-00001.jsonl" and local.read_text() == '{"id": 1}\n'


def test_half_written_artifact_is_refused(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "run/iter-000/model")
    storage.upload_dir(checkpoint(tmp_path / "m"), uri)  # a writer that died before its manifest
    with pytest.raises(mf.IncompleteArtifactError, match="no complete manifest"):
        materialize(uri, tmp_path / "cache")
    assert not (tmp_path / "cache" / "artifacts").exists()


def test_corrupt_download_leaves_no_entry(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "model")
    mf.write_dir_artifact(checkpoint(tmp_path / "m"), uri, "model")
    storage.write_bytes(storage.join(uri, "model.safetensors"), b"\x00" * 4096)  # bit rot
    cache = tmp_path / "cache"
    with pytest.raises(mf.ChecksumError):
        materialize(uri, cache)
    assert list((cache / "artifacts").iterdir()) == []  # no entry, no temp folder


def test_transient_errors_and_crash_leftovers(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "model")
    written = mf.write_dir_artifact(checkpoint(tmp_path / "m"), uri, "model")
    cache = tmp_path / "cache"
    leftover = cache / "artifacts" / f".tmp-{written.digest}-dead"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("half")  # a process killed mid-download
    with S3Faults(storage.s3_client(), failures=3, kind="connection") as faults:
        local = materialize(uri, cache)
    assert faults.injected == 3
    mf.verify_local(local, written)
    assert sorted(p.name for p in (cache / "artifacts").iterdir()) == [written.digest]


def test_concurrent_ranks_download_once(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "model")
    mf.write_dir_artifact(checkpoint(tmp_path / "m"), uri, "model")
    cache = tmp_path / "cache"
    results: list[Path | str] = []
    with S3Faults(storage.s3_client(), failures=0) as seen:
        threads = [
            threading.Thread(target=lambda: results.append(materialize(uri, cache)))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4 and len(set(results)) == 1
    # Each of the 4 reads the manifest; the 2 files are fetched by exactly one of them.
    assert seen.calls.count("GetObject") == 4 + 2, seen.calls
