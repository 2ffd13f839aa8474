"""What a run starts from: the base model θ0 (`spec.model`) and the SFT dataset (`spec.dataset`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from spin_operator.api.base import UriModel, desc
from spin_operator.api.fields import DATASET_URI, MODEL_URI, S3_OR_PATH
from spin_operator.api.scheduling import Resources


class ModelSpec(UriModel):
    """The base model θ0 that iteration 0 starts from (typically an SFT checkpoint)."""

    uri: Annotated[
        str,
        desc(
            "HF-format checkpoint: s3://bucket/prefix, a local path, or a hub id "
            "(e.g. alignment-handbook/zephyr-7b-sft-full).",
            pattern=MODEL_URI,
            max_length=1024,
        ),
    ]
    revision: Annotated[
        str | None,
        desc(
            "Hub revision (commit sha, tag or branch) of a hub-id uri, pinned so every pod and "
            "iteration starts from the same weights.",
            pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
            max_length=255,
        ),
    ] = None
    tokenizer: Annotated[
        str | None,
        desc("Tokenizer to use instead of the model's own.", pattern=MODEL_URI, max_length=1024),
    ] = None
    chat_template: Annotated[
        str | None,
        desc(
            "Jinja chat template file (s3:// or path) overriding the tokenizer's. "
            "Generation, training and evaluation all format prompts with it.",
            pattern=S3_OR_PATH,
            max_length=1024,
        ),
    ] = None


class DatasetSpec(UriModel):
    """The SFT dataset: prompts and their human (real) responses."""

    uri: Annotated[
        str,
        desc(
            "JSONL, JSON or parquet data (s3:// or path) with OpenAI-style `messages` or "
            "`prompt`/`response` fields: one file, a directory of shards (ending in /), a name "
            "prefix of shards (data/train_sft-) or a glob (data/train_sft-*). See docs/datasets.md.",
            pattern=DATASET_URI,
            max_length=1024,
        ),
    ]
    max_samples: Annotated[
        int, desc("Training prompts to use after shuffling; 0 uses all.", ge=0)
    ] = 0
    eval_samples: Annotated[
        int,
        desc(
            "Held-out prompts (taken first after shuffling, never trained on) for the "
            "per-epoch SPIN metrics and the built-in evaluation.",
            ge=0,
        ),
    ] = 256
    seed: Annotated[
        int, desc("Seed of the shuffle: every iteration sees the same prompts.", ge=0)
    ] = 0
    max_skipped_fraction: Annotated[
        float,
        desc(
            "Largest fraction of rows that may be skipped as unusable (not UTF-8, not JSON, no "
            "assistant answer, ...; see docs/datasets.md) before the run fails, before any "
            "generation, with the reasons and line numbers. 0 tolerates no bad row.",
            ge=0,
            le=1,
        ),
    ] = 0.01
    check_resources: Annotated[
        Resources,
        desc(
            "Requests/limits of the check Job that parses the dataset and checks θ0 before "
            "iteration 0's generation (one CPU pod, no GPU). Empty: requests cpu 500m and "
            "memory 1Gi, limit memory 4Gi. The dataset's parsed rows are held in memory: raise "
            "memory for a large dataset."
        ),
    ] = Field(default_factory=Resources)
