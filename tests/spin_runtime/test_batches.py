"""Pairs, their order and their collation: prompt masking, length rules, world-size invariance."""

from __future__ import annotations

import pytest
import torch

from spin_runtime import formatting
from spin_runtime.train import batches
from tests.spin_runtime.test_train_support import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


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
        (0, "0"),
        (0, "1"),
        (0, "3"),
        (1, "0"),
        (1, "1"),
    ]
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


def _pair(i, prompt, real, gen):
    import numpy as np

    return batches.Pair(i, str(i), 0, np.array(prompt), np.array(real), np.array(gen))


def _scored_table(batch):
    """{sequence: [(row, column, target), ...]} of a batch."""
    width = batch.input_ids.shape[1]
    table: dict[int, list] = {}
    s = batch.scored
    for pos, tgt, seg in zip(
        s.positions.tolist(), s.targets.tolist(), s.segments.tolist(), strict=True
    ):
        table.setdefault(seg, []).append((pos // width, pos % width, tgt))
    return table


def test_collate_separate_rows_masks_prompts_and_stacks_real_then_generated():
    a = _pair(0, [5, 6, 7], [8, 9], [10])
    b = _pair(1, [5], [11, 12, 13], [14, 15])
    batch = batches.collate([a, b, None], filler=a, pad_id=0)
    assert batch.input_ids.tolist() == [
        [5, 6, 7, 8, 9],
        [5, 11, 12, 13, 0],
        [5, 6, 7, 8, 9],  # filler for the padding slot
        [5, 6, 7, 10, 0],
        [5, 14, 15, 0, 0],
        [5, 6, 7, 10, 0],
    ]
    assert batch.position_ids is None
    assert batch.attention_mask.sum(1).tolist() == [5, 4, 5, 4, 3, 4]
    # position j predicts token j + 1; real sequences are 0..B-1, generated B..2B-1
    assert _scored_table(batch) == {
        0: [(0, 2, 8), (0, 3, 9)],
        1: [(1, 0, 11), (1, 1, 12), (1, 2, 13)],
        2: [(2, 2, 8), (2, 3, 9)],
        3: [(3, 2, 10)],
        4: [(4, 0, 14), (4, 1, 15)],
        5: [(5, 2, 10)],
    }
    assert batch.scored.num_sequences == 6
    assert batch.index.tolist() == [0, 1, 0]
    assert batch.weight.tolist() == [1.0, 1.0, 0.0]
    assert batch.num_tokens == (3 * 2 + 2 + 1) + (1 * 2 + 3 + 2)


def test_collate_shared_prompt_layout():
    a = _pair(0, [5, 6], [8, 9], [10, 11])
    b = _pair(1, [5], [12], [13])
    batch = batches.collate([a, b], filler=a, pad_id=0, shared_prompt=True)
    assert batch.input_ids.tolist() == [[5, 6, 8, 9, 10, 11], [5, 12, 13, 0, 0, 0]]
    # the generated answer continues the prompt: positions restart after it
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3], [0, 1, 1, 0, 0, 0]]
    mask = batch.attention_mask[:, 0].int().tolist()
    assert mask[0] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # generated tokens see the prompt, not the real answer
        [1, 1, 0, 0, 1, 1],
    ]
    assert mask[1] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # padding sees itself (never an all-masked softmax row) ...
        [1, 1, 1, 0, 1, 0],
        [1, 1, 1, 0, 0, 1],  # ... and nothing attends to padding
    ]
    assert _scored_table(batch) == {
        0: [(0, 1, 8), (0, 2, 9)],
        1: [(1, 0, 12)],
        2: [(0, 1, 10), (0, 4, 11)],  # the prompt's last position predicts both first tokens
        3: [(1, 0, 13)],
    }


