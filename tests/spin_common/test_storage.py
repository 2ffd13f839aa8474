"""storage: the same behaviour on local paths and on a real (moto) S3 server, plus retries."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from spin_common import storage
from tests.support.servers import S3Faults


@pytest.fixture(autouse=True)
def fast_retries() -> Iterator[None]:
    """Short backoff and no botocore-level retries, so our own wrapper is what gets exercised."""
    previous = storage.configure(base_delay=0.01, max_delay=0.05, botocore_attempts=1, attempts=5)
    yield
    storage.configure(**previous.__dict__)


@pytest.fixture(params=["local", "file-uri", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "file-uri":
        return f"file://{tmp_path}/store"
    return str(request.getfixturevalue("s3_bucket")) + "/some/prefix"


@pytest.mark.parametrize(
    "uri",
    [
        "s3://",
        "s3://Bad_Bucket/x",
        "s3://bucket/a//b",
        "s3://bucket/a/../b",
        "gs://b/x",
        "http://host/x",
        "file://relative/x",
        "",
    ],
)
def test_malformed_uris_name_the_uri(uri: str) -> None:
    with pytest.raises(ValueError) as err:
        storage.read_bytes(uri)
    assert repr(uri) in str(err.value) or (not uri and "empty" in str(err.value))


def test_join() -> None:
    assert storage.join("s3://bkt/run/", "iter-000", "model/") == "s3://bkt/run/iter-000/model"
    assert storage.join("s3://bkt", "x/y") == "s3://bkt/x/y"
    assert storage.join("/data/run", "a", "b.json") == "/data/run/a/b.json"
    assert storage.join("file:///data", "a") == "file:///data/a"
    with pytest.raises(ValueError, match=r"'\.\.'"):
        storage.join("s3://bkt/run", "../other")
    with pytest.raises(ValueError):
        storage.join("s3://bkt/run", "")


def test_roundtrip_and_listing(root: str, tmp_path: Path) -> None:
    storage.write_text(storage.join(root, "a.txt"), "hello")
    storage.write_bytes(storage.join(root, "sub/deep/b.bin"), b"\x00\x01")
    storage.write_text(storage.join(root + "-other", "c.txt"), "must not be listed")
    assert storage.read_text(storage.join(root, "a.txt")) == "hello"
    assert storage.read_bytes(storage.join(root, "sub/deep/b.bin")) == b"\x00\x01"
    assert storage.list_files(root) == ["a.txt", "sub/deep/b.bin"]
    assert storage.list_files(storage.join(root, "sub")) == ["deep/b.bin"]
    assert storage.list_files(storage.join(root, "missing")) == []
    assert storage.exists(storage.join(root, "a.txt"))
    assert storage.exists(storage.join(root, "sub"))  # a folder/prefix with files
    assert not storage.exists(storage.join(root, "nope.txt"))
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        storage.read_bytes(storage.join(root, "nope.txt"))

    down = storage.download_dir(root, tmp_path / "down")
    assert down == ["a.txt", "sub/deep/b.bin"]
    assert (tmp_path / "down/sub/deep/b.bin").read_bytes() == b"\x00\x01"
    storage.upload_dir(tmp_path / "down", storage.join(root, "copy"))
    assert storage.list_files(storage.join(root, "copy")) == ["a.txt", "sub/deep/b.bin"]
    only = storage.download_dir(root, tmp_path / "only", files=["a.txt"])
    assert only == ["a.txt"] and not (tmp_path / "only/sub").exists()

    assert storage.delete_prefix(storage.join(root, "copy")) == 2
    assert storage.delete_prefix(storage.join(root, "a.txt")) == 1
    assert storage.list_files(root) == ["sub/deep/b.bin"]
    assert storage.list_files(root + "-other") == ["c.txt"]


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f.json"
    storage.write_text(str(target), "old")

    def crash(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk gone"):
        storage.write_text(str(target), "new" * 1000)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temp file left


def test_multipart_upload_and_download(s3_bucket: str, tmp_path: Path) -> None:
    storage.configure(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    src = tmp_path / "big.bin"
    data = os.urandom(11 * 2**20)
    src.write_bytes(data)
    uri = storage.join(s3_bucket, "ckpt/model.safetensors")
    storage.upload_file(src, uri)
    bucket, key = storage.split_s3(uri)
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts: really multipart
    out = storage.download_file(uri, tmp_path / "out/big.bin")
    assert out.read_bytes() == data


@pytest.mark.parametrize("kind", ["503", "connection"])
def test_transient_errors_are_retried(s3_bucket: str, kind: str) -> None:
    uri = storage.join(s3_bucket, "x.txt")
    with S3Faults(storage.s3_client(), failures=3, kind=kind) as faults:
        storage.write_text(uri, "payload")
    assert faults.injected == 3
    with S3Faults(storage.s3_client(), failures=2, kind=kind) as faults:
        assert storage.read_text(uri) == "payload"
        assert storage.list_files(s3_bucket) == ["x.txt"]
    assert faults.injected == 2


def test_multipart_part_failures_are_retried(s3_bucket: str, tmp_path: Path) -> None:
    storage.configure(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(6 * 2**20))
    uri = storage.join(s3_bucket, "big.bin")
    with S3Faults(storage.s3_client(), failures=2, operations=("UploadPart",)) as faults:
        storage.upload_file(src, uri)
    assert faults.injected == 2
    assert storage.read_bytes(uri) == src.read_bytes()


def test_permanent_errors_are_not_retried(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "x.txt")
    with (
        S3Faults(storage.s3_client(), failures=10, kind="403") as faults,
        pytest.raises(ClientError),
    ):
        storage.write_text(uri, "payload")
    assert faults.injected == 1


def test_retries_are_bounded(s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "x.txt")
    with (
        S3Faults(storage.s3_client(), failures=100) as faults,
        pytest.raises(storage.StorageUnavailableError, match="after 5 attempts"),
    ):
        storage.write_text(uri, "payload")
    assert faults.injected == storage.config().attempts


def test_read_head_reads_a_prefix_and_the_size(root: str) -> None:
    uri = storage.join(root, "w.bin")
    storage.write_bytes(uri, b"0123456789")
    assert storage.read_head(uri, 4) == (b"0123", 10)
    assert storage.read_head(uri, 64) == (b"0123456789", 10)
    with pytest.raises(FileNotFoundError):
        storage.read_head(storage.join(root, "absent.bin"), 4)


def test_header_checks_ride_out_a_flapping_s3(s3_bucket: str) -> None:
    """The model check's ranged reads go through the same retries as every other read: two
    503s in a row (botocore's own retries off here) must not read as a broken checkpoint."""
    from spin_common import modelcheck

    storage.write_bytes(storage.join(s3_bucket, "m/w.bin"), b"0123456789")
    folder = modelcheck.Folder.open(storage.join(s3_bucket, "m"))
    with S3Faults(storage.s3_client(), failures=2, operations=("HeadObject",)) as faults:
        assert folder.head("w.bin", 4) == (b"0123", 10)
    assert faults.injected == 2


def test_s3_unavailable_is_not_reported_as_bad_input(s3_bucket: str) -> None:
    """S3 failing after every retry says nothing about the model: the check raises (the step
    fails as retryable) instead of listing a problem (exit 2, bad input, never retried)."""
    from spin_runtime import check

    with (
        S3Faults(storage.s3_client(), failures=100),
        pytest.raises(storage.StorageUnavailableError),
    ):
        check.check_model_uris(storage.join(s3_bucket, "model"), None, None)


def test_an_endpoint_given_as_a_value_brings_its_own_credentials(
    moto_server: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """storage.Endpoint names the endpoint, region and key pair: with no AWS_* credentials and no
    endpoint in the environment, calls in a `using` block read with them; the environment's
    (none) cannot; the secret never shows in the value's repr; os.environ is left as it was."""
    from botocore.exceptions import NoCredentialsError

    storage.write_bytes(f"{s3_bucket}/k", b"v")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup
    before = dict(os.environ)
    key = storage.Credentials("someone", "s3cr3t-value")
    endpoint = storage.Endpoint(url=moto_server, region="us-east-1", credentials=key)
    with storage.using(endpoint):
        assert storage.read_bytes(f"{s3_bucket}/k") == b"v"
    assert "s3cr3t-value" not in repr(endpoint)
    with storage.using(storage.Endpoint(url=moto_server)), pytest.raises(NoCredentialsError):
        storage.read_bytes(f"{s3_bucket}/k")
    assert dict(os.environ) == before
