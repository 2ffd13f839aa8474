"""Reading generated data: the trainer's (and the operator's) view of ``R/iter-t/generated``.

A generation step is done only when *every* shard 0..n-1 has a complete manifest whose checksum
matches the shard file; anything less (a pod still running, one killed mid-write, a shard
re-run with another shard count) must stop training rather than silently train on a subset.
Light module: storage and manifests only, no torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from spin_common import manifest, storage
from spin_common.errors import UsageError

SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.jsonl$")
SHARD_MANIFEST_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.manifest\.json$")
RECORD_FIELDS = (
    "id", "split", "system", "prompt", "real", "generated", "finish_reason",
    "num_generated_tokens", "iteration",
)  # fmt: skip # a word list, packed
#: Meta fields every shard of one generation step must agree on.
CONSISTENT_META = ("iteration", "num_shards", "model", "dataset", "selection", "sampling")


class GeneratedDataError(UsageError):
    """The generated data folder is not a complete, consistent set of shards."""


@dataclass(frozen=True)
class ShardStatus:
    """What :func:`shard_status` sees in a folder: the shard count and which shards are done."""

    num_shards: int
    complete: list[int]
    missing: list[int]


def _shard_counts(names: list[str]) -> set[int]:
    counts = set()
    for name in names:
        match = SHARD_RE.match(name) or SHARD_MANIFEST_RE.match(name)
        if match:
            counts.add(int(match.group(2)))
    return counts


def shard_status(dir_uri: str) -> ShardStatus:
    """Which shards of the folder have a complete manifest (no checksum verification)."""
    names = storage.list_files(dir_uri)
    counts = _shard_counts(names)
    if not counts:
        raise GeneratedDataError(f"{dir_uri}: no generated shards (shard-*-of-*.jsonl)")
    if len(counts) > 1:
        raise GeneratedDataError(
            f"{dir_uri}: shards of different shard counts {sorted(counts)} are mixed; "
            "remove the stale ones or regenerate the folder"
        )
    n = counts.pop()
    done = manifest.shard_manifests(dir_uri)
    from spin_common.layout import shard_name

    complete = [i for i in range(n) if shard_name(i, n) in done]
    return ShardStatus(n, complete, [i for i in range(n) if i not in complete])


def read_shard(
    dir_uri: str, index: int, num_shards: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records and manifest meta of one shard, verified against its manifest's size/sha256."""
    from spin_common.layout import shard_name

    name = shard_name(index, num_shards)
    uri = storage.join(dir_uri, name)
    found = manifest.read_manifest(uri)
    if found is None or not found.complete or name not in found.files:
        raise GeneratedDataError(
            f"{uri}: no complete manifest (shard {index} unfinished or failed)"
        )
    try:
        payload = storage.read_bytes(uri)
    except FileNotFoundError:
        raise GeneratedDataError(f"{uri}: listed by its manifest but missing") from None
    expected = found.files[name]
    actual = hashlib.sha256(payload).hexdigest()
    if len(payload) != expected.size or actual != expected.sha256:
        raise GeneratedDataError(
            f"{uri}: checksum mismatch (size {len(payload)} vs {expected.size}, sha256 "
            f"{actual[:12]} vs {expected.sha256[:12]}): the shard was changed after its manifest"
        )
    records = [json.loads(line) for line in payload.decode("utf-8").splitlines() if line.strip()]
    meta = dict(found.meta)
    if "records" in meta and meta["records"] != len(records):
        raise GeneratedDataError(f"{uri}: {len(records)} records, manifest says {meta['records']}")
    for record in records:
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise GeneratedDataError(f"{uri}: record {record.get('id')} lacks fields {missing}")
    return records, meta


def read_generated(dir_uri: str, split: str | None = None) -> list[dict[str, Any]]:
    """Every record of a complete generation step, shard 0 first (the selection order).

    ``split`` ("train" or "eval") filters records. Raises :class:`GeneratedDataError` naming
    the missing shards, a checksum mismatch, or shards that disagree (model, iteration, ...).
    """
    status = shard_status(dir_uri)
    if status.missing:
        from spin_common.layout import shard_name

        names = ", ".join(shard_name(i, status.num_shards) for i in status.missing)
        raise GeneratedDataError(
            f"{dir_uri}: {len(status.missing)} of {status.num_shards} shards have no complete "
            f"manifest: {names}"
        )
    records: list[dict[str, Any]] = []
    reference: dict[str, Any] | None = None
    for index in range(status.num_shards):
        shard_records, meta = read_shard(dir_uri, index, status.num_shards)
        consistent = {k: meta.get(k) for k in CONSISTENT_META}
        if reference is None:
            reference = consistent
        elif consistent != reference:
            diff = sorted(k for k in CONSISTENT_META if consistent[k] != reference[k])
            raise GeneratedDataError(
                f"{dir_uri}: shard {index} was generated with different {diff} than shard 0"
            )
        records.extend(shard_records)
    if split is not None:
        records = [r for r in records if r["split"] == split]
    return records
