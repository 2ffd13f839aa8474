"""Tiny model, tokenizer and dataset fixtures, built locally once per session (no hub)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

__all__ = [
    "tiny_dataset_path", "tiny_factory", "tiny_model_dir", "tiny_rows", "tiny_varied_model_dir",
]  # fmt: skip # a word list, packed

TINY_ROWS = 240


@pytest.fixture(scope="session")
def tiny_rows() -> list[dict]:
    """The synthetic task rows behind :func:`tiny_dataset_path` (and the tokenizer corpus)."""
    from spin_runtime import tiny

    return tiny.make_task_rows(TINY_ROWS, seed=0)


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[dict]) -> Path:
    """A JSONL dataset with OpenAI-style ``messages`` rows."""
    from spin_runtime import tiny

    return tiny.write_jsonl(tiny_rows, tmp_path_factory.mktemp("tiny-data") / "dataset.jsonl")


@pytest.fixture(scope="session")
def tiny_factory(
    tmp_path_factory: pytest.TempPathFactory, tiny_rows: list[dict]
) -> Callable[..., Path]:
    """``make(size="unit"|"small"|"demo", seed=0, init_std=0.02) -> checkpoint dir``, cached.

    ``init_std=0.3`` gives a random model with varied greedy answers (see tiny.make_model)."""
    from spin_runtime import tiny

    built: dict[tuple[str, int, float], Path] = {}

    def make(size: str = "unit", seed: int = 0, init_std: float = 0.02) -> Path:
        key = (size, seed, init_std)
        if key not in built:
            shape = tiny.SIZES[size]
            tokenizer = tiny.train_tokenizer(
                tiny_rows, model_max_length=shape.max_position_embeddings
            )
            model = tiny.make_model(tokenizer, shape, seed=seed, init_std=init_std)
            directory = tmp_path_factory.mktemp(f"tiny-{size}-{seed}-{init_std}")
            built[key] = tiny.save_tiny(directory, tokenizer, model)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_factory: Callable[..., Path]) -> Path:
    """A saved ~0.2 M-parameter Llama + tokenizer (one HF checkpoint directory)."""
    return tiny_factory("unit", 0)


@pytest.fixture(scope="session")
def tiny_varied_model_dir(tiny_factory: Callable[..., Path]) -> Path:
    """Like :func:`tiny_model_dir` but initialised with std 0.3: greedy answers vary from token
    to token and prompt to prompt (generation parity and padding tests need that)."""
    return tiny_factory("unit", 0, init_std=0.3)
