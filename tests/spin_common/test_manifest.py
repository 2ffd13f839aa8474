"""manifest: written last, trusted only when present, content-digested; local and real S3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from spin_common import manifest as mf
from spin_common import storage
from spin_common.layout import RunLayout
from tests.support.servers import S3Faults


@pytest.fixture(autouse=True)
def fast_retries() -> Iterator[None]:
    previous = storage.configure(base_delay=0.01, max_delay=0.05, botocore_attempts=1, attempts=3)
    yield
    storage.configure(**previous.__dict__)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return str(request.getfixturevalue("s3_bucket")) + "/runs"


def make_checkpoint(path: Path, salt: str = "") -> Path:
    (path / "sub").mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"hidden": 8, "salt": salt}))
    (path / "model.safetensors").write_bytes(b"\x01" * 1000 + salt.encode())
    (path / "sub" / "tokenizer.json").write_text("{}")
    return path


def test_dir_artifact_manifest_is_written_last(
    root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real_upload, real_write = storage.upload_file, storage.write_text

    def upload(src: Path, uri: str) -> None:
        order.append(uri)
        real_upload(src, uri)

    def write(uri: str, text: str) -> None:
        order.append(uri)
        real_write(uri, text)

    monkeypatch.setattr(storage, "upload_file", upload)
    monkeypatch.setattr(storage, "write_text", write)

    src = make_checkpoint(tmp_path / "ckpt")
    uri = storage.join(root, "iter-000/model")
    written = mf.write_dir_artifact(src, uri, "model", {"iteration": 0})
    assert order[-1] == f"{uri}/_MANIFEST.json" and len(order) == 4

    raw = json.loads(storage.read_text(f"{uri}/_MANIFEST.json"))
    assert set(raw) == {"complete", "kind", "files", "meta", "createdAt"}
    assert raw["complete"] is True and raw["kind"] == "model" and raw["meta"] == {"iteration": 0}
    assert raw["createdAt"].endswith("Z")
    assert sorted(raw["files"]) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert raw["files"]["model.safetensors"]["size"] == 1000
    assert mf.is_complete(uri) and mf.is_complete(uri, verify=True)
    assert mf.require_complete(uri) == written
    assert mf.digest(uri) == written.digest and len(written.digest) == 64


def test_files_without_manifest_are_not_complete(root: str, tmp_path: Path) -> None:
    uri = storage.join(root, "half")
    storage.upload_dir(make_checkpoint(tmp_path / "ckpt"), uri)  # files only: a crashed writer
    assert not mf.is_complete(uri)
    assert mf.read_manifest(uri) is None
    with pytest.raises(mf.IncompleteArtifactError, match="incomplete"):
        mf.require_complete(uri)
    with pytest.raises(mf.IncompleteArtifactError):
        mf.digest(uri)


def test_failed_upload_leaves_no_manifest(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "model")
    src = make_checkpoint(tmp_path / "ckpt")
    with S3Faults(storage.s3_client(), failures=1, operations=("PutObject",)):
        mf.write_dir_artifact(src, uri, "model")  # one transient failure: retried, completes
    assert mf.is_complete(uri, verify=True)

    # A rewrite that dies mid-upload (S3 down for good) must not leave the old manifest behind.
    changed = make_checkpoint(tmp_path / "ckpt2", salt="new")
    with (
        S3Faults(storage.s3_client(), failures=1000, operations=("PutObject",)),
        pytest.raises(storage.StorageUnavailableError),
    ):
        mf.write_dir_artifact(changed, uri, "model")
    assert storage.list_files(uri)  # some files are there...
    assert not mf.is_complete(uri)  # ...but nobody will trust them


def test_verify_detects_tampering(tmp_path: Path) -> None:
    uri = str(tmp_path / "model")
    mf.write_dir_artifact(make_checkpoint(tmp_path / "ckpt"), uri, "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x02" * 1000)  # same size
    assert mf.is_complete(uri)  # the cheap check trusts the manifest
    assert not mf.is_complete(uri, verify=True)
    with pytest.raises(mf.ChecksumError, match=r"model\.safetensors"):
        mf.verify_artifact(uri)


def test_in_place_local_output_is_published_without_copy(tmp_path: Path) -> None:
    out = make_checkpoint(tmp_path / "out")
    manifest = mf.write_dir_artifact(out, f"file://{out}", "model")
    assert mf.is_complete(str(out), verify=True)
    assert "_MANIFEST.json" not in manifest.files
    again = mf.write_dir_artifact(out, str(out), "model")  # republish: the manifest is not listed
    assert again.digest == manifest.digest


def test_shards_and_dataset_digest(root: str, tmp_path: Path) -> None:
    it = RunLayout(root).iteration(0)
    shards = []
    for i in range(2):
        local = tmp_path / f"s{i}.jsonl"
        local.write_text(json.dumps({"id": i, "generated": f"answer {i}"}) + "\n")
        shards.append(mf.write_file_artifact(local, it.shard(i, 2), "generated", {"shard": i}))
    assert storage.exists(it.shard_manifest(0, 2))
    assert mf.read_manifest(it.shard(1, 2)) == shards[1]
    assert mf.is_complete(it.shard(0, 2), verify=True)
    found = mf.shard_manifests(it.generated)
    assert sorted(found) == ["shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    union = {**shards[0].files, **shards[1].files}
    assert mf.digest(it.generated) == mf.files_digest(union)

    # The digest is about content: rewriting the same bytes with other meta keeps it,
    # changing a byte changes it.
    before = mf.digest(it.generated)
    mf.write_file_artifact(tmp_path / "s0.jsonl", it.shard(0, 2), "generated", {"other": True})
    assert mf.digest(it.generated) == before
    (tmp_path / "s0.jsonl").write_text('{"id": 0, "generated": "answer X"}\n')
    mf.write_file_artifact(tmp_path / "s0.jsonl", it.shard(0, 2), "generated")
    assert mf.digest(it.generated) != before


def test_malformed_or_incomplete_manifest_is_not_trusted(tmp_path: Path) -> None:
    uri = str(tmp_path / "model")
    mf.write_dir_artifact(make_checkpoint(tmp_path / "ckpt"), uri, "model")
    path = tmp_path / "model" / "_MANIFEST.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "complete": False}))
    assert not mf.is_complete(uri)
    path.write_text("{not json")
    assert not mf.is_complete(uri)
    with pytest.raises(ValueError, match="malformed manifest"):
        mf.read_manifest(uri)


def test_refuses_empty_artifact_and_bad_kind(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty artifact"):
        mf.write_dir_artifact(tmp_path / "empty", str(tmp_path / "x"), "model")
    with pytest.raises(ValueError, match="kind"):
        mf.write_dir_artifact(make_checkpoint(tmp_path / "c"), str(tmp_path / "x"), "")
