"""Reading the SFT dataset and choosing, deterministically, which prompts each command sees.

SPIN regenerates answers to the *same* prompts every iteration and evaluates on the *same*
held-out prompts, across pods and across retries. So example ids are source row indices (stable
whatever the shuffling), and the split depends only on (dataset, seed, sizes) — see
docs/runtime.md, "Dataset selection".

Light module: no torch. Parquet needs pyarrow (imported only for parquet files).
"""

from __future__ import annotations

import argparse
import fnmatch
import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spin_common import rows
from spin_common.errors import UsageError

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


FIRST_LOCATIONS = 5  # where each skip reason was seen: enough to find the pattern in an editor


@dataclass
class Loaded:
    """Parsed examples plus what was skipped, why and where (reported, never silent)."""

    examples: list[Example]
    total_rows: int
    skipped: Counter[str] = field(default_factory=Counter)
    where: dict[str, list[str]] = field(default_factory=dict)  # reason -> first locations

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, location: str) -> None:
        self.skipped[reason] += 1
        seen = self.where.setdefault(reason, [])
        if len(seen) < FIRST_LOCATIONS:
            seen.append(location)

    def report(self) -> dict[str, Any]:
        """The dataset profile: status.dataset, the MLflow dataset profile, `check` output."""
        return {
            "rows": self.total_rows,
            "usable": len(self.examples),
            "skipped": self.num_skipped,
            "skippedByReason": {
                reason: {"count": count, "first": self.where.get(reason, [])}
                for reason, count in self.skipped.most_common()
            },
        }

    def describe_skipped(self) -> str:
        """`not UTF-8 ×2 (line 23, line 40); empty prompt ×1 (line 7)`, most frequent first."""
        parts = []
        for reason, count in self.skipped.most_common():
            where = self.where.get(reason, [])
            more = ", …" if count > len(where) else ""
            parts.append(f"{reason} ×{count} ({', '.join(where)}{more})")
        return "; ".join(parts)


@dataclass(frozen=True)
class Split:
    train: list[Example]
    eval: list[Example]


