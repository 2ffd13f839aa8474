"""The corpus of broken inputs (docs/datasets.md, "What is checked"): each one with its outcome.

Rows that cannot be used are *skipped and counted*, with their reason and line; what makes the
whole dataset or model unusable *fails the check* (exit 2 before any Job) with the named cause.
Every case runs through the same functions as `python -m spin_runtime check` and the local
preflight (`load_examples`, `check_dataset`, `check_model`), and each finishes in well under a
second: nothing hangs.
"""

from __future__ import annotations

import codecs
import gzip
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spin_common import data, modelcheck, rows
from spin_common.check import check_dataset, check_model_uris

GOOD = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
GOOD_LINE = json.dumps(GOOD).encode()


def msgs(*pairs: tuple[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def jsonl(*items: Any) -> bytes:
    out = []
    for item in items:
        out.append(item if isinstance(item, bytes) else json.dumps(item).encode())
    return b"\n".join(out) + b"\n"


# ----------------------------------------------------------------------------- skipped and counted

# (case, file bytes, the bad row's reason (None: every row usable), its location, usable rows)
ROW_CASES: list[tuple[str, bytes, str | None, str, int]] = [
    (
        "latin-1 byte in one line",
        jsonl(GOOD, '{"prompt": "caf\xe9", "response": "A"}'.encode("latin-1"), GOOD),
        "not UTF-8",
        "line 2",
        2,
    ),
    (
        "0xff byte mid-line",
        jsonl(GOOD, GOOD, b'{"prompt": "\xff", "response": "A"}'),
        "not UTF-8",
        "line 3",
        2,
    ),
    ("UTF-8 BOM at the start", codecs.BOM_UTF8 + jsonl(GOOD, GOOD), None, "", 2),
    ("CRLF line ends", jsonl(GOOD, GOOD).replace(b"\n", b"\r\n"), None, "", 2),
    ("UTF-16 with a BOM", jsonl(GOOD, GOOD).decode().encode("utf-16"), None, "", 2),
    (
        "blank lines between rows keep physical line numbers",
        GOOD_LINE + b"\n\n\n" + b"not json\n",
        "not JSON",
        "line 4",
        1,
    ),
    ("truncated last line", jsonl(GOOD) + GOOD_LINE[:-7], "truncated JSON", "line 2", 1),
    ("not JSON at all", jsonl(GOOD, b"prompt,response"), "not JSON", "line 2", 1),
    ("a JSON array instead of an object", jsonl(GOOD, [1, 2]), "not an object", "line 2", 1),
    ("a JSON string row", jsonl(GOOD, "just text"), "not an object", "line 2", 1),
    (
        "deeply nested JSON",
        jsonl(GOOD, b"[" * 200_000 + b"]" * 200_000),
        "nested too deeply",
        "line 2",
        1,
    ),
    (
        "OpenAI content parts (text)",
        jsonl(
            msgs(
                ("user", [{"type": "text", "text": "Q"}]),
                ("assistant", [{"type": "text", "text": "A"}]),
            )
        ),
        None,
        "",
        1,
    ),
    (
        "OpenAI content parts without text",
        jsonl(
            GOOD,
            msgs(("user", [{"type": "image_url", "image_url": {"url": "x"}}]), ("assistant", "A")),
        ),
        "prompt is not text",
        "line 2",
        1,
    ),
    (
        "missing assistant turn",
        jsonl(GOOD, msgs(("user", "Q"))),
        "no assistant answer after the first user message",
        "line 2",
        1,
    ),
    (
        "two user turns before the answer",
        jsonl(GOOD, msgs(("user", "Q"), ("user", "Q2"), ("assistant", "A"))),
        "no assistant answer after the first user message",
        "line 2",
        1,
    ),
    (
        "roles out of order",
        jsonl(GOOD, msgs(("assistant", "A"), ("user", "Q"), ("assistant", "A"))),
        "roles out of order: assistant before the first user message",
        "line 2",
        1,
    ),
    (
        "no user message",
        jsonl(GOOD, msgs(("system", "S"), ("assistant", "A"))),
        "no user message",
        "line 2",
        1,
    ),
    ("empty messages", jsonl(GOOD, {"messages": []}), "empty messages", "line 2", 1),
    ("messages is null", jsonl(GOOD, {"messages": None}), "messages is null", "line 2", 1),
    (
        "a message without a role",
        jsonl(GOOD, {"messages": [{"content": "Q"}, {"role": "assistant", "content": "A"}]}),
        "a message without a role",
        "line 2",
        1,
    ),
    (
        "an unknown role",
        jsonl(GOOD, msgs(("human", "Q"), ("assistant", "A"))),
        "unknown role 'human'",
        "line 2",
        1,
    ),
    (
        "empty prompt string",
        jsonl(GOOD, {"prompt": "", "response": "A"}),
        "empty prompt",
        "line 2",
        1,
    ),
    (
        "whitespace-only answer",
        jsonl(GOOD, msgs(("user", "Q"), ("assistant", " \n\t"))),
        "empty response",
        "line 2",
        1,
    ),
    ("null answer", jsonl(GOOD, {"prompt": "Q", "response": None}), "empty response", "line 2", 1),
    (
        "a number as prompt",
        jsonl(GOOD, {"prompt": 42, "response": "A"}),
        "prompt is not a string",
        "line 2",
        1,
    ),
    (
        "system is not a string",
        jsonl(GOOD, {"system": ["S"], "prompt": "Q", "response": "A"}),
        "system is not a string",
        "line 2",
        1,
    ),
    (
        "unrelated fields",
        jsonl(GOOD, {"text": "Q A"}),
        "neither messages nor prompt/response fields",
        "line 2",
        1,
    ),
]


@pytest.mark.parametrize(
    ("case", "content", "reason", "where", "usable"), ROW_CASES, ids=[c[0] for c in ROW_CASES]
)
def test_bad_rows_are_skipped_and_counted_with_their_line(
    tmp_path: Path, case: str, content: bytes, reason: str | None, where: str, usable: int
) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    loaded = data.load_examples(str(path))
    assert len(loaded.examples) == usable, case
    if reason is None:
        assert loaded.num_skipped == 0 and {e.prompt for e in loaded.examples} == {"Q"}
    else:
        assert dict(loaded.skipped) == {reason: 1}
        assert loaded.where[reason] == [where]
        report = loaded.report()
        assert report["skippedByReason"][reason] == {"count": 1, "first": [where]}
        assert report["rows"] == usable + 1 and report["skipped"] == 1


def test_a_huge_line_is_skipped_not_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows, "MAX_LINE_BYTES", 2**20)
    big = {"prompt": "x" * (2**20), "response": "A"}
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(GOOD, big, GOOD))
    loaded = data.load_examples(str(path))
    assert dict(loaded.skipped) == {"line longer than 1 MiB": 1} and loaded.where[
        "line longer than 1 MiB"
    ] == ["line 2"]
    monkeypatch.setattr(rows, "MAX_LINE_BYTES", 4 * 2**20)  # under the limit: a long row is a row
    assert len(data.load_examples(str(path)).examples) == 3


