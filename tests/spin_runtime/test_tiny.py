"""tiny.py: a real HF checkpoint built locally, reloaded bit-identically offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spin_runtime import formatting, tiny


def test_task_rows_are_deterministic_distinct_and_exact() -> None:
    rows = tiny.make_task_rows(200, seed=3)
    assert rows == tiny.make_task_rows(200, seed=3)
    assert rows != tiny.make_task_rows(200, seed=4)
    prompts = [r["messages"][-2]["content"] for r in rows]
    assert len(set(prompts)) == 200
    assert {r["task"] for r in rows} == set(tiny.TASKS)
    for row in rows:
        prompt, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
        kind, _, arg = prompt.partition(": ")
        if kind == "reverse":
            assert answer.split() == arg.split()[::-1]
        elif kind == "sort":
            assert answer.split() == sorted(arg.split())
        elif kind == "upper":
            assert answer == arg.upper()
        else:
            a, b = arg.split(" + ")
            assert int(answer) == int(a) + int(b)
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(r["messages"][0]["role"] == "user" for r in rows)


def test_unknown_task_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tiny tasks"):
        tiny.make_task_rows(3, tasks=("nope",))


def test_tokenizer_round_trips_any_text_and_has_specials(tiny_rows) -> None:
    tok = tiny.train_tokenizer(tiny_rows)
    for text in ["reverse: red cat", "ÜNïcödé 🙂 text", "add: 12 + 7"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.padding_side == "left"
    assert None not in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    assert len(tok("<|assistant|>", add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize(("size", "low", "high"), [("unit", 1e5, 3e5), ("demo", 1e6, 3.2e6)])
def test_model_sizes(tiny_rows, size: str, low: float, high: float) -> None:
    tok = tiny.train_tokenizer(tiny_rows)
    assert low <= tiny.num_parameters(tiny.make_model(tok, size)) <= high


def test_saved_checkpoint_reloads_bit_identically_offline(tmp_path: Path) -> None:
    """A fresh process with HF_HUB_OFFLINE=1 loads what save_tiny wrote through the real loading
    code; weights, tokenization, template and padding side are identical."""
    import torch

    directory = tiny.build_tiny(tmp_path, size="unit", seed=1, num_rows=120)
    assert (tmp_path / "dataset.jsonl").is_file()
    script = f"""
import torch, json, sys
from spin_runtime import models, formatting
tok = models.load_tokenizer({str(directory)!r})
model = models.load_model({str(directory)!r}, tokenizer=tok)
torch.save({{k: v for k, v in model.state_dict().items()}}, {str(tmp_path / "sd.pt")!r})
print(json.dumps([tok.padding_side, formatting.prompt_ids(tok, "S", "sort: 2 1")]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env
    )
    import json

    side, ids = json.loads(out.stdout.strip().splitlines()[-1])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    assert side == "left"
    assert ids == formatting.prompt_ids(tok, "S", "sort: 2 1")
    reloaded = torch.load(tmp_path / "sd.pt")
    original = AutoModelForCausalLM.from_pretrained(directory).state_dict()
    assert reloaded.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(reloaded[key], value), key


def test_same_seed_same_weights(tiny_rows) -> None:
    import torch

    tok = tiny.train_tokenizer(tiny_rows)
    a, b = tiny.make_model(tok, "unit", seed=5), tiny.make_model(tok, "unit", seed=5)
    c = tiny.make_model(tok, "unit", seed=6)
    pa, pb, pc = (next(m.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
