"""Turn a model/checkpoint URI into something ``from_pretrained`` can open.

* Local paths (and ``file://``) are returned as they are.
* ``s3://`` artifacts are downloaded once per node into ``$SPIN_CACHE_DIR`` (default
  ``~/.cache/spin``), in a folder named after the artifact's manifest digest: a rewritten
  checkpoint gets a new folder, an unchanged one is reused across iterations and Jobs.
  An artifact without a complete manifest is refused (it may still be being written).
* A hub id (``org/name``: no scheme, not an existing path) is returned unchanged.

Concurrency and crashes: ranks of one node share the cache, so a per-digest file lock lets one
process download while the others wait; the download goes to a temp folder, is verified against
the manifest, and is renamed into place. A cache folder therefore either does not exist or is
complete; a crash leaves only a temp folder, removed by the next holder of the lock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from spin_common import manifest, storage

log = logging.getLogger(__name__)

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SPIN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "spin"


def is_hub_id(uri: str) -> bool:
    """``Qwen/Qwen2.5-0.5B`` or ``gpt2``: what transformers resolves from the hub (or its cache)."""
    return bool(_HUB_ID_RE.match(uri)) and ".." not in uri and not Path(uri).exists()


def materialize(
    uri: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
) -> Path | str:
    """A local path for ``uri`` (downloading s3:// artifacts into the cache), or the hub id."""
    text = os.fspath(uri)
    if storage.is_s3(text):
        return _materialize_s3(text, cache_root(cache_dir), verify)
    path = storage.local_path(text)  # ValueError for unsupported schemes
    if path.exists():
        return path
    if not text.startswith("file://") and is_hub_id(text):
        return text
    raise FileNotFoundError(
        f"{text!r} is not an existing local path, an s3:// URI or a hub id (org/name)"
    )


def _materialize_s3(uri: str, root: Path, verify: bool) -> Path:
    found = manifest.locate(uri)
    if found is None or not found[0].complete:
        raise manifest.IncompleteArtifactError(
            f"refusing to use {uri}: it has no complete manifest ({manifest.MANIFEST_NAME} or "
            f"{manifest.FILE_MANIFEST_SUFFIX}); it is still being written or its writer failed"
        )
    art, files_root = found
    key = art.digest
    entry = root / "artifacts" / key
    is_file = files_root != uri
    target = entry / next(iter(art.files)) if is_file else entry
    if entry.is_dir():
        return target
    (root / "locks").mkdir(parents=True, exist_ok=True)
    with open(root / "locks" / f"{key}.lock", "a+") as lock:
        start = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        waited = time.monotonic() - start
        if entry.is_dir():  # someone else downloaded it while we waited
            log.info("cache hit for %s after waiting %.1fs for another process", uri, waited)
            return target
        for stale in (root / "artifacts").glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)  # a crashed earlier download
        tmp = root / "artifacts" / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        try:
            t0 = time.monotonic()
            storage.download_dir(files_root, tmp, files=art.files)
            if verify:
                manifest.verify_local(tmp, art)
            name = (
                manifest.MANIFEST_NAME
                if not is_file
                else manifest.file_manifest_uri(next(iter(art.files)))
            )
            (tmp / name).write_text(art.to_json())
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "cached %s (%d files, %.1f MB) in %s in %.1fs",
            uri,
            len(art.files),
            art.total_bytes / 1e6,
            entry,
            time.monotonic() - t0,
        )
    return target
