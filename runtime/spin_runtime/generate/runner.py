"""One generation shard, end to end: select prompts, format, generate, write records, manifest.

Sharding is *contiguous*: the selected prompts (held-out first, then training, in the order
:func:`spin_common.data.select` gives) are cut into ``num_shards`` consecutive slices whose
sizes differ by at most one. The selection is already shuffled, so slices are alike in length
mix; contiguous slices make the concatenation of shards 0..n-1 the selection order, and a shard
depends only on (dataset, seed, sizes, index, n), so re-running shard i rewrites exactly shard i.

Crash safety: the shard's manifest is removed before any work and written only after the shard
file (docs/design.md), so a failed or killed shard never looks complete.

Retries: a shard that is already complete — manifest present, file checksum verified, and made
from the same inputs (model, data, selection, sampling, layout) — is not redone: a new attempt of
a generation step then only pays for the shards that failed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spin_common import data, layout, manifest, storage
from spin_common.errors import UsageError
from spin_runtime import formatting
from spin_runtime.generate.backends import Backend, Completion, SamplingConfig
from spin_runtime.generate.factory import make_backend

log = logging.getLogger(__name__)

SHARD_KIND = "generated-shard"


def shard_bounds(total: int, index: int, num_shards: int) -> tuple[int, int]:
    """``[start, end)`` of shard ``index`` of ``num_shards`` over ``total`` items (contiguous)."""
    if num_shards < 1:
        raise UsageError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= index < num_shards:
        raise UsageError(f"--shard-index {index} is out of range for {num_shards} shards")
    return index * total // num_shards, (index + 1) * total // num_shards


@dataclass
class GenerateOptions:
    model: str
    dataset: str
    output: str
    tokenizer: str | None = None
    chat_template: str | None = None
    max_samples: int = 0
    eval_samples: int = 0
    seed: int = 0
    max_skipped_fraction: float | None = None
    iteration: int = 0
    backend: str = "transformers"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 64
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    shard_index: int = 0
    num_shards: int = 1


@dataclass
class ShardResult:
    uri: str
    records: list[dict[str, Any]]
    stats: dict[str, Any]
    reused: bool = False  # already complete with the same inputs: nothing was generated


def _inputs(opts: GenerateOptions) -> dict[str, Any]:
    """The manifest `meta` entries that determine a shard's content (generate_shard writes them)."""
    return {
        "iteration": opts.iteration,
        "shard_index": opts.shard_index,
        "num_shards": opts.num_shards,
        "dataset": opts.dataset,
        "selection": {
            "seed": opts.seed,
            "max_samples": opts.max_samples,
            "eval_samples": opts.eval_samples,
        },
        "model": opts.model,
        "tokenizer": opts.tokenizer or opts.model,
        "chat_template": opts.chat_template,
        "backend": opts.backend,
        "dtype": opts.dtype,
        "sampling": opts.sampling.to_dict(),
    }


def complete_shard(opts: GenerateOptions, uri: str) -> manifest.Manifest | None:
    """The manifest of shard `uri` when it is complete, intact and made from `opts`' inputs."""
    try:
        found = manifest.require_complete(uri, verify=True)
    except (OSError, ValueError) as exc:  # missing, incomplete, malformed or a checksum mismatch
        log.debug("shard %s is not reusable: %s", uri, exc)
        return None
    changed = sorted(k for k, v in _inputs(opts).items() if found.meta.get(k) != v)
    if changed:
        log.info(
            "shard %s exists but was made with other %s: generating it again",
            uri,
            ", ".join(changed),
        )
        return None
    return found


def _stats(completions: list[Completion], elapsed: float, skipped_too_long: int) -> dict[str, Any]:
    tokens = sum(len(c.token_ids) for c in completions)
    n = len(completions)
    return {
        "prompts": n,
        "generated_tokens": tokens,
        "seconds": round(elapsed, 4),
        "prompts_per_s": n / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "mean_response_tokens": tokens / n if n else 0.0,
        "truncation_rate": sum(c.finish_reason == "length" for c in completions) / n if n else 0.0,
        "skipped_too_long": skipped_too_long,
    }


def _write_shard(records: list[dict[str, Any]], uri: str, meta: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="spin-generate-") as tmp:
        local = Path(tmp) / uri.rstrip("/").rsplit("/", 1)[-1]
        with local.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        manifest.write_file_artifact(local, uri, SHARD_KIND, meta)