def _text(content: Any) -> str | None:
    """Message content as text: a string, or OpenAI-style parts ``[{"type": "text", ...}]``
    (non-text parts such as images are ignored; no text part at all is not text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        ]
        if parts and all(isinstance(p, str) for p in parts):
            return "".join(parts)  # type: ignore[arg-type]
    return None


def _content(message: Mapping[str, Any], what: str) -> str | tuple[str]:
    """The text of a message, or a one-tuple with the reason it is not usable text."""
    content = message.get("content")
    if content is None:
        return (f"empty {what}",)
    text = _text(content)
    if text is None:
        return (f"{what} is not text",)  # e.g. only image parts
    return text


KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _parse_messages(messages: Any) -> tuple[str | None, str, str] | str:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        return "messages is not a list of objects"
    if not messages:
        return "empty messages"
    roles = [m.get("role") for m in messages]
    if any(not isinstance(r, str) or not r for r in roles):
        return "a message without a role"
    unknown = sorted({r for r in roles if r not in KNOWN_ROLES})
    if unknown:
        return f"unknown role {unknown[0]!r}"
    user_at = next((i for i, r in enumerate(roles) if r == "user"), None)
    if user_at is None:
        return "no user message"
    if "assistant" in roles[:user_at]:
        return "roles out of order: assistant before the first user message"
    if user_at + 1 >= len(roles) or roles[user_at + 1] != "assistant":
        return "no assistant answer after the first user message"
    system_msg = next(
        (m for m in messages[:user_at] if m.get("role") in ("system", "developer")), None
    )
    system = _content(system_msg, "system") if system_msg is not None else None
    if isinstance(system, tuple):
        return "system is not a string"
    prompt = _content(messages[user_at], "prompt")
    if isinstance(prompt, tuple):
        return prompt[0]
    response = _content(messages[user_at + 1], "response")
    if isinstance(response, tuple):
        return response[0]
    return system, prompt, response


def parse_row(row: Any) -> tuple[str | None, str, str] | str:
    """``(system, prompt, response)`` for a valid row, else the reason it is skipped.

    ``messages`` rows: the first system message before the first user turn (if any), the first
    user turn and the assistant turn right after it. Otherwise ``prompt``/``response`` (and
    optional ``system``) fields. The reasons are listed in docs/datasets.md.
    """
    if not isinstance(row, Mapping):
        return "not an object"
    system: Any
    prompt: Any
    response: Any
    if row.get("messages") is not None:
        parsed = _parse_messages(row["messages"])
        if isinstance(parsed, str):
            return parsed
        system, prompt, response = parsed
    elif row.get("prompt") is not None or row.get("response") is not None:
        system, prompt, response = row.get("system"), row.get("prompt"), row.get("response")
        if prompt is not None and not isinstance(prompt, str):
            return "prompt is not a string"
        if response is not None and not isinstance(response, str):
            return "response is not a string"
    elif "messages" in row:
        return "messages is null"
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
    from spin_common import storage

    parent, _, last = uri.rstrip("/").rpartition("/")
    if "*" in last or "?" in last:
        if not parent:
            raise DatasetError(
                f"--dataset {uri}: a glob needs a folder before it, such as ./{last}"
            )
        matched = [
            n for n in storage.list_files(parent) if "/" not in n and fnmatch.fnmatchcase(n, last)
        ]
        files = [storage.join(parent, n) for n in matched if n.endswith(DATA_SUFFIXES)]
        if not files:
            raise DatasetError(
                f"--dataset {uri}: no .jsonl/.json/.parquet files match {last!r} in {parent}"
            )
        return files
    if uri.endswith(DATA_SUFFIXES):
        return [uri]
    names = storage.list_files(uri)
    if names:
        return [storage.join(uri, n) for n in names if n.endswith(DATA_SUFFIXES) and "/" not in n]
    if not storage.is_s3(uri) and storage.local_path(uri).is_dir():
        return []
    if not uri.endswith("/") and storage.exists(
        uri
    ):  # a file without a data suffix: try it as JSONL
        return [uri]
    if parent and not uri.endswith("/"):
        siblings = [n for n in storage.list_files(parent) if "/" not in n and n.startswith(last)]
        files = [storage.join(parent, n) for n in siblings if n.endswith(DATA_SUFFIXES)]
        if files:
            return files
    raise DatasetError(f"--dataset {uri}: no such file, directory or prefix of shards")


def load_examples(uri: str, max_skipped_fraction: float | None = None) -> Loaded:
    """Parse every row of the dataset at ``uri`` (JSONL, JSON array or parquet; a file, or a
    directory, glob or name prefix of shards: :func:`data_files`), line by line: an unreadable or invalid row is skipped and counted with
    where it was. Raises :class:`DatasetError`, cause first, when a file cannot be read at all,
    when nothing usable is there, or when more than ``max_skipped_fraction`` of the rows were
    skipped (None: no limit).
    """
    from spin_common import storage

    try:
        files = data_files(uri)
    except OSError as exc:
        raise DatasetError(f"--dataset {uri}: cannot list it: {exc}") from exc
    if not files:
        raise DatasetError(f"--dataset {uri}: no .jsonl/.json/.parquet files in it")
    loaded = Loaded(examples=[], total_rows=0)
    for file in files:
        name = file.rsplit("/", 1)[-1]
        prefix = f"{name} " if len(files) > 1 else ""
        try:
            data = storage.read_bytes(file)
            for raw in rows.file_rows(file, data):
                parsed = raw.problem or parse_row(raw.value)
                if isinstance(parsed, str):
                    loaded.skip(parsed, prefix + raw.where)
                else:
                    loaded.examples.append(Example(loaded.total_rows, *parsed))
                loaded.total_rows += 1
        except rows.FileProblem as exc:
            raise DatasetError(f"dataset file {file}: {exc}") from None
        except FileNotFoundError:
            raise DatasetError(f"--dataset {uri}: {file}: no such file") from None
        except OSError as exc:
            raise DatasetError(f"--dataset {uri}: cannot read {file}: {exc}") from exc
        except Exception as exc:  # botocore errors have no common base we can name lazily
            raise DatasetError(
                f"--dataset {uri}: cannot read {file}: {type(exc).__name__}: {exc}"
            ) from exc
    if not loaded.total_rows:
        raise DatasetError(f"dataset {uri} is empty: no rows")
    if not loaded.examples:
        raise DatasetError(
            f"dataset {uri}: no usable rows: all {loaded.total_rows} skipped: {loaded.describe_skipped()}"
        )
    check_skipped(loaded, uri, max_skipped_fraction)
    if loaded.num_skipped:  # (when the run fails for them, the error says it: not twice)
        log.warning(
            "dataset %s: skipped %d of %d rows: %s",
            uri,
            loaded.num_skipped,
            loaded.total_rows,
            loaded.describe_skipped(),
        )
    log.info("dataset %s: %d examples from %d rows", uri, len(loaded.examples), loaded.total_rows)
    return loaded


def check_skipped(loaded: Loaded, uri: str, max_fraction: float | None) -> None:
    """DatasetError when more than ``max_fraction`` of the rows were skipped (the message leads
    with the reasons and where, then the numbers and the field that sets the limit)."""
    if max_fraction is None or not loaded.total_rows:
        return
    fraction = loaded.num_skipped / loaded.total_rows
    if fraction > max_fraction:
        raise DatasetError(
            f"dataset {uri}: {loaded.describe_skipped()} — {loaded.num_skipped} of "
            f"{loaded.total_rows} rows skipped ({fraction:.1%}), above "
            f"dataset.maxSkippedFraction {max_fraction:g} (--max-skipped-fraction)"
        )


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


def load_split(
    uri: str,
    seed: int,
    max_samples: int,
    eval_samples: int,
    max_skipped_fraction: float | None = None,
) -> Split:
    """:func:`load_examples` then :func:`select` — what every command does."""
    return select(
        load_examples(uri, max_skipped_fraction).examples, seed, max_samples, eval_samples
    )


def add_dataset_flags(parser: argparse.ArgumentParser, *, train: bool = True) -> None:
    """The selection flags shared with ``evaluate`` (docs/runtime.md, "Dataset selection")."""
    parser.add_argument("--dataset", required=True, help="SFT dataset URI (JSONL/parquet)")
    if train:
        parser.add_argument("--max-samples", type=int, default=0, help="training prompts, 0 = all")
    parser.add_argument("--eval-samples", type=int, default=0, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0, help="selection (and sampling) seed")
    parser.add_argument(
        "--max-skipped-fraction",
        type=_fraction,
        default=None,
        help="fail (exit 2) when more of the dataset's rows are skipped (default: no limit)",
    )


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value
