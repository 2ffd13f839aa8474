"""Manifests: an artifact is complete only once its manifest exists, and it is written last.

Neither S3 nor a shared folder can publish a set of files atomically, so every writer uploads
all files first and the manifest last; every reader (the reconciler deciding what is done, the
cache, training reading generated shards) trusts only artifacts that have one. A crash or an
outage mid-upload therefore leaves files without a manifest, which are ignored and overwritten
by the retry.

* Directory artifacts (model checkpoints, epoch checkpoints, eval results): ``<dir>/_MANIFEST.json``.
* Single files (generation shards): ``<stem>.manifest.json`` beside the file.

Format (docs/design.md): ``{"complete": true, "kind": ..., "files": {relpath: {"size": int,
"sha256": hex}}, "meta": {...}, "createdAt": iso8601}``. The *content digest* hashes only the
file list (names, sizes, checksums), so identical content gets the same digest however and
whenever it was written; it keys the model cache and names MLflow datasets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from spin_common import storage

log = logging.getLogger(__name__)

MANIFEST_NAME = "_MANIFEST.json"
FILE_MANIFEST_SUFFIX = ".manifest.json"


class IncompleteArtifactError(FileNotFoundError):
    """The artifact has no complete manifest: it is missing or still (or was half) written."""


class ChecksumError(ValueError):
    """A file does not match the size or sha256 its manifest records."""


@dataclass(frozen=True)
class FileInfo:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    kind: str
    files: Mapping[str, FileInfo]
    meta: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    complete: bool = True

    def to_json(self) -> str:
        return json.dumps(
            {
                "complete": self.complete,
                "kind": self.kind,
                "files": {
                    name: {"size": f.size, "sha256": f.sha256}
                    for name, f in sorted(self.files.items())
                },
                "meta": dict(self.meta),
                "createdAt": self.created_at,
            },
            indent=2,
            sort_keys=False,
        )

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            raw = json.loads(text)
            files = {
                str(name): FileInfo(size=int(info["size"]), sha256=str(info["sha256"]))
                for name, info in raw["files"].items()
            }
            return cls(
                kind=str(raw["kind"]),
                files=files,
                meta=dict(raw.get("meta") or {}),
                created_at=str(raw.get("createdAt", "")),
                complete=raw.get("complete") is True,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed manifest {where}: {exc}") from exc

    @property
    def digest(self) -> str:
        return files_digest(self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def files_digest(files: Mapping[str, FileInfo]) -> str:
    """sha256 over the sorted (name, size, sha256) list: the artifact's content identity."""
    canonical = json.dumps(
        [[name, f.size, f.sha256] for name, f in sorted(files.items())], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def dir_manifest_uri(dir_uri: str) -> str:
    return storage.join(dir_uri, MANIFEST_NAME)


def file_manifest_uri(file_uri: str) -> str:
    """``.../shard-00000-of-00004.jsonl`` -> ``.../shard-00000-of-00004.manifest.json``."""
    if storage.is_s3(file_uri):
        has_name = bool(storage.split_s3(file_uri)[1])
    else:
        has_name = bool(storage.local_path(file_uri).name)
    if not has_name:
        raise ValueError(f"not a file URI: {file_uri!r}")
    head, _, name = file_uri.rstrip("/").rpartition("/")
    stem = PurePosixPath(name).stem or name
    return f"{head}/{stem}{FILE_MANIFEST_SUFFIX}" if head else f"{stem}{FILE_MANIFEST_SUFFIX}"


def _parent(uri: str) -> str:
    head = uri.rstrip("/").rpartition("/")[0]
    return head or "."


def hash_file(path: str | os.PathLike[str]) -> FileInfo:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * 2**20):
            digest.update(chunk)
            size += len(chunk)
    return FileInfo(size=size, sha256=digest.hexdigest())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_manifest_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base == MANIFEST_NAME or base.endswith(FILE_MANIFEST_SUFFIX)


def _same_local_place(local: Path, uri: str) -> bool:
    return not storage.is_s3(uri) and local.resolve() == storage.local_path(uri).resolve()


def write_dir_artifact(
    local_dir: str | os.PathLike[str], uri: str, kind: str, meta: Mapping[str, Any] | None = None
) -> Manifest:
    """Publish a local folder at ``uri``: drop any old manifest, upload every file, then the
    manifest. ``local_dir`` may already be ``uri`` (a local output): then nothing is copied."""
    root = Path(local_dir)
    if not kind:
        raise ValueError("manifest kind must be a non-empty string")
    names = [n for n in storage.list_files(str(root)) if not _is_manifest_name(n)]
    if not names:
        raise ValueError(f"refusing to publish an empty artifact: {root} has no files")
    manifest_uri = dir_manifest_uri(uri)
    storage.delete_prefix(manifest_uri)  # a rewrite is incomplete until its new manifest lands
    files = {name: hash_file(root / name) for name in names}
    if not _same_local_place(root, uri):
        for name in names:
            storage.upload_file(root / name, storage.join(uri, name))
    manifest = Manifest(kind=kind, files=files, meta=dict(meta or {}), created_at=_now())
    storage.write_text(manifest_uri, manifest.to_json())
    return manifest


