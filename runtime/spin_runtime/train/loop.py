"""One SPIN iteration, top to bottom: θt + pairs -> θt+1.

1. If ``--output`` already holds a complete checkpoint, the step is done: return.
2. Load the tokenizer and θt (fp32 master weights), the pairs of every ``--data`` directory.
3. Wrap for the strategy (none / DDP / FSDP2); build optimizer and schedule.
4. Resume from the last complete epoch checkpoint, or score every pair with θt: these are the
   reference log-probs. θt is also the initial policy, so one model is ever in memory and the
   reference costs one forward pass per pair for the whole iteration (the official code keeps a
   frozen copy and runs it every step).
5. Epochs of optimizer steps over a seed-determined order; each step is ``global_batch`` pairs
   split over ranks and micro-batches. Per-pair losses are summed and divided by the number of
   pairs in the step, so the update is the same for any world size and micro-batch size.
6. At each epoch end: held-out metrics, an epoch checkpoint. At the end: θt+1 to ``--output``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from spin_common import manifest
from spin_common.errors import UsageError
from spin_common.train_config import TrainConfig
from spin_runtime.train import batches, checkpoint, control, distributed, exactness, lora
from spin_runtime.train.batches import PairSet
from spin_runtime.train.distributed import Context
from spin_runtime.train.loss import spin_loss
from spin_runtime.train.metrics import MetricsLog, summarize
from spin_runtime.train.policy import SequenceLogProbs, disable_dropout
from spin_runtime.train.step import Runner, TrainingError, apply_update, clip_grad

log = logging.getLogger(__name__)

# TrainConfig (every setting, with its default and meaning) lives in the light config module,
# TrainingError in step.py (the update raises it): both are part of what this module offers.
__all__ = ["TrainConfig", "TrainingError", "run"]


# ---------------------------------------------------------------------------------------------
# optimizer and schedule


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """RMSprop (the paper's) or AdamW (fused kernel, as transformers' default); biases and norm
    weights (1-D) are never decayed."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.learning_rate, alpha=0.99, eps=1e-8)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8, fused=True)


def lr_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based), as in
    transformers' schedules: linear warmup from 0, then linear/cosine decay to 0 or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0

    return factor


# ---------------------------------------------------------------------------------------------
# scoring


# ---------------------------------------------------------------------------------------------
# the iteration


def _load(cfg: TrainConfig, ctx: Context) -> tuple[Any, Any, Any, PairSet]:
    """Tokenizer, θt (fp32, CPU), θt's own config (θt+1 is saved with it), and the pairs."""
    from spin_common import records
    from spin_runtime import models

    tokenizer = models.load_tokenizer(cfg.model, cfg.tokenizer, cfg.chat_template)
    record_sets = []
    for uri in cfg.data:
        try:
            record_sets.append(records.read_generated(uri))
        except UsageError:
            raise
        except (FileNotFoundError, ValueError) as exc:
            raise UsageError(f"--data {uri}: {exc}") from exc
    try:
        pairs = batches.build_pairs(
            record_sets,
            cfg.data,
            tokenizer,
            cfg.max_length,
            cfg.max_prompt_length,
            truncated_answers=cfg.truncated_answers,
            drop_identical=cfg.drop_identical_pairs,
        )
    except batches.DataError as exc:
        raise UsageError(str(exc)) from exc
    # read before loading: the fp32 master copy rewrites the loaded model's dtype and use_cache
    config = checkpoint.source_config(cfg.model)
    model = models.load_model(cfg.model, "float32", "cpu", tokenizer=tokenizer)
    return tokenizer, model, config, pairs


