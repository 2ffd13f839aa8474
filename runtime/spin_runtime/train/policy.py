"""The trained module: a Hugging Face causal LM that returns per-sequence response log-probs.

DDP and FSDP2 wrap *this* module, not the HF model, so the log-probability computation runs
inside the wrapped ``forward``: under FSDP2 the root's parameters (embeddings, final norm,
output head) are unsharded exactly while it runs, and the output head's weight can be used
directly by the chunked projection of :mod:`spin_runtime.train.loss` instead of producing full
logits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spin_runtime.train.loss import (
    Scored,
    sequence_logps_from_hidden,
    sequence_logps_from_logits,
)

#: Config attributes that make the head more than ``hidden @ W.T``; with any of them set the
#: model's own forward computes the logits (slower, but exact).
_HEAD_MODIFIERS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _plain_head(model: Any) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return False
    if getattr(model, "base_model", model) is model:
        return False
    config = getattr(model, "config", None)
    for name in _HEAD_MODIFIERS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return False
    return True


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: the reference log-probs are computed once, before training, and
    must be what the policy computes at step 0 (the first loss is then exactly ln 2)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout", "hidden_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"):
        if isinstance(getattr(config, attr, None), float):
            setattr(config, attr, 0.0)


class SequenceLogProbs(nn.Module):
    """``forward(input_ids, attention_mask, position_ids, positions, targets, segments,
    num_sequences) -> (num_sequences,)`` fp32 sums of answer log-probs (the last four are a
    :class:`~spin_runtime.train.loss.Scored`, passed as plain tensors so DDP and FSDP2 see
    them as ordinary inputs)."""

    def __init__(self, model: nn.Module, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fused = _plain_head(model)
        self.chunk_tokens = chunk_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None,
        positions: torch.Tensor,
        targets: torch.Tensor,
        segments: torch.Tensor,
        num_sequences: int,
    ) -> torch.Tensor:
        model: Any = self.model
        scored = Scored(positions, targets, segments, num_sequences)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self.fused:
            hidden = model.base_model(**kwargs)[0]
            weight = model.get_output_embeddings().weight
            return sequence_logps_from_hidden(hidden, weight, scored, self.chunk_tokens)
        return sequence_logps_from_logits(model(**kwargs).logits, scored)


def supports_shared_prompt(model: Any) -> bool:
    """A shared-prompt batch needs a custom 4D boolean mask and explicit positions: the SDPA
    attention of transformers takes both as given; other kernels (flash-attention) do not."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa"


def score(module: nn.Module, batch: Any) -> torch.Tensor:
    """Run ``module`` (a :class:`SequenceLogProbs`, possibly wrapped) on a collated batch."""
    s = batch.scored
    out: torch.Tensor = module(
        batch.input_ids,
        batch.attention_mask,
        batch.position_ids,
        s.positions,
        s.targets,
        s.segments,
        s.num_sequences,
    )
    return out