def write_file_artifact(
    local_file: str | os.PathLike[str], uri: str, kind: str, meta: Mapping[str, Any] | None = None
) -> Manifest:
    """Publish one file at ``uri`` and then its ``<stem>.manifest.json`` beside it."""
    src = Path(local_file)
    if not kind:
        raise ValueError("manifest kind must be a non-empty string")
    manifest_uri = file_manifest_uri(uri)
    storage.delete_prefix(manifest_uri)
    info = hash_file(src)
    if not _same_local_place(src, uri):
        storage.upload_file(src, uri)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    manifest = Manifest(kind=kind, files={name: info}, meta=dict(meta or {}), created_at=_now())
    storage.write_text(manifest_uri, manifest.to_json())
    return manifest


def _read(uri: str) -> Manifest | None:
    try:
        return Manifest.from_json(storage.read_text(uri), uri)
    except FileNotFoundError:
        return None


def locate(uri: str) -> tuple[Manifest, str] | None:
    """(manifest, folder its relative names live in), trying the directory form first."""
    found = _read(dir_manifest_uri(uri))
    if found is not None:
        return found, uri
    try:
        found = _read(file_manifest_uri(uri))
    except ValueError:  # a bucket root or "/" cannot be a file artifact
        return None
    return (found, _parent(uri)) if found is not None else None


def read_manifest(uri: str) -> Manifest | None:
    """The manifest of a directory artifact (``uri/_MANIFEST.json``) or, failing that, of a file
    artifact (``<stem>.manifest.json``); None when there is none. Raises ValueError if malformed."""
    found = locate(uri)
    return found[0] if found else None


def is_complete(uri: str, *, verify: bool = False) -> bool:
    """True only if a complete manifest exists (and, with ``verify``, every file matches it)."""
    try:
        require_complete(uri, verify=verify)
        return True
    except IncompleteArtifactError:
        return False
    except (ValueError, FileNotFoundError) as exc:
        log.warning("artifact %s is not usable: %s", uri, exc)
        return False


def require_complete(uri: str, *, verify: bool = False) -> Manifest:
    """The complete manifest of ``uri``, or IncompleteArtifactError saying what is missing."""
    manifest = read_manifest(uri)
    if manifest is None or not manifest.complete:
        raise IncompleteArtifactError(
            f"artifact {uri} is incomplete: no complete {MANIFEST_NAME} or "
            f"{FILE_MANIFEST_SUFFIX} (still being written, or its writer failed)"
        )
    return verify_artifact(uri) if verify else manifest


def verify_local(local_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Check every file of ``manifest`` under ``local_dir``: ChecksumError on the first mismatch."""
    root = Path(local_dir)
    for name, expected in sorted(manifest.files.items()):
        path = root / name
        if not path.is_file():
            raise ChecksumError(f"{path}: missing (listed in the manifest)")
        actual = hash_file(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: size/sha256 {actual.size}/{actual.sha256[:12]} != manifest "
                f"{expected.size}/{expected.sha256[:12]}"
            )


def verify_artifact(uri: str) -> Manifest:
    """Check a stored artifact's files against its manifest (downloads S3 files to a temp dir).
    IncompleteArtifactError without a complete manifest, ChecksumError on a mismatch."""
    found = locate(uri)
    if found is None or not found[0].complete:
        raise IncompleteArtifactError(f"artifact {uri} is incomplete: no complete manifest")
    manifest, root = found
    if not storage.is_s3(root):
        verify_local(storage.local_path(root), manifest)
        return manifest
    with tempfile.TemporaryDirectory(prefix="spin-verify-") as tmp:
        storage.download_dir(root, tmp, files=manifest.files)
        verify_local(tmp, manifest)
    return manifest


def shard_manifests(dir_uri: str) -> dict[str, Manifest]:
    """Complete file manifests in a folder (generation shards), keyed by the shard file name."""
    found: dict[str, Manifest] = {}
    for name in storage.list_files(dir_uri):
        if "/" in name or not name.endswith(FILE_MANIFEST_SUFFIX):
            continue
        manifest = _read(storage.join(dir_uri, name))
        if manifest is not None and manifest.complete:
            for file_name in manifest.files:
                found[file_name] = manifest
    return found


def digest(uri: str) -> str:
    """Content digest of an artifact: its manifest's, or for a folder of shards the digest of
    the union of their file lists. IncompleteArtifactError when nothing complete is there."""
    manifest = read_manifest(uri)
    if manifest is not None and manifest.complete:
        return manifest.digest
    shards = shard_manifests(uri)
    if not shards:
        raise IncompleteArtifactError(f"artifact {uri} has no complete manifest to digest")
    files = {name: m.files[name] for name, m in shards.items()}
    return files_digest(files)