def test_parquet_nulls_are_skipped_by_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(
        [
            {"prompt": "Q", "response": "A"},
            {"prompt": None, "response": "A"},
            {"prompt": "Q", "response": None},
        ]
    )
    pq.write_table(table, tmp_path / "d.parquet")
    loaded = data.load_examples(str(tmp_path / "d.parquet"))
    assert len(loaded.examples) == 1
    assert loaded.where == {"empty prompt": ["row 2"], "empty response": ["row 3"]}


def test_a_shard_with_bad_rows_is_counted_under_its_name(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(jsonl(GOOD, GOOD))
    (tmp_path / "b.jsonl").write_bytes(jsonl(GOOD, b"\xff\xfe"))
    loaded = data.load_examples(str(tmp_path))
    assert loaded.where == {"not UTF-8": ["b.jsonl line 2"]}
    assert [e.id for e in loaded.examples] == [0, 1, 2]  # ids stay source row indices


# ----------------------------------------------------------------------------- failed with the cause


def _parquet(path: Path, rows_: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows_), path)


def _truncated_parquet(path: Path) -> None:
    _parquet(path, [{"prompt": "Q", "response": "A"}] * 50)
    path.write_bytes(path.read_bytes()[:-40])


def _shards_one_bad(directory: Path) -> Path:
    directory.mkdir()
    _parquet(directory / "train-00000-of-00002.parquet", [{"prompt": "Q", "response": "A"}])
    _truncated_parquet(directory / "train-00001-of-00002.parquet")
    return directory


