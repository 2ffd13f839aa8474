"""Reading the SFT dataset and choosing, deterministically, which prompts each command sees.

SPIN regenerates answers to the *same* prompts every iteration and evaluates on the *same*
held-out prompts, across pods and across retries. So example ids are source row indices (stable
whatever the shuffling), and the split depends only on (dataset, seed, sizes) — see
docs/runtime.md, "Dataset selection".

Light module: no torch. Parquet needs pyarrow (imported only for parquet files).
"""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spin_runtime.cli import UsageError

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DatasetError(UsageError):
    """The dataset cannot be used (missing, unreadable, empty, too small): bad input, exit 2."""


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer; ``id`` is the row index in the source."""

    id: int
    system: str | None
    prompt: str
    response: str


@dataclass
class Loaded:
    """Parsed examples plus what was skipped and why (reported, never silent)."""

    examples: list[Example]
    total_rows: int
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass(frozen=True)
class Split:
    train: list[Example]
    eval: list[Example]


def _text(content: Any) -> str | None:
    """Message content as text: a string, or OpenAI-style parts ``[{"type": "text", ...}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)  # type: ignore[arg-type]
    return None


def parse_row(row: Any) -> tuple[str | None, str, str] | str:
    """``(system, prompt, response)`` for a valid row, else the reason it is skipped.

    ``messages`` rows: the first system message (if any), the first user turn and the assistant
    turn right after it. Otherwise ``prompt``/``response`` (and optional ``system``) fields.
    """
    if not isinstance(row, Mapping):
        return "not an object"
    messages = row.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            return "messages is not a list of objects"
        system = next((_text(m.get("content")) for m in messages if m.get("role") == "system"), None)
        user_at = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if user_at is None:
            return "no user message"
        if user_at + 1 >= len(messages) or messages[user_at + 1].get("role") != "assistant":
            return "no assistant answer after the first user message"
        prompt = _text(messages[user_at].get("content"))
        response = _text(messages[user_at + 1].get("content"))
    elif "prompt" in row or "response" in row:
        system, prompt, response = row.get("system"), row.get("prompt"), row.get("response")
    else:
        return "neither messages nor prompt/response fields"
    if not isinstance(prompt, str) or not prompt.strip():
        return "empty prompt"
    if not isinstance(response, str) or not response.strip():
        return "empty response"
    if system is not None and not isinstance(system, str):
        return "system is not a string"
    return (system or None), prompt, response


def data_files(uri: str) -> list[str]:
    """The data files a dataset URI names, in the order their rows are read.

    - a ``.jsonl``/``.json``/``.parquet`` file: itself;
    - a directory (``.../data/``, or a name without a suffix that is a folder): every data file
      directly in it;
    - a glob in the last segment (``.../data/train_sft-*``): the matching data files beside it;
    - a name prefix (``.../data/train_sft-``): the data files beside it whose names start with it.

    Shards are sorted by name, so ``train-00000-of-00003.parquet``... concatenate in order and row
    ids stay stable. Hub datasets such as UltraChat ship ``data/train_sft-*`` next to
    ``data/test_sft-*``: a glob or prefix picks one split where the directory would mix them.
    """
    from spin_runtime import storage

    parent, _, last = uri.rstrip("/").rpartition("/")
    if "*" in last or "?" in last:
        if not parent:
            raise DatasetError(f"--dataset {uri}: a glob needs a folder before it, such as ./{last}")
        matched = [n for n in storage.list_files(parent) if "/" not in n and fnmatch.fnmatchcase(n, last)]
        files = [storage.join(parent, n) for n in matched if n.endswith(DATA_SUFFIXES)]
        if not files:
            raise DatasetError(f"--dataset {uri}: no .jsonl/.json/.parquet files match {last!r} in {parent}")
        return files
    if uri.endswith(DATA_SUFFIXES):
        return [uri]
    names = storage.list_files(uri)
    if names:
        return [storage.join(uri, n) for n in names if n.endswith(DATA_SUFFIXES) and "/" not in n]
    if not storage.is_s3(uri) and storage.local_path(uri).is_dir():
        return []
    if not uri.endswith("/") and storage.exists(uri):  # a file without a data suffix: try it as JSONL
        return [uri]
    if parent and not uri.endswith("/"):
        siblings = [n for n in storage.list_files(parent) if "/" not in n and n.startswith(last)]
        files = [storage.join(parent, n) for n in siblings if n.endswith(DATA_SUFFIXES)]
        if files:
            return files
    raise DatasetError(f"--dataset {uri}: no such file, directory or prefix of shards")


