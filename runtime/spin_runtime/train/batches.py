"""Training pairs: records -> token ids -> padded micro-batches, in a seed-determined order.

A pair is (prompt, real answer, generated answer). Each ``--data`` directory contributes one
pair per training prompt (the current iteration's answers first, then previous iterations'),
so with one previous iteration mixed in, a prompt yields two pairs with the same real answer.
The held-out pairs (records with ``split == "eval"``) come from the first directory only: they
measure the policy against the opponent it is being trained to beat.

Prompts and real answers are tokenized by :mod:`spin_runtime.formatting`, the same code
generation used. The generated answer is scored as the token ids θt sampled
(``generated_token_ids`` of the record, its stop token included), never re-tokenized from its
decoded text: decoding and re-encoding changes ~10 % of a byte-level BPE model's answers (split
multi-byte characters, non-canonical merges). So ``prompt + generated`` is exactly the
sequence θt produced — and an answer cut by its token budget (``finish_reason: length``) has no
EOS, because θt produced none. Records written before the ids were recorded are re-tokenized
(counted, with a warning).

Length rules (documented in docs/runtime.md):
- a pair whose formatted prompt is longer than ``max_prompt_length`` is skipped and counted
  (cutting a prompt would train on a question nobody asked);
- answers longer than ``max_length - len(prompt)`` are cut at the end and counted;
- pairs whose generated answer was truncated are kept (no EOS) or dropped
  (``truncated_answers``), and pairs whose generated answer is token for token the real one are
  counted and, with ``drop_identical``, dropped: their margin is 0 at every step, so they add
  no gradient but dilute the step mean and count as wrong in the accuracy.

One forward pass scores both answers of a micro-batch of B pairs: either one row per pair
(prompt, real answer, generated answer, the prompt computed once) or 2B rows; see
:func:`collate`. Either way the scored sequences are the B real ones, then the B generated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from spin_common.train_config import TRUNCATED_ANSWERS
from spin_runtime import formatting
from spin_runtime.train.loss import Scored

log = logging.getLogger(__name__)


#: What to do with pairs whose generated answer hit its token budget (finish_reason length).


class DataError(ValueError):
    """The training data cannot be used; the message names the input."""


@dataclass(frozen=True)
class Pair:
    """One training or held-out pair; ``index`` is its row in the reference log-prob table."""

    index: int
    id: str
    source: int  # position of its --data directory (0 = current iteration)
    prompt: np.ndarray
    real: np.ndarray
    gen: np.ndarray

    @property
    def num_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.real) + len(self.gen)


@dataclass
class PairSet:
    """All pairs of one training step, train first: ``pairs[i].index == i``."""

    train: list[Pair]
    eval: list[Pair]
    skipped_long_prompts: int = 0
    truncated_answers: int = 0
    per_source: list[int] = field(default_factory=list)
    truncated_generations: int = 0  # finish_reason length (kept without EOS, or dropped)
    identical_pairs: int = 0  # generated ids == real ids
    dropped_pairs: int = 0  # truncated or identical pairs left out by the settings
    retokenized_generations: int = 0  # old records without generated_token_ids

    @property
    def all(self) -> list[Pair]:
        return self.train + self.eval

    def fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on (ids, sources and lengths)."""
        import hashlib

        digest = hashlib.sha256()
        for p in self.all:
            digest.update(f"{p.id}|{p.source}|{len(p.prompt)}|{len(p.real)}|{len(p.gen)};".encode())
            digest.update(p.prompt.tobytes() + p.real.tobytes() + p.gen.tobytes())
        return digest.hexdigest()


