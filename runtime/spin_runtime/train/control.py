"""The control arm's objective: plain SFT inside the SPIN trainer (``train --objective sft``).

Same ``--data``, same pairs, same seed-determined order, same global batch and epochs as the
SPIN step of the iteration, hence the same number of optimizer steps on the same prompts: the
only difference is the loss, token-mean cross-entropy on the real answers (the generated
answers are ignored and no reference pass is made). DDP, FSDP2, resume and LoRA are the
trainer's own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from spin_common.train_config import TrainConfig
from spin_runtime.train import batches, distributed
from spin_runtime.train.batches import Pair, PairSet
from spin_runtime.train.step import Runner, apply_update, clip_grad


def answer_tokens(pairs: Sequence[Pair], slots: Sequence[int]) -> int:
    """Real-answer tokens of a step's slots (every rank computes the same number)."""
    return sum(len(pairs[i].real) for i in slots if i >= 0)


def sft_step(
    runner: Runner,
    cfg: TrainConfig,
    pairs: PairSet,
    order: list[int],
    s: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, float]:
    """One optimizer step: mean cross-entropy over every real-answer token of the step's pairs."""
    ctx = runner.ctx
    t0 = time.perf_counter()
    slots = batches.step_slots(order, s, cfg.global_batch_size)
    n_tokens = answer_tokens(pairs.train, slots)
    micro = batches.rank_micro_batches(slots, ctx.rank, ctx.world, cfg.micro_batch_size)
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # nll_sum, tokens scored
    # token mean over the whole step, whatever the split: DDP/FSDP average gradients over ranks
    scale = ctx.world / max(1, n_tokens)
    for k, chunk in enumerate(micro):
        chosen = [pairs.train[i] if i >= 0 else None for i in chunk]
        with runner.no_sync(k == len(micro) - 1):
            out, batch = runner.logps(chosen)
            nll = -(out[: len(chunk)] * batch.weight).sum()
            (nll * scale).backward()
        sums += torch.stack(
            [
                nll.detach().double(),
                torch.tensor(float(batch.num_tokens), dtype=torch.float64, device=ctx.device),
            ]
        )
    distributed.all_reduce_sum(ctx, sums)
    grad_norm = clip_grad(runner.module, cfg.max_grad_norm)
    loss = float(sums[0]) / max(1, n_tokens)
    lr = apply_update(optimizer, scheduler, loss, grad_norm, "--learning-rate")
    elapsed = time.perf_counter() - t0
    return {
        "loss": loss,
        "answer_tokens": float(n_tokens),
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": float(sums[1]) / elapsed,
        "step_s": elapsed,
    }


def held_out(
    policy: torch.Tensor, pairs: Sequence[Pair], prefix: str = "eval_"
) -> dict[str, float]:
    """Held-out token-mean cross-entropy of the real answers (``policy``: (P, 2) log-prob sums)."""
    tokens = sum(len(p.real) for p in pairs)
    return {
        f"{prefix}loss": -policy[:, 0].sum().item() / max(1, tokens),
        f"{prefix}logp_real": policy[:, 0].mean().item(),
    }