# (case, how to make the dataset under tmp_path -> its URI, the cause the message leads with)
DATASET_FAILURES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("empty file", lambda d: _bytes(d / "d.jsonl", b""), "is empty: no rows"),
    ("only blank lines", lambda d: _bytes(d / "d.jsonl", b"\n \r\n\n"), "is empty: no rows"),
    (
        "every row unusable",
        lambda d: _bytes(d / "d.jsonl", jsonl({"text": "a"}, {"text": "b"})),
        "no usable rows: all 2 skipped: neither messages nor prompt/response fields ×2 (line 1, line 2)",
    ),
    (
        "parquet with a wrong schema",
        lambda d: _rows_parquet(d / "d.parquet", [{"question": "Q", "answer": "A"}]),
        "parquet schema has no `messages` column and no `prompt` + `response` columns (columns: question, answer)",
    ),
    (
        "a truncated parquet file",
        lambda d: _call(_truncated_parquet, d / "d.parquet"),
        "not a parquet file",
    ),
    (
        "gzip-compressed JSONL",
        lambda d: _bytes(d / "d.jsonl", gzip.compress(jsonl(GOOD))),
        "compressed file",
    ),
    (
        "a .json array that is not valid JSON",
        lambda d: _bytes(d / "d.json", b'[{"prompt": "Q", "response": "A"},\n{"prompt": '),
        "not valid JSON at line 2",
    ),
    (
        "a .json object instead of an array",
        lambda d: _bytes(d / "d.json", b"[1][2]"),
        "not valid JSON at line 1",
    ),
    (
        "a directory of shards with one bad shard",
        lambda d: _shards_one_bad(d / "shards"),
        "train-00001-of-00002.parquet: not a parquet file",
    ),
    (
        "a directory without data files",
        lambda d: _mkdir(d / "empty"),
        "no .jsonl/.json/.parquet files",
    ),
    (
        "UTF-16 BOM with odd bytes",
        lambda d: _bytes(d / "d.jsonl", codecs.BOM_UTF16_LE + b"{\x00\x00\xd8"),
        "UTF-16 byte-order mark but not valid UTF-16",
    ),
]


def _bytes(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _rows_parquet(path: Path, rows_: list[dict[str, Any]]) -> Path:
    _parquet(path, rows_)
    return path


def _call(fn: Callable[[Path], None], path: Path) -> Path:
    fn(path)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("case", "make", "cause"), DATASET_FAILURES, ids=[c[0] for c in DATASET_FAILURES]
)
def test_unusable_datasets_fail_with_the_cause(
    tmp_path: Path, case: str, make: Callable[[Path], Path], cause: str
) -> None:
    uri = str(make(tmp_path))
    report, problems = check_dataset(uri, 0.01)
    assert report is None and len(problems) == 1, case
    assert cause in problems[0], problems[0]


def test_too_many_skipped_rows_fail_with_reasons_and_lines_first(tmp_path: Path) -> None:
    """The issue's dataset: 4 malformed rows of 24 (truncated JSON, not JSON, wrong types,
    empty `messages`) used to be dropped in silence."""
    good = [msgs(("user", f"Q{i}"), ("assistant", f"A{i}")) for i in range(20)]
    bad = [GOOD_LINE[:-9], b"not json", {"prompt": 1, "response": 2}, {"messages": []}]
    lines = (
        good[:5] + bad[:1] + good[5:10] + bad[1:2] + good[10:15] + bad[2:3] + good[15:] + bad[3:]
    )
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(*lines))
    report, problems = check_dataset(str(path), 0.01)
    assert report is None
    message = problems[0]
    assert message.index("truncated JSON ×1 (line 6)") < message.index(
        "4 of 24 rows skipped (16.7%)"
    )
    for reason in (
        "not JSON ×1 (line 12)",
        "prompt is not a string ×1 (line 18)",
        "empty messages ×1 (line 24)",
    ):
        assert reason in message
    assert "dataset.maxSkippedFraction 0.01" in message
    report, problems = check_dataset(str(path), 0.2)  # a looser limit: counted, not fatal
    assert problems == [] and report is not None
    assert (report["rows"], report["usable"], report["skipped"]) == (24, 20, 4)