def _check_tokens(pairs: PairSet, vocab: int) -> None:
    """Every token id must index an embedding row (a tokenizer from another model fails here or
    in models.check_vocab, never as an index error deep in a forward pass)."""
    top = max(int(max(p.prompt.max(), p.real.max(), p.gen.max())) for p in pairs.all)
    if top >= vocab:
        raise UsageError(
            f"token id {top} >= the model's {vocab} embedding rows: --tokenizer does not belong "
            "to --model"
        )


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train one iteration; returns the final metrics (empty when the output already existed)."""
    cfg.validate()
    if manifest.is_complete(cfg.output):
        log.info("%s already holds a complete checkpoint: nothing to do", cfg.output)
        return {}
    ctx = distributed.init()
    try:
        return _run(cfg, ctx)
    finally:
        distributed.shutdown(ctx)


@dataclass
class Session:
    """The wrapped policy, its optimizer and schedule: what the steps of an iteration share."""

    runner: Runner
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    num_params: int
    bf16: bool
    layout: exactness.Layout
    trainable_params: int = 0


def build_session(
    ctx: Context, cfg: TrainConfig, hf_model: Any, pad_id: int, pairs: PairSet
) -> Session:
    """Prepare θt (fp32, dropout off) for training under the chosen strategy."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and ctx.device.type == "cuda")
    disable_dropout(hf_model)
    if cfg.lora is not None:
        # after disable_dropout: the adapter keeps its own dropout (harmless at B = 0, see lora)
        hf_model = lora.apply(hf_model, cfg.lora)
    if cfg.gradient_checkpointing:
        # non-reentrant checkpointing works under DDP and FSDP2; transformers 5 renamed the call
        kwargs = {"use_reentrant": False}
        if hasattr(hf_model, "activation_checkpointing_enable"):
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hf_model.config.use_cache = False
    num_params = sum(p.numel() for p in hf_model.parameters())
    trainable = lora.trainable_parameters(hf_model)
    strategy = distributed.choose_strategy(ctx, cfg.strategy, num_params, cfg.optimizer)
    scorer = SequenceLogProbs(hf_model)
    if strategy != "fsdp":
        scorer.to(ctx.device)
    # fp32 and unwrapped (under FSDP2: still on the host); rank 0's decision binds every rank
    layout = exactness.choose(scorer, pairs.all, pad_id, cfg.prompt_sharing)
    layout = distributed.broadcast_object(ctx, layout)
    scorer.fused = layout.fused_head
    module: nn.Module = distributed.wrap(ctx, scorer, strategy, bf16)
    module.train()
    optimizer = build_optimizer(module, cfg)
    steps_per_epoch = batches.steps_per_epoch(len(pairs.train), cfg.global_batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg.lr_scheduler, warmup, total_steps)
    )
    autocast = bf16 and strategy != "fsdp"  # FSDP2 casts through its MixedPrecisionPolicy
    shared = layout.prompt_sharing
    runner = Runner(ctx, module, strategy, autocast, pad_id, pairs.train[0], shared)
    return Session(
        runner, optimizer, scheduler, steps_per_epoch, num_params, bf16, layout, trainable
    )


