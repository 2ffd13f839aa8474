"""``python -m spin_runtime evaluate``: the built-in held-out evaluation of an iteration's model.

Two numbers per model on the held-out split (the same prompts every iteration, by the shared
selection of :mod:`spin_common.data`):

* ``exact_match``: the greedy answer equals the reference after whitespace normalisation — the
  task metric for tasks with one right answer (the tiny task, extraction, arithmetic);
* ``real_logp_per_token``: log-likelihood of the reference answers per token (summed over all
  answers' tokens including EOS, divided by their count) — SPIN's own objective pushes it up,
  and it is meaningful for open-ended data where exact match is not;
* ``score``: whichever of the two can rank models on this data (``data.score_metric``: exact
  match for short answers, log-likelihood for free text), recorded in ``score_metric``.

With ``--baseline-model`` (θ0 at iteration 0) the same is computed for it, so a run shows its
gain without a second job. Writes ``results.json`` and ``answers.jsonl`` then ``_MANIFEST.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from spin_common.errors import UsageError

log = logging.getLogger(__name__)

EVAL_KIND = "eval"


def add_parser(subparsers: Any) -> None:
    from spin_common.data import add_dataset_flags

    p = subparsers.add_parser("evaluate", help="held-out exact match and reference log-likelihood")
    p.add_argument("--model", required=True, help="θt+1 checkpoint URI")
    p.add_argument("--baseline-model", default=None, help="also evaluate this model (e.g. θ0)")
    p.add_argument("--tokenizer", default=None, help="tokenizer URI (default: the model's)")
    p.add_argument("--chat-template", default=None, help="jinja chat template URI override")
    add_dataset_flags(p)  # --max-samples is accepted; it does not change the held-out split
    p.add_argument("--max-new-tokens", type=int, default=256, help="greedy answer budget")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    p.add_argument("--output", required=True, help="R/iter-t/eval")


def normalize(text: str) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, ends stripped."""
    return " ".join(text.split())


