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

from spin_runtime.train.loss import sequence_logps_from_hidden, sequence_logps_from_logits

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
    """``forward(input_ids, attention_mask, targets) -> (B,)`` fp32 sums of response log-probs.

    ``targets`` holds, per position, the response token it predicts or ``IGNORE``.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.fused = _plain_head(model)
        self.chunk_tokens = chunk_tokens

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        model: Any = self.model
        if self.fused:
            out = model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            )
            hidden = out[0]
            weight = model.get_output_embeddings().weight
            return sequence_logps_from_hidden(hidden, weight, targets, self.chunk_tokens)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return sequence_logps_from_logits(logits, targets)
