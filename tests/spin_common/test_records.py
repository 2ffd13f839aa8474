"""records.read_generated: only a complete, consistent, checksummed set of shards is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_common import manifest, records
from spin_common.layout import shard_name

META = {"iteration": 0, "model": "m", "dataset": "d", "selection": {"seed": 0}, "sampling": {}}


def _record(i: int, split: str = "train") -> dict:
    return {
        "id": i,
        "split": split,
        "system": None,
        "prompt": f"q{i}",
        "real": f"a{i}",
        "generated": f"g{i}",
        "finish_reason": "stop",
        "num_generated_tokens": 1,
        "iteration": 0,
    }


def write_shard(
    folder: str,
    index: int,
    n: int,
    recs: list[dict],
    meta: dict | None = None,
    with_manifest: bool = True,
) -> str:
    uri = f"{folder}/{shard_name(index, n)}"
    text = "".join(json.dumps(r) + "\n" for r in recs)
    local = Path(folder) / f".tmp-{index}"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(text)
    if with_manifest:
        full = {**META, "num_shards": n, "records": len(recs), **(meta or {})}
        manifest.write_file_artifact(local, uri, "generated-shard", full)
    else:
        Path(uri).write_text(text)
    local.unlink()
    return uri


def test_reads_all_shards_in_order_and_filters_split(tmp_path: Path) -> None:
    d = str(tmp_path)
    write_shard(d, 1, 2, [_record(2), _record(3)])
    write_shard(d, 0, 2, [_record(0, "eval"), _record(1)])
    assert [r["id"] for r in records.read_generated(d)] == [0, 1, 2, 3]
    assert [r["id"] for r in records.read_generated(d, split="eval")] == [0]


def test_missing_and_unfinished_shards_are_named(tmp_path: Path) -> None:
    d = str(tmp_path)
    write_shard(d, 0, 4, [_record(0)])
    write_shard(d, 2, 4, [_record(2)], with_manifest=False)  # a data file without manifest
    with pytest.raises(records.GeneratedDataError) as err:
        records.read_generated(d)
    text = str(err.value)
    assert "3 of 4 shards" in text
    for i in (1, 2, 3):
        assert shard_name(i, 4) in text
    assert shard_name(0, 4) not in text


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    d = str(tmp_path)
    uri = write_shard(d, 0, 1, [_record(0)])
    Path(uri).write_text(json.dumps(_record(9)) + "\n")
    with pytest.raises(records.GeneratedDataError, match="checksum mismatch"):
        records.read_generated(d)


def test_mixed_shard_counts_and_inconsistent_shards(tmp_path: Path) -> None:
    d = str(tmp_path / "a")
    write_shard(d, 0, 1, [_record(0)])
    write_shard(d, 0, 2, [_record(0)])
    with pytest.raises(records.GeneratedDataError, match=r"different shard counts \[1, 2\]"):
        records.read_generated(d)
    d = str(tmp_path / "b")
    write_shard(d, 0, 2, [_record(0)])
    write_shard(d, 1, 2, [_record(1)], meta={"model": "other"})
    with pytest.raises(records.GeneratedDataError, match=r"different \['model'\]"):
        records.read_generated(d)


def test_empty_folder_and_bad_records(tmp_path: Path) -> None:
    with pytest.raises(records.GeneratedDataError, match="no generated shards"):
        records.read_generated(str(tmp_path / "nothing"))
    bad = _record(0)
    del bad["real"]
    write_shard(str(tmp_path / "c"), 0, 1, [bad])
    with pytest.raises(records.GeneratedDataError, match="lacks fields"):
        records.read_generated(str(tmp_path / "c"))


def test_reads_from_s3(s3_bucket: str, tmp_path: Path) -> None:
    from spin_common import storage

    folder = f"{s3_bucket}/run/iter-000/generated"
    for i in range(2):
        local = tmp_path / f"s{i}.jsonl"
        local.write_text(json.dumps(_record(i)) + "\n")
        meta = {**META, "num_shards": 2, "records": 1}
        manifest.write_file_artifact(local, f"{folder}/{shard_name(i, 2)}", "generated-shard", meta)
    assert [r["id"] for r in records.read_generated(folder)] == [0, 1]
    storage.delete_prefix(f"{folder}/{shard_name(1, 2).removesuffix('.jsonl')}.manifest.json")
    with pytest.raises(records.GeneratedDataError, match=shard_name(1, 2)):
        records.read_generated(folder)


def test_records_module_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, spin_common.records; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
