"""What one optimizer step needs, shared by the SPIN loop (loop.py) and the control arm's SFT
step (control.py): the forward-pass bundle (`Runner`), the gradient clip and the guarded update.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from spin_runtime.train import batches, distributed
from spin_runtime.train.batches import Pair
from spin_runtime.train.distributed import Context
from spin_runtime.train.policy import score as policy_score


class TrainingError(RuntimeError):
    """Training itself went wrong (non-finite loss or gradient): exit 1, nothing published."""


@dataclass
class Runner:
    """Everything a forward pass needs, bundled so the loop reads top to bottom."""

    ctx: Context
    module: nn.Module  # the wrapped SequenceLogProbs
    strategy: str
    autocast: bool
    pad_id: int
    filler: Pair
    shared_prompt: bool

    def amp(self) -> contextlib.AbstractContextManager[Any]:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16)

    def logps(self, pairs: Sequence[Pair | None]) -> tuple[torch.Tensor, batches.Batch]:
        """(2B,) answer log-prob sums: the B real answers, then the B generated ones."""
        batch = batches.collate(pairs, self.filler, self.pad_id, self.shared_prompt)
        batch = batch.to(self.ctx.device)
        with self.amp():
            out = policy_score(self.module, batch)
        return out, batch

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.strategy == "ddp" and not sync:
            return self.module.no_sync()  # type: ignore[operator,no-any-return]
        if self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(sync)  # type: ignore[operator]
        return contextlib.nullcontext()

    @torch.no_grad()
    def score(self, pairs: Sequence[Pair], batch_size: int) -> torch.Tensor:
        """(len(pairs), 2) log-prob sums of (real, generated) under the current weights; each
        rank scores every world-th pair, then all ranks exchange their rows."""
        ctx = self.ctx
        per_rank = -(-len(pairs) // ctx.world)
        mine = [i * ctx.world + ctx.rank for i in range(per_rank)]
        local = torch.zeros(per_rank, 2, dtype=torch.float32, device=ctx.device)
        self.module.eval()
        for start in range(0, per_rank, batch_size):
            chunk = mine[start : start + batch_size]
            chosen = [pairs[i] if i < len(pairs) else None for i in chunk]
            out, _ = self.logps(chosen)
            b = len(chunk)
            local[start : start + b, 0] = out[:b]
            local[start : start + b, 1] = out[b:]
        self.module.train()
        table = torch.zeros(per_rank * ctx.world, 2, dtype=torch.float32, device=ctx.device)
        for rank, rows in enumerate(distributed.all_gather_rows(ctx, local)):
            table[rank :: ctx.world] = rows
        return table[: len(pairs)]


def apply_update(
    optimizer: torch.optim.Optimizer, scheduler: Any, loss: float, grad_norm: float, knobs: str
) -> float:
    """Step the optimizer and the schedule once the loss and gradient norm are finite (else
    TrainingError naming ``knobs`` to lower, before any weight changes); the step's learning rate."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingError(
            f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at optimizer "
            f"step {scheduler.last_epoch + 1} (loss {loss}, grad norm {grad_norm}): lower "
            f"{knobs}, or check the data; nothing was saved for this step"
        )
    lr = float(optimizer.param_groups[0]["lr"])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def clip_grad(module: nn.Module, max_norm: float) -> float:
    """Global gradient norm (before clipping); clips when ``max_norm`` > 0."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
