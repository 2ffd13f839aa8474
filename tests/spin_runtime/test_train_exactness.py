"""The trainer end to end on what issue 16 found: prompt sharing decided on the run's own pairs
(and reported), a refusal when it is forced where it is not exact, and θt+1 saved in θt's own
dtype and config, also for a hub-id θ0."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from spin_runtime.train.exactness import TOLERANCE
from tests.spin_runtime.test_train_support import (
    metrics,
    one_thread,
    run_train,
    subprocess_env,
    task_records,
    train_argv,
    write_generated,
)

FLAGS = {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tiny_rows, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("generated")
    return write_generated(root / "g", task_records(tiny_rows[:20], 4, shift=1))


def _save(directory: Path, tokenizer, config, dtype: str = "float32") -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def windowed_model(tiny_rows, tmp_path_factory) -> Path:
    """A tiny Mistral whose sliding window (4) is far shorter than its packed rows."""
    from transformers import MistralConfig

    from spin_runtime import tiny

    tokenizer = tiny.train_tokenizer(tiny_rows)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=4,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return _save(tmp_path_factory.mktemp("mistral"), tokenizer, config)


def test_data_event_reports_prompt_sharing_on_a_full_attention_model(
    tiny_model_dir, data, tmp_path
):
    argv = train_argv(tiny_model_dir, [data], tmp_path / "model", tmp_path / "train", **FLAGS)
    assert run_train(argv) == 0
    (event,) = metrics(tmp_path / "train", "data")
    assert event["prompt_sharing"] is True
    assert 0 <= event["prompt_sharing_max_abs_diff"] <= TOLERANCE
    assert event["fused_head"] is True and event["fused_head_max_abs_diff"] <= TOLERANCE
    assert event["identical_pairs"] == 0 and event["retokenized_generations"] == 20
    assert event["truncated_generations"] == 0 and event["dropped_pairs"] == 0


def test_sliding_window_model_falls_back_and_on_refuses(
    windowed_model, data, tmp_path, capsys, caplog
):
    argv = train_argv(windowed_model, [data], tmp_path / "model", tmp_path / "train", **FLAGS)
    with caplog.at_level(logging.INFO):
        assert run_train(argv) == 0
    (event,) = metrics(tmp_path / "train", "data")
    assert event["prompt_sharing"] is False
    assert event["prompt_sharing_max_abs_diff"] > 100 * TOLERANCE  # the packed row is wrong here
    assert "sliding_window=4" in event["prompt_sharing_reason"]
    assert "prompt sharing off" in caplog.text and "sliding_window=4" in caplog.text

    forced = train_argv(
        windowed_model, [data], tmp_path / "m2", tmp_path / "t2", prompt_sharing="on", **FLAGS
    )
    assert run_train(forced) == 2
    err = capsys.readouterr().err
    assert "--prompt-sharing on (training.promptSharing: on): not exact" in err
    assert "sliding_window=4" in err
    assert not (tmp_path / "m2" / "_MANIFEST.json").exists()


def _hub_cache(root: Path, repo: str, source: Path) -> Path:
    """A Hugging Face hub cache holding ``source`` as ``repo``'s main revision (what a
    downloaded hub model looks like to an offline process)."""
    import shutil

    revision = "0" * 40
    folder = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(source, folder / "snapshots" / revision)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return root


def test_hub_id_model_saves_in_its_own_dtype_and_config(tiny_rows, data, tmp_path):
    """θ0 given as a hub id, stored in bf16 with use_cache on: θt+1 is bf16 (not fp32) and
    its config.json is θ0's (no use_cache: false, no zeroed dropout)."""
    import torch
    from safetensors import safe_open
    from transformers import LlamaConfig

    from spin_runtime import tiny

    tokenizer = tiny.train_tokenizer(tiny_rows)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=0.1,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    source = _save(tmp_path / "src", tokenizer, config, dtype="bfloat16")
    cache = _hub_cache(tmp_path / "hub", "spin-tests/tiny-bf16", source)
    out = tmp_path / "model"
    argv = train_argv("spin-tests/tiny-bf16", [data], out, tmp_path / "train", **FLAGS)
    env = {**subprocess_env(), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "spin_runtime", *argv],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = json.loads((out / "config.json").read_text())
    original = json.loads((source / "config.json").read_text())
    assert saved["dtype"] == "bfloat16"
    assert saved["use_cache"] is True and saved["attention_dropout"] == 0.1
    ignored = {"transformers_version", "dtype"}
    assert {k: v for k, v in saved.items() if k not in ignored} == {
        k: v for k, v in original.items() if k not in ignored
    }
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
