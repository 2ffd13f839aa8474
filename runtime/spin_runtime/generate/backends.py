"""The small interface both generation backends implement (factory.py picks one).

Backends receive already formatted prompt *token ids* (built by :mod:`spin_runtime.formatting`),
never text, so both backends — and training — see exactly the same tokens, and no engine can
re-tokenize and add a second BOS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from spin_common.errors import UsageError

BACKENDS = ("transformers", "vllm")
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling flags (docs/runtime.md). ``temperature == 0`` means greedy; ``top_k <= 0``
    disables top-k. ``seed`` makes sampling reproducible for a fixed shard layout."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """One answer: its tokens without the final EOS, the decoded text, why it ended — ``stop``
    (EOS) or ``length`` (cut by the token budget: a truncated answer) — and the stop token
    the model sampled (None when truncated)."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    stop_token_id: int | None = None

    @property
    def sampled_ids(self) -> list[int]:
        """Every token the model sampled after the prompt, its stop token included: the
        sequence training scores (records' ``generated_token_ids``)."""
        tail = [] if self.stop_token_id is None else [self.stop_token_id]
        return [*self.token_ids, *tail]


class Backend(Protocol):
    name: str

    @property
    def context_length(self) -> int:
        """Maximum prompt + answer tokens the model accepts."""

    def generate(
        self, prompts: list[list[int]], params: SamplingConfig, max_tokens: list[int]
    ) -> list[Completion]:
        """Answers in prompt order; ``max_tokens[i]`` is prompt i's token budget (the caller
        caps it to the context length, so both backends cut answers at the same place)."""

    def close(self) -> None:
        """Release the model (and the accelerator)."""
