"""Pairs, their order and their collation: prompt masking, length rules, world-size invariance."""

from __future__ import annotations

import pytest
import torch

from spin_runtime import formatting
from spin_runtime.train import batches
from spin_runtime.train.loss import IGNORE


@pytest.fixture(scope="module")
def tokenizer(tiny_rows):
    from spin_runtime import tiny

    return tiny.train_tokenizer(tiny_rows)


def _record(i: int, split: str = "train", prompt: str | None = None, gen: str = "x y") -> dict:
    return {
        "id": i,
        "split": split,
        "system": "Answer with the result only." if i % 2 else None,
        "prompt": prompt or f"add: {i} + 1",
        "real": str(i + 1),
        "generated": gen,
    }


def test_pairs_use_shared_formatting_and_keep_order(tokenizer):
    current = [_record(3), _record(1), _record(2, "eval"), _record(0)]
    previous = [_record(0, gen="zz"), _record(1, gen="zz"), _record(2, "eval", gen="zz")]
    pairs = batches.build_pairs([current, previous], ["cur", "prev"], tokenizer, 64, 32)
    # one pair per (train prompt, data dir); eval pairs come from the current dir only
    assert [(p.source, p.id) for p in pairs.train] == [
        (0, "0"), (0, "1"), (0, "3"), (1, "0"), (1, "1"),
    ]  # fmt: skip
    assert [(p.source, p.id) for p in pairs.eval] == [(0, "2")]
    assert [p.index for p in pairs.all] == list(range(6))
    assert pairs.per_source == [4, 2]
    p = pairs.train[1]
    rec = _record(1)
    assert p.prompt.tolist() == formatting.prompt_ids(tokenizer, rec["system"], rec["prompt"])
    assert p.real.tolist() == formatting.response_ids(tokenizer, "2")
    assert p.gen.tolist() == formatting.response_ids(tokenizer, "x y")
    assert p.gen[-1] == tokenizer.eos_token_id
    # the same records in another order give the same pairs
    again = batches.build_pairs([current[::-1], previous], ["cur", "prev"], tokenizer, 64, 32)
    assert again.fingerprint() == pairs.fingerprint()


def test_long_prompts_are_skipped_and_counted_long_answers_cut(tokenizer):
    long_prompt = "reverse: " + " ".join(["red green blue"] * 40)
    records = [_record(0), _record(1, prompt=long_prompt), _record(2, gen="seven " * 80)]
    pairs = batches.build_pairs([records], ["cur"], tokenizer, max_length=48, max_prompt_length=24)
    assert pairs.skipped_long_prompts == 1
    assert pairs.truncated_answers == 1
    assert [p.id for p in pairs.train] == ["0", "2"]
    cut = pairs.train[1]
    assert len(cut.prompt) + len(cut.gen) == 48


def test_bad_data_is_a_data_error(tokenizer):
    with pytest.raises(batches.DataError, match="--data cur: no generated records"):
        batches.build_pairs([[]], ["cur"], tokenizer, 64, 32)
    long_prompt = "reverse: " + " ".join(["red green blue"] * 40)
    with pytest.raises(batches.DataError, match="1 skipped: prompt longer"):
        batches.build_pairs([[_record(0, prompt=long_prompt)]], ["cur"], tokenizer, 64, 32)
    with pytest.raises(batches.DataError, match="'generated'"):
        bad = _record(0)
        del bad["generated"]
        batches.build_pairs([[bad]], ["cur"], tokenizer, 64, 32)
    with pytest.raises(batches.DataError, match="--max-prompt-length"):
        batches.build_pairs([[_record(0)]], ["cur"], tokenizer, 32, 32)


def test_collate_masks_prompts_and_stacks_real_then_generated():
    import numpy as np

    def pair(i, prompt, real, gen):
        return batches.Pair(i, str(i), 0, np.array(prompt), np.array(real), np.array(gen))

    a = pair(0, [5, 6, 7], [8, 9], [10])
    b = pair(1, [5], [11, 12, 13], [14, 15])
    batch = batches.collate([a, b, None], filler=a, pad_id=0)
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 8, 9],
        [5, 11, 12, 13, 0],
        [5, 6, 7, 8, 9],  # filler for the padding slot
        [5, 6, 7, 10, 0],
        [5, 14, 15, 0, 0],
        [5, 6, 7, 10, 0],
    ]
    I = IGNORE  # noqa: E741
    assert batch.targets.tolist() == [
        [I, I, 8, 9, I],
        [11, 12, 13, I, I],
        [I, I, 8, 9, I],
        [I, I, 10, I, I],
        [14, 15, I, I, I],
        [I, I, 10, I, I],
    ]
    assert batch.attention_mask.sum(1).tolist() == [5, 4, 5, 4, 3, 4]
    assert batch.index.tolist() == [0, 1, 0]
    assert batch.weight.tolist() == [1.0, 1.0, 0.0]
    assert batch.num_tokens == (3 * 2 + 2 + 1) + (1 * 2 + 3 + 2)


def test_order_is_a_function_of_seed_and_epoch():
    assert batches.epoch_order(10, 3, 1) == batches.epoch_order(10, 3, 1)
    assert sorted(batches.epoch_order(10, 3, 1)) == list(range(10))
    assert batches.epoch_order(10, 3, 1) != batches.epoch_order(10, 3, 2)
    assert batches.epoch_order(10, 3, 1) != batches.epoch_order(10, 4, 1)


@pytest.mark.parametrize("world,micro", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_every_world_size_scores_the_same_pairs_per_step(world, micro):
    order = batches.epoch_order(21, 0, 1)
    steps = batches.steps_per_epoch(21, 8)
    assert steps == 3
    seen = []
    for s in range(steps):
        slots = batches.step_slots(order, s, 8)
        assert len(slots) == 8
        per_rank = [batches.rank_micro_batches(slots, r, world, micro) for r in range(world)]
        # all ranks run the same number of passes (collectives stay matched)
        assert len({len(m) for m in per_rank}) == 1
        flat = [i for m in per_rank for chunk in m for i in chunk]
        assert flat == slots
        seen += [i for i in flat if i >= 0]
    assert sorted(seen) == list(range(21))
    assert batches.step_slots(order, 2, 8)[-3:] == [-1, -1, -1]


def test_batch_moves_to_device():
    import numpy as np

    p = batches.Pair(0, "0", 0, np.array([1]), np.array([2]), np.array([3]))
    batch = batches.collate([p], p, 0).to(torch.device("cpu"))
    assert batch.input_ids.dtype == torch.long
