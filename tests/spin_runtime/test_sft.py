"""sft.py: the demo's brief SFT trains on exactly the tokens generation will produce."""

from __future__ import annotations

import itertools

import pytest

from spin_common import data
from spin_runtime import formatting, sft, tiny


@pytest.fixture(scope="module")
def examples() -> list[data.Example]:
    rows = tiny.make_task_rows(64, seed=1, tasks=("sort",))
    return [data.Example(i, *data.parse_row(r)) for i, r in enumerate(rows)]  # type: ignore[misc]


def test_encode_masks_the_prompt_and_ends_with_eos(
    tiny_rows: list[dict], examples: list[data.Example]
) -> None:
    tok = tiny.train_tokenizer(tiny_rows)
    ids, labels = sft.encode(tok, examples[0], max_length=96)
    prompt = formatting.prompt_ids(tok, examples[0].system, examples[0].prompt)
    answer = formatting.response_ids(tok, examples[0].response)
    assert ids == prompt + answer
    assert labels == [sft.IGNORE] * len(prompt) + answer and labels[-1] == tok.eos_token_id
    short_ids, short_labels = sft.encode(tok, examples[0], max_length=5)
    assert len(short_ids) == len(short_labels) == 5


def test_training_lowers_the_loss_deterministically(
    tiny_rows: list[dict], examples: list[data.Example]
) -> None:
    import torch

    torch.set_num_threads(1)
    tok = tiny.train_tokenizer(tiny_rows)
    cfg = sft.SFTConfig(steps=30, batch_size=16, learning_rate=3e-3, warmup_steps=3, seed=2)
    seen: list[int] = []
    model = tiny.make_model(tok, "unit", seed=0)
    losses = sft.train_sft(model, tok, examples, cfg, on_step=lambda step, loss: seen.append(step))
    assert seen == list(range(1, 31)) and not model.training
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0]
    again = sft.train_sft(tiny.make_model(tok, "unit", seed=0), tok, examples, cfg)
    assert again == losses


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    cfg = sft.SFTConfig(steps=100, warmup_steps=10)
    factors = [sft._lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_no_examples_is_an_error(tiny_rows: list[dict]) -> None:
    tok = tiny.train_tokenizer(tiny_rows)
    with pytest.raises(ValueError, match="at least one example"):
        sft.train_sft(tiny.make_model(tok), tok, [])