def test_a_held_out_split_that_leaves_nothing_to_train_on(tmp_path: Path) -> None:
    path = _bytes(tmp_path / "d.jsonl", jsonl(GOOD, GOOD))
    _, problems = check_dataset(str(path), 0.01, eval_samples=2)
    assert problems and "dataset.evalSamples" in problems[0]


# ----------------------------------------------------------------------------- models


def _safetensors(tensors: dict[str, tuple[int, int]]) -> bytes:
    header = json.dumps(
        {
            k: {"dtype": "F32", "shape": [(e - s) // 4], "data_offsets": [s, e]}
            for k, (s, e) in tensors.items()
        }
    ).encode()
    end = max((e for _, e in tensors.values()), default=0)
    return struct.pack("<Q", len(header)) + header + b"\0" * end


@pytest.fixture
def model(tmp_path: Path) -> Path:
    from tests.spin_operator.local_support import write_model_folder

    folder = write_model_folder(tmp_path / "model")
    (folder / "model.safetensors").write_bytes(_safetensors({"w": (0, 64)}))
    return folder


def _write(path: Path, text: str) -> None:
    path.write_text(text)


# (case, how to break the good folder, the named cause)
MODEL_FAILURES: list[tuple[str, Callable[[Path], object], str]] = [
    ("no config.json", lambda m: (m / "config.json").unlink(), "no config.json"),
    (
        "config.json is not JSON",
        lambda m: _write(m / "config.json", "{'model_type': 'llama'"),
        "config.json is not valid JSON",
    ),
    (
        "config without architectures",
        lambda m: _write(m / "config.json", '{"model_type": "llama"}'),
        "config.json has no `architectures`",
    ),
    (
        "config without model_type",
        lambda m: _write(m / "config.json", '{"architectures": ["LlamaForCausalLM"]}'),
        "config.json has no `model_type`",
    ),
    ("no weights", lambda m: (m / "model.safetensors").unlink(), "no weights"),
    (
        "a truncated safetensors file",
        lambda m: _truncate(m / "model.safetensors", 10),
        "model.safetensors is truncated: its header declares",
    ),
    (
        "a safetensors file cut inside its header",
        lambda m: _truncate(m / "model.safetensors", 80),
        "model.safetensors is truncated or not safetensors",
    ),
    (
        "weights that are not safetensors",
        lambda m: _write(m / "model.safetensors", "<html>404</html>"),
        "is truncated or not safetensors",
    ),
    (
        "a shard index naming a missing shard",
        lambda m: _shards(m, drop=1),
        "missing: model-00002-of-00002.safetensors",
    ),
    (
        "a directory of shards with one bad shard",
        lambda m: _shards(m, truncate=1),
        "model-00002-of-00002.safetensors is truncated",
    ),
    (
        "shards without their index",
        lambda m: _shards(m, index=False),
        "without model.safetensors.index.json",
    ),
    (
        "no tokenizer files",
        lambda m: (m / "tokenizer.json").unlink(),
        "no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt)",
    ),
    (
        "a tokenizer.json that is not JSON",
        lambda m: _write(m / "tokenizer.json", "version: 1"),
        "tokenizer.json is not valid JSON",
    ),
    (
        "a tokenizer without a chat template",
        lambda m: (m / "chat_template.jinja").unlink(),
        "the tokenizer has no chat template",
    ),
    (
        "an empty folder",
        lambda m: [p.unlink() for p in m.iterdir()],
        "no such folder, or it is empty",
    ),
]


def _truncate(path: Path, cut: int) -> None:
    path.write_bytes(path.read_bytes()[:-cut])


def _shards(
    model: Path, drop: int | None = None, truncate: int | None = None, index: bool = True
) -> None:
    (model / "model.safetensors").unlink()
    names = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    weight_map = {}
    for i, name in enumerate(names):
        (model / name).write_bytes(_safetensors({f"w{i}": (0, 32)}))
        weight_map[f"w{i}"] = name
    if index:
        (model / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map})
        )
    if drop is not None:
        (model / names[drop]).unlink()
    if truncate is not None:
        _truncate(model / names[truncate], 5)


def test_a_good_folder_passes(model: Path) -> None:
    assert modelcheck.check_model(str(model)) == []
    _shards(model)
    assert modelcheck.check_model(str(model)) == []


