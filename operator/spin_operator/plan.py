"""`spinctl plan FILE` and `spinctl render FILE`: what a SPINRun will create, before it runs.

Both use the operator's own code (`steps.plan_step`, `render.render`), so what they print is
what the operator would create — never a second description of it that could drift.

`plan` lists every Job of every iteration with its pods, GPUs, optimizer steps and tokens to
generate, and estimates GPU-hours from throughputs given as flags. The default throughputs are
assumptions for a 7B model on H100-class GPUs, not measurements of this project (none has run
on GPUs): pass your own from a short run's MLflow metrics for a real estimate.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from spin_operator.api import types as api
from spin_operator.settings import Settings, resolve_spec
from spin_operator.steps import RunRef, StepPlan, jobs_of_iteration, plan_step

# Assumed throughputs (tokens per GPU-second), overridable by flags: vLLM sampling, training
# (forward + backward over prompt + answer tokens), greedy evaluation with transformers.
GEN_RATE, TRAIN_RATE, EVAL_RATE = 2000.0, 2000.0, 200.0
# A uid the operator would take from the API server; render prints it in ownerReferences.
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="YAML file with one SPINRun")
    parser.add_argument(
        "--storage-uri",
        default=None,
        help="storage prefix when the spec has none (the operator's SPIN_STORAGE_URI)",
    )
    parser.add_argument(
        "--runtime-image",
        default=None,
        help="runtime image when the spec has none (the operator's SPIN_RUNTIME_IMAGE)",
    )
    if parser.prog.endswith(" render"):
        parser.add_argument(
            "--iteration", type=int, default=0, help="iteration t to render (0-based; default 0)"
        )
        parser.add_argument(
            "--attempt", type=int, default=0, help="attempt (0 = first Job; k = retry -rk)"
        )
        parser.add_argument(
            "--uid", default=PLACEHOLDER_UID, help="SPINRun uid for ownerReferences"
        )
        return
    parser.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="training prompts, when the dataset cannot be read here and maxSamples is 0",
    )
    parser.add_argument(
        "--gpu-hour-price",
        type=float,
        default=None,
        help="price of one GPU-hour, for a cost estimate",
    )
    parser.add_argument(
        "--gen-tokens-per-gpu-second",
        type=float,
        default=GEN_RATE,
        help=f"generation throughput (assumed: {GEN_RATE:g})",
    )
    parser.add_argument(
        "--train-tokens-per-gpu-second",
        type=float,
        default=TRAIN_RATE,
        help=f"training throughput (assumed: {TRAIN_RATE:g})",
    )
    parser.add_argument(
        "--eval-tokens-per-gpu-second",
        type=float,
        default=EVAL_RATE,
        help=f"evaluation throughput (assumed: {EVAL_RATE:g})",
    )


class PlanError(ValueError):
    """Bad input to plan/render; the message names the file, field or flag."""


def load(
    path: str, storage_uri: str | None, runtime_image: str | None
) -> tuple[RunRef, api.SPINRunSpec, Settings]:
    """The one SPINRun of `path`, validated and resolved as the operator resolves it."""
    from spin_operator.validation import InvalidSpec, parse, validate_file
    from spin_operator.yamlio import YamlSyntaxError, load_file

    problems = validate_file(path)
    if problems:
        raise PlanError("\n".join(f"{path}: {p}" for p in problems))
    try:
        docs = load_file(path)
    except (OSError, YamlSyntaxError) as exc:  # validate_file reported these already
        raise PlanError(f"{path}: {exc}") from None
    if len(docs) != 1:
        raise PlanError(f"{path}: expected one SPINRun document, found {len(docs)}")
    env = Settings.from_env()
    settings = Settings(
        runtime_image=runtime_image or env.runtime_image,
        storage_uri=storage_uri or env.storage_uri,
        mlflow_uri=env.mlflow_uri,
        s3_endpoint=env.s3_endpoint,
        s3_region=env.s3_region,
        s3_secret=env.s3_secret,
        mlflow_secret=env.mlflow_secret,
    )
    try:
        spec = resolve_spec(parse(docs[0]), settings)
    except InvalidSpec as exc:
        hint = (
            " (or pass --storage-uri)"
            if any(p.path == "spec.storage.uri" for p in exc.problems)
            else ""
        )
        raise PlanError("\n".join(f"{path}: {p}{hint}" for p in exc.problems)) from None
    meta = docs[0].get("metadata") or {}
    return (
        RunRef(str(meta.get("namespace") or "default"), str(meta["name"]), PLACEHOLDER_UID),
        spec,
        settings,
    )


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Row:
    plan: StepPlan
    gpus: int
    optimizer_steps: int | None
    tokens: int  # generated (generate, evaluate) or processed (train) tokens, upper bound
    gpu_hours: float


def train_prompts(spec: api.SPINRunSpec, given: int | None) -> tuple[int, str]:
    """Training prompts per iteration and where the number comes from."""
    if given is not None:
        return given, "--prompts"
    try:
        from spin_common.data import load_examples

        usable = len(load_examples(spec.dataset.uri).examples) - spec.dataset.eval_samples
    except Exception as exc:  # unreadable here (S3 without credentials, a missing file)
        if spec.dataset.max_samples:
            return (
                spec.dataset.max_samples,
                "dataset.maxSamples (dataset not readable here: an upper bound)",
            )
        raise PlanError(
            f"spec.dataset.uri: cannot count the prompts here ({exc}); set dataset.maxSamples or pass --prompts"
        ) from None
    if spec.dataset.max_samples:
        return min(usable, spec.dataset.max_samples), "dataset (maxSamples applied)"
    return usable, "dataset"


def plan_rows(
    spec: api.SPINRunSpec,
    settings: Settings,
    run: RunRef,
    prompts: int,
    rates: tuple[float, float, float],
) -> list[Row]:
    gen_rate, train_rate, eval_rate = rates
    rows = []
    g, tr, ev = spec.generation, spec.training, spec.evaluation
    for t in range(spec.iterations):
        for kind in jobs_of_iteration(spec, t):
            plan = plan_step(spec, settings, run, t, kind)
            gpus = plan.pods * plan.gpus_per_pod
            steps: int | None = None
            if kind == "check":  # reads the data and θ0's files on a CPU: no tokens, no GPU
                rows.append(Row(plan, gpus, None, 0, 0.0))
                continue
            if kind == "generate":
                tokens = prompts * g.max_new_tokens
                gpu_s = tokens / gen_rate
            elif kind in ("train", "control-train"):  # the control: same pairs, same steps
                pairs = prompts * (1 + min(t, tr.mix_previous_iterations))
                steps = math.ceil(pairs / tr.global_batch_size) * tr.epochs
                # Two sequences (real, generated) of up to maxLength tokens per pair and epoch,
                # plus the reference log-probs: one forward pass (~1/3 of forward + backward).
                tokens = 2 * pairs * tr.max_length * tr.epochs
                gpu_s = (tokens + 2 * pairs * tr.max_length / 3) / train_rate
            else:
                spin = kind == "evaluate"  # θ0's baseline is SPIN's evaluation's, once
                models = 2 if spin and t == 0 and ev.baseline and ev.command is None else 1
                tokens = spec.dataset.eval_samples * ev.max_new_tokens * models
                gpu_s = tokens / eval_rate
            rows.append(Row(plan, gpus, steps, tokens, gpu_s / 3600 if gpus else 0.0))
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


def _plan(args: argparse.Namespace) -> int:
    run, spec, settings = load(
        args.file, args.storage_uri or "s3://plan-only/unset", args.runtime_image
    )
    rates = (
        args.gen_tokens_per_gpu_second,
        args.train_tokens_per_gpu_second,
        args.eval_tokens_per_gpu_second,
    )
    if min(rates) <= 0:
        raise PlanError("--*-tokens-per-gpu-second must be > 0")
    prompts, source = train_prompts(spec, args.prompts)
    rows = plan_rows(spec, settings, run, prompts, rates)
    table = [["ITER", "JOB", "PODS", "GPUS", "OPT STEPS", "TOKENS", "GPU-HOURS"]]
    for r in rows:
        p = r.plan
        table.append(
            [
                str(p.iteration),
                p.job_name,
                str(p.pods),
                str(r.gpus),
                "-" if r.optimizer_steps is None else str(r.optimizer_steps),
                f"{r.tokens:,}",
                f"{r.gpu_hours:.2f}",
            ]
        )
    total = sum(r.gpu_hours for r in rows)
    print(
        f"{run.namespace}/{run.name}: {spec.iterations} iteration(s) (θ0 → θ{spec.iterations}), "
        f"{len(rows)} Jobs; {prompts:,} training prompts ({source}), {spec.dataset.eval_samples} held out"
    )
    print(_table(table))
    print(
        "TOKENS: generate = prompts × generation.maxNewTokens; train = 2 × pairs × maxLength × epochs; "
        "evaluate = greedy tokens (θ0 too at iteration 0). Upper bounds: answers may stop earlier."
    )
    print(
        f"GPU-hours: {total:.2f} at assumed throughputs (tokens per GPU-second) generate {rates[0]:g}, "
        f"train {rates[1]:g}, evaluate {rates[2]:g}; set yours with --*-tokens-per-gpu-second."
    )
    if args.gpu_hour_price is not None:
        print(f"cost: {total * args.gpu_hour_price:,.2f} at {args.gpu_hour_price:g} per GPU-hour")
    return 0


# --------------------------------------------------------------------------- render


def render_iteration(
    spec: api.SPINRunSpec, settings: Settings, run: RunRef, iteration: int, attempt: int = 0
) -> list[dict[str, Any]]:
    """Every object the operator creates for `iteration` (Services before their Jobs)."""
    from spin_operator.render import render

    if not 0 <= iteration < spec.iterations:
        raise PlanError(f"--iteration {iteration}: the run has iterations 0..{spec.iterations - 1}")
    if not 0 <= attempt <= spec.failure_policy.max_retries:
        raise PlanError(
            f"--attempt {attempt}: failurePolicy.maxRetries allows 0..{spec.failure_policy.max_retries}"
        )
    return [
        obj
        for kind in jobs_of_iteration(spec, iteration)
        for obj in render(plan_step(spec, settings, run, iteration, kind, attempt), spec, run)
    ]


def _render(args: argparse.Namespace) -> int:
    run, spec, settings = load(args.file, args.storage_uri, args.runtime_image)
    run = RunRef(run.namespace, run.name, args.uid)
    objects = render_iteration(spec, settings, run, args.iteration, args.attempt)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False, allow_unicode=True))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return _plan(args) if args.command == "plan" else _render(args)
    except PlanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