def _run(cfg: TrainConfig, ctx: Context) -> dict[str, Any]:
    world_share = cfg.micro_batch_size * ctx.world
    if cfg.global_batch_size % world_share:
        raise UsageError(
            f"--global-batch-size {cfg.global_batch_size} is not a multiple of "
            f"--micro-batch-size {cfg.micro_batch_size} x {ctx.world} processes"
        )
    torch.manual_seed(cfg.seed)
    tokenizer, hf_model, source_config, pairs = _load(cfg, ctx)
    _check_tokens(pairs, hf_model.get_input_embeddings().num_embeddings)
    drop = checkpoint.tied_output_names(hf_model)
    session = build_session(ctx, cfg, hf_model, int(tokenizer.pad_token_id or 0), pairs)
    runner, optimizer, scheduler = session.runner, session.optimizer, session.scheduler
    module, steps_per_epoch = runner.module, session.steps_per_epoch
    fingerprint = pairs.fingerprint()
    trainer_info = {"resume_key": cfg.resume_key(), "data_fingerprint": fingerprint}
    if ctx.main:
        log.info(
            "iteration %d: %d train pairs (%s per --data), %d held out, %d skipped long prompts, "
            "%d cut answers; %d params (%d trained); strategy %s on %d process(es), %s, prompt sharing %s; "
            "%d steps of %d pairs",
            cfg.iteration,
            len(pairs.train),
            pairs.per_source,
            len(pairs.eval),
            pairs.skipped_long_prompts,
            pairs.truncated_answers,
            session.num_params,
            session.trainable_params,
            runner.strategy,
            ctx.world,
            "bf16" if session.bf16 else "fp32",
            "on" if runner.shared_prompt else "off",
            steps_per_epoch * cfg.epochs,
            cfg.global_batch_size,
        )

    start_epoch, step = 1, 0
    resumed_epoch = checkpoint.latest_epoch(cfg.work_dir) if ctx.main else None
    resumed_epoch = distributed.broadcast_object(ctx, resumed_epoch)
    if resumed_epoch is not None:

        def same_run(trainer: dict[str, Any]) -> None:
            if trainer.get("resume_key") != cfg.resume_key() or (
                trainer.get("data_fingerprint") != fingerprint
            ):
                raise UsageError(
                    f"--work-dir {cfg.work_dir} holds epoch checkpoints of other settings or "
                    "data; use an empty --work-dir"
                )

        state = checkpoint.load_epoch(
            ctx, cfg.work_dir, resumed_epoch, module, optimizer, check=same_run
        )
        scheduler.load_state_dict(state.scheduler)
        reference = state.reference.to(ctx.device)
        start_epoch, step = state.epoch + 1, state.step
        log.info("resumed from %s", checkpoint.epoch_uri(cfg.work_dir, state.epoch))
    elif cfg.objective == "sft":  # plain cross-entropy needs no reference
        reference = torch.zeros(len(pairs.all), 2, dtype=torch.float32, device=ctx.device)
    else:
        t0 = time.perf_counter()
        reference = runner.score(pairs.all, 2 * cfg.micro_batch_size)
        if ctx.main:
            log.info(
                "reference log-probs of %d pairs in %.1fs", len(pairs.all), time.perf_counter() - t0
            )
    metrics = MetricsLog(ctx, cfg.work_dir, keep_until_step=step)
    if resumed_epoch is None and ctx.main:
        stats = {**_data_stats(pairs), **session.layout.stats(), **_totals_or_nothing(cfg.data[0])}
        metrics.log({"event": "data", "step": 0, **stats})

    final: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        order = batches.epoch_order(len(pairs.train), cfg.seed, epoch)
        for s in range(steps_per_epoch):
            step += 1
            if cfg.objective == "sft":
                values = control.sft_step(runner, cfg, pairs, order, s, optimizer, scheduler)
            else:
                values = train_step(runner, cfg, pairs, reference, order, s, optimizer, scheduler)
            record: dict[str, Any] = {
                "event": "train",
                "step": step,
                "epoch": epoch - 1 + (s + 1) / steps_per_epoch,
                **values,
            }
            metrics.log(record)
            final.update({k: v for k, v in record.items() if k != "event"})
        if pairs.eval:
            policy = runner.score(pairs.eval, 2 * cfg.micro_batch_size)
            if cfg.objective == "sft":
                held_out = control.held_out(policy, pairs.eval)
            else:
                held_out = summarize(policy, reference[len(pairs.train) :], cfg.beta, "eval_")
            metrics.log({"event": "eval", "step": step, "epoch": epoch, **held_out})
            final.update(held_out)
        checkpoint.save_epoch(
            ctx, cfg.work_dir, epoch, module, optimizer, scheduler, step, reference, trainer_info
        )
        metrics.publish()

    meta = {
        "iteration": cfg.iteration,
        "objective": cfg.objective,
        "base_model": cfg.model,
        "data": cfg.data,
        "steps": step,
        "train_pairs": len(pairs.train),
        "eval_pairs": len(pairs.eval),
        "data_fingerprint": fingerprint,
        "metrics": {k: v for k, v in final.items() if isinstance(v, int | float)},
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
    }
    if cfg.lora is not None:
        meta["adapter"] = {**cfg.lora.as_dict(), "path": lora.ADAPTER_DIR}
    checkpoint.save_model(
        ctx, module, hf_model, tokenizer, cfg.output, source_config, drop, meta, cfg.lora
    )
    if cfg.lora is not None:
        _track_adapter(metrics, cfg, session.trainable_params)
    metrics.publish()
    return final


def _track_adapter(metrics: MetricsLog, cfg: TrainConfig, trainable: int) -> None:
    """The adapter's settings and where it is stored, on the iteration's MLflow run."""
    from spin_common import storage

    if metrics.tracker is None or cfg.lora is None:
        return
    with contextlib.suppress(Exception):  # tracking never fails training
        metrics.tracker.log_params({f"peft.{k}": v for k, v in cfg.lora.as_dict().items()})
        metrics.tracker.set_tags({"spin.adapter_uri": storage.join(cfg.output, lora.ADAPTER_DIR)})
        metrics.tracker.log_metrics({"trainable_params": float(trainable)}, step=0)