def generate_shard(opts: GenerateOptions, backend: Backend | None = None) -> ShardResult:
    """Generate and publish shard ``opts.shard_index`` of ``opts.num_shards``.

    ``backend``: an already loaded backend of ``opts.model`` to reuse (tests, benchmarks); by
    default one is built from ``opts`` and closed at the end.
    """
    shard_bounds(0, opts.shard_index, opts.num_shards)  # validate before any I/O
    if opts.iteration < 0:
        raise UsageError(f"--iteration must be >= 0, got {opts.iteration}")
    uri = storage.join(opts.output, layout.shard_name(opts.shard_index, opts.num_shards))
    done = complete_shard(opts, uri)
    if done is not None:  # a retry of the step: this shard finished in an earlier attempt
        log.info("shard %s is already complete with these inputs: not generated again", uri)
        return ShardResult(
            uri=uri, records=[], stats=dict(done.meta.get("stats") or {}), reused=True
        )
    storage.delete_prefix(manifest.file_manifest_uri(uri))  # incomplete until rewritten

    loaded = data.load_examples(opts.dataset, opts.max_skipped_fraction)
    split = data.select(loaded.examples, opts.seed, opts.max_samples, opts.eval_samples)
    selected = [(e, "eval") for e in split.eval] + [(e, "train") for e in split.train]
    start, end = shard_bounds(len(selected), opts.shard_index, opts.num_shards)
    mine = selected[start:end]
    log.info(
        "shard %d/%d: prompts %d..%d of %d (%d held-out, %d train selected)",
        opts.shard_index,
        opts.num_shards,
        start,
        end,
        len(selected),
        len(split.eval),
        len(split.train),
    )

    from spin_runtime import models

    tokenizer = models.load_tokenizer(opts.model, opts.tokenizer, opts.chat_template)
    owned = backend is None
    if backend is None:
        backend = make_backend(
            opts.backend,
            models.resolve(opts.model),
            tokenizer,
            dtype=opts.dtype,
            batch_size=opts.batch_size,
            tensor_parallel_size=opts.tensor_parallel_size,
            seed=opts.sampling.seed,
        )
    try:
        context = backend.context_length
        todo: list[tuple[data.Example, str]] = []
        prompts: list[list[int]] = []
        budgets: list[int] = []
        too_long: list[int] = []
        for example, which in mine:
            ids = formatting.prompt_ids(tokenizer, example.system, example.prompt)
            budget = min(opts.sampling.max_new_tokens, context - len(ids))
            if budget < 1:
                too_long.append(example.id)
                continue
            todo.append((example, which))
            prompts.append(ids)
            budgets.append(budget)
        if too_long:
            log.warning(
                "skipped %d prompts longer than the model context (%d tokens): ids %s",
                len(too_long),
                context,
                too_long[:20],
            )
        began = time.perf_counter()
        report = _progress_reporter(opts.shard_index, began)
        report(0, len(prompts))
        if hasattr(backend, "on_batch"):  # transformers: after every batch; vLLM: as requests end
            backend.on_batch = report
        try:
            completions = backend.generate(prompts, opts.sampling, budgets)
        finally:
            if hasattr(backend, "on_batch"):  # a caller's backend outlives this shard
                backend.on_batch = None
        report(len(prompts), len(prompts))
        elapsed = time.perf_counter() - began
    finally:
        if owned:
            backend.close()

    records = [
        {
            "id": example.id,
            "split": which,
            "system": example.system,
            "prompt": example.prompt,
            "real": example.response,
            "generated": completion.text,
            # what training scores: the sampled ids, never a re-tokenization of the text
            "generated_token_ids": completion.sampled_ids,
            "finish_reason": completion.finish_reason,
            "num_generated_tokens": len(completion.token_ids),
            "iteration": opts.iteration,
        }
        for (example, which), completion in zip(todo, completions, strict=True)
    ]
    stats = _stats(completions, elapsed, len(too_long))
    meta = {
        **_inputs(opts),  # what complete_shard compares before reusing the shard
        "backend": backend.name,  # the one loaded (a backend given by a test names its own)
        "records": len(records),
        "train_records": sum(r["split"] == "train" for r in records),
        "eval_records": sum(r["split"] == "eval" for r in records),
        "skipped_too_long": len(too_long),
        "dataset_rows": loaded.total_rows,
        "dataset_skipped": dict(loaded.skipped),
        "stats": stats,
        "host": os.uname().nodename,
    }
    _write_shard(records, uri, meta)
    log.info(
        "shard %s: %d records, %.1f prompts/s, %.1f generated tokens/s, mean response %.1f "
        "tokens, truncation rate %.3f, %d skipped as too long",
        uri,
        len(records),
        stats["prompts_per_s"],
        stats["tokens_per_s"],
        stats["mean_response_tokens"],
        stats["truncation_rate"],
        len(too_long),
    )
    return ShardResult(uri=uri, records=records, stats=stats)


def _progress_reporter(shard: int, began: float) -> Callable[[int, int], None]:
    """Progress by batch as JSON lines on stderr (what `spinctl run` shows, and what a pod's
    log says on a cluster): ``{"event": "generate", "shard": i, "done": d, "total": n}``.
    Repeats of the same count (the final call after the last batch) are dropped."""
    last: list[int] = [-1]

    def report(done: int, total: int) -> None:
        if done == last[0]:
            return
        last[0] = done
        elapsed = time.perf_counter() - began
        record = {
            "event": "generate",
            "shard": shard,
            "done": done,
            "total": total,
            "seconds": round(elapsed, 1),
        }
        print(json.dumps(record), file=sys.stderr, flush=True)

    return report
