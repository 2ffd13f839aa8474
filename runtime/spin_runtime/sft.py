"""Brief supervised fine-tuning (SFT) of a small causal LM: the demo's weak starting model θ0.

SPIN starts from an SFT checkpoint. The demo has no hub to download one from, so it trains a
tiny model from scratch on the task's training split for a fixed, small number of steps: long
enough to learn the format and part of the task, short enough to leave room for SPIN (a model
trained to a plateau gains nothing from it — see the field notes).

Sequences are built by :mod:`spin_runtime.formatting`, exactly as generation and the SPIN
trainer build them, so θ0 learns the very tokens it will later be asked to produce. The loss is
plain cross-entropy on the answer tokens (prompt positions masked). CPU only; no distribution.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spin_runtime import formatting

if TYPE_CHECKING:
    from spin_common.data import Example

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class SFTConfig:
    """Optimizer and schedule. Defaults are what the demo measured (docs/quickstart.md)."""

    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    max_length: int = 96
    seed: int = 0


def quiet_progress_bars() -> None:
    """Silence transformers' progress bars ("Writing model shards"): noise for a 2 MB model."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def encode(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example: prompt then answer (+ EOS), prompt masked."""
    prompt = formatting.prompt_ids(tokenizer, example.system, example.prompt)
    answer = formatting.response_ids(tokenizer, example.response)
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return ids, labels


def _batch(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(rows):  # right padding: positions stay 0..n-1
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, cfg: SFTConfig) -> float:
    """Linear warmup, then cosine decay to 10% (a short run should end calm, not abruptly)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_sft(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    cfg: SFTConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``model`` in place for ``cfg.steps`` steps on ``examples``; returns the losses.

    Batches cycle through seed-shuffled epochs, so the result depends only on the inputs.
    ``on_step(step, loss)`` (1-based) lets a caller show progress. The model ends in eval mode.
    """
    import torch

    cfg = cfg or SFTConfig()
    if not examples:
        raise ValueError("SFT needs at least one example")
    encoded = [encode(tokenizer, e, cfg.max_length) for e in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    model.train()
    order: list[int] = []
    losses: list[float] = []
    for step in range(1, cfg.steps + 1):
        if len(order) < cfg.batch_size:
            fresh = list(range(len(encoded)))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[: cfg.batch_size], order[cfg.batch_size :]
        batch = _batch([encoded[i] for i in picked], pad_id)
        loss = model(**batch, use_cache=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    log.info("SFT: %d steps, loss %.3f -> %.3f", cfg.steps, losses[0], losses[-1])
    return losses
