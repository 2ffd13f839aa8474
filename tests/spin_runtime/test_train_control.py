"""``train --objective sft`` (the control arm): the SPIN step's pairs, order and step count, a
token-mean cross-entropy loss on the real answers, no reference pass; 2 processes on the CPU
(torchrun, gloo; FSDP2 and DDP) give the 1-process loss curve and the same θ1, within 1e-5 as the
SPIN step's 2-process tests (tests/spin_runtime/test_train_distributed.py): only the order of
floating-point sums differs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from spin_common import manifest, records
from spin_runtime import models
from spin_runtime.train import batches
from spin_runtime.train.policy import SequenceLogProbs, score
from tests.spin_runtime.test_train_support import (
    metrics,
    one_thread,
    run_train,
    task_records,
    torchrun,
    train_argv,
    write_generated,
)

FLAGS = {"global_batch_size": 16, "micro_batch_size": 4, "learning_rate": 2e-3, "epochs": 2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data(tiny_rows, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("generated")
    return write_generated(root / "iter-0", task_records(tiny_rows[:64], 8, shift=1))


@pytest.fixture(scope="module")
def control(tiny_model_dir, data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("control")
    argv = train_argv(
        tiny_model_dir, [data], root / "model", root / "train", objective="sft", **FLAGS
    )
    assert run_train(argv) == 0
    return root


def _real_nll(model_dir: str | Path, pairs: list[batches.Pair]) -> tuple[float, int]:
    """Summed NLL of the real answers under a checkpoint loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = score(SequenceLogProbs(model), batches.collate(pairs, pairs[0], 0))
    return -float(out[: len(pairs)].sum()), sum(len(p.real) for p in pairs)


def test_same_steps_as_spin_and_the_first_loss_is_the_token_mean_cross_entropy(
    control, tiny_model_dir, data
):
    steps = metrics(control / "train")
    assert len(steps) == 2 * math.ceil(56 / 16)  # what SPIN's step makes of the same flags
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    pairs = batches.build_pairs([records.read_generated(data)], [data], tokenizer, 96, 64).train
    slots = batches.step_slots(batches.epoch_order(len(pairs), 0, 1), 0, 16)
    nll, tokens = _real_nll(tiny_model_dir, [pairs[i] for i in slots if i >= 0])
    assert steps[0]["answer_tokens"] == tokens
    assert abs(steps[0]["loss"] - nll / tokens) < 1e-4, (steps[0]["loss"], nll / tokens)
    assert "margin" not in steps[0] and "rewards_real" not in steps[0]
    evals = metrics(control / "train", "eval")
    assert [e["epoch"] for e in evals] == [1, 2] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    # the saved θ1 fits the real answers better than θ0 did
    after, _ = _real_nll(control / "model", pairs)
    before, _ = _real_nll(tiny_model_dir, pairs)
    assert after < 0.9 * before, (after, before)
    found = manifest.require_complete(str(control / "model"))
    assert found.meta["objective"] == "sft" and found.meta["steps"] == len(steps)


def test_the_loss_does_not_depend_on_the_micro_batch_split(control, tiny_model_dir, data, tmp_path):
    flags = {**FLAGS, "micro_batch_size": 2, "epochs": 1}
    argv = train_argv(
        tiny_model_dir, [data], tmp_path / "m", tmp_path / "w", objective="sft", **flags
    )
    assert run_train(argv) == 0
    split, whole = metrics(tmp_path / "w"), metrics(control / "train")
    for a, b in zip(split, whole[: len(split)], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3


def test_no_reference_pass_and_unknown_objective_is_a_usage_error(
    tiny_model_dir, data, tmp_path, caplog
):
    with caplog.at_level(logging.INFO):
        argv = train_argv(
            tiny_model_dir, [data], tmp_path / "m", tmp_path / "w", objective="sft", epochs=1
        )
        assert run_train(argv) == 0
    assert not any("reference log-probs" in r.getMessage() for r in caplog.records)
    bad = train_argv(tiny_model_dir, [data], tmp_path / "m2", tmp_path / "w2", objective="dpo")
    with pytest.raises(SystemExit) as exc:
        run_train(bad)
    assert exc.value.code == 2


def test_lora_control_trains_only_the_adapter_and_publishes_it_merged(
    tiny_model_dir, data, tmp_path
):
    from safetensors.torch import load_file

    flags = {**FLAGS, "epochs": 1, "peft": "lora", "lora_rank": 4, "lora_alpha": 8}
    argv = train_argv(
        tiny_model_dir, [data], tmp_path / "m", tmp_path / "w", objective="sft", **flags
    )
    assert run_train(argv) == 0
    found = manifest.require_complete(str(tmp_path / "m"))
    assert found.meta["objective"] == "sft" and found.meta["adapter"]["rank"] == 4
    assert (tmp_path / "m" / "adapter").is_dir()
    steps = metrics(tmp_path / "w")
    assert steps[-1]["loss"] < steps[0]["loss"]
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(tmp_path / "m" / "model.safetensors")
    assert set(after) == set(before)  # merged: a plain checkpoint of θ0's architecture
    assert any(not torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    "strategy", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)]
)  # one strategy in the default run: each 2-process run costs ~20 s on two shared cores
def test_two_processes_match_one_process(strategy, control, tiny_model_dir, data, tmp_path):
    from safetensors.torch import load_file

    argv = train_argv(
        tiny_model_dir,
        [data],
        tmp_path / "model",
        tmp_path / "train",
        objective="sft",
        strategy=strategy,
        **FLAGS,
    )
    done = torchrun(2, argv)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"strategy {strategy} on 2 process(es)" in done.stderr
    one, two = metrics(control / "train"), metrics(tmp_path / "train")
    assert [m["step"] for m in two] == [m["step"] for m in one]
    for a, b in zip(one, two, strict=True):
        assert a["answer_tokens"] == b["answer_tokens"]  # each step saw the same pairs
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5, (a, b)
    evals_one, evals_two = metrics(control / "train", "eval"), metrics(tmp_path / "train", "eval")
    assert [e["eval_loss"] for e in evals_two] == pytest.approx(
        [e["eval_loss"] for e in evals_one], abs=1e-5
    )
    w1 = load_file(control / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "model" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-5)
    assert manifest.require_complete(str(tmp_path / "model")).meta["objective"] == "sft"
