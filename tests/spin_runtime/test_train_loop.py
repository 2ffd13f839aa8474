"""The trainer end to end in one process: ln 2 at the first step of every iteration, learning on
the training pairs, a checkpoint transformers loads, skip when done, resume after a crash."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from spin_common import manifest
from spin_runtime.train import batches, checkpoint, loop
from spin_runtime.train.loss import LN2
from spin_runtime.train.policy import SequenceLogProbs, score
from tests.spin_runtime.test_train_support import (
    metrics,
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


TRAIN_FLAGS = {"global_batch_size": 16, "micro_batch_size": 4, "learning_rate": 2e-3}


@pytest.fixture(scope="module")
def data(tiny_rows, tmp_path_factory) -> tuple[str, str]:
    """Current and previous iteration's generated dirs: 8 held-out + 56 training prompts."""
    root = tmp_path_factory.mktemp("generated")
    rows = tiny_rows[:64]
    current = write_generated(root / "iter-1", task_records(rows, 8, shift=1, iteration=1))
    previous = write_generated(root / "iter-0", task_records(rows, 8, shift=3), num_shards=1)
    return current, previous


@pytest.fixture(scope="module")
def trained(tiny_model_dir, data, tmp_path_factory) -> Path:
    """One finished iteration (2 epochs), shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("iter-1")
    argv = train_argv(tiny_model_dir, data, root / "model", root / "train", **TRAIN_FLAGS)
    assert run_train(argv) == 0
    return root


def _score(model_dir: Path, pairs: list[batches.Pair]) -> torch.Tensor:
    """(P, 2) response log-probs of a saved checkpoint, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        batch = batches.collate(pairs, pairs[0], 0)
        out = score(SequenceLogProbs(model), batch)
    return torch.stack([out[: len(pairs)], out[len(pairs) :]], 1)


def test_first_step_is_ln2_and_the_policy_learns_to_prefer_real(trained, tiny_model_dir, data):
    steps = metrics(trained / "train")
    assert len(steps) == 2 * math.ceil(2 * 56 / 16)
    first = steps[0]
    assert abs(first["loss"] - LN2) < 1e-5
    assert abs(first["margin"]) < 1e-5 and first["accuracy"] == 0.0
    assert {
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "rewards_real",
        "rewards_generated",
    } <= set(first)
    evals = metrics(trained / "train", "eval")
    assert [e["epoch"] for e in evals] == [1, 2]
    assert {"eval_loss", "eval_margin", "eval_accuracy"} <= set(evals[0])

    # independent check on the saved checkpoint: score the training pairs before and after
    from spin_runtime import models

    tokenizer = models.load_tokenizer(str(trained / "model"))
    from spin_common import records

    pairs = batches.build_pairs([records.read_generated(data[0])], ["cur"], tokenizer, 96, 64).train
    before = _score(tiny_model_dir, pairs)
    after = _score(trained / "model", pairs)
    rewards = after - before  # beta = 1
    margin = rewards[:, 0] - rewards[:, 1]
    assert margin.mean() > 1.0, margin.mean()
    assert (margin > 0).float().mean() > 0.8
    # the late steps separate the pairs better than the early ones did
    late = steps[-4:]
    assert sum(s["margin"] for s in late) / 4 > 0.5
    assert sum(s["accuracy"] for s in late) / 4 > 0.6


