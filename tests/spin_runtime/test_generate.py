"""generate: the transformers backend end to end, sharding, crash safety and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spin_common import data, manifest, records
from spin_runtime import cli, tiny
from spin_runtime.generate import runner
from spin_runtime.generate.backends import SamplingConfig
from spin_runtime.generate.transformers_backend import TransformersBackend, split_answer

EVAL, TRAIN = 6, 18


def argv(model: Path, dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "generate", "--model", str(model), "--dataset", str(dataset), "--output", str(output),
        "--eval-samples", str(EVAL), "--max-samples", str(TRAIN), "--max-new-tokens", "6",
        "--seed", "3", *extra,
    ]  # fmt: skip # argv: a flag beside its value


def test_cli_end_to_end_in_a_subprocess(tiny_model_dir, tiny_dataset_path, tmp_path) -> None:
    """``python -m spin_runtime generate`` as the operator runs it: records of both splits, then
    a manifest with counts, checksum, model, sampling and throughput."""
    out = tmp_path / "generated"
    env = {**os.environ, "JOB_COMPLETION_INDEX": "0", "SPIN_NUM_SHARDS": "1"}
    batch = 8
    cmd = [
        sys.executable,
        "-m",
        "spin_runtime",
        *argv(tiny_model_dir, tiny_dataset_path, out, "--batch-size", str(batch)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "generated tokens/s" in proc.stderr and "truncation rate" in proc.stderr
    # Progress by batch: one JSON line per batch of --batch-size prompts, counting up to the total.
    progress = [
        json.loads(line)
        for line in proc.stderr.splitlines()
        if line.startswith('{"event": "generate"')
    ]
    done = [p["done"] for p in progress]
    assert done[0] == 0 and done[-1] == EVAL + TRAIN == progress[-1]["total"]
    assert done == sorted(done) and len(done) == 1 + -(-(EVAL + TRAIN) // batch)

    recs = records.read_generated(str(out))
    split = data.load_split(str(tiny_dataset_path), seed=3, max_samples=TRAIN, eval_samples=EVAL)
    assert [r["id"] for r in recs] == [e.id for e in split.eval + split.train]
    assert [r["split"] for r in recs] == ["eval"] * EVAL + ["train"] * TRAIN
    by_id = {e.id: e for e in split.eval + split.train}
    for r in recs:
        e = by_id[r["id"]]
        assert (r["prompt"], r["real"], r["system"]) == (e.prompt, e.response, e.system)
        assert r["finish_reason"] in ("stop", "length") and r["iteration"] == 0
        assert 0 <= r["num_generated_tokens"] <= 6

    meta = manifest.read_manifest(str(out / "shard-00000-of-00001.jsonl")).meta  # type: ignore[union-attr]
    assert meta["records"] == EVAL + TRAIN and meta["eval_records"] == EVAL
    assert meta["model"] == str(tiny_model_dir) and meta["backend"] == "transformers"
    assert meta["sampling"]["max_new_tokens"] == 6 and meta["sampling"]["temperature"] == 1.0
    stats = meta["stats"]
    assert stats["tokens_per_s"] > 0 and stats["prompts_per_s"] > 0
    assert stats["generated_tokens"] == sum(r["num_generated_tokens"] for r in recs)
    truncated = sum(r["finish_reason"] == "length" for r in recs)
    assert stats["truncation_rate"] == pytest.approx(truncated / len(recs))


def test_greedy_answer_in_a_padded_batch_equals_the_answer_alone(tiny_varied_model_dir) -> None:
    from spin_runtime import formatting, models

    tok = models.load_tokenizer(str(tiny_varied_model_dir))
    backend = TransformersBackend(str(tiny_varied_model_dir), tok, batch_size=8)
    prompts = [
        formatting.prompt_ids(tok, system, prompt)
        for system, prompt in [
            (None, "add: 1 + 2"),
            ("You are a precise assistant.", "reverse: red green blue cat dog"),
            (None, "sort: 9 8 7 6 5 4 3 2 1 0 9 8 7"),
            ("Answer with the result only.", "upper: sun"),
        ]
    ]
    assert len({len(p) for p in prompts}) == 4  # really padded
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
    batched = backend.generate(prompts, greedy, [12, 12, 5, 12])
    alone = [
        backend.generate([p], greedy, [m])[0] for p, m in zip(prompts, [12, 12, 5, 12], strict=True)
    ]
    assert batched == alone
    assert len({tuple(c.token_ids) for c in batched}) == 4  # varied answers: a telling check
    assert len(batched[2].token_ids) == 5 and batched[2].finish_reason == "length"
    backend.close()


def test_seeded_sampling_is_reproducible(tiny_varied_model_dir) -> None:
    from spin_runtime import formatting, models

    tok = models.load_tokenizer(str(tiny_varied_model_dir))
    backend = TransformersBackend(str(tiny_varied_model_dir), tok, batch_size=4)
    prompts = [formatting.prompt_ids(tok, None, f"add: {i} + {i}") for i in range(6)]

    def sample(seed: int) -> list[list[int]]:
        params = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=seed)
        return [c.token_ids for c in backend.generate(prompts, params, [8] * 6)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    backend.close()


def test_split_answer() -> None:
    assert split_answer([5, 6, 2, 0, 0], eos_id=2, budget=10) == ([5, 6], "stop")
    assert split_answer([5, 6, 7, 2], eos_id=2, budget=3) == ([5, 6, 7], "length")
    assert split_answer([5, 2], eos_id=2, budget=2) == ([5], "stop")


@pytest.mark.parametrize("total", [0, 1, 7, 24, 101])
def test_contiguous_shards_cover_every_prompt_exactly_once(total: int) -> None:
    for n in (1, 2, 3, 5, 8):
        bounds = [runner.shard_bounds(total, i, n) for i in range(n)]
        covered = [j for start, end in bounds for j in range(start, end)]
        assert covered == list(range(total))
        sizes = [end - start for start, end in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_shards_together_are_the_unsharded_selection(
    tiny_model_dir, tiny_dataset_path, tmp_path
) -> None:
    out = tmp_path / "generated"
    for i in range(3):
        code = cli.main(
            argv(
                tiny_model_dir,
                tiny_dataset_path,
                out,
                "--temperature",
                "0",
                "--shard-index",
                str(i),
                "--num-shards",
                "3",
            )
        )
        assert code == 0
    sharded = records.read_generated(str(out))
    assert (
        cli.main(argv(tiny_model_dir, tiny_dataset_path, tmp_path / "one", "--temperature", "0"))
        == 0
    )
    single = records.read_generated(str(tmp_path / "one"))
    assert [(r["id"], r["generated"]) for r in sharded] == [
        (r["id"], r["generated"]) for r in single
    ]
    assert len({r["id"] for r in sharded}) == EVAL + TRAIN
    assert records.read_generated(str(out), split="eval") == sharded[:EVAL]
    # One iteration's generation over all shards (what the trainer logs as generate/total_*),
    # not the last shard's numbers.
    from spin_runtime.train.loop import generation_totals

    totals = generation_totals(str(out))
    assert totals["generate/total_prompts"] == EVAL + TRAIN and totals["generate/shards"] == 3
    assert totals["generate/total_generated_tokens"] == sum(
        r["num_generated_tokens"] for r in sharded
    )
    truncated = sum(r["finish_reason"] == "length" for r in sharded)
    assert totals["generate/truncation_rate"] == pytest.approx(truncated / len(sharded))


def test_shard_from_environment(tiny_model_dir, tiny_dataset_path, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    monkeypatch.setenv("SPIN_NUM_SHARDS", "4")
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-00001-of-00004.jsonl",
        "shard-00001-of-00004.manifest.json",
    ]
    status = records.shard_status(str(tmp_path))
    assert (status.complete, status.missing) == ([1], [0, 2, 3])


def test_killed_shard_rerun_leaves_one_consistent_result(
    tiny_model_dir, tiny_dataset_path, tmp_path
) -> None:
    """Shard 1 is killed mid-generation: its old manifest is already gone, so readers refuse the
    folder and name the shard; re-running shard 1 alone restores the same complete result."""
    out = tmp_path / "generated"
    common = ["--temperature", "0", "--num-shards", "2"]
    for i in (0, 1):
        assert (
            cli.main(argv(tiny_model_dir, tiny_dataset_path, out, *common, "--shard-index", str(i)))
            == 0
        )
    before = records.read_generated(str(out))
    shard0 = (out / "shard-00000-of-00002.jsonl").read_bytes()

    # A long run of shard 1, killed once it has started working.
    slow = argv(tiny_model_dir, tiny_dataset_path, out, *common, "--shard-index", "1")
    slow[slow.index("--max-new-tokens") + 1] = "200"
    slow[slow.index("--max-samples") + 1] = "0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spin_runtime", *slow], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "shard 1/2: prompts" in line:
            break
    time.sleep(3)  # let it load the model and start generating (200 tokens x 234 prompts)
    proc.kill()
    assert proc.wait(timeout=60) == -9, "".join(seen)  # killed, not finished or failed
    assert not (out / "shard-00001-of-00002.manifest.json").exists()
    with pytest.raises(records.GeneratedDataError, match=r"shard-00001-of-00002\.jsonl"):
        records.read_generated(str(out))

    assert (
        cli.main(argv(tiny_model_dir, tiny_dataset_path, out, *common, "--shard-index", "1")) == 0
    )
    assert records.read_generated(str(out)) == before
    assert (out / "shard-00000-of-00002.jsonl").read_bytes() == shard0


def test_prompts_too_long_for_the_context_are_skipped_and_counted(tiny_model_dir, tmp_path) -> None:
    rows = tiny.make_task_rows(10, seed=1)
    rows.append({"prompt": "reverse: " + "red " * 400, "response": "x"})  # > 256-token context
    rows.append({"prompt": "   ", "response": "x"})  # empty prompt: skipped by the reader
    dataset = tiny.write_jsonl(rows, tmp_path / "d.jsonl")
    out = tmp_path / "generated"
    code = cli.main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(dataset),
            "--output",
            str(out),
            "--max-new-tokens",
            "4",
        ]
    )
    assert code == 0
    recs = records.read_generated(str(out))
    assert sorted(r["id"] for r in recs) == list(range(10))
    meta = manifest.read_manifest(str(out / "shard-00000-of-00001.jsonl")).meta  # type: ignore[union-attr]
    assert meta["skipped_too_long"] == 1 and meta["stats"]["skipped_too_long"] == 1
    assert meta["dataset_skipped"] == {"empty prompt": 1}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "tensorrt"], "--backend tensorrt"),
        (["--shard-index", "4", "--num-shards", "4"], "--shard-index"),
        (["--num-shards", "0"], "--num-shards"),
        (["--top-p", "0"], "--top-p"),
        (["--dtype", "int4"], "--dtype int4"),
        (["--eval-samples", "1000"], "--eval-samples 1000"),
    ],
)
def test_bad_flags_exit_2_without_a_manifest(
    tiny_model_dir, tiny_dataset_path, tmp_path, capsys, extra, message
) -> None:
    out = tmp_path / "generated"
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out) + extra) == 2
    assert message in capsys.readouterr().err
    assert not list(out.glob("*.manifest.json")) if out.exists() else True


def test_bad_environment_and_inputs_exit_2(
    tiny_model_dir, tiny_dataset_path, tmp_path, capsys, monkeypatch
) -> None:
    out = tmp_path / "generated"
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "zero")
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out)) == 2
    assert "$JOB_COMPLETION_INDEX" in capsys.readouterr().err
    monkeypatch.delenv("JOB_COMPLETION_INDEX")

    assert cli.main(argv(tiny_model_dir, tmp_path / "missing.jsonl", out)) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert cli.main(argv(tmp_path / "no-model", tiny_dataset_path, out)) == 2
    assert "no-model" in capsys.readouterr().err
    assert not out.exists() or not list(out.glob("*.manifest.json"))


def test_failed_rerun_removes_the_old_manifest(tiny_model_dir, tiny_dataset_path, tmp_path) -> None:
    """A shard that fails is not complete, even if an earlier run of it had finished."""
    out = tmp_path / "generated"
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out)) == 0
    assert records.shard_status(str(out)).complete == [0]
    assert cli.main(argv(tiny_model_dir, tmp_path / "missing.jsonl", out)) == 2
    assert records.shard_status(str(out)).missing == [0]


def test_records_are_valid_json_lines_with_iteration(
    tiny_model_dir, tiny_dataset_path, tmp_path
) -> None:
    out = tmp_path / "generated"
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out, "--iteration", "2")) == 0
    lines = (out / "shard-00000-of-00001.jsonl").read_text().splitlines()
    assert all(json.loads(line)["iteration"] == 2 for line in lines)
    assert len(lines) == EVAL + TRAIN


def test_everything_on_s3(
    tiny_model_dir, tiny_dataset_path, s3_bucket, tmp_path, monkeypatch
) -> None:
    """Model (through the digest-keyed cache), dataset and output all on S3, as in a cluster."""
    from spin_common import storage

    monkeypatch.setenv("SPIN_CACHE_DIR", str(tmp_path / "cache"))
    model_uri = f"{s3_bucket}/models/tiny"
    manifest.write_dir_artifact(tiny_model_dir, model_uri, "model")
    dataset_uri = f"{s3_bucket}/data/sft.jsonl"
    storage.upload_file(tiny_dataset_path, dataset_uri)
    out = f"{s3_bucket}/run/iter-000/generated"
    flags = [
        "--eval-samples",
        "2",
        "--max-samples",
        "4",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0",
    ]
    code = cli.main(
        ["generate", "--model", model_uri, "--dataset", dataset_uri, "--output", out, *flags]
    )
    assert code == 0
    recs = records.read_generated(out)
    assert len(recs) == 6 and recs[0]["split"] == "eval"
    assert list((tmp_path / "cache").iterdir())  # the model came through the cache

    local = tmp_path / "local"
    code = cli.main(
        [
            "generate",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(tiny_dataset_path),
            "--output",
            str(local),
            *flags,
        ]
    )
    assert code == 0
    assert [r["generated"] for r in records.read_generated(str(local))] == [
        r["generated"] for r in recs
    ]


def test_cli_parser_is_light() -> None:
    """Parsing generate/evaluate arguments (and ``--help``) imports no torch, transformers or vLLM."""
    code = (
        "import argparse, sys; from spin_runtime import evaluate; "
        "from spin_runtime.generate import cli as g; p = argparse.ArgumentParser(); "
        "sub = p.add_subparsers(dest='command'); g.add_parser(sub); evaluate.add_parser(sub); "
        "p.parse_args(['generate', '--model', 'm', '--dataset', 'd', '--output', 'o']); "
        "bad = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_records_carry_the_sampled_ids_that_retokenizing_would_change(
    tiny_varied_model_dir, tiny_dataset_path, tmp_path
) -> None:
    """A sampling model produces token sequences its tokenizer would not (non-canonical
    merges, split characters): the record keeps the ids, and the trainer scores those."""
    from spin_runtime import formatting, models
    from spin_runtime.train import batches

    out = tmp_path / "generated"
    flags = ("--temperature", "1.0", "--max-new-tokens", "16")
    assert cli.main(argv(tiny_varied_model_dir, tiny_dataset_path, out, *flags)) == 0
    recs = records.read_generated(str(out))
    tok = models.load_tokenizer(str(tiny_varied_model_dir))
    eos = tok.eos_token_id
    for r in recs:
        ids = r["generated_token_ids"]
        assert r["generated"] == tok.decode(ids, skip_special_tokens=True)
        if r["finish_reason"] == "stop":
            assert ids[-1] == eos and eos not in ids[:-1]
            assert r["num_generated_tokens"] == len(ids) - 1
        else:
            assert eos not in ids and len(ids) == r["num_generated_tokens"] == 16
    changed = [
        r for r in recs if formatting.response_ids(tok, r["generated"]) != r["generated_token_ids"]
    ]
    assert changed, "expected some answers whose text re-encodes to other ids"
    pairs = batches.build_pairs([recs], ["g"], tok, 256, 128, drop_identical=False)
    by_id = {p.id: p.gen.tolist() for p in pairs.all}
    assert all(by_id[str(r["id"])] == r["generated_token_ids"] for r in recs)
    print(f"\n{len(changed)} of {len(recs)} answers re-encode to other ids")


def test_a_retry_skips_shards_that_are_already_complete(
    tiny_model_dir, tiny_dataset_path, tmp_path, monkeypatch
) -> None:
    """A new attempt of a generation step re-runs every shard: a shard complete with the same
    inputs is not generated again (no model loaded, file and manifest untouched); a shard made
    with other inputs, or whose file no longer matches its manifest, is generated again."""
    out = tmp_path / "generated"
    common = ["--num-shards", "2", "--shard-index", "0", "--temperature", "0"]
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out, *common)) == 0
    shard = out / "shard-00000-of-00002.jsonl"
    marker = out / "shard-00000-of-00002.manifest.json"
    stamps = (shard.stat().st_mtime_ns, marker.read_bytes())

    made = []
    real = runner.make_backend
    monkeypatch.setattr(runner, "make_backend", lambda *a, **k: made.append(1) or real(*a, **k))
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out, *common)) == 0
    assert made == [] and (shard.stat().st_mtime_ns, marker.read_bytes()) == stamps

    other = [*common[:-1], "0.7"]  # other sampling: the old shard is not reused
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out, *other)) == 0
    assert made == [1]
    assert json.loads(marker.read_text())["meta"]["sampling"]["temperature"] == 0.7

    shard.write_text(shard.read_text().replace('"split"', '"split" ', 1))  # corrupted meanwhile
    assert cli.main(argv(tiny_model_dir, tiny_dataset_path, out, *other)) == 0
    assert made == [1, 1]
    assert manifest.is_complete(str(shard), verify=True)
