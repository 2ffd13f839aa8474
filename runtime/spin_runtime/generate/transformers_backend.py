"""Generation with transformers' ``generate``: batched, left-padded, fp32 on CPU.

The backend for CPU runs, tests and small models. Prompts are batched by length (less padding)
and padded on the left by hand, with an attention mask, so every prompt's answer does not
depend on its batch-mates (greedy output in a padded batch equals the output alone).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from spin_runtime.generate.backends import Completion, FinishReason, SamplingConfig

log = logging.getLogger(__name__)


def _context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError("cannot tell the model's context length from its config")


def split_answer(new_tokens: list[int], eos_id: int, budget: int) -> tuple[list[int], FinishReason]:
    """Cut generated tokens at the first EOS (``stop``) or at the budget (``length``); padding
    after an EOS is dropped with it."""
    head = new_tokens[:budget]
    if eos_id in head:
        return head[: head.index(eos_id)], "stop"
    return head, "length"


class TransformersBackend:
    name = "transformers"

    def __init__(
        self, model_path: str, tokenizer: Any, *, dtype: str = "auto", batch_size: int = 64
    ):
        import torch

        from spin_runtime import models

        if batch_size < 1:
            from spin_common.errors import UsageError

            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # Called with (prompts done, prompts in this call) after every batch: progress by batch.
        self.on_batch: Callable[[int, int], None] | None = None
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.model = models.load_model(model_path, dtype, self.device, tokenizer=tokenizer)
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        )

    @property
    def context_length(self) -> int:
        return _context_length(self.model.config)

    def _generation_config(self, params: SamplingConfig, max_new_tokens: int) -> Any:
        from transformers import GenerationConfig

        # Built from the flags alone: the checkpoint's generation_config (its own temperature,
        # repetition penalty, ...) must not leak in, or backends would sample differently.
        # top_k=0 disables top-k (None would mean transformers' default of 50).
        kwargs: dict[str, Any] = {"do_sample": False}
        if not params.greedy:
            kwargs = {
                "do_sample": True,
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k if params.top_k > 0 else 0,
            }
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            **kwargs,
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingConfig, max_tokens: list[int]
    ) -> list[Completion]:
        import torch

        if len(prompts) != len(max_tokens):
            raise ValueError("one token budget per prompt")
        torch.manual_seed(params.seed)
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        # Prompts whose budget was capped by the context run alone: in a shared batch the
        # longest prompt would be driven past the context by its batch-mates' larger budgets.
        # All other prompts share one budget and fit, however they are batched.
        top = max(max_tokens, default=0)
        alone = [[i] for i in order if max_tokens[i] < top]
        shared = [i for i in order if max_tokens[i] == top]
        batches = alone + [
            shared[k : k + self.batch_size] for k in range(0, len(shared), self.batch_size)
        ]
        results: list[Completion | None] = [None] * len(prompts)
        done = 0
        for batch in batches:
            width = max(len(prompts[i]) for i in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prompts[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                mask[row, width - len(ids) :] = 1
            budget = max(max_tokens[i] for i in batch)
            with torch.inference_mode():
                out = self.model.generate(  # type: ignore[operator]  # typed as Tensor | Module
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=self._generation_config(params, budget),
                )
            new = out[:, width:].tolist()
            for row, i in enumerate(batch):
                tokens, reason = split_answer(new[row], self.eos_id, max_tokens[i])
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                stop = self.eos_id if reason == "stop" else None
                results[i] = Completion(tokens, text, reason, stop_token_id=stop)
            done += len(batch)
            if self.on_batch is not None:
                self.on_batch(done, len(prompts))
        return [r for r in results if r is not None]

    def close(self) -> None:
        import gc

        del self.model
        gc.collect()