def test_output_is_a_complete_hf_checkpoint(trained, tiny_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained / "model"
    found = manifest.require_complete(str(out), verify=True)
    assert found.kind == "model"
    assert {
        "model.safetensors",
        "config.json",
        "chat_template.jinja",
        "tokenizer.json",
        "MLmodel",
        "components/tokenizer/tokenizer.json",
    } <= set(found.files)
    assert found.meta["iteration"] == 0 and found.meta["steps"] == 14
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied to the embeddings: stored once
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(out)
    source = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template == source.chat_template
    assert len(tokenizer) == len(source)
    # and it really moved
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(
        model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    )


def test_next_iteration_starts_at_ln2_again(trained, data, tmp_path):
    argv = train_argv(
        trained / "model",
        data[:1],
        tmp_path / "model",
        tmp_path / "train",
        epochs=1,
        iteration=1,
        **TRAIN_FLAGS,
    )
    assert run_train(argv) == 0
    first = metrics(tmp_path / "train")[0]
    assert abs(first["loss"] - LN2) < 1e-5


def test_a_finished_step_is_never_redone(trained, tiny_model_dir, data, caplog):
    before = (trained / "model" / "model.safetensors").stat().st_mtime_ns
    lines = (trained / "train" / "metrics.jsonl").read_text()
    argv = train_argv(tiny_model_dir, data, trained / "model", trained / "train", **TRAIN_FLAGS)
    with caplog.at_level(logging.INFO):
        assert run_train(argv) == 0
    assert "nothing to do" in caplog.text
    assert (trained / "model" / "model.safetensors").stat().st_mtime_ns == before
    assert (trained / "train" / "metrics.jsonl").read_text() == lines


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_gives_the_uninterrupted_result(
    trained, tiny_model_dir, data, tmp_path, monkeypatch, caplog
):
    argv = train_argv(tiny_model_dir, data, tmp_path / "model", tmp_path / "train", **TRAIN_FLAGS)
    real_step = loop.train_step
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # in epoch 2 (7 steps per epoch)
            raise Crash("killed")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", crashing)
    with pytest.raises(Crash):
        run_train(argv)
    assert checkpoint.latest_epoch(str(tmp_path / "train")) == 1
    assert not manifest.is_complete(str(tmp_path / "model"))

    monkeypatch.setattr(loop, "train_step", real_step)
    with caplog.at_level(logging.INFO):
        assert run_train(argv) == 0
    assert "resumed from" in caplog.text and "reference log-probs" not in caplog.text
    steps = [s["step"] for s in metrics(tmp_path / "train")]
    assert steps == list(range(1, 15))  # the lost steps are redone once, not logged twice
    from safetensors.torch import load_file

    got = load_file(tmp_path / "model" / "model.safetensors")
    want = load_file(trained / "model" / "model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    for mine, ref in zip(metrics(tmp_path / "train"), metrics(trained / "train"), strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], abs=1e-6)


def test_a_run_killed_while_saving_leaves_nothing_marked_complete(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    argv = train_argv(
        tiny_model_dir, data, tmp_path / "model", tmp_path / "train", epochs=2, **TRAIN_FLAGS
    )
    real_save = torch.save

    def dying_save(obj, path, *args, **kwargs):
        if str(path).endswith("epoch-002/optimizer.pt"):
            Path(path).write_bytes(b"partial")
            raise Crash("killed while saving")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    with pytest.raises(Crash):
        run_train(argv)
    assert (tmp_path / "train" / "epoch-002" / "model.pt").exists()
    assert not manifest.is_complete(str(tmp_path / "train" / "epoch-002"))
    assert checkpoint.latest_epoch(str(tmp_path / "train")) == 1
    assert not manifest.is_complete(str(tmp_path / "model"))

    # the final save dies after its files, before the manifest
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    real_publish = manifest.write_dir_artifact

    def dying_publish(local_dir, uri, kind, meta=None):
        if kind == checkpoint.MODEL_KIND:
            raise Crash("killed before the manifest")
        return real_publish(local_dir, uri, kind, meta)

    monkeypatch.setattr(manifest, "write_dir_artifact", dying_publish)
    with pytest.raises(Crash):
        run_train(argv)
    assert (tmp_path / "model" / "model.safetensors").exists()
    assert not manifest.is_complete(str(tmp_path / "model"))
    assert checkpoint.latest_epoch(str(tmp_path / "train")) == 2

    monkeypatch.setattr(manifest, "write_dir_artifact", real_publish)
    assert run_train(argv) == 0  # resumes after epoch 2: only the save is left
    assert manifest.is_complete(str(tmp_path / "model"), verify=True)


def test_schedules():
    linear = loop.lr_factor("linear", warmup=2, total=10)
    assert [linear(i) for i in (0, 1, 2, 6, 10)] == [0.0, 0.5, 1.0, 0.5, 0.0]
    cosine = loop.lr_factor("cosine", warmup=0, total=4)
    assert [round(cosine(i), 6) for i in range(5)] == [1.0, 0.853553, 0.5, 0.146447, 0.0]
    constant = loop.lr_factor("constant", warmup=4, total=10)
    assert [constant(i) for i in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_bf16_gradient_checkpointing_and_rmsprop(tiny_model_dir, data, tmp_path):
    argv = train_argv(
        tiny_model_dir,
        data[:1],
        tmp_path / "model",
        tmp_path / "train",
        epochs=1,
        precision="bf16",
        gradient_checkpointing=True,
        optimizer="rmsprop",
        lr_scheduler="linear",
        warmup_ratio=0.5,
        **TRAIN_FLAGS,
    )
    assert run_train(argv) == 0
    steps = metrics(tmp_path / "train")
    assert abs(steps[0]["loss"] - LN2) < 1e-3  # bf16: reference and step batch differently
    assert steps[0]["learning_rate"] == 0.0 and steps[2]["learning_rate"] == pytest.approx(2e-3)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["dtype"] == "float32"  # θt+1 keeps θt's dtype (fp32 master weights)


def test_output_loads_as_an_mlflow_transformers_model(trained):
    """The published folder is itself an MLflow model: mlflow.transformers.load_model reads
    the weights in place and generates what transformers generates from the same folder."""
    import mlflow.transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained / "model"
    pipe = mlflow.transformers.load_model(str(out))
    assert type(pipe.model).__name__ == "LlamaForCausalLM"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    prompt = "reverse: abc"
    ids = tokenizer(prompt, return_tensors="pt")
    want = tokenizer.decode(model.generate(**ids, max_new_tokens=6, do_sample=False)[0])
    got = pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert got == want
