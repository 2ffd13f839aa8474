"""``train --peft lora``: ln 2 at the first step (θt is the reference, the fresh adapter is zero),
only the adapter learns, θt+1 is published merged with the adapter beside it (peft reloads it
onto θt and gets the same weights), bad LoRA flags are usage errors, and 2 processes under
FSDP2 and DDP (gloo) give the 1-process run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spin_common import manifest
from spin_runtime.train import checkpoint, loop
from spin_runtime.train.loss import LN2
from tests.spin_runtime.test_train_support import (
    metrics,
    one_thread,
    run_train,
    task_records,
    torchrun,
    train_argv,
    write_generated,
)

LORA = {
    "peft": "lora",
    "lora_rank": 4,
    "lora_alpha": 8,
    "global_batch_size": 8,
    "micro_batch_size": 2,
    "learning_rate": 5e-3,
    "epochs": 2,
}


@pytest.fixture(scope="module")
def data(tiny_rows, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("generated")
    return write_generated(root / "g", task_records(tiny_rows[:40], 8, shift=1))


@pytest.fixture(scope="module")
def single(tiny_model_dir, data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora")
    with one_thread():
        argv = train_argv(tiny_model_dir, [data], root / "model", root / "train", **LORA)
        assert run_train(argv) == 0
    return root


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_first_step_is_ln2_and_the_adapter_learns(single):
    steps = metrics(single / "train")
    assert abs(steps[0]["loss"] - LN2) < 1e-6
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.05
    assert steps[-1]["margin"] > 0


def test_published_model_is_merged_and_the_adapter_reloads_onto_theta_t(single, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = single / "model"
    assert manifest.is_complete(str(out))
    meta = manifest.require_complete(str(out)).meta
    assert meta["adapter"]["method"] == "lora" and meta["adapter"]["rank"] == 4
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "adapter_config.json").exists()  # the merged folder is a plain checkpoint

    merged = _weights(out)
    base = _weights(Path(tiny_model_dir))
    assert merged.keys() == base.keys()  # plain HF names, no base_layer/lora_A parts
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted linears moved
    assert not any(torch.equal(merged[k], base[k]) for k in merged if "q_proj" in k)

    theta = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(theta, str(adapter)).merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(reloaded[key], value, rtol=0, atol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(out)  # loads as a plain model
    assert type(plain).__name__ == "LlamaForCausalLM"


@pytest.mark.slow  # another full run of ~20-40 s on a busy 2-core machine
def test_a_killed_lora_run_resumes_to_the_same_weights(
    single, tiny_model_dir, data, tmp_path, monkeypatch, capsys
):
    argv = train_argv(tiny_model_dir, [data], tmp_path / "model", tmp_path / "train", **LORA)
    real_step = loop.train_step
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # in epoch 2 (4 steps an epoch)
            raise RuntimeError("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crashing)
    with one_thread(), pytest.raises(RuntimeError, match="killed"):
        run_train(argv)
    assert checkpoint.latest_epoch(str(tmp_path / "train")) == 1
    assert not manifest.is_complete(str(tmp_path / "model"))
    monkeypatch.setattr(loop, "train_step", real_step)
    with one_thread():
        assert run_train(argv) == 0
    a, b = _weights(single / "model"), _weights(tmp_path / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # a full fine-tuning run cannot resume the adapter's work dir
    full = {k: v for k, v in LORA.items() if not k.startswith(("peft", "lora"))}
    argv = train_argv(tiny_model_dir, [data], tmp_path / "m2", tmp_path / "train", **full)
    capsys.readouterr()
    with one_thread():
        assert run_train(argv) == 2  # refused before loading (parameter names differ)
    assert "holds epoch checkpoints of other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"lora_rank": 0}, "--lora-rank 0"),
        ({"lora_dropout": 1.5}, "--lora-dropout 1.5"),
        ({"lora_target_modules": "no_such_proj"}, "--lora-target-modules no_such_proj"),
        ({"lora_target_modules": "all-linear,q_proj"}, "all-linear cannot be combined"),
    ],
)
def test_bad_lora_flags_are_usage_errors(tiny_model_dir, data, tmp_path, capsys, flags, message):
    argv = train_argv(tiny_model_dir, [data], tmp_path / "m", tmp_path / "t", **{**LORA, **flags})
    with one_thread():
        assert run_train(argv) == 2
    assert message in capsys.readouterr().err
    assert not manifest.is_complete(str(tmp_path / "m"))


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_processes_match_one_process(single, tiny_model_dir, data, tmp_path, strategy):
    argv = train_argv(
        tiny_model_dir, [data], tmp_path / "model", tmp_path / "train", strategy=strategy, **LORA
    )
    done = torchrun(2, argv)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"strategy {strategy} on 2 process(es)" in done.stderr
    for x, y in zip(metrics(single / "train"), metrics(tmp_path / "train"), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
    a, b = _weights(single / "model"), _weights(tmp_path / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow  # another full run of ~20-40 s on a busy 2-core machine
def test_gradient_checkpointing_gives_the_same_lora_run(single, tiny_model_dir, data, tmp_path):
    argv = train_argv(
        tiny_model_dir,
        [data],
        tmp_path / "model",
        tmp_path / "train",
        gradient_checkpointing=True,
        **LORA,
    )
    with one_thread():
        assert run_train(argv) == 0
    for x, y in zip(metrics(single / "train"), metrics(tmp_path / "train"), strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-6
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-5
