"""The dataset and the model checked before any real work: what `python -m spin_runtime check`
runs (spin_runtime/check.py) and what `spinctl run`'s preflight calls in-process (docs/runtime.md,
docs/datasets.md). The dataset is parsed row by row with the reader every command uses; the model
folder is checked piece by piece without loading weights. Problems are cause-first sentences.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from spin_common.errors import UsageError

log = logging.getLogger(__name__)


def check_dataset(
    uri: str, max_skipped_fraction: float | None, eval_samples: int = 0, flag: str = "--dataset"
) -> tuple[dict[str, Any] | None, list[str]]:
    """(the dataset profile, problems). Problems are cause-first sentences."""
    from spin_common import data

    try:
        loaded = data.load_examples(uri, max_skipped_fraction)
    except UsageError as exc:
        return None, [str(exc)]
    problems = []
    if eval_samples >= len(loaded.examples):
        problems.append(
            f"dataset {uri}: {len(loaded.examples)} usable rows leave no training prompts after "
            f"{eval_samples} held-out ones (dataset.evalSamples / --eval-samples)"
        )
    return loaded.report(), problems


def check_model_uris(
    model: str | None,
    tokenizer: str | None,
    chat_template: str | None,
    names: dict[str, str] | None = None,
) -> list[str]:
    """Problems of the model (and separate tokenizer) folders, each prefixed by its field name
    from ``names`` (default: the CLI flags)."""
    from spin_common import modelcheck, storage

    names = names or {
        "model": "--model",
        "tokenizer": "--tokenizer",
        "chat_template": "--chat-template",
    }
    problems: list[str] = []
    try:
        if model and not modelcheck.is_hub_id(model):
            problems += [
                f"{names['model']} {model}: {p}"
                for p in modelcheck.check_model(_expand(model), tokenizer, chat_template)
            ]
        if tokenizer and not modelcheck.is_hub_id(tokenizer):
            folder = modelcheck.Folder.open(_expand(tokenizer))
            found = (
                modelcheck.check_tokenizer(folder, needs_template=chat_template is None)
                if folder.names
                else ["no such folder, or it is empty"]
            )
            problems += [f"{names['tokenizer']} {tokenizer}: {p}" for p in found]
        if chat_template and not storage.exists(_expand(chat_template)):
            problems.append(f"{names['chat_template']} {chat_template}: no such file")
    except storage.StorageUnavailableError:
        # S3 failing after every retry says nothing about the input: not bad input (exit 2,
        # never retried) but a failure the Job's or the operator's retry may outlast
        raise
    except OSError as exc:
        problems.append(f"{names['model']} {model}: cannot read it: {exc}")
    return problems


def _expand(uri: str) -> str:
    """`~/x` as the home folder, as models.resolve reads it (storage takes paths literally)."""
    return os.path.expanduser(uri) if uri.startswith("~") else uri