def _rows(uri: str) -> Iterable[Any]:
    from spin_runtime import storage

    data = storage.read_bytes(uri)
    if uri.endswith(".parquet"):
        import pyarrow.parquet as pq

        yield from pq.read_table(io.BytesIO(data)).to_pylist()
        return
    text = data.decode("utf-8")
    if uri.endswith(".json") and text.lstrip().startswith("["):
        yield from json.loads(text)
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            yield None  # counted as invalid by parse_row, keeps row indices aligned


def load_examples(uri: str) -> Loaded:
    """Parse every row of the dataset at ``uri`` (JSONL, JSON array or parquet; a file, or a
    directory, glob or name prefix of shards: :func:`data_files`). Raises :class:`DatasetError` naming the URI when nothing usable is there.
    """
    try:
        files = data_files(uri)
        if not files:
            raise DatasetError(f"--dataset {uri}: no .jsonl/.json/.parquet files in it")
        loaded = Loaded(examples=[], total_rows=0)
        for file in files:
            for row in _rows(file):
                parsed = parse_row(row)
                if isinstance(parsed, str):
                    loaded.skipped[parsed] += 1
                else:
                    loaded.examples.append(Example(loaded.total_rows, *parsed))
                loaded.total_rows += 1
    except DatasetError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"--dataset {uri}: cannot read it: {exc}") from exc
    except Exception as exc:  # pyarrow/botocore errors have no common base we can name lazily
        raise DatasetError(f"--dataset {uri}: cannot read it: {type(exc).__name__}: {exc}") from exc
    if loaded.num_skipped:
        log.warning(
            "dataset %s: skipped %d of %d rows: %s",
            uri, loaded.num_skipped, loaded.total_rows, dict(loaded.skipped),
        )
    if not loaded.examples:
        raise DatasetError(
            f"--dataset {uri}: no usable rows (of {loaded.total_rows}; skipped: {dict(loaded.skipped)})"
        )
    log.info("dataset %s: %d examples from %d rows", uri, len(loaded.examples), loaded.total_rows)
    return loaded


# Reference answers of at most this many words (median) count as short answers that one right
# output can match; longer, free-text answers (chat data) almost never match exactly, so exact
# match is ~0 for every model and ranks nothing. Short-answer tasks: arithmetic, extraction, the
# tiny demo task (<= 7 words); UltraChat's answers: a median of ~200 words.
SHORT_ANSWER_WORDS = 16


def score_metric(examples: list[Example]) -> tuple[str, str]:
    """The evaluation metric that can rank models on these examples, and why (the `auto` rule):
    ``exact_match`` for short answers, ``real_logp_per_token`` (the real answers' log-likelihood
    per token) for free text."""
    words = sorted(len(e.response.split()) for e in examples)
    if not words:
        return "exact_match", "no examples"
    median = words[len(words) // 2]
    if median <= SHORT_ANSWER_WORDS:
        return "exact_match", f"short answers (median {median} words <= {SHORT_ANSWER_WORDS})"
    return "real_logp_per_token", (
        f"free-text answers (median {median} words > {SHORT_ANSWER_WORDS}): exact match would be ~0"
    )


def select(examples: list[Example], seed: int, max_samples: int, eval_samples: int) -> Split:
    """Shuffle by ``seed``; the first ``eval_samples`` are held out, the next ``max_samples``
    (0 = all the rest) train. Depends only on the examples' ids and the arguments."""
    if max_samples < 0:
        raise UsageError(f"--max-samples must be >= 0, got {max_samples}")
    if eval_samples < 0:
        raise UsageError(f"--eval-samples must be >= 0, got {eval_samples}")
    if eval_samples >= len(examples):
        raise DatasetError(
            f"--eval-samples {eval_samples} leaves no training prompts: the dataset has "
            f"{len(examples)} usable examples"
        )
    order = sorted(examples, key=lambda e: e.id)
    random.Random(seed).shuffle(order)
    held_out, rest = order[:eval_samples], order[eval_samples:]
    if max_samples and max_samples > len(rest):
        log.warning("--max-samples %d: only %d training examples available", max_samples, len(rest))
    train = rest[:max_samples] if max_samples else rest
    return Split(train=train, eval=held_out)


def load_split(uri: str, seed: int, max_samples: int, eval_samples: int) -> Split:
    """:func:`load_examples` then :func:`select` — what every command does."""
    return select(load_examples(uri).examples, seed, max_samples, eval_samples)