@pytest.mark.parametrize(
    ("case", "breaks", "cause"), MODEL_FAILURES, ids=[c[0] for c in MODEL_FAILURES]
)
def test_broken_models_fail_with_the_missing_piece_named(
    model: Path, case: str, breaks: Callable[[Path], object], cause: str
) -> None:
    breaks(model)
    problems = check_model_uris(str(model), None, None)
    assert any(p.startswith(f"--model {model}: ") and cause in p for p in problems), problems


def test_a_chat_template_given_separately_or_in_the_tokenizer_config_is_enough(
    model: Path, tmp_path: Path
) -> None:
    (model / "chat_template.jinja").unlink()
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    assert check_model_uris(str(model), None, str(template)) == []
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    assert check_model_uris(str(model), None, None) == []


def test_a_separate_tokenizer_folder_is_checked_instead(model: Path, tmp_path: Path) -> None:
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text("{}")
    problems = check_model_uris(str(model), str(tokenizer), None)
    assert problems == [
        f"--tokenizer {tokenizer}: no tokenizer files (tokenizer.json, tokenizer.model, or vocab.json + merges.txt): copy the tokenizer into the folder or set the tokenizer field"
    ]
    (tokenizer / "merges.txt").write_text("")
    (tokenizer / "chat_template.jinja").write_text("x")
    assert check_model_uris(str(model), str(tokenizer), None) == []


def test_a_real_checkpoint_passes_and_its_truncation_is_caught(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    assert modelcheck.check_model(str(copy)) == []
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (problem,) = modelcheck.check_model(str(copy))
    assert problem.startswith("model.safetensors is truncated: its header declares")


def test_loading_a_tokenizer_from_a_folder_without_one_names_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Not transformers' "You need to have sentencepiece or tiktoken installed"."""
    from spin_runtime import models

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    (copy / "tokenizer.json").unlink()
    with pytest.raises(models.ModelError, match="no tokenizer files") as info:
        models.load_tokenizer(str(copy))
    assert "sentencepiece" not in str(info.value)


# ----------------------------------------------------------------------------- the CLI


def test_check_cli_reports_and_exits_2_with_the_cause_first(model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    data_path = _bytes(tmp_path / "d.jsonl", jsonl(GOOD, GOOD, GOOD, b"\xff"))
    argv = [
        sys.executable,
        "-m",
        "spin_runtime",
        "check",
        "--model",
        str(model),
        "--dataset",
        str(data_path),
    ]
    ok = subprocess.run(
        [*argv, "--max-skipped-fraction", "0.5", "--output", str(tmp_path / "report.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["ok"] and doc["dataset"]["skippedByReason"] == {
        "not UTF-8": {"count": 1, "first": ["line 4"]}
    }
    assert json.loads((tmp_path / "report.json").read_text()) == doc
    (model / "tokenizer.json").unlink()
    bad = subprocess.run(
        [*argv, "--max-skipped-fraction", "0.1"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert sum("not UTF-8" in line for line in lines) == 1  # said once
    errors = lines[next(i for i, line in enumerate(lines) if line.startswith("error: ")) :]
    assert (
        errors[0]
        == f"error: dataset {data_path}: not UTF-8 ×1 (line 4) — 1 of 4 rows skipped (25.0%), above dataset.maxSkippedFraction 0.1 (--max-skipped-fraction)"
    )
    assert errors[1].startswith(f"--model {model}: no tokenizer files")
    assert json.loads(bad.stdout)["ok"] is False


def test_a_bad_input_exit_leaves_its_cause_in_the_output_folder(tmp_path: Path) -> None:
    """What the operator shows as the cause on a cluster (it reads storage, not pod logs)."""
    from spin_runtime import cli

    data_path = _bytes(tmp_path / "d.jsonl", jsonl(GOOD))
    out = tmp_path / "run" / "iter-000" / "generated"
    argv = ["generate", "--model", str(tmp_path / "no-model"), "--dataset", str(data_path)]
    assert cli.main([*argv, "--output", str(out)]) == 2
    cause = (out / cli.BAD_INPUT_FILE).read_text()
    assert cause == f"--model {tmp_path / 'no-model'}: no such folder, or it is empty\n"
    assert not any(p.name.endswith("manifest.json") for p in out.iterdir())  # nothing complete
