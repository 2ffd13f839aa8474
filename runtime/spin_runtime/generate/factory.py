"""Build a generation backend by name: the one module that knows both implementations (they
import only the interface, backends.py, so neither imports the other or this module)."""

from __future__ import annotations

from typing import Any

from spin_common.errors import UsageError
from spin_runtime.generate.backends import BACKENDS, Backend


def make_backend(
    name: str,
    model_path: str,
    tokenizer: Any,
    *,
    dtype: str = "auto",
    batch_size: int = 64,
    tensor_parallel_size: int = 1,
    seed: int = 0,
) -> Backend:
    """Build a backend by name; vLLM is imported only when asked for."""
    if name == "transformers":
        from spin_runtime.generate.transformers_backend import TransformersBackend

        return TransformersBackend(model_path, tokenizer, dtype=dtype, batch_size=batch_size)
    if name == "vllm":
        from spin_runtime.generate.vllm_backend import VLLMBackend

        return VLLMBackend(
            model_path, tokenizer, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed
        )
    raise UsageError(f"--backend {name}: expected one of {', '.join(BACKENDS)}")
