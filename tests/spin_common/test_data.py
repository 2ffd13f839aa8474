"""data.py: parsing SFT rows and the deterministic split every command shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_common import data
from spin_common.errors import UsageError


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


GOOD_MESSAGES = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
}


def test_messages_row_takes_system_first_user_turn_and_its_answer() -> None:
    assert data.parse_row(GOOD_MESSAGES) == ("Be brief.", "Q1", "A1")
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": "A"},
        ]
    }
    assert data.parse_row(parts) == (None, "Q", "A")


def test_prompt_response_row() -> None:
    assert data.parse_row({"prompt": "Q", "response": "A"}) == (None, "Q", "A")
    assert data.parse_row({"prompt": "Q", "response": "A", "system": "S"}) == ("S", "Q", "A")


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": [{"role": "user", "content": "Q"}]}, "no assistant answer"),
        ({"messages": [{"role": "assistant", "content": "A"}]}, "no user message"),
        (
            {
                "messages": [
                    {"role": "user", "content": "  "},
                    {"role": "assistant", "content": "A"},
                ]
            },
            "empty prompt",
        ),
        ({"prompt": "Q", "response": ""}, "empty response"),
        ({"text": "x"}, "neither"),
        ({"messages": "nope"}, "not a list"),
        ([1, 2], "not an object"),
    ],
)
def test_invalid_rows_have_reasons(row, reason: str) -> None:
    result = data.parse_row(row)
    assert isinstance(result, str) and reason in result


def test_load_counts_skipped_rows_and_keeps_source_indices(tmp_path: Path, caplog) -> None:
    uri = _write(
        tmp_path / "d.jsonl",
        [
            GOOD_MESSAGES,
            {"prompt": "", "response": "A"},
            "not json {",
            {"prompt": "Q3", "response": "A3"},
        ],
    )
    with caplog.at_level("WARNING"):
        loaded = data.load_examples(uri)
    assert [e.id for e in loaded.examples] == [0, 3]
    assert loaded.total_rows == 4 and loaded.num_skipped == 2
    assert "skipped 2 of 4 rows" in caplog.text


def test_parquet_and_directory_of_shards(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"Q{i}", "response": f"A{i}"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "train-00001-of-00002.parquet")
    (tmp_path / "README.md").write_text("ignored")
    loaded = data.load_examples(str(tmp_path))
    assert [(e.id, e.prompt) for e in loaded.examples] == [(i, f"Q{i}") for i in range(5)]
    single = data.load_examples(str(tmp_path / "train-00001-of-00002.parquet"))
    assert [e.prompt for e in single.examples] == ["Q3", "Q4"]


def test_errors_name_the_uri(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(UsageError, match=r"missing.jsonl"):
        data.load_examples(missing)
    empty = _write(tmp_path / "empty.jsonl", [{"x": 1}])
    with pytest.raises(data.DatasetError, match=r"empty.jsonl: no usable rows"):
        data.load_examples(empty)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(data.DatasetError, match=r"bad.parquet: not a parquet file"):
        data.load_examples(str(tmp_path / "bad.parquet"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(data.DatasetError, match=r"no .jsonl"):
        data.load_examples(str(tmp_path / "nothing"))


def _examples(n: int) -> list[data.Example]:
    return [data.Example(i, None, f"Q{i}", f"A{i}") for i in range(n)]


def test_select_is_deterministic_disjoint_and_independent_of_row_order() -> None:
    examples = _examples(50)
    a = data.select(examples, seed=7, max_samples=20, eval_samples=10)
    b = data.select(list(reversed(examples)), seed=7, max_samples=20, eval_samples=10)
    assert a == b
    assert len(a.train) == 20 and len(a.eval) == 10
    assert not {e.id for e in a.train} & {e.id for e in a.eval}
    c = data.select(examples, seed=8, max_samples=20, eval_samples=10)
    assert [e.id for e in c.eval] != [e.id for e in a.eval]
    # the held-out split does not depend on --max-samples
    assert data.select(examples, seed=7, max_samples=0, eval_samples=10).eval == a.eval
    assert [e.id for e in a.eval] != sorted(e.id for e in a.eval)  # really shuffled


def test_select_all_and_bounds() -> None:
    split = data.select(_examples(10), seed=0, max_samples=0, eval_samples=3)
    assert len(split.train) == 7
    assert len(data.select(_examples(10), seed=0, max_samples=100, eval_samples=0).train) == 10
    with pytest.raises(data.DatasetError, match="--eval-samples 10"):
        data.select(_examples(10), seed=0, max_samples=0, eval_samples=10)
    with pytest.raises(UsageError, match="--max-samples"):
        data.select(_examples(10), seed=0, max_samples=-1, eval_samples=0)


def test_tiny_dataset_loads(tiny_dataset_path: Path) -> None:
    split = data.load_split(str(tiny_dataset_path), seed=0, max_samples=100, eval_samples=20)
    assert len(split.train) == 100 and len(split.eval) == 20


def _ultrachat_like(root: Path) -> list[str]:
    """UltraChat 200k's layout: data/{train,test}_{sft,gen}-NNNNN-of-NNNNN-<hash>.parquet with
    multi-turn `messages` (and `prompt`, `prompt_id`) columns. Returns the train_sft prompts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    prompts: list[str] = []
    for split, shards in (("train_sft", 2), ("test_sft", 1), ("train_gen", 1)):
        for k in range(shards):
            rows = []
            for i in range(3):
                q = f"{split}-{k}-Q{i}"
                turns = [
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": f"A{i}"},
                    {"role": "user", "content": "more?"},
                    {"role": "assistant", "content": "no"},
                ]
                rows.append({"prompt": q, "prompt_id": f"{split}{k}{i}", "messages": turns})
                if split == "train_sft":
                    prompts.append(q)
            name = f"{split}-{k:05d}-of-{shards:05d}-a1b2c3.parquet"
            pq.write_table(pa.Table.from_pylist(rows), root / "data" / name)
    (root / "README.md").write_text("card")
    return prompts