def _ids(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: record {record.get('id')!r} has no string field {key!r}")
    return value


def generated_ids(record: dict[str, Any], tokenizer: Any, where: str) -> tuple[np.ndarray, bool]:
    """The generated answer as θt sampled it, and whether it had to be re-tokenized (a record
    without ``generated_token_ids``: its text + EOS unless it was truncated)."""
    ids = record.get("generated_token_ids")
    if ids is None:
        text = _text(record, "generated", where)
        tokens = formatting.response_ids(tokenizer, text)
        if record.get("finish_reason") == "length":
            tokens = tokens[:-1]  # θt produced no EOS
        return _ids(tokens), True
    if not isinstance(ids, list) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise DataError(
            f"{where}: record {record.get('id')!r}: generated_token_ids must be a list of "
            "non-negative token ids"
        )
    return _ids(ids), False


def build_pairs(
    record_sets: Sequence[Sequence[dict[str, Any]]],
    names: Sequence[str],
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int,
    truncated_answers: str = "keep",
    drop_identical: bool = True,
) -> PairSet:
    """Tokenize the records of each ``--data`` directory (``names`` for messages) into pairs."""
    if max_prompt_length >= max_length:
        raise DataError(
            f"--max-prompt-length ({max_prompt_length}) must be below --max-length ({max_length})"
        )
    if truncated_answers not in TRUNCATED_ANSWERS:
        raise DataError(f"--truncated-answers {truncated_answers}: one of {TRUNCATED_ANSWERS}")
    prompt_cache: dict[tuple[str, str], np.ndarray] = {}
    train: list[tuple[str, Pair]] = []
    held_out: list[tuple[str, Pair]] = []
    skipped = truncated = 0
    counts = {"truncated": 0, "identical": 0, "dropped": 0, "retokenized": 0}
    per_source: list[int] = []
    for source, (records, name) in enumerate(zip(record_sets, names, strict=True)):
        if not records:
            raise DataError(f"--data {name}: no generated records")
        count = 0
        for record in records:
            split = record.get("split", "train")
            if split not in ("train", "eval"):
                raise DataError(f"--data {name}: record {record.get('id')!r} has split {split!r}")
            if split == "eval" and source > 0:
                continue
            system = record.get("system") or ""
            prompt = _text(record, "prompt", f"--data {name}")
            key = (system, prompt)
            if key not in prompt_cache:
                prompt_cache[key] = _ids(formatting.prompt_ids(tokenizer, system or None, prompt))
            prompt_ids = prompt_cache[key]
            if len(prompt_ids) == 0:
                raise DataError(f"--data {name}: record {record.get('id')!r} formats to no tokens")
            if len(prompt_ids) > max_prompt_length:
                skipped += 1
                continue
            real = _ids(formatting.response_ids(tokenizer, _text(record, "real", f"--data {name}")))
            gen, retokenized = generated_ids(record, tokenizer, f"--data {name}")
            counts["retokenized"] += retokenized
            cut = record.get("finish_reason") == "length"
            same = np.array_equal(real, gen)
            counts["truncated"] += cut
            counts["identical"] += same
            if (cut and truncated_answers == "drop") or (same and drop_identical):
                counts["dropped"] += 1
                continue
            budget = max_length - len(prompt_ids)
            answers = []
            for ids in (real, gen):
                if len(ids) > budget:
                    truncated += 1
                    ids = ids[:budget]
                answers.append(ids)
            pair = Pair(-1, str(record.get("id")), source, prompt_ids, answers[0], answers[1])
            (held_out if split == "eval" else train).append((str(record.get("id")), pair))
            count += 1
        per_source.append(count)
    if counts["retokenized"]:
        log.warning(
            "%d generated answers have no generated_token_ids (records of an older generate): "
            "re-tokenized from their text, which may differ from what θt sampled",
            counts["retokenized"],
        )
    if counts["identical"] or counts["truncated"]:
        log.info(
            "%d pairs with a generated answer identical to the real one, %d truncated "
            "generations; %d pairs dropped (--drop-identical-pairs %s, --truncated-answers %s)",
            counts["identical"],
            counts["truncated"],
            counts["dropped"],
            drop_identical,
            truncated_answers,
        )
    if skipped:
        log.warning(
            "skipped %d pairs whose prompt is longer than --max-prompt-length %d",
            skipped,
            max_prompt_length,
        )
    if truncated:
        log.info("cut %d answers to fit --max-length %d", truncated, max_length)
    if not train:
        why = [f"{skipped} skipped: prompt longer than --max-prompt-length"] if skipped else []
        if counts["dropped"]:
            why.append(
                f"{counts['dropped']} dropped: {counts['identical']} identical to the real "
                f"answer (--drop-identical-pairs), {counts['truncated']} truncated "
                f"(--truncated-answers {truncated_answers})"
            )
        raise DataError(
            f"no training pairs in --data {', '.join(names)}"
            + (f" ({'; '.join(why)})" if why else "")
        )

    def ordered(items: list[tuple[str, Pair]], offset: int) -> list[Pair]:
        # deterministic whatever order the shards were read in: by source, then by id
        items.sort(key=lambda kv: (kv[1].source, _id_key(kv[0])))
        return [_with_index(p, offset + i) for i, (_, p) in enumerate(items)]

    train_pairs = ordered(train, 0)
    return PairSet(
        train_pairs,
        ordered(held_out, len(train_pairs)),
        skipped,
        truncated,
        per_source,
        truncated_generations=counts["truncated"],
        identical_pairs=counts["identical"],
        dropped_pairs=counts["dropped"],
        retokenized_generations=counts["retokenized"],
    )


def _id_key(value: str) -> tuple[int, int, str]:
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


def _with_index(pair: Pair, index: int) -> Pair:
    return Pair(index, pair.id, pair.source, pair.prompt, pair.real, pair.gen)


# ---------------------------------------------------------------------------------------------
# order: which pairs each rank scores at each step


def epoch_order(num_pairs: int, seed: int, epoch: int) -> list[int]:
    """The permutation of training pairs for ``epoch``: a function of (seed, epoch) only, so
    every rank, every world size and a resumed run agree on it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_pairs, generator=generator).tolist()


def steps_per_epoch(num_pairs: int, global_batch: int) -> int:
    return -(-num_pairs // global_batch)


def step_slots(order: list[int], step: int, global_batch: int) -> list[int]:
    """The ``global_batch`` slots of optimizer step ``step`` of an epoch; -1 pads the last step
    (padding slots are scored with weight 0, so every rank runs the same number of passes)."""
    slots = order[step * global_batch : (step + 1) * global_batch]
    return slots + [-1] * (global_batch - len(slots))


def rank_micro_batches(
    slots: list[int], rank: int, world: int, micro_batch: int
) -> list[list[int]]:
    """This rank's contiguous share of a step's slots, cut into micro-batches."""
    per_rank = len(slots) // world
    mine = slots[rank * per_rank : (rank + 1) * per_rank]
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]


# ---------------------------------------------------------------------------------------------
# collation


@dataclass
class Batch:
    """A micro-batch of B pairs in one of two layouts (see :func:`collate`)."""

    input_ids: torch.Tensor  # (rows, T) long
    attention_mask: torch.Tensor  # (rows, T) long, or (rows, 1, T, T) bool with a shared prompt
    position_ids: torch.Tensor | None  # (rows, T) long with a shared prompt, else None
    scored: Scored  # which position scores which answer token; sequences: B real, then B gen
    index: torch.Tensor  # (B,) long: pair index (reference table row)
    weight: torch.Tensor  # (B,) float: 1 for a pair, 0 for a padding slot
    num_tokens: int  # tokens of the 2B scored sequences (prompt counted twice), real pairs only

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        scored = Scored(
            move(self.scored.positions),
            move(self.scored.targets),
            move(self.scored.segments),
            self.scored.num_sequences,
        )
        return Batch(
            move(self.input_ids),
            move(self.attention_mask),
            None if self.position_ids is None else move(self.position_ids),
            scored,
            move(self.index),
            move(self.weight),
            self.num_tokens,
        )


def collate(
    pairs: Sequence[Pair | None], filler: Pair, pad_id: int, shared_prompt: bool = False
) -> Batch:
    """Pad a micro-batch; ``None`` (a padding slot) is scored as ``filler`` with weight 0.

    Two layouts, the same log-probs:

    * separate rows (default): 2B right-padded rows, ``prompt + real`` for each pair, then
      ``prompt + generated``;
    * ``shared_prompt``: one row per pair, ``prompt + real + generated``, with positions of the
      generated answer restarting after the prompt and an attention mask that hides the real
      answer from the generated one. Each prompt then goes through the model once instead of
      twice (with 150-token prompts and 250-token answers, a fifth fewer tokens).
    """
    chosen = [p if p is not None else filler for p in pairs]
    b = len(chosen)
    weight = torch.tensor([0.0 if p is None else 1.0 for p in pairs], dtype=torch.float32)
    index = torch.tensor([p.index for p in chosen], dtype=torch.long)
    num_tokens = int(sum(p.num_tokens for p in pairs if p is not None))
    positions: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    segments: list[np.ndarray] = []

    def score(flat_start: int, tokens: np.ndarray, segment: int) -> None:
        positions.append(np.arange(flat_start, flat_start + len(tokens)))
        targets.append(tokens)
        segments.append(np.full(len(tokens), segment))

    if not shared_prompt:
        rows = [(p.prompt, p.real) for p in chosen] + [(p.prompt, p.gen) for p in chosen]
        width = max(len(a) + len(r) for a, r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, (prompt, answer) in enumerate(rows):
            n_p, n = len(prompt), len(prompt) + len(answer)
            ids[r, :n_p], ids[r, n_p:n], mask[r, :n] = prompt, answer, 1
            # position j predicts token j + 1: the answer is predicted from n_p - 1 .. n - 2
            score(r * width + n_p - 1, answer, r)
        attention: torch.Tensor = torch.from_numpy(mask)
        position_ids = None
    else:
        width = max(len(p.prompt) + len(p.real) + len(p.gen) for p in chosen)
        ids = np.full((b, width), pad_id, dtype=np.int64)
        pos = np.zeros((b, width), dtype=np.int64)
        part = np.full((b, width), 3, dtype=np.int64)  # 0 prompt, 1 real, 2 generated, 3 pad
        for r, p in enumerate(chosen):
            n_p, n_r, n_g = len(p.prompt), len(p.real), len(p.gen)
            end = n_p + n_r + n_g
            ids[r, :end] = np.concatenate([p.prompt, p.real, p.gen])
            pos[r, :end] = np.concatenate([np.arange(n_p + n_r), np.arange(n_p, n_p + n_g)])
            part[r, :n_p], part[r, n_p : n_p + n_r], part[r, n_p + n_r : end] = 0, 1, 2
            score(r * width + n_p - 1, p.real, r)
            score(r * width + n_p - 1, p.gen[:1], b + r)  # the prompt's end predicts both
            score(r * width + n_p + n_r, p.gen[1:], b + r)
        seg = torch.from_numpy(part)
        query, key = seg[:, :, None], seg[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        attention = causal & ~((query == 2) & (key == 1)) & (key != 3)
        # nothing attends to padding; padding also attends to itself, so no row is fully
        # masked (its softmax would be NaN, and NaN times a zero weight is still NaN)
        attention |= torch.eye(width, dtype=torch.bool) & (query == 3)
        attention = attention[:, None]
        position_ids = torch.from_numpy(pos)
    scored = Scored(
        torch.from_numpy(np.concatenate(positions)).long(),
        torch.from_numpy(np.concatenate(targets)).long(),
        torch.from_numpy(np.concatenate(segments)).long(),
        2 * b,
    )
    return Batch(torch.from_numpy(ids), attention, position_ids, scored, index, weight, num_tokens)