def reference_logprobs(
    model: Any, sequences: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> tuple[float, int]:
    """Sum of log p(response token | prefix) over all responses, and the token count.

    ``sequences`` are (prompt ids, response ids); batches are right-padded and masked, logits
    are taken in fp32.
    """
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, r) in enumerate(batch):
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            mask[row, : len(p) + len(r)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for row, (p, r) in enumerate(batch):
            total += float(token_logp[row, len(p) - 1 : len(p) + len(r) - 1].sum())
            count += len(r)
    return total, count


def evaluate_model(
    model_uri: str, args: argparse.Namespace, examples: list[Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics and per-example answers of one model on the held-out examples."""
    from spin_runtime import formatting, models
    from spin_runtime.generate.backends import SamplingConfig
    from spin_runtime.generate.transformers_backend import TransformersBackend

    tokenizer = models.load_tokenizer(model_uri, args.tokenizer, args.chat_template)
    backend = TransformersBackend(
        models.resolve(model_uri), tokenizer, dtype=args.dtype, batch_size=args.batch_size
    )
    try:
        context = backend.context_length
        kept, prompts, budgets, scored = [], [], [], []
        skipped = 0
        for example in examples:
            ids = formatting.prompt_ids(tokenizer, example.system, example.prompt)
            budget = min(args.max_new_tokens, context - len(ids))
            response = formatting.response_ids(tokenizer, example.response)
            if budget < 1 or len(ids) + len(response) > context:
                skipped += 1
                continue
            kept.append(example)
            prompts.append(ids)
            budgets.append(budget)
            scored.append((ids, response))
        if not kept:
            raise UsageError(f"--model {model_uri}: every held-out prompt exceeds its context")
        began = time.perf_counter()
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
        completions = backend.generate(prompts, greedy, budgets)
        total, count = reference_logprobs(
            backend.model, scored, backend.pad_id, max(1, args.batch_size // 2)
        )
        elapsed = time.perf_counter() - began
    finally:
        backend.close()
    answers = [
        {
            "id": e.id,
            "prompt": e.prompt,
            "reference": e.response,
            "answer": c.text,
            "exact": normalize(c.text) == normalize(e.response),
            "finish_reason": c.finish_reason,
        }
        for e, c in zip(kept, completions, strict=True)
    ]
    metrics = {
        "exact_match": sum(a["exact"] for a in answers) / len(answers),
        "real_logp_per_token": total / count,
        "num_examples": len(answers),
        "skipped_too_long": skipped,
        "truncation_rate": sum(a["finish_reason"] == "length" for a in answers) / len(answers),
        "seconds": round(elapsed, 3),
    }
    log.info("evaluate %s: %s", model_uri, json.dumps(metrics))
    return metrics, answers


def run(args: argparse.Namespace) -> int:
    from spin_common import data, manifest, storage

    if args.eval_samples < 1:
        raise UsageError("--eval-samples must be >= 1: evaluate scores the held-out split")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    storage.delete_prefix(manifest.dir_manifest_uri(args.output))  # incomplete until rewritten
    split = data.load_split(
        args.dataset, args.seed, 0, args.eval_samples, getattr(args, "max_skipped_fraction", None)
    )
    # `score` is the data's own ranking metric (what `evaluation.metric: auto` ranks by): the same
    # held-out prompts every iteration, so every iteration picks the same one.
    chosen, why = data.score_metric(split.eval)
    log.info("evaluate: score = %s (%s)", chosen, why)
    metrics, answers = evaluate_model(args.model, args, split.eval)
    metrics["score"] = metrics[chosen]
    baseline = None
    if args.baseline_model:
        baseline, base_answers = evaluate_model(args.baseline_model, args, split.eval)
        baseline["score"] = baseline[chosen]
        for answer, base in zip(answers, base_answers, strict=False):
            if answer["id"] == base["id"]:
                answer["baseline_answer"] = base["answer"]
    results = {
        "metrics": metrics,
        "baseline": baseline,
        "score_metric": {"metric": chosen, "why": why},
        "model": args.model,
        "baseline_model": args.baseline_model,
        "dataset": args.dataset,
        "selection": {"seed": args.seed, "eval_samples": args.eval_samples},
    }
    with tempfile.TemporaryDirectory(prefix="spin-eval-") as tmp:
        Path(tmp, "results.json").write_text(json.dumps(results, indent=2) + "\n")
        with Path(tmp, "answers.jsonl").open("w", encoding="utf-8") as f:
            for answer in answers:
                f.write(json.dumps(answer, ensure_ascii=False) + "\n")
        manifest.write_dir_artifact(tmp, args.output, EVAL_KIND, {"metrics": metrics})
    _log_metrics(metrics)
    _log_samples(answers)
    return 0


SAMPLES = 20  # rows of the per-iteration sample generations table
SAMPLES_TABLE = "eval_samples.json"


def _log_samples(answers: list[dict[str, Any]]) -> None:
    """The first held-out answers (θt+1's greedy answer beside the reference, and θ0's at
    iteration 0) as an MLflow table of the iteration's run, so a reviewer reads what the model
    says, not only its scores. Logged once: a retried evaluation finds it and does not append."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    rows = answers[:SAMPLES]
    columns = ["id", "prompt", "reference", "answer", "exact"]
    if any("baseline_answer" in r for r in rows):
        columns.append("baseline_answer")
    try:
        from mlflow.tracking import MlflowClient

        # the control arm's evaluation keeps its own table beside SPIN's (control/eval_samples.json)
        prefix = os.environ.get("SPIN_METRIC_PREFIX", "")
        table = f"{prefix}{SAMPLES_TABLE}"
        client = MlflowClient()
        listed = client.list_artifacts(run_id, prefix.rstrip("/") or None)
        if any(a.path == table for a in listed):
            return
        client.log_table(run_id, {c: [r.get(c) for r in rows] for c in columns}, table)
    except Exception as exc:  # tracking never fails a job
        log.warning("could not log sample answers to MLflow: %s", exc)


def _log_metrics(metrics: dict[str, Any]) -> None:
    """θt+1's metrics to the iteration's MLflow run when ``MLFLOW_RUN_ID`` is set; never fails
    the job. θ0's (``baseline`` in results.json) go to the parent run's ``heldout/*`` at step 0,
    logged by whoever reads results.json (operator or spinctl): as one-point metrics of iteration
    0's run they only added a single-bar panel per metric to the chart view."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return
    values = {f"eval/{k}": float(v) for k, v in metrics.items()}
    try:
        from spin_common import tracking

        logger = tracking.from_env_logger()
        logger.log_metrics(values)
        logger.close()
    except Exception as exc:  # tracking never fails a job
        log.warning("could not log evaluation metrics to MLflow: %s", exc)