def generation_totals(generated_uri: str) -> dict[str, float]:
    """This iteration's generation over all its shards (each shard logs only its own numbers):
    `generate/total_prompts`, `.../total_generated_tokens`, `.../truncation_rate`, and the
    slowest shard's seconds. Empty when the manifests carry no stats."""
    from spin_common import manifest

    stats = [
        m.meta.get("stats") or {}
        for m in {id(m): m for m in manifest.shard_manifests(generated_uri).values()}.values()
    ]
    prompts = sum(int(s.get("prompts", 0)) for s in stats)
    if not prompts:
        return {}
    truncated = sum(float(s.get("truncation_rate", 0.0)) * int(s.get("prompts", 0)) for s in stats)
    return {
        "generate/total_prompts": prompts,
        "generate/total_generated_tokens": sum(int(s.get("generated_tokens", 0)) for s in stats),
        "generate/truncation_rate": truncated / prompts,
        "generate/slowest_shard_seconds": max(float(s.get("seconds", 0.0)) for s in stats),
        "generate/shards": len(stats),
    }


def _totals_or_nothing(generated_uri: str) -> dict[str, float]:
    try:
        return generation_totals(generated_uri)
    except Exception as exc:  # reporting never fails training
        log.warning("generation totals of %s not computed: %s", generated_uri, exc)
        return {}


def _data_stats(pairs: PairSet) -> dict[str, Any]:
    return {
        "train_pairs": len(pairs.train),
        "eval_pairs": len(pairs.eval),
        "skipped_long_prompts": pairs.skipped_long_prompts,
        "truncated_answers": pairs.truncated_answers,
        "truncated_generations": pairs.truncated_generations,
        "identical_pairs": pairs.identical_pairs,
        "dropped_pairs": pairs.dropped_pairs,
        "retokenized_generations": pairs.retokenized_generations,
    }


def train_step(
    runner: Runner,
    cfg: TrainConfig,
    pairs: PairSet,
    reference: torch.Tensor,
    order: list[int],
    s: int,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, float]:
    """One optimizer step over ``global_batch_size`` pairs; returns its metrics (all ranks)."""
    ctx = runner.ctx
    t0 = time.perf_counter()
    slots = batches.step_slots(order, s, cfg.global_batch_size)
    n_pairs = sum(1 for i in slots if i >= 0)
    micro = batches.rank_micro_batches(slots, ctx.rank, ctx.world, cfg.micro_batch_size)
    # loss_sum, reward_real_sum, reward_gen_sum, correct, tokens
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)
    scale = ctx.world / n_pairs  # DDP/FSDP average gradients over ranks
    for k, chunk in enumerate(micro):
        chosen = [pairs.train[i] if i >= 0 else None for i in chunk]
        with runner.no_sync(k == len(micro) - 1):
            out, batch = runner.logps(chosen)
            b = len(chunk)
            ref = reference[batch.index]
            stats = spin_loss(out[:b], out[b:], ref[:, 0], ref[:, 1], cfg.beta)
            ((stats.losses * batch.weight).sum() * scale).backward()
        w = batch.weight.double()
        sums += torch.stack(
            [
                (stats.losses.detach().double() * w).sum(),
                (stats.rewards_real.double() * w).sum(),
                (stats.rewards_gen.double() * w).sum(),
                (stats.correct.double() * w).sum(),
                torch.tensor(float(batch.num_tokens), dtype=torch.float64, device=ctx.device),
            ]
        )
    distributed.all_reduce_sum(ctx, sums)
    grad_norm = clip_grad(runner.module, cfg.max_grad_norm)
    loss, rr, rg, correct, tokens = (
        sums / torch.tensor([n_pairs] * 4 + [1], device=ctx.device)
    ).tolist()
    lr = apply_update(optimizer, scheduler, loss, grad_norm, "--learning-rate or --beta")
    elapsed = time.perf_counter() - t0
    return {
        "loss": loss,
        "rewards_real": rr,
        "rewards_generated": rg,
        "margin": rr - rg,
        "accuracy": correct,
        "learning_rate": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed,
    }
