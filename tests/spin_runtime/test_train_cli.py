"""Bad input to ``train``: a clear error naming the cause, a non-zero exit, nothing complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from spin_common import manifest
from tests.spin_runtime.test_train_support import (
    one_thread,
    run_train,
    task_records,
    train_argv,
    write_generated,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tiny_rows, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("generated")
    return write_generated(root / "g", task_records(tiny_rows[:24], 4, shift=1))


def _fails(argv, capsys, status: int, *needles: str) -> str:
    assert run_train(argv) == status
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_data_dir(tiny_model_dir, tmp_path, capsys):
    argv = train_argv(tiny_model_dir, [tmp_path / "nope"], tmp_path / "out", tmp_path / "work")
    _fails(argv, capsys, 2, "nope", "no generated shards")
    assert not manifest.is_complete(str(tmp_path / "out"))


def test_incomplete_data_dir(tiny_model_dir, tiny_rows, tmp_path, capsys):
    generated = write_generated(tmp_path / "g", task_records(tiny_rows[:10], 2, 1), num_shards=2)
    (Path(generated) / "shard-00001-of-00002.manifest.json").unlink()  # shard 1 still running
    argv = train_argv(tiny_model_dir, [generated], tmp_path / "out", tmp_path / "work")
    _fails(argv, capsys, 2, "shard-00001-of-00002", "no complete manifest")


def test_empty_data(tiny_model_dir, tmp_path, capsys):
    generated = write_generated(tmp_path / "g", [], num_shards=1)
    argv = train_argv(tiny_model_dir, [generated], tmp_path / "out", tmp_path / "work")
    _fails(argv, capsys, 2, "--data", "no generated records")


def test_only_held_out_records(tiny_model_dir, tiny_rows, tmp_path, capsys):
    generated = write_generated(tmp_path / "g", task_records(tiny_rows[:4], 4, 1), num_shards=1)
    argv = train_argv(tiny_model_dir, [generated], tmp_path / "out", tmp_path / "work")
    _fails(argv, capsys, 2, "no training pairs")


def test_every_prompt_too_long(tiny_model_dir, data, tmp_path, capsys):
    argv = train_argv(
        tiny_model_dir, [data], tmp_path / "out", tmp_path / "work", max_prompt_length=4
    )
    _fails(argv, capsys, 2, "no training pairs", "skipped: prompt longer than --max-prompt-length")


def test_tokenizer_of_another_model(tiny_model_dir, tiny_rows, data, tmp_path, capsys):
    from spin_runtime import tiny

    bigger = tiny.train_tokenizer(tiny_rows, vocab_size=900)
    bigger.save_pretrained(tmp_path / "tok")
    argv = train_argv(tiny_model_dir, [data], tmp_path / "out", tmp_path / "work")
    argv += ["--tokenizer", str(tmp_path / "tok")]
    _fails(argv, capsys, 2, "embedding rows", "--tokenizer")
    assert not (tmp_path / "out").exists()


def test_global_batch_not_divisible(tiny_model_dir, data, tmp_path, capsys):
    argv = train_argv(
        tiny_model_dir,
        [data],
        tmp_path / "out",
        tmp_path / "work",
        global_batch_size=6,
        micro_batch_size=4,
    )
    _fails(argv, capsys, 2, "--global-batch-size 6", "--micro-batch-size 4")


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("beta", 0, "--beta"),
        ("max_prompt_length", 96, "--max-prompt-length"),
        ("warmup_ratio", 1.5, "--warmup-ratio"),
        ("epochs", 0, "--epochs"),
    ],
)
def test_bad_hyperparameters(tiny_model_dir, data, tmp_path, capsys, flag, value, needle):
    argv = train_argv(tiny_model_dir, [data], tmp_path / "out", tmp_path / "work", **{flag: value})
    _fails(argv, capsys, 2, needle)


def test_non_finite_loss_fails_and_publishes_nothing(tiny_model_dir, data, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "nan")
    argv = train_argv(tmp_path / "nan", [data], tmp_path / "out", tmp_path / "work")
    _fails(argv, capsys, 1, "non-finite loss", "step 1")
    assert not manifest.is_complete(str(tmp_path / "out"))
    assert not (tmp_path / "work" / "epoch-001").exists()


def test_work_dir_of_other_settings_is_refused(tiny_model_dir, data, tmp_path, capsys):
    base = train_argv(tiny_model_dir, [data], tmp_path / "out", tmp_path / "work", epochs=1)
    assert run_train(base) == 0
    (tmp_path / "out" / "_MANIFEST.json").unlink()
    other = train_argv(
        tiny_model_dir, [data], tmp_path / "out", tmp_path / "work", epochs=1, beta=0.5
    )
    _fails(other, capsys, 2, "--work-dir", "other settings")