@pytest.fixture(params=["local", "s3"])
def ultrachat(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, list[str]]:
    """The UltraChat-like layout on a local folder or under an S3 prefix (moto)."""
    prompts = _ultrachat_like(tmp_path / "uc")
    if request.param == "local":
        return str(tmp_path / "uc"), prompts
    from spin_common import storage

    root = str(request.getfixturevalue("s3_bucket")) + "/hub/ultrachat_200k"
    for path in sorted((tmp_path / "uc").rglob("*")):
        if path.is_file():
            storage.upload_file(
                path, storage.join(root, path.relative_to(tmp_path / "uc").as_posix())
            )
    return root, prompts


def test_a_glob_or_prefix_of_shards_reads_one_split_in_order(
    ultrachat: tuple[str, list[str]],
) -> None:
    root, train_prompts = ultrachat
    for uri in (
        f"{root}/data/train_sft-*",
        f"{root}/data/train_sft-*.parquet",
        f"{root}/data/train_sft-",
    ):
        files = data.data_files(uri)
        assert [f.rsplit("/", 1)[-1][:15] for f in files] == [
            "train_sft-00000",
            "train_sft-00001",
        ], uri
        loaded = data.load_examples(uri)
        # Multi-turn rows: the first user turn and the answer right after it; later turns unused.
        assert [e.prompt for e in loaded.examples] == train_prompts
        assert {e.response for e in loaded.examples} == {"A0", "A1", "A2"}
        assert [e.id for e in loaded.examples] == list(range(6))
    # The directory itself mixes every split (documented: use the glob or prefix).
    assert len(data.load_examples(f"{root}/data/").examples) == 12
    assert len(data.load_examples(f"{root}/data").examples) == 12
    with pytest.raises(
        data.DatasetError, match=r"no \.jsonl/\.json/\.parquet files match 'validation-\*'"
    ):
        data.data_files(f"{root}/data/validation-*")
    with pytest.raises(data.DatasetError, match="no such file, directory or prefix"):
        data.data_files(f"{root}/data/validation-")


def test_the_rows_in_docs_datasets_md_parse_as_documented() -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "datasets.md").read_text()
    rows = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", doc, re.S)]
    assert len(rows) == 2
    expected = ("You are a concise assistant.", "Name three prime numbers.", "2, 3 and 5.")
    assert [data.parse_row(r) for r in rows] == [expected, expected]
