"""The SPIN loss and the response log-probabilities it is built from.

SPIN (arXiv 2401.01335) trains θt+1 to prefer the human answer over θt's own answer, with θt as
the reference:

    loss = -logsigmoid(beta * ((logp_real - ref_real) - (logp_gen - ref_gen)))

where each ``logp`` is the sum over the response's tokens (the prompt is masked) of the policy's
log-probabilities, computed in fp32. It is TRL's DPO sigmoid loss with chosen = real and
rejected = generated.

The log-probabilities are the expensive part: a naive ``logits.float().log_softmax(-1)`` builds
an fp32 tensor of (sequences x tokens x vocab) — prompt and padding positions included — and
autograd keeps it for the backward. :class:`TokenLogProbs` instead takes only the hidden states
of the positions that predict a response token, projects them through the output embedding in
chunks, and keeps just one float per token (its log-sum-exp); the backward recomputes each
chunk's logits. Peak extra memory is one chunk of fp32 logits, whatever the sequence length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Label value of positions that predict no response token (prompt, padding, last position).
IGNORE = -100

#: fp32 logits kept at once by the chunked projection: chunk tokens = this // vocab size.
CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32


def _chunk_tokens(vocab: int, chunk_tokens: int | None) -> int:
    return max(1, chunk_tokens if chunk_tokens else CHUNK_ELEMENTS // max(1, vocab))


class TokenLogProbs(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T)[i, targets[i]]`` in fp32, one chunk of logits at a time.

    ``hidden`` (N, H) and ``weight`` (V, H) share a compute dtype (bf16 or fp32): the projection
    runs in it, as the model's own ``lm_head`` would, and everything after it in fp32. When the
    logits of all N tokens fit in one chunk they are kept for the backward instead of being
    recomputed (the common small-batch case costs no extra matmul).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        kept: torch.Tensor | None = None
        for start in range(0, n, chunk_tokens):
            end = min(n, start + chunk_tokens)
            logits = (hidden[start:end] @ weight.T).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            out[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse[start:end]
            if n <= chunk_tokens:
                kept = logits
        ctx.chunk_tokens = chunk_tokens  # type: ignore[attr-defined]
        ctx.has_kept = kept is not None  # type: ignore[attr-defined]
        if kept is None:
            ctx.save_for_backward(hidden, weight, targets, lse)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse, kept)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        hidden, weight, targets, lse = saved[:4]
        chunk_tokens: int = ctx.chunk_tokens  # type: ignore[attr-defined]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_out = grad_out.float()
        n = hidden.shape[0]
        for start in range(0, n, chunk_tokens):
            end = min(n, start + chunk_tokens)
            h = hidden[start:end]
            logits = saved[4] if ctx.has_kept else (h @ weight.T).float()  # type: ignore[attr-defined]
            g_out = grad_out[start:end, None]
            # d/dlogits of (logit[target] - lse) is onehot(target) - softmax(logits)
            g = torch.exp(logits - lse[start:end, None]).mul_(-g_out)
            g.scatter_add_(1, targets[start:end, None], g_out)
            g = g.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:end] = g @ weight
            if grad_w is not None:
                grad_w += (g.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """fp32 log-probabilities of ``targets`` (N,) under ``hidden`` (N, H) @ ``weight`` (V, H).T.

    Under autocast the projection runs in the autocast dtype, as the model's own head would.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    chunk = _chunk_tokens(weight.shape[0], chunk_tokens)
    out: torch.Tensor = TokenLogProbs.apply(hidden, weight, targets, chunk)
    return out


@dataclass(frozen=True)
class Scored:
    """Which hidden states score which tokens of which sequence.

    ``positions[i]`` is the flat index (row * T + column) of the hidden state that predicts
    token ``targets[i]`` of sequence ``segments[i]``. A position may predict several tokens
    (with a shared prompt, its last position predicts the first token of both answers).
    """

    positions: torch.Tensor  # (N,) long
    targets: torch.Tensor  # (N,) long
    segments: torch.Tensor  # (N,) long, in [0, num_sequences)
    num_sequences: int


def sequence_logps_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, scored: Scored, chunk_tokens: int | None = None
) -> torch.Tensor:
    """(num_sequences,) fp32 sums of response log-probs from the last hidden states (R, T, H):
    only the scored positions are projected onto the vocabulary."""
    selected = hidden.flatten(0, 1).index_select(0, scored.positions)
    logps = token_logps(selected, weight, scored.targets, chunk_tokens)
    sums = torch.zeros(scored.num_sequences, dtype=torch.float32, device=hidden.device)
    return sums.index_add(0, scored.segments, logps)


def sequence_logps_from_logits(logits: torch.Tensor, scored: Scored) -> torch.Tensor:
    """The same sums from full logits (R, T, V): the path for heads that are not a plain
    projection (logit soft-capping, scaling). Only scored positions are upcast."""
    selected = logits.flatten(0, 1).index_select(0, scored.positions).float()
    picked = selected.gather(1, scored.targets[:, None]).squeeze(1)
    logps = picked - torch.logsumexp(selected, -1)
    sums = torch.zeros(scored.num_sequences, dtype=torch.float32, device=logits.device)
    return sums.index_add(0, scored.segments, logps)


def scored_from_labels(labels: torch.Tensor) -> Scored:
    """:class:`Scored` for one sequence per row, ``labels[r, j]`` = the token position j
    predicts, or :data:`IGNORE`."""
    mask = labels != IGNORE
    flat = mask.flatten().nonzero(as_tuple=True)[0]
    return Scored(flat, labels.flatten()[flat], flat // labels.shape[1], labels.shape[0])


@dataclass
class PairStats:
    """Per-pair SPIN quantities; everything but ``losses`` is detached."""

    losses: torch.Tensor  # (P,) -logsigmoid(beta * margin)
    rewards_real: torch.Tensor  # beta * (logp_real - ref_real)
    rewards_gen: torch.Tensor  # beta * (logp_gen - ref_gen)

    @property
    def margins(self) -> torch.Tensor:
        return self.rewards_real - self.rewards_gen

    @property
    def correct(self) -> torch.Tensor:
        """1.0 where the real answer beats the generated one (reward strictly larger)."""
        return (self.rewards_real > self.rewards_gen).float()


def spin_loss(
    logp_real: torch.Tensor,
    logp_gen: torch.Tensor,
    ref_real: torch.Tensor,
    ref_gen: torch.Tensor,
    beta: float,
) -> PairStats:
    """Per-pair SPIN loss. At the first step of an iteration the policy is the reference, every
    margin is 0 and every loss is exactly ln 2."""
    real = logp_real.float() - ref_real.float()
    gen = logp_gen.float() - ref_gen.float()
    losses = -F.logsigmoid(beta * (real - gen))
    return PairStats(losses, (beta * real).detach(), (beta * gen).detach())


LN2 = math.log(2.0)