def test_both_layouts_give_the_same_log_probs_and_gradients(tokenizer):
    from spin_runtime import tiny
    from spin_runtime.train.policy import SequenceLogProbs, score, supports_shared_prompt

    model = tiny.make_model(tokenizer, "unit", seed=1).train()
    assert supports_shared_prompt(model)
    policy = SequenceLogProbs(model)
    records = [_record(i, gen="red " * (i % 5)) for i in range(5)]
    pairs = batches.build_pairs([records], ["cur"], tokenizer, 64, 32).train
    results = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        out = score(policy, batches.collate(pairs, pairs[0], 0, shared_prompt=shared))
        (out * torch.linspace(-1, 1, len(out))).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=2e-5)
    for g0, g1 in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-5)


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
    p = _pair(0, [1], [2], [3])
    for shared in (False, True):
        batch = batches.collate([p], p, 0, shared_prompt=shared).to(torch.device("cpu"))
        assert batch.input_ids.dtype == torch.long
        assert batch.scored.num_sequences == 2


# ---------------------------------------------------------------------------------------------
# generated answers: sampled ids, truncation, identical pairs (issue 16)


def test_generated_token_ids_are_scored_as_sampled(tokenizer):
    """Ids that decode to the same text as a canonical encoding (here: a merged word spelled
    letter by letter, as a sampling model may produce it) are scored as sampled, not
    re-tokenized."""
    eos = tokenizer.eos_token_id
    canonical = formatting.response_ids(tokenizer, "reverse")
    sampled = [tokenizer.convert_tokens_to_ids(c) for c in "reverse"] + [eos]
    assert len(canonical) < len(sampled)  # "reverse" is a merge in the tiny vocabulary
    assert tokenizer.decode(sampled, skip_special_tokens=True) == "reverse"
    record = {**_record(1), "generated_token_ids": sampled, "finish_reason": "stop"}
    pairs = batches.build_pairs([[record]], ["cur"], tokenizer, 64, 32)
    assert pairs.train[0].gen.tolist() == sampled
    assert pairs.retokenized_generations == 0


def test_truncated_generations_have_no_eos_or_are_dropped(tokenizer):
    eos = tokenizer.eos_token_id
    cut = formatting.response_ids(tokenizer, "x y")[:-1]
    records = [
        {**_record(0), "generated_token_ids": cut, "finish_reason": "length"},
        {**_record(1), "finish_reason": "length"},  # an old record: text only
        {**_record(2), "generated_token_ids": [*cut, eos], "finish_reason": "stop"},
    ]
    kept = batches.build_pairs([records], ["cur"], tokenizer, 64, 32)
    assert [p.gen.tolist() for p in kept.train] == [cut, cut, [*cut, eos]]
    assert kept.truncated_generations == 2 and kept.dropped_pairs == 0
    assert kept.retokenized_generations == 1
    dropped = batches.build_pairs([records], ["cur"], tokenizer, 64, 32, truncated_answers="drop")
    assert [p.id for p in dropped.train] == ["2"] and dropped.dropped_pairs == 2
    with pytest.raises(batches.DataError, match="--truncated-answers"):
        batches.build_pairs([records], ["cur"], tokenizer, 64, 32, truncated_answers="maybe")


def test_identical_pairs_are_counted_and_dropped_unless_kept(tokenizer):
    same = {**_record(1), "generated": "2"}  # the real answer of _record(1), token for token
    records = [_record(0), same, {**_record(3, "eval"), "generated": "4"}]
    dropped = batches.build_pairs([records], ["cur"], tokenizer, 64, 32)
    assert [p.id for p in dropped.all] == ["0"]
    assert dropped.identical_pairs == 2 and dropped.dropped_pairs == 2
    kept = batches.build_pairs([records], ["cur"], tokenizer, 64, 32, drop_identical=False)
    assert [p.id for p in kept.all] == ["0", "1", "3"] and kept.identical_pairs == 2
    with pytest.raises(batches.DataError, match=r"1 dropped: 1 identical.*--drop-identical-pairs"):
        batches.build_pairs([[same]], ["cur"], tokenizer, 64, 32)


@pytest.mark.parametrize("bad", ["1 2", [1, "2"], [-1], [1.5]])
def test_bad_generated_token_ids_name_the_record(tokenizer, bad):
    record = {**_record(7), "generated_token_ids": bad}
    with pytest.raises(batches.DataError, match=r"record 7.*generated_token_ids"):
        batches.build_pairs([[record]], ["cur"], tokenizer, 64, 32)
