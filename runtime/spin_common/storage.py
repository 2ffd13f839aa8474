"""One URI-based storage interface over ``s3://bucket/key`` and local paths (or ``file://``).

Shared by the operator and the runtime, so it stays light: boto3 is imported lazily and torch
never. Every artifact of a run goes through here, which gives one place for the two properties
the pipeline relies on:

* Local writes are atomic (temp file in the same folder + ``os.replace``): a crash never leaves a
  half-written file under its final name. S3 objects are atomic by nature.
* Transient S3 failures (5xx, throttling, dropped connections) are retried: botocore's own retry
  ("standard" mode, a few quick attempts) handles blips; :func:`_retry` adds slower exponential
  backoff around whole operations, including multipart transfers whose part failures boto3 wraps.

Missing objects raise ``FileNotFoundError`` on both backends; malformed URIs ``ValueError``;
S3 still failing after every retry ``StorageUnavailableError`` (an ``OSError``).
Directory operations treat ``uri`` as a folder: ``list_files("s3://b/x")`` lists ``x/...``, never
``x-other``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
TMP_SUFFIX = ".spin-tmp"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_THROTTLING = {
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "SlowDown", "RequestLimitExceeded", "RequestTimeout", "InternalError",
    "ServiceUnavailable", "TooManyRequestsException",
}  # fmt: skip # a word list, packed


class StorageUnavailableError(OSError):
    """S3 kept failing transiently (5xx, throttling, connection) after every retry."""


@dataclass(frozen=True)
class StorageConfig:
    """Retry and transfer knobs; env defaults so Jobs can be tuned without code changes."""

    attempts: int = 5  # whole-operation attempts (our wrapper)
    base_delay: float = 0.5  # seconds, doubled per attempt, jittered
    max_delay: float = 20.0
    botocore_attempts: int = 3  # botocore "standard" retries inside each attempt
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * 2**20
    multipart_chunksize: int = 64 * 2**20
    max_concurrency: int = 8

    @classmethod
    def from_env(cls) -> StorageConfig:
        env = os.environ
        return cls(
            attempts=int(env.get("SPIN_S3_RETRY_ATTEMPTS", cls.attempts)),
            base_delay=float(env.get("SPIN_S3_RETRY_BASE_DELAY", cls.base_delay)),
            max_delay=float(env.get("SPIN_S3_RETRY_MAX_DELAY", cls.max_delay)),
            botocore_attempts=int(env.get("AWS_MAX_ATTEMPTS", cls.botocore_attempts)),
        )


_config = StorageConfig.from_env()
_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def configure(**changes: Any) -> StorageConfig:
    """Change retry/transfer settings (tests use short delays); returns the previous config."""
    global _config
    previous = _config
    _config = replace(_config, **changes)
    with _clients_lock:
        _clients.clear()
    return previous


def config() -> StorageConfig:
    """The settings of calls made here: an enclosing `budget` block's, else the process'."""
    return _budget.get() or _config


# A caller serving many stores (the operator) bounds its calls per thread/task, without changing
# the process-wide settings the runtime's own transfers use.
_budget: ContextVar[StorageConfig | None] = ContextVar("spin_storage_budget", default=None)


@contextmanager
def budget(settings: StorageConfig) -> Iterator[None]:
    """Calls in this block use `settings` (attempts, botocore retries and socket timeouts)."""
    token = _budget.set(settings)
    try:
        yield
    finally:
        _budget.reset(token)


# ---------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key has no leading/trailing slash."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"malformed S3 URI {uri!r}: invalid or missing bucket name {bucket!r}")
    key = key.strip("/")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"malformed S3 URI {uri!r}: empty, '.' or '..' path segment")
    return bucket, key


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or ``file://`` URI; ValueError for any other scheme."""
    text = os.fspath(uri)
    if not text:
        raise ValueError("empty storage URI")
    if text.startswith("file://"):
        rest = text[7:]
        if rest.startswith("localhost/"):
            rest = rest[9:]
        if not rest.startswith("/"):
            raise ValueError(f"malformed file URI {text!r}: expected file:///absolute/path")
        return Path(rest)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", text)
    if match:
        raise ValueError(
            f"unsupported URI scheme {match.group(1)!r} in {text!r}: use s3://bucket/key or a "
            "local path"
        )
    return Path(text)


def check_uri(uri: str) -> str:
    """Validate a URI (raises ValueError naming it) and return it unchanged."""
    split_s3(uri) if is_s3(uri) else local_path(uri)
    return uri


def join(uri: str, *parts: str) -> str:
    """Append path segments; ``..`` and empty segments are refused so joins stay under ``uri``."""
    check_uri(uri)
    segments = [s for p in parts for s in str(p).strip("/").split("/")]
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError(f"cannot join {parts!r} onto {uri!r}: empty, '.' or '..' segment")
    return "/".join([uri.rstrip("/"), *segments]) if segments else uri


