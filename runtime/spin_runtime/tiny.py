"""A tiny tokenizer, model and synthetic task, built locally with no downloads.

Tests, the demo and the benchmarks need a real Hugging Face checkpoint that the real loading
code (:mod:`spin_runtime.models`) and vLLM can open, but no hub is reachable. Everything here is
deterministic given a seed, and the pieces compose: rows -> tokenizer -> model -> ``save_tiny``.

The task: short templated instructions with one exact answer each (reverse a word list, sort
digits, uppercase, add two numbers), so exact match is a meaningful held-out metric.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

#: Role markers are single special tokens; the answer ends with EOS (see formatting.py).
#: Newlines are jinja expressions because transformers renders with trim_blocks, which would
#: drop a literal newline right after a block tag.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)

SYSTEM_PROMPTS = ("You are a precise assistant.", "Answer with the result only.")
_WORDS = [
    "red", "green", "blue", "cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "star",
    "sky", "sea", "hat", "cup", "pen", "box", "map", "key", "car", "bus", "ship", "road", "hill",
    "lake", "rain", "snow", "wind", "fire", "ice", "gold",
]  # fmt: skip # a word list, packed


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 5))
    return "reverse: " + " ".join(words), " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 7))]
    return "sort: " + " ".join(digits), " ".join(sorted(digits))


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(1, 4))
    return "upper: " + " ".join(words), " ".join(words).upper()


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add: {a} + {b}", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "sort": _sort,
    "upper": _upper,
    "add": _add,
}


def make_task_rows(
    n: int, seed: int = 0, tasks: Sequence[str] = tuple(TASKS), system_rate: float = 0.5
) -> list[dict[str, Any]]:
    """``n`` distinct rows ``{"messages": [system?, user, assistant], "task": name}``.

    Prompts are unique, so any held-out split is truly unseen; a fraction ``system_rate`` of
    rows carries a system prompt so both formatting paths are exercised.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tiny tasks {sorted(unknown)}; known: {sorted(TASKS)}")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot make {n} distinct prompts from tasks {list(tasks)}")
        task = tasks[rng.randrange(len(tasks))]
        prompt, answer = TASKS[task](rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        messages = []
        if rng.random() < system_rate:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages, "task": task})
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSONL (the dataset format the runtime reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _corpus(rows: Iterable[dict[str, Any]]) -> Iterable[str]:
    for row in rows:
        for message in row.get("messages", []):
            yield message["content"]


def train_tokenizer(
    rows: Sequence[dict[str, Any]], vocab_size: int = 512, model_max_length: int = 256
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the rows' text (any string still encodes, byte by byte),
    wrapped with pad/bos/eos, left padding and the tiny chat template.

    ``padding_side`` is passed at construction: set afterwards it is not saved (transformers 5).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(rows), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",
        model_max_length=model_max_length,
        chat_template=TINY_CHAT_TEMPLATE,
    )


@dataclass(frozen=True)
class TinySize:
    """Model shape. ``UNIT`` (~0.2 M params) keeps unit tests fast; ``DEMO`` (~3 M) is the
    demo/benchmark model."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 256


# head_dim >= 32 everywhere: vLLM's CPU attention rejects head_dim 16.
UNIT = TinySize(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256)
SMALL = TinySize(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384)
DEMO = TinySize(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
SIZES = {"unit": UNIT, "small": SMALL, "demo": DEMO}


def make_model(
    tokenizer: PreTrainedTokenizerFast,
    size: TinySize | str = UNIT,
    seed: int = 0,
    init_std: float = 0.02,
) -> PreTrainedModel:
    """A randomly initialised Llama sized to the tokenizer (fp32, eval mode).

    ``init_std`` (the config's ``initializer_range``): the default 0.02 gives near-uniform
    next-token distributions that repeat one token greedily; a larger value gives varied greedy
    answers, which makes backend-parity and padding tests more telling.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size] if isinstance(size, str) else size
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(
    directory: str | Path, tokenizer: PreTrainedTokenizerFast, model: PreTrainedModel
) -> Path:
    """Save model + tokenizer as one HF checkpoint directory (safetensors, chat_template.jinja)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny(
    directory: str | Path,
    size: TinySize | str = UNIT,
    seed: int = 0,
    num_rows: int = 400,
    vocab_size: int = 512,
    dataset_name: str | None = "dataset.jsonl",
) -> Path:
    """One call: task rows (written beside the model when ``dataset_name``), tokenizer, model.

    Returns the checkpoint directory ``directory/model``.
    """
    directory = Path(directory)
    rows = make_task_rows(num_rows, seed=seed)
    shape = SIZES[size] if isinstance(size, str) else size
    tokenizer = train_tokenizer(rows, vocab_size, model_max_length=shape.max_position_embeddings)
    model = make_model(tokenizer, shape, seed=seed)
    if dataset_name:
        write_jsonl(rows, directory / dataset_name)
    return save_tiny(directory / "model", tokenizer, model)


def num_parameters(model: PreTrainedModel) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
