"""``python -m spin_runtime generate``: argv and environment -> one generation shard.

Light at import time (argparse only): torch, transformers and vLLM load inside :func:`run`.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from spin_common.data import add_dataset_flags
from spin_common.errors import UsageError

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="θt answers the selected prompts (one shard)")
    p.add_argument("--model", required=True, help="θt checkpoint URI (HF format)")
    p.add_argument("--tokenizer", default=None, help="tokenizer URI (default: the model's)")
    p.add_argument("--chat-template", default=None, help="jinja chat template URI override")
    add_dataset_flags(p)
    p.add_argument("--output", required=True, help="R/iter-t/generated")
    p.add_argument("--iteration", type=int, default=0)
    p.add_argument("--backend", default="transformers", help="vllm | transformers")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="<= 0 disables top-k")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="transformers backend batch")
    p.add_argument(
        "--sampling-seed", type=int, default=None, help="sampling seed (default: --seed)"
    )
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument(
        "--shard-index", type=int, default=None, help="default $JOB_COMPLETION_INDEX or 0"
    )
    p.add_argument("--num-shards", type=int, default=None, help="default $SPIN_NUM_SHARDS or 1")


def _from_env(value: int | None, var: str, default: int) -> int:
    if value is not None:
        return value
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"${var} must be an integer, got {raw!r}") from None


def shard_from_args(args: argparse.Namespace) -> tuple[int, int]:
    """(index, count): flags first, then the Indexed Job's environment, else 0 of 1."""
    index = _from_env(args.shard_index, "JOB_COMPLETION_INDEX", 0)
    count = _from_env(args.num_shards, "SPIN_NUM_SHARDS", 1)
    if count < 1:
        raise UsageError(f"--num-shards (or $SPIN_NUM_SHARDS) must be >= 1, got {count}")
    if not 0 <= index < count:
        raise UsageError(
            f"--shard-index (or $JOB_COMPLETION_INDEX) {index} is out of range for {count} shards"
        )
    return index, count


def run(args: argparse.Namespace) -> int:
    from spin_runtime.generate.backends import BACKENDS, SamplingConfig
    from spin_runtime.generate.runner import GenerateOptions, generate_shard
    from spin_runtime.models import DTYPES

    if args.backend not in BACKENDS:
        raise UsageError(f"--backend {args.backend}: expected one of {', '.join(BACKENDS)}")
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype}: expected one of {', '.join(DTYPES)}")
    index, count = shard_from_args(args)
    from spin_common.check import check_model_uris

    # the model folder's pieces named before anything loads (on a cluster this is the first Job:
    # a missing tokenizer fails it with exit 2, never retried, instead of transformers' message)
    problems = check_model_uris(args.model, args.tokenizer, args.chat_template)
    if problems:
        raise UsageError("; ".join(problems))
    opts = GenerateOptions(
        model=args.model,
        dataset=args.dataset,
        output=args.output,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        max_samples=args.max_samples,
        eval_samples=args.eval_samples,
        seed=args.seed,
        max_skipped_fraction=args.max_skipped_fraction,
        iteration=args.iteration,
        backend=args.backend,
        sampling=SamplingConfig(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed if args.sampling_seed is None else args.sampling_seed,
        ),
        batch_size=args.batch_size,
        tensor_parallel_size=args.tensor_parallel_size,
        dtype=args.dtype,
        shard_index=index,
        num_shards=count,
    )
    result = generate_shard(opts)
    if not result.reused:  # a reused shard's stats were logged by the attempt that made it
        log_to_tracking(result.stats, index)
    return 0


def log_to_tracking(stats: dict[str, Any], shard_index: int) -> None:
    """Report the shard's throughput to the iteration's MLflow run (``MLFLOW_RUN_ID``), one
    point per shard (step = shard index). Never fails the job: the RunLogger buffers/spools."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    try:
        from spin_common import tracking

        logger = tracking.from_env_logger()
        logger.log_metrics(
            {
                f"generate/{key}": float(stats[key])
                for key in (
                    "prompts_per_s",
                    "tokens_per_s",
                    "mean_response_tokens",
                    "truncation_rate",
                    "prompts",
                    "generated_tokens",
                    "skipped_too_long",
                )
            },
            step=shard_index,
        )
        logger.close()
    except Exception as exc:  # tracking must never fail a job
        log.warning("could not log generation metrics to MLflow: %s", exc)