# ---------------------------------------------------------------- retries


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: 5xx, throttling, timeouts and connection errors (anywhere in the chain)."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        IncompleteReadError,
        SSLError,
    )

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, SSLError):
            return False
        if isinstance(cur, ConnectionError | HTTPClientError | IncompleteReadError):
            return True
        if isinstance(cur, ClientError):
            err = cur.response.get("Error", {})
            status = cur.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = str(err.get("Code", ""))
            return bool(status and int(status) >= 500) or code in _THROTTLING or code[:1] == "5"
        last = getattr(cur, "last_exception", None)  # boto3 RetriesExceededError
        cur = last if isinstance(last, BaseException) else (cur.__cause__ or cur.__context__)
    return False


def _retry(what: str, uri: str, fn: Callable[[], T]) -> T:
    cfg = config()
    for attempt in range(1, max(1, cfg.attempts) + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt >= cfg.attempts:
                raise StorageUnavailableError(
                    f"S3 {what} {uri} failed after {attempt} attempts: {type(exc).__name__}: {exc}"
                ) from exc
            delay = min(cfg.max_delay, cfg.base_delay * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.0)
            log.warning(
                "S3 %s %s failed (%s: %s); retry %d/%d in %.2fs",
                what,
                uri,
                type(exc).__name__,
                exc,
                attempt,
                cfg.attempts - 1,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def _is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


@dataclass(frozen=True)
class Credentials:
    """An S3 key pair given as a value (never read from or written to the environment here)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Endpoint:
    """Where S3 calls go and with which credentials, as a value a caller builds and passes in.

    A field left None is the process environment's, read and never written: ``url`` from
    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (else AWS itself), ``region`` from
    ``AWS_REGION``/``AWS_DEFAULT_REGION`` (else us-east-1), ``credentials`` from boto3's default
    chain (``AWS_ACCESS_KEY_ID``..., config files, an instance or IRSA role). That is the runtime's
    contract inside Jobs (docs/design.md); the operator, serving runs on several stores, names
    each run's endpoint (spin_operator.endpoints.storage_endpoint).
    """

    url: str | None = None
    region: str | None = None
    credentials: Credentials | None = None


# The endpoint of the calls made in this thread/task: a process that serves several stores (the
# operator) points each call at one with `using`, never through os.environ, so calls to different
# endpoints need no lock and never wait for each other.
_endpoint: ContextVar[Endpoint | None] = ContextVar("spin_storage_endpoint", default=None)


@contextmanager
def using(endpoint: Endpoint) -> Iterator[None]:
    """S3 calls in this block (this thread or task only) go to `endpoint`."""
    token = _endpoint.set(endpoint)
    try:
        yield
    finally:
        _endpoint.reset(token)


def s3_client() -> Any:
    """The boto3 S3 client of an enclosing `using` block's endpoint, else the environment's."""
    return client_for(_endpoint.get() or Endpoint())


def client_for(endpoint: Endpoint) -> Any:
    """The boto3 S3 client for `endpoint` (cached per endpoint, credentials and settings)."""
    env = os.environ
    url = endpoint.url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = (
        endpoint.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    )
    creds = endpoint.credentials
    # the default chain's key is part of the cache key: a rotated key gets a new client
    who = creds or (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SESSION_TOKEN"))
    cfg = config()
    key = (url, region, who, cfg)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            session = (
                boto3.session.Session(
                    aws_access_key_id=creds.access_key_id,
                    aws_secret_access_key=creds.secret_access_key,
                    aws_session_token=creds.session_token,
                )
                if creds
                else boto3.session.Session()
            )
            client = session.client(
                "s3",
                endpoint_url=url,
                region_name=region,
                config=Config(
                    retries={"mode": "standard", "total_max_attempts": cfg.botocore_attempts},
                    connect_timeout=cfg.connect_timeout,
                    read_timeout=cfg.read_timeout,
                    s3={"addressing_style": "path" if url else "auto"},
                ),
            )
            _clients[key] = client
    return client


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    cfg = _config
    return TransferConfig(
        multipart_threshold=cfg.multipart_threshold,
        multipart_chunksize=cfg.multipart_chunksize,
        max_concurrency=cfg.max_concurrency,
    )


# ---------------------------------------------------------------- local helpers


def _atomic_write_local(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_local(src: Path, dst: Path) -> None:
    def write(fh: Any) -> None:
        with open(src, "rb") as inp:
            shutil.copyfileobj(inp, fh, 8 * 2**20)

    _atomic_write_local(dst, write)


# ---------------------------------------------------------------- public API


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {uri}")
        return path.read_bytes()
    bucket, key = split_s3(uri)

    def get() -> bytes:
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
            return bytes(body.read())
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"no such object: {uri}") from exc
            raise

    return _retry("get", uri, get)


def read_head(uri: str, n: int) -> tuple[bytes, int]:
    """The first ``n`` bytes of a file and its size, without reading the rest (a ranged GET)."""
    if not is_s3(uri):
        path = local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {uri}")
        with path.open("rb") as f:
            return f.read(n), path.stat().st_size
    bucket, key = split_s3(uri)

    def get() -> tuple[bytes, int]:
        try:
            client = s3_client()
            size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
            if size == 0 or n <= 0:
                return b"", size
            rng = f"bytes=0-{min(n, size) - 1}"
            return bytes(client.get_object(Bucket=bucket, Key=key, Range=rng)["Body"].read()), size
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"no such object: {uri}") from exc
            raise

    return _retry("get", uri, get)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    if not is_s3(uri):
        _atomic_write_local(local_path(uri), lambda fh: fh.write(data))
        return
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"cannot write to a bucket root: {uri!r}")
    _retry("put", uri, lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    """True for an existing file/object or a non-empty folder/prefix."""
    if not is_s3(uri):
        return local_path(uri).exists()
    bucket, key = split_s3(uri)
    if key and _object_exists(bucket, key, uri):
        return True
    prefix = f"{key}/" if key else ""

    def any_child() -> bool:
        try:
            resp = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise
        return int(resp.get("KeyCount", 0)) > 0

    return _retry("list", uri, any_child)


def _object_exists(bucket: str, key: str, uri: str) -> bool:
    def head() -> bool:
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if _is_not_found(exc):
                return False
            raise

    return _retry("head", uri, head)


def list_files(prefix_uri: str) -> list[str]:
    """Every file under a folder, recursively, as sorted relative POSIX names ([] if absent)."""
    if not is_s3(prefix_uri):
        root = local_path(prefix_uri)
        if not root.is_dir():
            return []
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(TMP_SUFFIX)
        )
    bucket, key = split_s3(prefix_uri)
    prefix = f"{key}/" if key else ""

    def listing() -> list[str]:
        names: list[str] = []
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            names.extend(obj["Key"][len(prefix) :] for obj in page.get("Contents", []))
        return sorted(n for n in names if n and not n.endswith("/"))

    try:
        return _retry("list", prefix_uri, listing)
    except Exception as exc:
        if _is_not_found(exc):
            return []
        raise


def upload_file(local: str | os.PathLike[str], uri: str) -> None:
    """Copy a local file to ``uri``; large files go multipart through boto3's transfer manager."""
    src = Path(local)
    if not src.is_file():
        raise FileNotFoundError(f"no such local file: {src}")
    if not is_s3(uri):
        _copy_local(src, local_path(uri))
        return
    bucket, key = split_s3(uri)
    if not key:
        raise ValueError(f"cannot write to a bucket root: {uri!r}")
    cfg = _transfer_config()
    _retry("upload", uri, lambda: s3_client().upload_file(str(src), bucket, key, Config=cfg))


def download_file(uri: str, local: str | os.PathLike[str]) -> Path:
    """Copy ``uri`` to a local file (written under a temp name, then renamed)."""
    dst = Path(local)
    if not is_s3(uri):
        src = local_path(uri)
        if not src.is_file():
            raise FileNotFoundError(f"no such file: {uri}")
        _copy_local(src, dst)
        return dst
    bucket, key = split_s3(uri)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cfg = _transfer_config()

    def get() -> None:
        try:
            s3_client().download_file(bucket, key, str(dst), Config=cfg)
        except Exception as exc:
            if _is_not_found(exc):
                raise FileNotFoundError(f"no such object: {uri}") from exc
            raise

    _retry("download", uri, get)
    return dst


def upload_dir(local_dir: str | os.PathLike[str], uri: str) -> list[str]:
    """Upload every file under ``local_dir`` to ``uri/<relpath>``; returns the relative names."""
    root = Path(local_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such local folder: {root}")
    names = list_files(str(root))
    for name in names:
        upload_file(root / name, join(uri, name))
    return names


def download_dir(
    uri: str, local_dir: str | os.PathLike[str], files: Iterable[str] | None = None
) -> list[str]:
    """Download a folder (or just ``files``, relative names) into ``local_dir``."""
    names = sorted(files) if files is not None else list_files(uri)
    root = Path(local_dir)
    for name in names:
        download_file(join(uri, name), root / name)
    return names


def delete_prefix(uri: str) -> int:
    """Delete a folder (everything under ``uri/``) or a single file; returns how many files."""
    if not is_s3(uri):
        path = local_path(uri)
        if path.is_dir():
            count = len(list_files(str(path)))
            shutil.rmtree(path)
            return count
        if path.exists():
            path.unlink()
            return 1
        return 0
    bucket, key = split_s3(uri)
    keys = [f"{key}/{n}" if key else n for n in list_files(uri)]
    if key and _object_exists(bucket, key, uri):
        keys.append(key)
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}

        def delete(batch: dict[str, Any] = batch) -> None:
            s3_client().delete_objects(Bucket=bucket, Delete=batch)

        _retry("delete", uri, delete)
    return len(keys)
