"""``train``: one SPIN iteration, θt -> θt+1 (flags: docs/runtime.md).

Run it under torchrun for several processes or nodes; a plain ``python -m spin_runtime train``
is a world of one. Importing this module stays light (no torch): the dispatcher builds every
subcommand's parser for ``--help``.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "train",
        help="train θt+1 from θt on (real, generated) pairs",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="θt: policy init and reference (HF checkpoint URI)"
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer URI (default: the model's)")
    p.add_argument("--chat-template", default=None, help="jinja chat template URI override")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="generated dir URI, repeatable: current iteration first, then previous ones",
    )
    p.add_argument("--output", required=True, help="θt+1 checkpoint URI (R/iter-t/model)")
    p.add_argument(
        "--work-dir", required=True, help="epoch checkpoints and metrics (R/iter-t/train)"
    )
    p.add_argument("--iteration", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--learning-rate", type=float, default=5e-7)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=64, help="pairs per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=1, help="pairs per forward pass")
    p.add_argument("--max-length", type=int, default=1024, help="prompt + answer tokens")
    p.add_argument(
        "--max-prompt-length", type=int, default=512, help="longer prompts are skipped, counted"
    )
    p.add_argument("--optimizer", choices=["rmsprop", "adamw"], default="rmsprop")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr-scheduler", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 on GPU, fp32 on CPU (fp32 master weights either way)",
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--strategy",
        choices=["auto", "ddp", "fsdp"],
        default="auto",
        help="auto: DDP when a replica fits in half a device, else FSDP2",
    )
    p.add_argument(
        "--prompt-sharing",
        choices=["auto", "on", "off"],
        default="auto",
        help="score each pair as one row (prompt computed once) instead of two: auto uses it "
        "only when checked exact for this model on the run's own pairs; on refuses (exit 2) "
        "when that check fails",
    )
    p.add_argument(
        "--no-prompt-sharing",
        dest="prompt_sharing",
        action="store_const",
        const="off",
        help="same as --prompt-sharing off (kept for older callers)",
    )
    p.add_argument(
        "--truncated-answers",
        choices=["keep", "drop"],
        default="keep",
        help="generated answers cut by their token budget (finish_reason length): train on "
        "them as sampled, without an EOS, or drop their pairs",
    )
    p.add_argument(
        "--drop-identical-pairs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop pairs whose generated answer is token for token the real one (they carry "
        "no gradient); counted either way",
    )
    p.add_argument(
        "--objective",
        choices=["spin", "sft"],
        default="spin",
        help="sft: the control arm, plain cross-entropy on the real answers of the same pairs "
        "for the same optimizer steps (no reference pass; --beta is ignored)",
    )
    p.add_argument(
        "--peft",
        choices=["none", "lora"],
        default="none",
        help="lora: train a LoRA adapter on θt (peft) and publish θt+1 merged, with the adapter "
        "in OUTPUT/adapter; none: full fine-tuning",
    )
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32, help="scaling is alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="on the adapter's input")
    p.add_argument(
        "--lora-target-modules",
        default="all-linear",
        help="comma-separated module names (e.g. q_proj,v_proj), or all-linear (every linear "
        "layer but the output head)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from spin_runtime.train.loop import TrainConfig, TrainingError
    from spin_runtime.train.loop import run as train
    from spin_runtime.train.lora import LoraSettings

    adapter = None
    if args.peft == "lora":
        adapter = LoraSettings(
            rank=args.lora_rank,
            alpha=args.lora_alpha,
            dropout=args.lora_dropout,
            target_modules=[m.strip() for m in args.lora_target_modules.split(",")],
        )

    cfg = TrainConfig(
        model=args.model,
        data=list(args.data),
        output=args.output,
        work_dir=args.work_dir,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        iteration=args.iteration,
        seed=args.seed,
        beta=args.beta,
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        global_batch_size=args.global_batch_size,
        micro_batch_size=args.micro_batch_size,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        optimizer=args.optimizer,
        weight_decay=args.weight_decay,
        lr_scheduler=args.lr_scheduler,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        precision=args.precision,
        gradient_checkpointing=args.gradient_checkpointing,
        strategy=args.strategy,
        prompt_sharing=args.prompt_sharing,
        lora=adapter,
        truncated_answers=args.truncated_answers,
        drop_identical_pairs=args.drop_identical_pairs,
        objective=args.objective,
    )
    try:
        train(cfg)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
